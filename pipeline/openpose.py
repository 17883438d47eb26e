"""OpenPose body keypoints and the pose image the SDXL OpenPose ControlNets were trained on.

The reference's multi-ControlNet demo makes its pose images with controlnet_aux's
``OpenposeDetector`` (body only): CMU's OpenPose body network (VGG-19 front end, six
two-branch stages: 38 part-affinity-field channels and 19 heatmap channels, stride 8) run
once at 368 px box size on the picture resized to 512 px on its short side, keypoints from
the heatmap peaks, people from the part affinity fields, and the COCO-18 skeleton drawn on
black. This module does the same steps with our own code:

1. :func:`detect_resolution` - the picture's size for detection (short side 512, both
   sides multiples of 64).
2. :meth:`BodyPose.maps` - heatmaps and fields at that size (BGR input, as the network
   was trained).
3. :func:`find_peaks` / :func:`find_people` - keypoints, then limbs scored along the
   fields and joined into people (people with fewer than 4 parts or a low mean score dropped).
4. :func:`draw` - ellipses for 17 limbs at 60% colour, then a dot per keypoint.

Weights: ``annotators/openpose/body_pose_model.pth`` in the weights root (the file
lllyasviel/Annotators publishes; a ``.safetensors`` copy with the same keys also works).
The network's widths are read from the file, so any checkpoint of this topology loads.
CMU licenses these weights for non-commercial use only (README, "Weights").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

BODY_FILES = ("body_pose_model.safetensors", "body_pose_model.pth")
DETECT_RESOLUTION = 512  # the short side OpenposeDetector detects at (detect_resolution)
BOX_SIZE = 368  # the network's trained input height, at scale 0.5 (one scale, as the reference)
STRIDE = 8
PAD_VALUE = 128
PEAK_THRESHOLD = 0.1
FIELD_THRESHOLD = 0.05
FIELD_SAMPLES = 10
MAX_PEAKS = 64  # per part, the strongest (OpenPose's own bound is of this order; the port has none)
PARTS = 18  # COCO-18: nose, neck, r shoulder/elbow/wrist, l shoulder/elbow/wrist, r hip/knee/ankle,
#             l hip/knee/ankle, r eye, l eye, r ear, l ear
# (part a, part b, x field channel, y field channel); the first 17 are drawn, the last two
# (ear-shoulder) only join people.
LIMBS = ((1, 2, 12, 13), (1, 5, 20, 21), (2, 3, 14, 15), (3, 4, 16, 17), (5, 6, 22, 23), (6, 7, 24, 25),
         (1, 8, 0, 1), (8, 9, 2, 3), (9, 10, 4, 5), (1, 11, 6, 7), (11, 12, 8, 9), (12, 13, 10, 11),
         (1, 0, 28, 29), (0, 14, 30, 31), (14, 16, 34, 35), (0, 15, 32, 33), (15, 17, 36, 37),
         (2, 16, 18, 19), (5, 17, 26, 27))
DRAWN_LIMBS = 17
COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
STICK_WIDTH = 4
DOT_RADIUS = 4
LIMB_SHADE = 0.6

Keypoint = tuple[float, float]


@dataclass(frozen=True)
class Peak:
    x: int
    y: int
    score: float
    id: int  # index over all parts' peaks


@dataclass(frozen=True)
class Person:
    keypoints: tuple[Keypoint | None, ...]  # PARTS entries, pixels of the detection picture
    score: float


# --------------------------------------------------------------------------- network


def _stages() -> list[tuple[str, list[str]]]:
    """The network's layer names in order, by block (the published checkpoint's keys)."""
    front = ["conv1_1", "conv1_2", "pool", "conv2_1", "conv2_2", "pool", "conv3_1", "conv3_2", "conv3_3", "conv3_4",
             "pool", "conv4_1", "conv4_2", "conv4_3_CPM", "conv4_4_CPM"]
    blocks = [("front", front)]
    for branch in ("L1", "L2"):
        blocks.append((f"stage1_{branch}", [f"conv5_{k}_CPM_{branch}" for k in range(1, 6)]))
    for stage in range(2, 7):
        for branch in ("L1", "L2"):
            blocks.append((f"stage{stage}_{branch}", [f"Mconv{k}_stage{stage}_{branch}" for k in range(1, 8)]))
    return blocks


def load_state(path: Path) -> dict:
    """The checkpoint's tensors (``.pth`` read without running pickled code)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return dict(state.get("state_dict", state)) if isinstance(state, dict) else state


def body_network(state: dict):
    """The body network with its widths taken from ``state`` (strictly loaded)."""
    import torch
    from torch import nn

    class BodyPoseNetwork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = _stages()
            for _, names in self.blocks:
                for name in names:
                    if name != "pool":
                        weight = state[f"{name}.weight"]
                        out, inp, k, _ = weight.shape
                        self.add_module(name, nn.Conv2d(inp, out, k, padding=k // 2))

        def _run(self, block: str, x):
            names = dict(self.blocks)[block]
            for k, name in enumerate(names):
                if name == "pool":
                    x = torch.nn.functional.max_pool2d(x, 2, 2)
                    continue
                x = getattr(self, name)(x)
                last = k == len(names) - 1
                # The published port's layer list skips the ReLU after each branch's last
                # convolution except the final heatmaps' (Mconv7_stage6_L2 keeps it): kept so.
                if not last or block == "stage6_L2":
                    x = torch.relu(x)
            return x

        def forward(self, x):
            features = self._run("front", x)
            fields, heat = self._run("stage1_L1", features), self._run("stage1_L2", features)
            for stage in range(2, 7):
                both = torch.cat([fields, heat, features], 1)
                fields, heat = self._run(f"stage{stage}_L1", both), self._run(f"stage{stage}_L2", both)
            return fields, heat

    missing = [f"{n}.weight" for _, names in _stages() for n in names if n != "pool" and f"{n}.weight" not in state]
    if missing:
        raise KeyError(f"not an OpenPose body checkpoint: no {', '.join(missing[:3])}")
    network = BodyPoseNetwork()
    network.load_state_dict(state, strict=True)
    return network.eval()


class BodyPose:
    """The body network on a device, with the reference's pre- and post-processing."""

    def __init__(self, path: Path, device="cpu", dtype=None) -> None:
        import torch

        self.dtype = dtype or torch.float32
        self.device = device
        self.network = body_network(load_state(path)).to(device, self.dtype)

    def maps(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Heatmaps (H, W, 19) and part affinity fields (H, W, 38) of a BGR uint8 picture,
        at its size."""
        import torch

        height, width = bgr.shape[:2]
        scale = 0.5 * BOX_SIZE / height
        scaled = cv2.resize(bgr, (0, 0), fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        down, right = (-scaled.shape[0]) % STRIDE, (-scaled.shape[1]) % STRIDE
        padded = cv2.copyMakeBorder(scaled, 0, down, 0, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
        x = torch.from_numpy(padded.astype(np.float32) / 256.0 - 0.5).permute(2, 0, 1)[None]
        with torch.inference_mode():
            fields, heat = self.network(x.to(self.device, self.dtype))

        def back(output) -> np.ndarray:
            grid = output[0].float().permute(1, 2, 0).cpu().numpy()
            grid = cv2.resize(grid, (0, 0), fx=STRIDE, fy=STRIDE, interpolation=cv2.INTER_CUBIC)
            grid = grid[:padded.shape[0] - down, :padded.shape[1] - right]
            return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)

        return back(heat), back(fields)

    def people(self, bgr: np.ndarray) -> list[Person]:
        heat, fields = self.maps(bgr)
        return find_people(find_peaks(heat), fields, bgr.shape[0])

    def pose_image(self, image: Image.Image) -> Image.Image:
        """The pose image of a photo, at the photo's size."""
        rgb = np.asarray(image.convert("RGB"))
        height, width = detect_resolution(rgb.shape[0], rgb.shape[1])
        enlarge = DETECT_RESOLUTION > min(rgb.shape[:2])
        resized = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LANCZOS4 if enlarge else cv2.INTER_AREA)
        canvas = draw(self.people(np.ascontiguousarray(resized[..., ::-1])), height, width)
        return Image.fromarray(cv2.resize(canvas, image.size, interpolation=cv2.INTER_LINEAR))


# --------------------------------------------------------------------------- decoding


def detect_resolution(height: int, width: int, short_side: int = DETECT_RESOLUTION) -> tuple[int, int]:
    """The detection size of a picture: short side ``short_side``, both sides rounded to
    multiples of 64."""
    k = short_side / min(height, width)
    return max(64, int(np.round(height * k / 64.0)) * 64), max(64, int(np.round(width * k / 64.0)) * 64)


def find_peaks(heat: np.ndarray, threshold: float = PEAK_THRESHOLD) -> list[list[Peak]]:
    """Per part, the local maxima of its smoothed heatmap above ``threshold`` (4-neighbour,
    ties kept; at most MAX_PEAKS, the strongest), scored by the unsmoothed heatmap."""
    from scipy.ndimage import gaussian_filter

    found, counter = [], 0
    for part in range(PARTS):
        raw = heat[:, :, part]
        smooth = gaussian_filter(raw, sigma=3)
        edged = np.pad(smooth, 1)  # zeros around: a border pixel may be a peak
        centre = edged[1:-1, 1:-1]
        peak = ((centre >= edged[:-2, 1:-1]) & (centre >= edged[2:, 1:-1]) & (centre >= edged[1:-1, :-2])
                & (centre >= edged[1:-1, 2:]) & (centre > threshold))
        ys, xs = np.nonzero(peak)  # row by row
        if len(ys) > MAX_PEAKS:  # a flat map (not a trained network's) would make every pixel a peak
            keep = np.sort(np.argsort(-raw[ys, xs], kind="stable")[:MAX_PEAKS])
            ys, xs = ys[keep], xs[keep]
        peaks = [Peak(int(x), int(y), float(raw[y, x]), counter + n) for n, (y, x) in enumerate(zip(ys, xs))]
        counter += len(peaks)
        found.append(peaks)
    return found


def _limb_candidates(a_peaks: list[Peak], b_peaks: list[Peak], field: np.ndarray, height: int):
    """Pairs (a, b) whose straight line follows the field, best first, each peak used once."""
    a = np.array([(p.x, p.y) for p in a_peaks], np.float64)[:, None, :]  # (nA, 1, 2)
    b = np.array([(p.x, p.y) for p in b_peaks], np.float64)[None, :, :]  # (1, nB, 2)
    delta = b - a
    norm = np.maximum(np.hypot(delta[..., 0], delta[..., 1]), 0.001)
    # FIELD_SAMPLES points from a to b, as np.linspace places them (the last one exactly b)
    steps = np.arange(FIELD_SAMPLES)[:, None, None, None] * (delta / (FIELD_SAMPLES - 1)) + a
    steps[-1] = np.broadcast_to(b, steps[-1].shape)
    cols, rows = np.rint(steps[..., 0]).astype(int), np.rint(steps[..., 1]).astype(int)
    along = field[rows, cols, 0] * (delta[..., 0] / norm) + field[rows, cols, 1] * (delta[..., 1] / norm)
    score = along.sum(axis=0) / FIELD_SAMPLES + np.minimum(0.5 * height / norm - 1, 0)
    good = ((along > FIELD_THRESHOLD).sum(axis=0) > 0.8 * FIELD_SAMPLES) & (score > 0)
    scored = sorted(((float(score[i, j]), i, j) for i, j in zip(*np.nonzero(good))),
                    key=lambda c: c[0], reverse=True)  # stable: ties keep (i, j) order
    taken, used_a, used_b = [], set(), set()
    for value, i, j in scored:
        if i not in used_a and j not in used_b:
            taken.append((a_peaks[i].id, b_peaks[j].id, value))
            used_a.add(i)
            used_b.add(j)
            if len(taken) >= min(len(a_peaks), len(b_peaks)):
                break
    return taken


def find_people(peaks: list[list[Peak]], fields: np.ndarray, height: int) -> list[Person]:
    """Limbs joined into people, as OpenPose's greedy assembly does: a limb extends the
    person holding either end, merges two people it joins when they share no part, or
    starts a new person (not for the two ear-shoulder limbs)."""
    scores = {p.id: p.score for part in peaks for p in part}
    where = {p.id: (p.x, p.y) for part in peaks for p in part}
    rows: list[np.ndarray] = []  # per person: PARTS peak ids (-1 none), total score, part count
    for k, (a, b, fx, fy) in enumerate(LIMBS):
        if not peaks[a] or not peaks[b]:
            continue
        for id_a, id_b, limb in _limb_candidates(peaks[a], peaks[b], fields[:, :, (fx, fy)], height):
            holders = [n for n, row in enumerate(rows) if row[a] == id_a or row[b] == id_b][:2]
            if len(holders) == 2 and not _overlap(rows[holders[0]], rows[holders[1]]):
                first, second = rows[holders[0]], rows.pop(holders[1])  # two people joined: one person
                first[:-2] += second[:-2] + 1
                first[-2:] += second[-2:]
                first[-2] += limb
            elif holders:
                row = rows[holders[0]]
                if len(holders) == 2 or row[b] != id_b:
                    row[b] = id_b
                    row[-1] += 1
                    row[-2] += scores[id_b] + limb
            elif k < DRAWN_LIMBS:  # the ear-shoulder limbs only join people
                row = -np.ones(PARTS + 2)
                row[a], row[b] = id_a, id_b
                row[-1] = 2
                row[-2] = scores[id_a] + scores[id_b] + limb
                rows.append(row)
    people = []
    for row in rows:
        if row[-1] < 4 or row[-2] / row[-1] < 0.4:
            continue
        keypoints = tuple(where[int(i)] if i >= 0 else None for i in row[:PARTS])
        people.append(Person(keypoints, float(row[-2])))
    return people


def _overlap(first: np.ndarray, second: np.ndarray) -> bool:
    return bool(((first[:-2] >= 0) & (second[:-2] >= 0)).any())


def draw(people: list[Person], height: int, width: int) -> np.ndarray:
    """The pose image (RGB uint8): each person's 17 limbs as ellipses 4 px thick at 60% of
    their colour, then every keypoint as a dot of radius 4 in its colour, on black."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for limb in range(DRAWN_LIMBS):
        a, b = LIMBS[limb][:2]
        shade = [int(c * LIMB_SHADE) for c in COLORS[limb]]
        for person in people:
            one, two = person.keypoints[a], person.keypoints[b]
            if one is None or two is None:
                continue
            (x1, y1), (x2, y2) = one, two
            length = math.hypot(x1 - x2, y1 - y2)
            angle = math.degrees(math.atan2(y1 - y2, x1 - x2))
            polygon = cv2.ellipse2Poly((int((x1 + x2) / 2), int((y1 + y2) / 2)), (int(length / 2), STICK_WIDTH),
                                       int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, shade)
    for part in range(PARTS):
        for person in people:
            point = person.keypoints[part]
            if point is not None:
                cv2.circle(canvas, (int(point[0]), int(point[1])), DOT_RADIUS, COLORS[part], thickness=-1)
    return canvas
