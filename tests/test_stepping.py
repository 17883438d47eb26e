"""Step-level batching (pipeline/stepping.py) on fixture weights: an image is the same
whether rendered alone, in a static batch, or joining a running batch at any step, for every
scheduler and for mixed step counts; IdentityNet sees only the rows inside their windows;
groups, the batch cap, oldest-first, cancellation and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import InvalidParameter
from pipeline.keypoints import Frame
from pipeline.pipeline import Cancelled, RenderItem, RenderOptions
from pipeline.schedulers import SCHEDULERS
from pipeline.stepping import StepLoop, group_key
from tests.conftest import pixels


def items(face, size=(64, 64), count=1, seed=10, **extra):
    kps = Frame(face.image_size, size).points(np.asarray(face.kps))
    box = (0.25 * size[0], 0.2 * size[1], 0.75 * size[0], 0.8 * size[1])
    return [RenderItem(prompt=f"portrait {seed + k}", negative_prompt="blurry", embedding=face.embedding, kps=kps,
                       seed=seed + k, ip_adapter_scale=0.5 + 0.2 * k, guidance_scale=4.0 + k, face_box=box,
                       **extra) for k in range(count)]


def options(steps=3, scheduler="euler", size=(64, 64), **extra):
    return RenderOptions(width=size[0], height=size[1], num_inference_steps=steps, scheduler=scheduler, **extra)


def max_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def alone(pipe, its, opts):
    return pipe.render(its, opts)[0]


def run_joining(pipe, first, second, after: int, cap: int = 8):
    """``first`` starts; ``second`` is added after ``after`` steps; both run to the end."""
    loop = StepLoop(pipe, max_images=cap)
    one = loop.add(*first)
    for _ in range(after):
        loop.step()
    two = loop.add(*second)
    loop.run()
    return one.result(0), two.result(0), loop


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_gives_the_image_it_gives_alone_when_joining_mid_run(pipe, face, scheduler):
    first = (items(face, seed=1, count=2), options(4, scheduler))
    second = (items(face, seed=7), options(4, scheduler))
    expected = alone(pipe, *first), alone(pipe, *second)
    got_first, got_second, loop = run_joining(pipe, first, second, after=2)
    assert all(max_diff(a, b) <= 1 for a, b in zip(expected[0], got_first))
    assert max_diff(expected[1][0], got_second[0]) <= 1
    assert list(loop.batch_sizes) == [2, 2, 3, 3, 1, 1]  # the newcomer shared two forwards


@pytest.mark.parametrize("after", [0, 1, 3, 4])
def test_mixed_step_counts_join_at_any_step(pipe, face, after):
    first = (items(face, seed=3), options(5, "dpmpp_2m_karras"))
    second = (items(face, seed=4), options(3, "ddim", control_guidance_end=0.5))
    got_first, got_second, loop = run_joining(pipe, first, second, after=after)
    assert max_diff(alone(pipe, *first)[0], got_first[0]) <= 1
    assert max_diff(alone(pipe, *second)[0], got_second[0]) <= 1
    assert loop.forwards == max(5, after + 3)


def test_a_static_batch_and_the_step_loop_agree_with_face_masks_and_cfg(pipe, face):
    its, opts = items(face, count=3, seed=20), options(3, enhance_face_region=True)
    loop = StepLoop(pipe)
    request = loop.add(its, opts)
    loop.run()
    assert all(max_diff(a, b) <= 1 for a, b in zip(pipe.render(its, opts)[0], request.result(0)))


def test_identitynet_runs_only_on_the_rows_inside_their_windows(pipe, face):
    rows = []
    handle = pipe.sdxl.controlnet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        loop = StepLoop(pipe)
        loop.add(items(face, seed=1), options(4, control_guidance_start=0.5))  # steps 2 and 3
        loop.add(items(face, seed=2), options(4, control_guidance_end=0.5))  # steps 0 and 1
        loop.run()
    finally:
        handle.remove()
    assert rows == [2, 2, 2, 2]  # one image (CFG: two rows) inside its window at each step


def test_groups_do_not_share_a_forward_and_the_oldest_group_goes_first(pipe, face):
    loop = StepLoop(pipe)
    small = loop.add(items(face, seed=1), options(2))
    wide = loop.add(items(face, size=(96, 64), seed=2), options(2, size=(96, 64)))
    late = loop.add(items(face, seed=3), options(2))
    assert group_key(small.options) != group_key(wide.options)
    loop.run()
    assert list(loop.batch_sizes) == [2, 2, 1, 1]  # the first group (with the late one), then the wide one
    assert max_diff(alone(pipe, wide.items, wide.options)[0], wide.result(0)[0]) <= 1
    assert max_diff(alone(pipe, late.items, late.options)[0], late.result(0)[0]) <= 1


def test_the_cap_holds_and_waiting_images_take_freed_places(pipe, face):
    loop = StepLoop(pipe, max_images=2)
    first = loop.add(items(face, seed=1), options(2))
    second = loop.add(items(face, seed=2), options(3))
    third = loop.add(items(face, seed=3), options(2))
    loop.run()
    assert max(loop.batch_sizes) == 2 and list(loop.batch_sizes) == [2, 2, 2, 1]
    for request in (first, second, third):
        assert max_diff(alone(pipe, request.items, request.options)[0], request.result(0)[0]) <= 1


def test_a_cancelled_request_leaves_and_the_others_finish(pipe, face):
    def stop(step, total):
        if step == 1:
            raise Cancelled("stop")

    seen = []
    loop = StepLoop(pipe)
    cancelled = loop.add(items(face, seed=1), options(3), on_step=stop)
    kept = loop.add(items(face, seed=2), options(3), on_step=lambda step, total: seen.append((step, total)))
    loop.run()
    with pytest.raises(Cancelled):
        cancelled.result(0)
    assert seen == [(1, 3), (2, 3), (3, 3)] and list(loop.batch_sizes) == [2, 1, 1]
    assert max_diff(alone(pipe, kept.items, kept.options)[0], kept.result(0)[0]) <= 1


def test_img2img_and_inpainting_images_join_text_to_image_ones(pipe, face):
    picture = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    plain = (items(face, seed=1), options(4))
    restyle = (items(face, seed=2, init_image=picture), options(4, strength=0.5))
    inpaint = (items(face, seed=3, init_image=picture, mask=mask), options(4, strength=1.0, inpaint=True))
    loop = StepLoop(pipe)
    requests = [loop.add(*plain), loop.add(*restyle)]
    loop.step()
    requests.append(loop.add(*inpaint))
    loop.run()
    for request in requests:
        assert max_diff(alone(pipe, request.items, request.options)[0], request.result(0)[0]) <= 1


def test_bad_input_is_refused_when_added(pipe, face):
    loop = StepLoop(pipe)
    with pytest.raises(InvalidParameter) as info:
        loop.add(items(face), options(0))
    assert info.value.field == "num_inference_steps" and loop.pending == 0
    with pytest.raises(InvalidParameter) as info:
        StepLoop(pipe, max_images=0)
    assert info.value.field == "max_images"
    assert not loop.step()



def test_a_failed_decode_fails_its_request_and_the_loop_goes_on(pipe, face, monkeypatch):
    loop = StepLoop(pipe)
    broken = loop.add(items(face, seed=1), options(1))
    monkeypatch.setattr(pipe, "_decode", lambda latents: (_ for _ in ()).throw(RuntimeError("decoder down")))
    loop.run()
    with pytest.raises(RuntimeError, match="decoder down"):
        broken.result(0)
    monkeypatch.undo()
    later = loop.add(items(face, seed=2), options(1))
    loop.run()
    assert len(later.result(0)) == 1 and loop.pending == 0
