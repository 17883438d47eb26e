"""Shared fixtures: fixture weights written once per session, one loaded pipeline,
synthetic face photos, and a real S3-compatible server."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).parent / "data"


def face_photo(size=(256, 256), blobs=((128, 128, 50),), background=(20, 20, 20), color=(240, 220, 200)) -> Image.Image:
    """A picture the fixture detector sees faces in: one bright disc per ``(cx, cy, r)``."""
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    for cx, cy, r in blobs:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    return image


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    from pipeline.fixtures import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def pipe(weights_dir):
    from pipeline.pipeline import InstantIDPipeline

    return InstantIDPipeline.from_weights(weights_dir)


@pytest.fixture(scope="session")
def face(pipe):
    """The analysed face of a standard synthetic photo."""
    return pipe.analyze_faces(face_photo())


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from tests.s3server import SeaweedFS

    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)
