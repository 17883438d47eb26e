"""Photos named by ``s3://`` reference, read from a real object store (SeaweedFS): only the
caller's own uploads, never more than the byte cap, and only the object that was
size-checked."""

from __future__ import annotations

import asyncio
import io

import pytest

from tests.conftest import face_photo

OWNER = "o_inputs"


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    face_photo(blobs=((100 + 10 * seed, 128, 50),)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def photo(s3_server, monkeypatch):
    """An upload of OWNER's in an input bucket, and ImageInputs reading that bucket."""
    from deployments.inputs import ImageInputs, upload_prefix
    from service.config import Limits

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    s3 = s3_server.client()
    if "inputs-test" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket="inputs-test")
    key = upload_prefix(OWNER) + "photo.png"
    s3.put_object(Bucket="inputs-test", Key=key, Body=png(1))
    inputs = ImageInputs(Limits(max_image_bytes=1024 * 1024), ["inputs-test"], s3_server.endpoint)
    return {"inputs": inputs, "s3": s3, "key": key, "ref": f"s3://inputs-test/{key}"}


def read(photo) -> bytes:
    return asyncio.run(photo["inputs"].image_bytes(photo["ref"], "face_images[0]", OWNER))


def test_an_s3_photo_is_read_with_a_ranged_get_of_at_most_the_cap(photo):
    assert read(photo) == png(1)
    ranges = []
    photo["inputs"]._s3.meta.events.register(
        "before-send.s3.GetObject", lambda request, **_: ranges.append(request.headers.get("Range")))
    assert read(photo) == png(1)
    assert [r.decode() if isinstance(r, bytes) else r for r in ranges] == [f"bytes=0-{1024 * 1024 - 1}"]


def test_a_photo_swapped_between_its_size_check_and_its_read_is_not_read(photo):
    """The GET is pinned (``If-Match``) to the ETag the size check saw: an object replaced in
    between is refused, not read."""
    from pipeline.errors import InvalidParameter

    read(photo)  # the client exists now
    swapped = png(2)
    photo["inputs"]._s3.meta.events.register(
        "after-call.s3.HeadObject",
        lambda **_: photo["s3"].put_object(Bucket="inputs-test", Key=photo["key"], Body=swapped))
    with pytest.raises(InvalidParameter, match="cannot read s3://inputs-test/") as refused:
        read(photo)
    assert refused.value.field == "face_images[0]"


def test_another_keys_upload_gets_the_answer_a_missing_object_gets(photo):
    from deployments.inputs import upload_prefix
    from pipeline.errors import InvalidParameter

    answers = []
    for ref in (photo["ref"], f"s3://inputs-test/{upload_prefix(OWNER)}missing.png"):
        with pytest.raises(InvalidParameter) as refused:
            asyncio.run(photo["inputs"].image_bytes(ref, "face_images[0]", "o_someone_else"))
        answers.append(str(refused.value).replace(ref, "REF"))
    assert answers[0] == answers[1]
