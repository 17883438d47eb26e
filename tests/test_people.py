"""Several people in one picture (pipeline/people.py and the render path): each person's face
tokens act only inside their region at every attention level, for sizes of every shape class;
IdentityNet runs once per person per step inside its window, with that person's keypoints;
one person through this path is the single-person path with its region mask; batches and the
step loop give each picture as it is alone; bad placements are refused naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.cli import EXIT_INVALID, main
from pipeline.errors import InvalidParameter
from pipeline.identitynet import to_tensor
from pipeline.keypoints import draw_keypoints
from pipeline.params import GenerationParams, parse_params
from pipeline.people import PersonParams, fit_keypoints, place_people, split_people
from pipeline.pipeline import RenderItem, RenderOptions
from pipeline.stepping import StepLoop
from tests.conftest import face_photo
from tests.test_pipeline import CrossAttentionCalls, Recorder, max_diff


@pytest.fixture(scope="module")
def other(pipe):
    """A second identity (another synthetic photo: another embedding)."""
    return pipe.analyze_faces(face_photo(size=(200, 240), blobs=((90, 110, 45),), color=(250, 200, 150)))


def plan(pipe, faces, boxes, size=(64, 64), **params):
    spec = parse_params(GenerationParams, prompt="two people", width=size[0], height=size[1],
                        people=[{"box": box} for box in boxes], **{"num_inference_steps": 2, "seed": 3, **params})
    return pipe.plan(spec, None, people=faces)


def halves(width, height):
    """Two face boxes side by side, apart by a gap (whole pixels)."""
    return [(0, height // 4, width // 2 - 4, 3 * height // 4), (width // 2 + 4, height // 4, width, 3 * height // 4)]


# square; landscape and portrait; latent sides odd at the first level (33, 7, 9) and at the
# second (17: 384x264 has token grids 33x48, 17x24, 9x12; 72x104: 9x13, 5x7, 3x4)
@pytest.mark.parametrize("width,height", [(64, 64), (96, 64), (64, 96), (384, 264), (72, 104)])
def test_each_persons_tokens_change_only_their_region_at_every_level(pipe, face, other, width, height):
    options, items = plan(pipe, [face, other], halves(width, height), (width, height), num_inference_steps=1)
    assert options.people == 2 and len(items[0].people) == 2
    with CrossAttentionCalls(pipe.sdxl.unet) as recorded:
        images, _ = pipe.render(items, options)
    assert images[0].size == (width, height)
    assert len({grid for *_, grid in recorded.calls}) == 2  # both cross-attention levels of SDXL's UNet
    tokens = pipe.num_face_tokens
    for attn, hidden, kwargs, (rows, cols) in recorded.calls:
        context = kwargs["encoder_hidden_states"]
        assert kwargs["ip_adapter_mask"].people == 2
        with torch.no_grad():
            base = attn(hidden, **kwargs)
        cell_w, cell_h = width / cols, height / rows
        x, y = (torch.arange(cols) + 0.5) * cell_w, (torch.arange(rows) + 0.5) * cell_h
        for person, (x1, y1, x2, y2) in enumerate(items[0].people[k].box for k in range(2)):
            changed = context.clone()  # this person's block of face tokens, and nothing else, changed
            start = context.shape[1] - (2 - person) * tokens
            changed[:, start:start + tokens] += torch.randn_like(changed[:, start:start + tokens])
            with torch.no_grad():
                effect = (attn(hidden, **{**kwargs, "encoder_hidden_states": changed}) - base).abs().amax(-1)
            effect = effect.view(-1, rows, cols)
            outside = ((x < x1 - cell_w) | (x > x2 + cell_w))[None, :] | ((y < y1 - cell_h) | (y > y2 + cell_h))[:, None]
            assert torch.all(effect[:, outside] == 0), (person, rows, cols)  # a cell or more away from their box
            centre = int((y1 + y2) / 2 / cell_h), int((x1 + x2) / 2 / cell_w)
            assert torch.all(effect[:, centre[0], centre[1]] > 0), (person, rows, cols)


def test_identitynet_runs_once_per_person_per_step_inside_its_window(pipe, face, other):
    boxes = [(0, 0, 20, 24), (22, 0, 42, 24), (44, 30, 64, 64)]
    options, items = plan(pipe, [face, other, face], boxes, num_inference_steps=4, control_guidance_start=0.25,
                          control_guidance_end=0.75)
    residuals = []
    hook = pipe.sdxl.unet.register_forward_pre_hook(
        lambda module, args, kwargs: residuals.append(kwargs["down_block_additional_residuals"]), with_kwargs=True)
    try:
        with Recorder(pipe.sdxl.controlnet) as control, Recorder(pipe.sdxl.unet) as unet:
            pipe.render(items, options)
    finally:
        hook.remove()
    assert len(unet.calls) == 4 and len(control.calls) == 2 * 3  # steps 1 and 2, three people each
    assert residuals[0] is None and residuals[3] is None  # outside the window: no IdentityNet
    for residual in residuals[1][0], residuals[1][-1]:  # the finest and the coarsest level
        rows, cols = residual.shape[-2:]
        cell_w, cell_h = 64 / cols, 64 / rows
        x, y = (torch.arange(cols) + 0.5) * cell_w, (torch.arange(rows) + 0.5) * cell_h
        near = torch.zeros(rows, cols, dtype=torch.bool)  # within a cell of someone's box
        for x1, y1, x2, y2 in boxes:
            near |= ((x >= x1 - cell_w) & (x <= x2 + cell_w))[None, :] & ((y >= y1 - cell_h) & (y <= y2 + cell_h))[:, None]
        assert torch.all(residual[..., ~near] == 0) and torch.any(residual[..., near] != 0), (rows, cols)
    tokens = pipe.num_face_tokens
    unet_faces = unet.calls[0]["encoder_hidden_states"][:, -3 * tokens:]
    for k, call in enumerate(control.calls[:3]):
        person = items[0].people[k]
        assert torch.equal(call["encoder_hidden_states"], unet_faces[:, k * tokens:(k + 1) * tokens])
        keypoints = to_tensor(draw_keypoints(person.kps, (64, 64)))
        assert torch.equal(call["controlnet_cond"][-1], keypoints)  # that person's keypoints alone


def test_one_person_is_the_single_person_path_with_its_region_mask(pipe, face):
    box = (8, 16, 40, 56)
    options, items = plan(pipe, [face], [box], guidance_scale=4.0)
    person = items[0].people[0]
    assert person.box == box
    single = RenderItem(prompt=items[0].prompt, negative_prompt=None, embedding=face.embedding, kps=person.kps,
                        seed=items[0].seed, guidance_scale=4.0, face_box=box)
    single_options = RenderOptions(width=64, height=64, num_inference_steps=2, enhance_face_region=True)
    assert max_diff(pipe.render(items, options)[0][0], pipe.render([single], single_options)[0][0]) == 0
    # and the Python API's people= gives that image too
    called = pipe(people=[{"face": face, "box": list(box)}], prompt="two people", width=64, height=64,
                  num_inference_steps=2, seed=3, guidance_scale=4.0)
    assert max_diff(called.images[0], pipe.render(items, options)[0][0]) == 0


def test_each_picture_is_the_same_alone_in_a_batch_and_in_the_step_loop(pipe, face, other):
    first = plan(pipe, [face, other], halves(64, 64), seed=1)
    second = plan(pipe, [other, face], [(0, 0, 30, 30), (34, 34, 64, 64)], seed=2)
    options = first[0]
    items = first[1] + second[1]
    batched, _ = pipe.render(items, options)
    for k, one in enumerate(items):
        assert max_diff(pipe.render([one], options)[0][0], batched[k]) <= 1, k
    loop = StepLoop(pipe)
    request = loop.add(items, options)
    loop.run()
    assert all(max_diff(a, b) <= 1 for a, b in zip(batched, request.result(0)))
    assert max_diff(batched[0], batched[1]) > 1  # other people, other places: another picture


def test_keypoints_are_fitted_into_the_box_proportions_kept():
    kps = np.array([[10, 10], [30, 10], [20, 20], [12, 30], [28, 30]], float)
    fitted = fit_keypoints(kps, (0, 0, 40, 40), (100, 50, 180, 90))  # an 80x40 box: the face scaled by 1
    assert np.allclose(fitted, kps + [120, 50])
    assert np.allclose(fit_keypoints(kps, (0, 0, 40, 40), (0, 0, 20, 20)), kps / 2)


def test_a_pose_photo_places_the_face_where_it_is_in_that_photo(pipe, face, other):
    spec = parse_params(GenerationParams, width=64, height=64, people=[{"box": None}, {"box": [40, 0, 64, 20]}])
    posed = pipe.analyze_faces(face_photo(size=(128, 128), blobs=((30, 90, 20),)))
    people = place_people(spec.people, [posed, other], (64, 64))
    x1, y1, x2, y2 = people[0].box
    assert x2 <= 30 and y1 >= 30  # the face sits low on the left of the pose photo, and of the picture
    overlapping = parse_params(GenerationParams, width=64, height=64, people=[{"box": [0, 30, 40, 64]}, {"box": None}])
    with pytest.raises(InvalidParameter) as error:
        place_people(overlapping.people, [other, posed], (64, 64))
    assert error.value.field == "people[1].pose_image" and "overlaps people[0]" in error.value.reason


@pytest.mark.parametrize("people,size,field,needle", [
    ([{"box": [0, 0, 40, 40]}, {"box": [30, 30, 64, 64]}], (64, 64), "people[1].box", "overlaps people[0]"),
    ([{"box": [0, 0, 72, 40]}], (64, 64), "people[0].box", "reaches past the picture (64x64)"),
    ([{"box": [0, 0, 64, 70]}], (64, 64), "people[0].box", "reaches past"),
    ([{"box": [20, 0, 10, 40]}], (64, 64), "people[0].box", "x1 < x2"),
    ([{"box": [-1, 0, 10, 40]}], (64, 64), "people[0].box", "negative"),
    ([{"box": [0, 0, 8, 8]}] * 5, (64, 64), "people", "at most 4"),
    ([{"box": [0, 0, 8, 8]}], (None, 64), "width", "is needed with people"),
    ([{"box": [0, 0, 8, 8], "face_id": "f"}], (64, 64), "people[0].face_id", "not a known parameter"),
])
def test_bad_placements_are_refused_naming_the_field(people, size, field, needle):
    with pytest.raises(InvalidParameter) as error:
        parse_params(GenerationParams, width=size[0], height=size[1], people=people)
    assert error.value.field == field and needle in error.value.reason
    assert GenerationParams(width=64, height=64, people=[{"box": [0, 0, 32, 64]}, {"box": [32, 0, 64, 64]}]).people \
        == [PersonParams(box=(0, 0, 32, 64)), PersonParams(box=(32, 0, 64, 64))]  # edges may touch


@pytest.mark.parametrize("entries,field,needle", [
    ([{"box": [0, 0, 8, 8]}], "people[0]", "needs its face"),
    ([{"face": "x", "face_images": ["y"], "box": [0, 0, 8, 8]}], "people[0]", "needs its face"),
    ([{"face": "x"}], "people[0]", "exactly one of box"),
    ([{"face": "x", "box": [0, 0, 8, 8], "pose_image": "p"}], "people[0]", "exactly one of box"),
    ([{"face": "x", "box": [0, 0, 8, 8], "where": 1}], "people[0].where", "not a known parameter"),
    (["x"], "people[0]", "must be a dict"),
])
def test_python_api_entries_are_checked(entries, field, needle):
    with pytest.raises(InvalidParameter) as error:
        split_people(entries)
    assert error.value.field == field and needle in error.value.reason


def test_the_python_api_refuses_a_face_beside_people(pipe, face):
    with pytest.raises(InvalidParameter, match="give the faces in people"):
        pipe(face, people=[{"face": face, "box": [0, 0, 8, 8]}], width=64, height=64)
    with pytest.raises(InvalidParameter, match="needs face photos"):
        pipe(None, width=64, height=64)


def test_cli_person_flags(weights_dir, tmp_path, capsys):
    face_photo().save(tmp_path / "a.png")
    face_photo(size=(200, 240), blobs=((90, 110, 45),), color=(250, 200, 150)).save(tmp_path / "b@home.png")
    base = ["generate", "--weights", str(weights_dir), "--prompt", "two friends", "--width", "64", "--height", "64",
            "--num-inference-steps", "1", "--out", str(tmp_path / "out.png"), "--no-c2pa"]
    people = ["--person", f"{tmp_path / 'a.png'}@0,8,30,56", "--person", f"{tmp_path / 'b@home.png'}@34,8,64,56"]
    assert main([*base, *people]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [p["box"] for p in report["people"]] == [[0, 8, 30, 56], [34, 8, 64, 56]]
    assert (tmp_path / "out.png").is_file()
    for extra, needle in [
        (["--person", f"{tmp_path / 'a.png'}@0,8,40,56", *people[2:]], "b@home.png@34,8,64,56: overlaps people[0]"),
        (["--person", f"{tmp_path / 'a.png'}@0,8,40"], "--person: expected PHOTO@X1,Y1,X2,Y2"),
        ([*people, "--face", str(tmp_path / "a.png")], "give faces either with --face or with --person"),
        ([], "needs a face photo"),
        (people * 3, "--person: List should have at most 4 items"),
    ]:
        assert main([*base, *extra]) == EXIT_INVALID, extra
        assert needle in capsys.readouterr().err, extra
