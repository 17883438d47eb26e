from deployments.ratelimit import Limits


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_token_bucket_allows_bursts_then_the_rate():
    clock = Clock()
    limits = Limits(requests_per_minute=60, burst=3, images_per_day=None, clock=clock, wall=clock)
    assert [limits.check("a")["allowed"] for _ in range(3)] == [True] * 3
    refused = limits.check("a")
    assert not refused["allowed"] and refused["reason"] == "rate_limited" and refused["retry_after"] == 1
    assert limits.check("b")["allowed"]  # keys do not share a bucket
    clock.now += 1.0  # one request per second refills
    assert limits.check("a")["allowed"] and not limits.check("a")["allowed"]


def test_daily_image_quota_counts_images_and_resets_the_next_day():
    clock = Clock()
    clock.now = 86400 * 100 + 50
    limits = Limits(requests_per_minute=None, burst=None, images_per_day=5, clock=clock, wall=clock)
    assert limits.check("a", 4)["allowed"]
    refused = limits.check("a", 2)
    assert refused == {"allowed": False, "reason": "quota_exceeded", "retry_after": 86400 - 50, "remaining": 1}
    assert limits.check("a", 1)["allowed"] and not limits.check("a", 1)["allowed"]
    assert limits.check("a", 0)["allowed"]  # requests that make no image are not counted
    clock.now += 86400
    assert limits.check("a", 5)["allowed"]


def test_no_limits_configured_admits_everything():
    limits = Limits(None, None, None)
    assert all(limits.check("a", 100)["allowed"] for _ in range(1000))


def test_images_are_charged_apart_from_the_request_that_was_already_admitted():
    """The ingress admits a call (one token) from its headers, and charges a generation's
    images once its body is valid: the second check takes no token."""
    clock = Clock()
    clock.now = 86400 * 100
    limits = Limits(requests_per_minute=60, burst=1, images_per_day=5, clock=clock, wall=clock)
    assert limits.check("a")["allowed"]  # the call: the one token of the burst
    assert limits.check("a", 3, request=False)["allowed"]  # its images: no token needed
    assert limits.check("a", 3, request=False)["reason"] == "quota_exceeded"
    assert limits.check("a")["reason"] == "rate_limited"  # the bucket was not touched by the image charges
