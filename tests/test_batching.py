"""The one render path (service.batching) on the real pipeline: requests grouped by what a
batch must share, each group rendered once, each request's images split back out in order;
one group's failure or cancel stays in that group."""

from __future__ import annotations

import numpy as np

from pipeline.params import GenerationParams
from service.batching import GroupReport, RenderedImages, RenderRequest, render_requests
from service.errors import Canceled

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


def request(face, name: str, **params) -> RenderRequest:
    return RenderRequest(name, GenerationParams(**{**SMALL, **params}), face)


def test_compatible_requests_share_a_batch_and_get_their_own_images_back(pipe, face):
    requests = [request(face, "a", seed=1, prompt="a"), request(face, "wide", seed=5, width=96),
                request(face, "b", seed=2, num_images=2, ip_adapter_scale=0.5),
                request(face, "broken", seed=9, width=72, lora="/nowhere/lora.safetensors")]
    groups: list[GroupReport] = []
    outcomes = render_requests(pipe, requests, on_group=groups.append)
    a, wide, b, broken = outcomes
    assert [type(o) for o in (a, wide, b)] == [RenderedImages] * 3
    assert (a.id, a.seeds, a.batch_size) == ("a", [1], 3) and (b.seeds, b.batch_size) == ([2, 3], 3)
    assert (wide.width, wide.height, wide.batch_size) == (96, 64, 1)
    assert getattr(broken, "field", None) == "lora"  # its group failed, alone
    assert sorted(g.images for g in groups) == [1, 3]
    for done, params in ((a, {"seed": 1, "prompt": "a"}), (b, {"seed": 2, "num_images": 2, "ip_adapter_scale": 0.5})):
        [alone] = render_requests(pipe, [request(face, "alone", **params)])
        for batched, single in zip(done.images, alone.images):
            assert np.abs(batched.astype(int) - single.astype(int)).max() <= 1  # as if rendered alone


def test_a_stopped_group_is_canceled_and_the_others_render(pipe, face):
    requests = [request(face, "keep", seed=1), request(face, "stop", seed=2, width=96)]
    steps: list[tuple[list[int], int]] = []
    outcomes = render_requests(pipe, requests, on_step=lambda indices, step, total: steps.append((indices, step)),
                               stop=lambda indices: indices == [1])
    assert isinstance(outcomes[0], RenderedImages) and isinstance(outcomes[1], Canceled)
    assert steps == [([0], 1), ([0], 2)]  # the stopped group never made a step
