"""The OpenPose annotator: people and keypoints decoded from heatmaps and fields built for
known skeletons, the pose image's colours and shapes, the network's published topology,
maps brought back onto the picture's pixels at every shape class, and the annotator in a
render."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import openpose
from pipeline.controlnets import Annotators, available_annotators
from pipeline.errors import InvalidParameter
from pipeline.img2img import frame_picture
from pipeline.openpose import COLORS, LIMBS, PARTS, BodyPose, Person, draw, find_peaks, find_people, load_state
from pipeline.params import GenerationParams
from pipeline.weights import ExtraWeights

# A standing person in COCO-18 order (nose, neck, right arm, left arm, right leg, left leg,
# eyes, ears), offsets in pixels from the neck.
SKELETON = ((0, -16), (0, 0), (-14, 0), (-20, 16), (-22, 32), (14, 0), (20, 16), (22, 32), (-8, 34), (-9, 56),
            (-10, 78), (8, 34), (9, 56), (10, 78), (-5, -20), (5, -20), (-10, -17), (10, -17))


def planted(necks, size=(192, 256), skip_limbs=(), parts=range(PARTS)):
    """Heatmaps (H, W, 19) and fields (H, W, 38) for people standing at ``necks``: a blob
    per keypoint, a unit vector along each limb within 2 px of it."""
    height, width = size
    heat = np.zeros((height, width, 19), np.float32)
    fields = np.zeros((height, width, 38), np.float32)
    ys, xs = np.mgrid[:height, :width]
    people = []
    for nx, ny in necks:
        points = [(nx + dx, ny + dy) for dx, dy in SKELETON]
        people.append(points)
        for part in parts:
            x, y = points[part]
            heat[..., part] = np.maximum(heat[..., part], np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 2.0 ** 2)))
        for k, (a, b, fx, fy) in enumerate(LIMBS):
            if k in skip_limbs:
                continue
            (x1, y1), (x2, y2) = points[a], points[b]
            length = math.hypot(x2 - x1, y2 - y1)
            ux, uy = (x2 - x1) / length, (y2 - y1) / length
            along = (xs - x1) * ux + (ys - y1) * uy
            across = np.abs(-(xs - x1) * uy + (ys - y1) * ux)
            near = (along >= -1) & (along <= length + 1) & (across <= 2)
            fields[near, fx], fields[near, fy] = ux, uy
    return heat, fields, people


def found(people: list[Person]) -> list[list]:
    return sorted([list(p.keypoints) for p in people])


def test_two_people_are_found_with_every_keypoint_where_it_was_planted():
    heat, fields, people = planted([(60, 60), (180, 70)])
    assert found(find_people(find_peaks(heat), fields, heat.shape[0])) == sorted(people)


def test_a_person_missing_a_limb_field_is_joined_through_the_ears_and_few_parts_are_no_one():
    neck_shoulder = 0  # without it the right arm starts a second person, joined by the ear-shoulder limb
    heat, fields, people = planted([(100, 60)], skip_limbs=(neck_shoulder,))
    assert found(find_people(find_peaks(heat), fields, heat.shape[0])) == people
    heat, fields, _ = planted([(100, 60)], parts=(0, 1, 2))  # nose, neck, shoulder: three parts
    assert find_people(find_peaks(heat), fields, heat.shape[0]) == []


def test_a_limb_against_its_field_or_far_too_long_is_not_joined():
    heat, fields, people = planted([(100, 60)])
    assert len(find_people(find_peaks(heat), -fields, heat.shape[0])) == 0
    # a weak field joins limbs up to half the picture's height; beyond, the length costs more
    assert found(find_people(find_peaks(heat), 0.4 * fields, heat.shape[0])) == people
    short = find_people(find_peaks(heat), 0.4 * fields, 16)  # limbs over 8 px: only the face's are joined
    assert short and all(p.keypoints[k] is None for p in short for k in range(1, 14))


def test_flat_heatmaps_are_bounded_in_peaks():
    peaks = find_peaks(np.full((64, 80, 19), 0.5, np.float32))
    assert all(len(p) <= openpose.MAX_PEAKS for p in peaks) and sum(map(len, peaks)) > 0


def test_the_pose_image_draws_limbs_at_60_percent_and_keypoints_in_full_colour():
    points = tuple((64 + dx * 1.5, 40 + dy * 1.5) for dx, dy in SKELETON)
    canvas = draw([Person(points, 1.0)], 192, 128)
    assert canvas.shape == (192, 128, 3) and canvas.dtype == np.uint8
    for part, (x, y) in enumerate(points[:14]):  # the face's dots overlap each other
        assert tuple(canvas[int(y), int(x)]) == COLORS[part], part
    for limb in (6, 7, 9, 10):  # neck-hips and thighs: long, apart from other limbs
        (x1, y1), (x2, y2) = points[LIMBS[limb][0]], points[LIMBS[limb][1]]
        mid = canvas[int((y1 + y2) / 2), int((x1 + x2) / 2)]
        assert tuple(mid) == tuple(int(c * 0.6) for c in COLORS[limb]), limb
    assert tuple(canvas[5, 5]) == (0, 0, 0) and tuple(canvas[-5, -5]) == (0, 0, 0)
    assert (draw([], 64, 96) == 0).all()


def test_the_fixture_checkpoint_has_the_published_topology(weights_dir):
    state = load_state(weights_dir / "annotators" / "openpose" / "body_pose_model.pth")
    assert len(state) == 184  # 92 convolutions, weight and bias each
    assert state["conv1_1.weight"].shape[1] == 3 and state["conv5_5_CPM_L1.weight"].shape[0] == 38
    assert state["Mconv7_stage6_L2.weight"].shape[0] == 19
    assert state["Mconv1_stage2_L1.weight"].shape[1] == 38 + 19 + state["conv4_4_CPM.weight"].shape[0]
    kernels = {name.split(".")[0]: t.shape[-1] for name, t in state.items() if name.endswith("weight")}
    assert kernels["conv3_4"] == 3 and kernels["conv5_4_CPM_L2"] == 1 and kernels["Mconv5_stage4_L1"] == 7
    assert kernels["Mconv6_stage6_L2"] == 1


class CellCentres(torch.nn.Module):
    """Stands in for the body network to test the geometry around it: at the network's
    stride, every heatmap holds the column of each cell's centre in the padded input's
    pixels, every field the row."""

    def forward(self, x):
        rows, cols = x.shape[2] // openpose.STRIDE, x.shape[3] // openpose.STRIDE
        col = torch.arange(cols, dtype=torch.float32) * openpose.STRIDE + (openpose.STRIDE - 1) / 2
        row = torch.arange(rows, dtype=torch.float32) * openpose.STRIDE + (openpose.STRIDE - 1) / 2
        return row[None, None, :, None].expand(1, 38, rows, cols), col[None, None, None, :].expand(1, 19, rows, cols)


@pytest.mark.parametrize("height,width", [(160, 200), (161, 97), (97, 161), (64, 64), (512, 384)])
def test_maps_land_on_the_pictures_pixels_at_every_shape_class(weights_dir, height, width):
    pose = BodyPose(weights_dir / "annotators" / "openpose" / "body_pose_model.pth")
    heat, fields = pose.maps(np.zeros((height, width, 3), np.uint8))
    assert heat.shape == (height, width, 19) and fields.shape == (height, width, 38)
    pose.network = CellCentres()
    heat, fields = pose.maps(np.zeros((height, width, 3), np.uint8))
    # the network saw the picture scaled to 184 rows (w columns), padded right and down to
    # whole cells: each picture pixel must read the scaled picture's coordinate of its centre
    scale = 0.5 * openpose.BOX_SIZE / height
    scaled_width = round(width * scale)
    xs, ys = np.arange(width // 10, width - width // 10), np.arange(height // 10, height - height // 10)
    expected_x = (xs + 0.5) * scaled_width / width - 0.5
    expected_y = (ys + 0.5) * 184 / height - 0.5
    assert np.abs(np.median(heat[:, xs, 0], axis=0) - expected_x).max() < 0.75
    assert np.abs(np.median(fields[ys, :, 0], axis=1) - expected_y).max() < 0.75


@pytest.mark.parametrize("size", [(200, 160), (97, 161), (640, 480)])
def test_the_annotator_gives_a_pose_image_of_the_photos_size(pipe, size):
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    pose = pipe.annotators.control_image("pose", photo, "controlnets[0].preprocessed")
    assert pose.size == size and pose.mode == "RGB"


def test_a_render_with_a_pose_photo_uses_the_annotators_image(pipe, face):
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    spec = GenerationParams(controlnets=[{"type": "pose"}], width=64, height=64, num_inference_steps=2, seed=1)
    _, items = pipe.plan(spec, face, control_images=[photo])
    expected = frame_picture(pipe.annotators.pose(photo), (64, 64))
    assert np.array_equal(items[0].controls[0], expected)


def test_the_pose_annotator_is_offered_only_where_its_weights_are(weights_dir, tmp_path):
    assert available_annotators(ExtraWeights(weights_dir)) == ["canny", "depth", "pose"]
    assert available_annotators(ExtraWeights(tmp_path)) == ["canny"]
    with pytest.raises(InvalidParameter) as info:
        Annotators(ExtraWeights(tmp_path), "cpu", torch.float32).control_image(
            "pose", Image.new("RGB", (64, 64)), "controlnets[2].preprocessed")
    assert info.value.field == "controlnets[2].preprocessed"
    assert "annotators/openpose/" in str(info.value) and "body_pose_model.pth" in str(info.value)
    broken = tmp_path / "annotators" / "openpose"
    broken.mkdir(parents=True)
    (broken / "body_pose_model.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception) as info:
        Annotators(ExtraWeights(tmp_path), "cpu", torch.float32).pose(Image.new("RGB", (64, 64)))
    assert "annotators/openpose/body_pose_model.pth" in str(info.value) and "OpenPose" in str(info.value)
