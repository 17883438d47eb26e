"""Output geometry: the reference size rule, frame mapping, and IdentityNet's keypoint image."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

# Left eye, right eye, nose, left mouth corner, right mouth corner (RGB).
KEYPOINT_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 0, 255),
)
NOSE = 2
LIMB_HALF_WIDTH = 4
LIMB_DIM = 0.6
POINT_RADIUS = 10


def reference_size(width: int, height: int, *, short_side: int = 1024, max_side: int = 1280, multiple: int = 64) -> tuple[int, int]:
    """The reference output size of a photo: short side to 1024, long side at most 1280,
    both floored to multiples of 64. Returns ``(width, height)``."""
    ratio = short_side / min(width, height)
    w, h = round(ratio * width), round(ratio * height)
    ratio = max_side / max(w, h)
    if ratio < 1:
        w, h = round(ratio * w), round(ratio * h)
    return max(multiple, (w // multiple) * multiple), max(multiple, (h // multiple) * multiple)


@dataclass(frozen=True)
class Frame:
    """Maps pixel coordinates of a source picture into an output frame.

    The source is scaled to cover the output and centred ("cover" crop), so faces keep
    their proportions whatever the output aspect ratio.
    """

    source_size: tuple[int, int]
    output_size: tuple[int, int]

    @property
    def scale(self) -> float:
        (sw, sh), (ow, oh) = self.source_size, self.output_size
        return max(ow / sw, oh / sh)

    @property
    def offset(self) -> tuple[float, float]:
        (sw, sh), (ow, oh) = self.source_size, self.output_size
        s = self.scale
        return (sw * s - ow) / 2.0, (sh * s - oh) / 2.0

    def points(self, xy: np.ndarray) -> np.ndarray:
        ox, oy = self.offset
        out = np.asarray(xy, dtype=np.float64).reshape(-1, 2) * self.scale
        out[:, 0] -= ox
        out[:, 1] -= oy
        return out

    def box(self, bbox: np.ndarray) -> np.ndarray:
        x1y1x2y2 = self.points(np.asarray(bbox, dtype=np.float64).reshape(2, 2)).reshape(4)
        ow, oh = self.output_size
        return np.clip(x1y1x2y2, 0, [ow, oh, ow, oh])


def frame_face(face, picture_size: tuple[int, int] | None, size: tuple[int, int]):
    """A face's keypoints and box (a :class:`~pipeline.face.FaceInfo`) in the pixels of a
    ``size`` output: its picture framed to it. ``picture_size``: the img2img picture's
    size, when the face may have been found in that picture."""
    source, kps, bbox = face.image_size, np.asarray(face.kps, float), np.asarray(face.bbox, float)
    if picture_size is not None and tuple(source) == reference_size(*picture_size):
        # the face was found in the picture, which the face stage stretched to multiples of 64: back
        # to the picture's own pixels, so that the keypoints land on its face once both are framed
        factor = np.array(picture_size, float) / np.array(source, float)
        source, kps, bbox = picture_size, kps * factor, bbox * np.tile(factor, 2)
    frame = Frame(tuple(source), size)
    return frame.points(kps), tuple(float(v) for v in frame.box(bbox))


def draw_keypoints(kps: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """IdentityNet's spatial condition for five facial keypoints on a ``(width, height)`` canvas.

    Black canvas; a limb from each eye and mouth corner to the nose, a filled ellipse of
    half-width 4 px along the segment in the outer point's colour; the canvas times 0.6;
    then a filled disc of radius 10 px at every keypoint in its colour.
    """
    points = np.asarray(kps, dtype=np.float64).reshape(-1, 2)
    if points.shape[0] != len(KEYPOINT_COLORS):
        raise ValueError(f"expected 5 keypoints, got {points.shape[0]}")
    width, height = size
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for start in (0, 1, 3, 4):
        (x0, y0), (x1, y1) = points[start], points[NOSE]
        half_length = math.hypot(x1 - x0, y1 - y0) / 2.0
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        centre = (int((x0 + x1) / 2.0), int((y0 + y1) / 2.0))
        polygon = cv2.ellipse2Poly(centre, (int(half_length), LIMB_HALF_WIDTH), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, KEYPOINT_COLORS[start])
    canvas = (canvas * LIMB_DIM).astype(np.uint8)
    for (x, y), color in zip(points, KEYPOINT_COLORS):
        cv2.circle(canvas, (int(x), int(y)), POINT_RADIUS, color, -1)
    return Image.fromarray(canvas, "RGB")
