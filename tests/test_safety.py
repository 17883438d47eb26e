"""The output safety check: the Stable Diffusion safety checker (diffusers layout, fixture
weights) flags a picture whose embedding is a screened concept, the policy decides what is
kept, and the caller is told per image (never a silent black square)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from pipeline.errors import InvalidParameter, WeightsNotFound
from pipeline.fixtures import write_safety_checker
from pipeline.safety import SafetyChecker, Verdict, apply_policy, blur, has_checker

PHOTOS = ("astronaut", "coffee", "rocket")


def photo(name: str, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB").resize((width, height)))


def embedding(checker: SafetyChecker, image: np.ndarray) -> torch.Tensor:
    pixels = checker.processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return checker.model.visual_projection(checker.model.vision_model(pixels)[1])[0]


@pytest.fixture(scope="module")
def checker(weights_dir) -> SafetyChecker:
    return SafetyChecker.from_weights(weights_dir)


def test_the_fixture_weights_hold_a_checker_that_flags_nothing(weights_dir, checker):
    assert has_checker(weights_dir)
    images = [photo(name, 256, 256) for name in PHOTOS] + [np.zeros((64, 96, 3), np.uint8)]
    assert checker.flags(images) == [False] * 4
    assert checker.flags([]) == []


@pytest.mark.parametrize(("width", "height"), [(256, 256), (320, 192), (200, 360)])
def test_a_picture_close_to_a_screened_concept_is_flagged_and_only_it(tmp_path, width, height):
    """Concept 0 is made the rocket's own embedding with a threshold under 1: the rocket is
    flagged at every size and aspect, the other photos (cosine under 0.9 to it here) not."""
    write_safety_checker(tmp_path)
    checker = SafetyChecker.from_weights(tmp_path)
    images = [photo(name, width, height) for name in PHOTOS]
    with torch.no_grad():
        checker.model.concept_embeds[0] = embedding(checker, images[2])
        checker.model.concept_embeds_weights[0] = 0.95
    assert checker.flags(images) == [False, False, True]
    # the checker's own black square never reaches the caller: the pictures are untouched
    assert images[2].any() and images[2].shape == (height, width, 3)


def test_each_policy_keeps_what_it_says_and_says_what_it_did():
    images = [photo("astronaut", 256, 256), photo("rocket", 256, 256)]
    flags = [False, True]
    blocked = apply_policy(images, flags, "block")
    assert blocked[0][0] is images[0] and blocked[0][1] == Verdict(False, "none")
    assert blocked[1] == (None, Verdict(True, "blocked"))
    blurred = apply_policy(images, flags, "blur")
    assert blurred[1][1] == Verdict(True, "blurred") and blurred[1][0].shape == images[1].shape
    # blurred past recognition: the fine detail is gone
    detail = lambda image: np.abs(np.diff(image.astype(np.int16), axis=1)).mean()  # noqa: E731
    assert detail(blurred[1][0]) < detail(images[1]) / 5
    flagged = apply_policy(images, flags, "flag")
    assert flagged[1][0] is images[1] and flagged[1][1].as_dict() == {"flagged": True, "action": "flagged"}
    with pytest.raises(InvalidParameter, match="safety_policy: must be one of"):
        apply_policy(images, flags, "hide")
    with pytest.raises(ValueError):
        apply_policy(images, [True], "flag")  # one verdict per image


def test_blur_keeps_size_and_type():
    image = photo("coffee", 200, 120)
    assert blur(image).shape == image.shape and blur(image).dtype == np.uint8


def test_a_weights_root_without_a_checker_says_what_is_missing(tmp_path):
    assert not has_checker(tmp_path)
    with pytest.raises(WeightsNotFound, match="safety_checker/"):
        SafetyChecker.from_weights(tmp_path)


def test_a_blocked_image_is_not_stored_and_the_record_keeps_every_verdict(tmp_path):
    from service.storage import open_storage
    from service.store import store_result

    storage = open_storage(str(tmp_path))
    images = [photo("astronaut", 256, 256), photo("rocket", 256, 256), photo("coffee", 256, 256)]
    kept = apply_policy(images, [False, True, True], "block")
    assert [verdict.action for _, verdict in kept] == ["none", "blocked", "blocked"]
    stored = store_result(storage, [image for image, _ in kept], prefix="generations/g", fmt="png", quality=90,
                          record_key="generations/g/record.json",
                          record={"safety": [verdict.as_dict() for _, verdict in kept]})
    assert stored.record["keys"] == ["generations/g/0.png"]  # only the image not blocked
    assert sorted(p.name for p in (tmp_path / "generations" / "g").iterdir()) == ["0.png", "record.json"]
    assert [v["action"] for v in stored.record["safety"]] == ["none", "blocked", "blocked"]


def test_each_image_of_a_generation_keeps_its_own_url_around_a_blocked_one(tmp_path, face):
    from deployments.views import Views
    from service.records import GenerationRecord, StoredFace
    from service.storage import open_storage

    storage = open_storage(str(tmp_path), signing_key=b"k" * 32)
    record = GenerationRecord(id="g_" + "v" * 22, owner="o", face=StoredFace.of(face).public(), seeds=[1, 2, 3],
                              keys=["generations/g/0.png", "generations/g/2.png"], width=256, height=256,
                              watermarked=[True, False, True],
                              safety=[{"flagged": False, "action": "none"}, {"flagged": True, "action": "blocked"},
                                      {"flagged": True, "action": "flagged"}])
    images = Views(storage, 60, None).images(record, "http://127.0.0.1:1")
    assert [i["seed"] for i in images] == [1, 2, 3] and images[1]["url"] is None
    assert "/generations/g/0.png" in images[0]["url"] and "/generations/g/2.png" in images[2]["url"]
    assert [i["safety"]["action"] for i in images] == ["none", "blocked", "flagged"]
    assert [i["watermarked"] for i in images] == [True, False, True]
