"""Step-level serving (service.continuous) on the real pipeline, without Ray: requests
submitted from their own threads join the running loop, come out as they would from the
static path, leave it when cancelled, and wait for their own group when incompatible."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pipeline.errors import InstantIDError
from pipeline.params import GenerationParams
from service.batching import RenderedImages, RenderRequest, render_requests
from service.continuous import ContinuousRenderer
from service.errors import Canceled

SMALL = {"width": 64, "height": 64, "num_inference_steps": 3}


def request(face, name: str, **params) -> RenderRequest:
    return RenderRequest(name, GenerationParams(**{**SMALL, **params}), face)


@pytest.fixture
def renderer(pipe):
    made = ContinuousRenderer(pipe, max_images=4)
    yield made
    made.close()


def settle(renderer, requests, **callbacks):
    """Submit each request from its own thread at once; their handles once all are done."""
    handles: dict[str, object] = {}
    done = {r.id: threading.Event() for r in requests}

    def submit(r):
        handles[r.id] = renderer.submit(r, on_done=lambda _: done[r.id].set(), **callbacks.get(r.id, {}))

    threads = [threading.Thread(target=submit, args=(r,)) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    for r in requests:
        assert done[r.id].wait(300), f"{r.id} never finished"
    return [handles[r.id] for r in requests]


def test_requests_joining_a_running_loop_get_the_images_the_static_path_gives(renderer, pipe, face):
    requests = [request(face, "a", seed=1, prompt="a"), request(face, "b", seed=2, num_images=2,
                                                               ip_adapter_scale=0.5, num_inference_steps=5),
                request(face, "wide", seed=5, width=96, scheduler="dpmpp_2m_karras")]
    handles = settle(renderer, requests)
    outcomes = [renderer.outcome(r, h) for r, h in zip(requests, handles)]
    assert all(isinstance(o, RenderedImages) for o in outcomes)
    for outcome, r in zip(outcomes, requests):
        [alone] = render_requests(pipe, [r])
        assert (outcome.id, outcome.seeds, outcome.width) == (alone.id, alone.seeds, alone.width)
        for joined, single in zip(outcome.images, alone.images):
            assert np.abs(joined.astype(int) - single.astype(int)).max() <= 1
        assert {"queue", "denoise", "render"} <= set(outcome.timings_ms)
    assert outcomes[2].batch_size == 1  # 96 wide: a group of its own
    assert renderer.status() == {"rendering": 0, "waiting": 0, "images": 0}


class Hold:
    """An on_step callback that keeps the loop after the first step until released, so a
    test acts between steps for certain, however fast or slow the machine is."""

    def __init__(self):
        self.started, self.released, self.steps = threading.Event(), threading.Event(), []

    def __call__(self, step, total):
        self.steps.append(step)
        self.started.set()
        self.released.wait(300)

    def wait(self):
        assert self.started.wait(300), "the render never made its first step"


def test_a_newcomer_shares_the_forwards_of_a_render_already_running(renderer, face):
    hold = Hold()
    long = renderer.submit(request(face, "long", seed=1, num_inference_steps=12), on_step=hold)
    hold.wait()
    short = renderer.submit(request(face, "short", seed=2))  # joins at step 2 of 12
    hold.released.set()
    assert short.result(300) and long.result(300)
    assert short.mean_batch == 2  # every one of its steps ran beside the long render
    assert 1 < long.mean_batch < 2 and hold.steps == list(range(1, 13))


def test_a_cancelled_request_leaves_at_the_next_step_and_the_others_finish(renderer, face):
    hold = Hold()
    stopped = renderer.submit(request(face, "stop", seed=1, num_inference_steps=50), on_step=hold)
    kept = renderer.submit(request(face, "keep", seed=2))
    hold.wait()
    renderer.cancel(stopped)
    hold.released.set()
    assert isinstance(renderer.outcome(request(face, "stop"), stopped), Canceled)
    assert len(kept.result(300)) == 1
    assert renderer.loop.slots() == []  # nothing of the cancelled render is left


def test_an_incompatible_request_waits_for_its_own_group(renderer, face):
    hold = Hold()
    running = renderer.submit(request(face, "running", seed=1, num_inference_steps=6), on_step=hold)
    hold.wait()
    other = renderer.submit(request(face, "other", seed=2, width=128))
    status = renderer.status()
    hold.released.set()
    assert status["rendering"] == 1 and status["waiting"] == 1  # the 128 wide one is not in a forward yet
    assert other.result(300) and running.result(300)
    assert other.mean_batch == 1 and running.mean_batch == 1  # never in one forward


def test_the_batch_cap_applies_from_the_next_step(renderer, face):
    renderer.max_images = 1
    handles = settle(renderer, [request(face, "a", seed=1), request(face, "b", seed=2)])
    assert [h.mean_batch for h in handles] == [1, 1]
    with pytest.raises(InstantIDError) as refused:
        renderer.max_images = 0
    assert refused.value.field == "max_images"


def test_bad_parameters_are_refused_at_submission_naming_the_field(renderer, face):
    with pytest.raises(InstantIDError) as refused:
        renderer.submit(request(face, "bad", lora="/nowhere/lora.safetensors"))
    assert refused.value.field == "lora"
    assert renderer.loop.slots() == []


def test_a_fault_between_forwards_fails_the_requests_in_the_loop_and_the_loop_goes_on(renderer, face,
                                                                                      monkeypatch):
    report = renderer.loop._report
    faults = [RuntimeError("a fault outside the forward")]

    def faulty(slots):
        if faults:
            raise faults.pop()
        report(slots)

    monkeypatch.setattr(renderer.loop, "_report", faulty)
    failed = renderer.submit(request(face, "failed", seed=1))
    with pytest.raises(RuntimeError, match="outside the forward"):
        failed.result(300)  # settled with the fault: its caller never hangs
    assert renderer.loop.slots() == []
    assert len(renderer.submit(request(face, "next", seed=2)).result(300)) == 1  # the thread still steps
