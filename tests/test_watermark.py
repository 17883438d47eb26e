"""The invisible watermark: its payload reads back from every marked picture (sizes of each
shape class), names the output and the service, is not read from unmarked pictures, and
survives the service's own encoding; `instantid verify` reads it from a file."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from pipeline.watermark import MIN_PIXELS, Watermark, id_sha256_prefix
from service.storage import open_storage
from service.store import store_result

INSTANTID = str(Path(sys.executable).parent / "instantid")
GID = "g_MvPE6dJWdzGHLis2qttKyQ"  # as the service makes them: "g_" + 16 random bytes, base64url
PHOTOS = {"astronaut": data.astronaut, "coffee": data.coffee, "chelsea": data.chelsea}


def photo(name: str, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(PHOTOS[name]()).convert("RGB").resize((width, height), Image.BICUBIC))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255 ** 2 / np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize(("width", "height"), [(256, 256), (512, 768), (1024, 576), (300, 260)])
def test_a_marked_picture_names_its_generation_and_this_service(name, width, height):
    image = photo(name, width, height)
    marked = Watermark().mark(image, GID)
    assert marked.shape == image.shape and marked.dtype == np.uint8
    assert psnr(image, marked) > 34  # invisible: the change is below what the eye sees in a photo
    reading = Watermark().read(marked)
    assert reading.found and reading.this_service and reading.generation_id == GID and reading.names(GID)
    # another service's reader finds a mark, not its own
    other = Watermark("someone-else").read(marked)
    assert other.found and not other.this_service and other.generation_id == GID


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_an_unmarked_picture_has_no_mark_and_a_small_one_gets_none(name):
    image = photo(name, 512, 512)
    assert not Watermark().read(image).found
    assert not Watermark().read(np.zeros((512, 512, 3), np.uint8)).found
    small = photo(name, 255, 256)
    assert small.shape[0] * small.shape[1] < MIN_PIXELS and Watermark().mark(small, GID) is None
    assert not Watermark().read(small).found and not Watermark().read(photo(name, 64, 64)).found


def test_an_id_that_is_not_a_generation_id_is_carried_as_its_digest():
    marked = Watermark().mark(photo("coffee", 512, 512), "row-0007")
    reading = Watermark().read(marked)
    assert reading.found and reading.generation_id is None
    assert reading.id_sha256_prefix == id_sha256_prefix("row-0007") and reading.names("row-0007")
    assert not reading.names("row-0008")


def test_an_empty_service_name_is_refused():
    with pytest.raises(ValueError, match="service"):
        Watermark("")


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_the_store_step_marks_and_signs_each_image_and_records_what_the_file_keeps(tmp_path, fmt):
    from pipeline.provenance import credentials_from_env, read

    storage = open_storage(str(tmp_path))
    images = [photo("astronaut", 512, 512), photo("chelsea", 320, 256), photo("coffee", 128, 128)]
    stored = store_result(storage, images, prefix=f"generations/{GID}", fmt=fmt, quality=90,
                          record_key=f"generations/{GID}/record.json", record={"id": GID, "seeds": [5, 6, 7]},
                          watermark=Watermark(), output_id=GID, credentials=credentials_from_env("instantid"),
                          settings={"steps": 4, "generation_id": GID})
    record = stored.record
    # what the record says is what a reader finds in each stored file (the manifest, signed
    # after the mark, leaves the marked pixels as they were)
    files = [storage.get(key) for key in record["keys"]]
    found = [Watermark().read(np.asarray(Image.open(io.BytesIO(file)).convert("RGB"))).names(GID) for file in files]
    assert record["watermarked"] == found
    assert found[2] is False  # too small to carry it
    if fmt in ("png", "jpeg"):  # lossless, and JPEG written 4:4:4 at quality 90: the mark stays
        assert found[:2] == [True, True]
    assert record["c2pa"] is True
    for k, file in enumerate(files):  # each file signed, stating its own index and seed
        manifest = read(file, f"image/{fmt}")
        assert manifest.valid and manifest.created_by_algorithm, manifest.errors
        assert manifest.generation == {"steps": 4, "generation_id": GID, "index": k, "seed": 5 + k}


def test_without_a_watermark_the_store_step_records_nothing_about_one(tmp_path):
    storage = open_storage(str(tmp_path))
    stored = store_result(storage, [photo("astronaut", 256, 256)], prefix="x", fmt="png", quality=90,
                          record_key="x/record.json", record={"id": "x"})
    assert "watermarked" not in stored.record and "c2pa" not in stored.record
    assert not Watermark().read(np.asarray(Image.open(io.BytesIO(storage.get("x/0.png"))))).found


def test_verify_command_reads_the_mark_of_a_file(tmp_path):
    marked, plain = tmp_path / "marked.png", tmp_path / "plain.jpg"
    Image.fromarray(Watermark().mark(photo("coffee", 512, 384), GID)).save(marked)
    Image.fromarray(photo("coffee", 512, 384)).save(plain)
    run = subprocess.run([INSTANTID, "verify", str(marked)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["watermark"] == {"found": True, "this_service": True, "generation_id": GID,
                                                   "id_sha256_prefix": None}
    other = subprocess.run([INSTANTID, "verify", str(marked), "--service", "elsewhere"], capture_output=True,
                           text=True, timeout=120)
    assert other.returncode == 1 and json.loads(other.stdout)["watermark"]["this_service"] is False
    unmarked = subprocess.run([INSTANTID, "verify", str(plain)], capture_output=True, text=True, timeout=120)
    assert unmarked.returncode == 1 and json.loads(unmarked.stdout)["watermark"]["found"] is False
    missing = subprocess.run([INSTANTID, "verify", str(tmp_path / "nothing.png")], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "image: file not found" in missing.stderr and not missing.stdout
