"""RateLimiter: per-API-key request rates and daily image quotas, one place for the whole app.

Every ingress replica asks this one deployment (a single replica), so the limits hold
across replicas. A token bucket per key (``requests_per_minute``, bursts up to ``burst``:
every API call takes a token, before the ingress reads its body) and a count of images per
key per UTC day (``images_per_day``, charged when a generation is accepted). Counters live
in memory: a restart of this replica forgets them (at worst a key gets a fresh bucket and a
fresh day).
"""

from __future__ import annotations

import math
import time

from ray import serve


class Limits:
    """The bookkeeping, plain Python (unit-tested without Ray)."""

    def __init__(self, requests_per_minute: int | None, burst: int | None, images_per_day: int | None,
                 clock=time.monotonic, wall=time.time) -> None:
        self.rate = requests_per_minute / 60.0 if requests_per_minute else None
        self.capacity = float(burst or requests_per_minute or 0)
        self.images_per_day = images_per_day
        self.clock, self.wall = clock, wall
        self._buckets: dict[str, tuple[float, float]] = {}  # owner -> (tokens, at)
        self._days: dict[tuple[str, int], int] = {}  # (owner, day) -> images

    def check(self, owner: str, images: int = 0, request: bool = True) -> dict:
        """Admit one request (unless ``request`` is false: images only) costing ``images``
        images, or say when to retry."""
        now = self.clock()
        day = int(self.wall() // 86400)
        request = request and self.rate is not None
        if request:
            tokens, at = self._buckets.get(owner, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - at) * self.rate)
            if tokens < 1.0:
                self._buckets[owner] = (tokens, now)
                return {"allowed": False, "reason": "rate_limited",
                        "retry_after": max(1, math.ceil((1.0 - tokens) / self.rate))}
        used = self._days.get((owner, day), 0)
        if self.images_per_day is not None and images and used + images > self.images_per_day:
            return {"allowed": False, "reason": "quota_exceeded",
                    "retry_after": max(1, math.ceil((day + 1) * 86400 - self.wall())),
                    "remaining": max(0, self.images_per_day - used)}
        if request:
            self._buckets[owner] = (tokens - 1.0, now)
        if images:
            self._days[(owner, day)] = used + images
            for key in [k for k in self._days if k[1] < day]:  # yesterday is gone
                del self._days[key]
        return {"allowed": True}


@serve.deployment(name="RateLimiter", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class RateLimiter:
    def __init__(self, requests_per_minute: int | None = None, burst: int | None = None,
                 images_per_day: int | None = None) -> None:
        self.limits = Limits(requests_per_minute, burst, images_per_day)

    def check(self, owner: str, images: int = 0, request: bool = True) -> dict:
        return self.limits.check(owner, images, request)

    def ready(self) -> dict:
        return {"stage": "ratelimiter"}
