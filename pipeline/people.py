"""Several people in one picture: where each person's face goes, checked before any model work.

A person is an identity (their face: photos or a registered face) and a region of the
output: a ``box`` ``[x1, y1, x2, y2]`` in output pixels, where their face is drawn (their
keypoints fitted into it, proportions kept, centred), or, without a box, the place of the
face in a pose photo (framed to the output as a single person's pose is). In the render
(:mod:`pipeline.pipeline`) each person's face tokens act only inside their region (the
adapter's attention masked per person, :class:`~pipeline.adapter.FaceRegionMask`) and
IdentityNet runs once per person with that person's keypoints, its residuals masked to the
region; the prompt describes the scene around them.

Regions may not overlap (a pixel would take two identities) and must lie inside the
picture; at most :data:`MAX_PEOPLE` people. Boxes are in output pixels, so ``people``
needs an explicit ``width`` and ``height``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import InvalidParameter
from .keypoints import Frame

MAX_PEOPLE = 4

Box = tuple[float, float, float, float]


class PersonParams(BaseModel):
    """One person's placement (their face travels beside it: photos, a ``face_id``, or a
    :class:`~pipeline.face.FaceInfo`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    box: tuple[int, int, int, int] | None = Field(
        None, description="Where this person's face goes: [x1, y1, x2, y2] in output pixels (their face is fitted "
                          "into it). Without a box, the face goes where it is in the person's pose_image.")

    @field_validator("box")
    @classmethod
    def _ordered(cls, box: tuple[int, int, int, int] | None):
        if box is not None:
            x1, y1, x2, y2 = box
            if min(box) < 0:
                raise ValueError(f"must not have negative coordinates, got {list(box)}")
            if x2 <= x1 or y2 <= y1:
                raise ValueError(f"must be [x1, y1, x2, y2] with x1 < x2 and y1 < y2, got {list(box)}")
        return box


def check_people(people: Sequence[PersonParams], width: int | None, height: int | None) -> None:
    """Refuse a placement that cannot render: no explicit size, a box past the picture,
    two boxes that overlap. (Counted elsewhere: at most :data:`MAX_PEOPLE`.)"""
    if not people:
        return
    for name, value in (("width", width), ("height", height)):
        if value is None:
            raise InvalidParameter(name, "is needed with people (their boxes are in output pixels)")
    for k, person in enumerate(people):
        if person.box is not None and (person.box[2] > width or person.box[3] > height):
            raise InvalidParameter(f"people[{k}].box", f"{list(person.box)} reaches past the picture "
                                                       f"({width}x{height})")
    check_apart([p.box for p in people], [f"people[{k}].box" for k in range(len(people))])


def overlap(a: Box, b: Box) -> bool:
    """Whether two boxes share pixels (touching edges do not)."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def check_apart(boxes: Sequence[Box | None], fields: Sequence[str]) -> None:
    """No two regions overlap; the later one of a pair is named (``None``: not placed yet)."""
    for j, box in enumerate(boxes):
        for i in range(j):
            if box is not None and boxes[i] is not None and overlap(boxes[i], box):
                raise InvalidParameter(fields[j], f"overlaps {fields[i].split('.')[0]}'s region "
                                                  f"({_shown(boxes[i])} and {_shown(box)}): each pixel belongs to "
                                                  "one person at most")


@dataclass(frozen=True)
class RenderPerson:
    """One person of a render: their identity embedding, their five keypoints and their
    region, both in output pixels."""

    embedding: np.ndarray
    kps: np.ndarray
    box: Box


def fit_keypoints(kps: np.ndarray, face_box: Box, box: Box) -> np.ndarray:
    """Keypoints of a face whose box is ``face_box``, scaled (proportions kept) and moved so
    that face box fits ``box``, centred."""
    kps = np.asarray(kps, dtype=np.float64).reshape(-1, 2)
    fx1, fy1, fx2, fy2 = face_box
    x1, y1, x2, y2 = box
    scale = min((x2 - x1) / max(fx2 - fx1, 1e-6), (y2 - y1) / max(fy2 - fy1, 1e-6))
    face_centre = np.array([(fx1 + fx2) / 2, (fy1 + fy2) / 2])
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    return (kps - face_centre) * scale + centre


def place_people(placements: Sequence[PersonParams], faces: Sequence, size: tuple[int, int],
                 fields: Sequence[str] | None = None) -> list[RenderPerson]:
    """Each person's keypoints and region in a ``size`` (width, height) output. ``faces``:
    one :class:`~pipeline.face.FaceInfo` per person (coordinates in the photo it was found
    in: their face photo when a box is given, their pose photo when not). ``fields``: what
    errors call each person's face (default ``people[k]``)."""
    fields = list(fields or [f"people[{k}]" for k in range(len(placements))])
    if len(faces) != len(placements):
        raise InvalidParameter("people", f"{len(placements)} people placed but {len(faces)} faces given")
    people = []
    for k, (placement, face) in enumerate(zip(placements, faces)):
        kps, bbox = np.asarray(face.kps, float), tuple(float(v) for v in face.bbox)
        if placement.box is not None:
            box = tuple(float(v) for v in placement.box)
            kps = fit_keypoints(kps, bbox, box)
        else:
            frame = Frame(tuple(face.image_size), size)
            kps, box = frame.points(kps), tuple(float(v) for v in frame.box(np.asarray(bbox)))
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                raise InvalidParameter(f"{fields[k]}.pose_image", "its face falls outside the picture once framed "
                                                                  f"to {size[0]}x{size[1]}")
        people.append(RenderPerson(np.asarray(face.embedding, np.float32).reshape(-1), kps, box))
    check_apart([p.box for p in people],
                [f"{f}.box" if p.box is not None else f"{f}.pose_image" for f, p in zip(fields, placements)])
    return people


def _shown(box: Box) -> list:
    return [round(float(v), 1) if float(v) % 1 else int(v) for v in box]


def split_people(entries: Sequence[dict] | None) -> tuple[list[dict], list[tuple[object, object]]]:
    """The Python API's ``people`` entries -> their placements (``{"box": ...}``) and their
    faces: ``(face_images or face, pose_image)`` per person. Each needs one face (photos or
    a FaceInfo) and exactly one of ``box`` and ``pose_image``."""
    placements, sources = [], []
    for k, entry in enumerate(entries or ()):
        if not isinstance(entry, dict):
            raise InvalidParameter(f"people[{k}]", "must be a dict: {face_images | face, box | pose_image}")
        unknown = sorted(set(entry) - {"face_images", "face", "box", "pose_image"})
        if unknown:
            raise InvalidParameter(f"people[{k}].{unknown[0]}", "is not a known parameter")
        given = [name for name in ("face_images", "face") if entry.get(name) is not None]
        if len(given) != 1:
            raise InvalidParameter(f"people[{k}]", "needs its face: face_images (photos) or face, one of them")
        if (entry.get("box") is None) == (entry.get("pose_image") is None):
            raise InvalidParameter(f"people[{k}]", "needs exactly one of box (where the face goes) and pose_image")
        placements.append({"box": entry.get("box")})
        sources.append((entry[given[0]], entry.get("pose_image")))
    return placements, sources
