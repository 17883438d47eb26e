"""Several people in one picture through real HTTP (the session's shared S3 app): a
synchronous render of two people (photos and a registered face, each in a box), an async
job of two people placed by their pose photos, the 422s that name the field, and a
cascade erasure of a face used by a person. Renders are 64x64, two steps."""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest

from tests.conftest import CONSENT, KEY_A, data_url, face_photo

SIZE = {"width": 64, "height": 64, "num_inference_steps": 2}
LEFT, RIGHT = [0, 0, 32, 64], [32, 0, 64, 64]  # touching edges: no overlap
MADE: dict[str, str] = {}  # generations this module made, by test (the cascade erases them)


@pytest.fixture(scope="module")
def client(s3_app):
    with httpx.Client(base_url=s3_app["url"], timeout=120, headers={"Authorization": f"Bearer {KEY_A}"}) as c:
        yield c


@pytest.fixture(scope="module")
def photo() -> str:
    return data_url(face_photo())


@pytest.fixture(scope="module")
def face_id(client, photo) -> str:
    response = client.post("/v1/faces", json={"consent": CONSENT, "face_images": [photo]})
    assert response.status_code == 201, response.text
    return response.json()["face_id"]


def assert_error(response: httpx.Response, status: int, code: str, field: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error.get("field")) == (code, field), error
    assert error["message"]


def test_two_people_in_boxes_render_synchronously(client, photo, face_id):
    """One person from photos, one registered; the record's face is the first person's;
    the manifest states the settings and no face data."""
    people = [{"face_images": [photo], "box": LEFT}, {"face_id": face_id, "box": RIGHT}]
    response = client.post("/v1/generations", json={"people": people, "seed": 5, **SIZE})
    assert response.status_code == 200, response.text
    body = response.json()
    MADE["sync"] = body["id"]
    [image] = body["images"]
    assert (image["width"], image["height"], image["seed"]) == (64, 64, 5)
    assert set(body["face"]) == {"bbox", "kps", "det_score", "image_size"}
    stored = httpx.get(image["url"], timeout=60)
    assert stored.status_code == 200
    verified = client.post("/v1/verify", json={"image": base64.b64encode(stored.content).decode()})
    assert verified.status_code == 200, verified.text
    settings = json.dumps(verified.json()["c2pa"]["generation"])
    assert verified.json()["c2pa"]["valid"] and '"steps": 2' in settings
    assert not any(word in settings for word in ("face_id", "face_images", "pose_image", "embedding", face_id))


def test_an_async_job_of_two_people_placed_by_their_pose_photos_succeeds(client, photo, face_id):
    """Photos with a pose photo (kept analysed in the job's input) and a registered face
    with a pose photo (a reference, read when the job runs)."""
    left = data_url(face_photo(blobs=((48, 128, 36),)))
    right = data_url(face_photo(blobs=((208, 128, 36),)))
    people = [{"face_images": [photo], "pose_image": left}, {"face_id": face_id, "pose_image": right}]
    response = client.post("/v1/generations", json={"people": people, "seed": 9, "async": True, **SIZE})
    assert response.status_code == 202, response.text
    MADE["async"] = generation_id = response.json()["id"]
    deadline = time.monotonic() + 120
    while (view := client.get(f"/v1/generations/{generation_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, view
        time.sleep(0.2)
    assert view["status"] == "succeeded", view
    assert [(i["width"], i["height"], i["seed"]) for i in view["images"]] == [(64, 64, 9)]
    assert httpx.get(view["images"][0]["url"], timeout=60).status_code == 200


def person(box=LEFT, **face):
    return {"face_images": ["PHOTO"], "box": box} if not face else {**face, "box": box}


@pytest.mark.parametrize("change,field", [
    ({"people": [person(), person([16, 0, 48, 64])]}, "people[1].box"),  # overlapping regions
    ({"people": [person([0, 0, 32, 72])]}, "people[0].box"),  # past the picture
    ({"people": [person([8 * k, 0, 8 * k + 8, 8]) for k in range(5)]}, "people"),  # 5 people
    ({"people": [person(), {"face_images": ["PHOTO"], "box": RIGHT, "pose_image": "PHOTO"}]}, "people[1]"),
    ({"people": [person(), {"box": RIGHT}]}, "people[1]"),  # no face
    ({"people": [person(), {"face_images": ["PHOTO"], "face_id": "f_" + "a" * 22, "box": RIGHT}]}, "people[1]"),
    ({"people": [person()], "face_images": ["PHOTO"]}, "face_images"),
    ({"people": [person()], "pose_image": "PHOTO"}, "pose_image"),
    ({"people": [person()], "width": None}, "width"),
    ({"people": [person(box=[0, 0, 8, 8], face_images=["PHOTO"] * 3),
                 person(box=RIGHT, face_images=["PHOTO"] * 2)]}, "people"),  # 5 photos in all, 4 allowed
    ({"people": [person(), person(RIGHT, face_images=["PHOTO", "not base64!"])]}, "people[1].face_images[1]"),
    ({"people": [{**person(), "colour": "red"}]}, "people[0].colour"),
])
def test_bad_people_are_422_naming_the_field(client, photo, change, field):
    body = {**SIZE, **change}
    body = {k: v for k, v in json.loads(json.dumps(body).replace('"PHOTO"', json.dumps(photo))).items()
            if v is not None}
    response = client.post("/v1/generations", json=body)
    if field.endswith("face_images[1]"):
        assert_error(response, 400, "invalid_image", field)
    else:
        assert_error(response, 422, "invalid_parameter", field)


def test_a_persons_unknown_face_id_is_404_naming_the_person(client, photo):
    people = [{"face_images": [photo], "box": LEFT}, {"face_id": "f_" + "x" * 22, "box": RIGHT}]
    assert_error(client.post("/v1/generations", json={"people": people, **SIZE}), 404, "not_found",
                 "people[1].face_id")


def test_erasing_a_face_used_by_a_person_with_cascade_erases_those_generations(client, photo, face_id):
    """The multi-person generations that used the face go with it (the ones above, or one
    made here when this test runs alone)."""
    if "sync" not in MADE:
        people = [{"face_images": [photo], "box": LEFT}, {"face_id": face_id, "box": RIGHT}]
        made = client.post("/v1/generations", json={"people": people, **SIZE})
        assert made.status_code == 200, made.text
        MADE["sync"] = made.json()["id"]
    erased = client.delete(f"/v1/faces/{face_id}?cascade=true")
    assert erased.status_code == 200, erased.text
    assert erased.json()["face_id"] == face_id and erased.json()["generations_erased"] >= 1
    assert erased.json()["generations_erased"] == len(MADE)
    for generation_id in MADE.values():
        assert_error(client.get(f"/v1/generations/{generation_id}"), 404, "not_found", None)
