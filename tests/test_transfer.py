"""Fetching one object from S3 (SeaweedFS) in parallel ranged parts: the same bytes, checked
against the ETag, resumed after the fetching process is killed, never mixed with a replaced
object, and refetched when the bytes on disk are not what the journal says."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.transfer import ContentMismatch, ObjectChanged, fetch_object, part_layout

ROOT = Path(__file__).resolve().parent.parent
KIB, MIB = 1024, 1024 * 1024
BUCKET = "transfer"


@pytest.fixture(scope="module")
def s3(s3_server):
    client = s3_server.client()
    client.create_bucket(Bucket=BUCKET)
    return client


def put(client, key: str, data: bytes, *, multipart_mib: int | None = None) -> dict:
    """Upload as ``aws s3 cp`` does (multipart in ``multipart_mib`` parts when given) and
    return its listing's size and ETag."""
    if multipart_mib:
        upload = client.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
        part_size = multipart_mib * MIB
        parts = []
        for number, start in enumerate(range(0, len(data), part_size), start=1):
            answer = client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=number,
                                        Body=data[start:start + part_size])
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        client.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})
    else:
        client.put_object(Bucket=BUCKET, Key=key, Body=data)
    head = client.head_object(Bucket=BUCKET, Key=key)
    return {"size": int(head["ContentLength"]), "etag": head["ETag"].strip('"')}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_etag_of_each_upload_kind_is_what_the_check_expects(s3):
    """The two ETag forms the check relies on, as this S3 server makes them: the MD5 of the
    bytes for one PUT; the MD5 of the parts' MD5s and ``-N`` for a multipart upload."""
    data = os.urandom(11 * MIB + 123)
    whole = put(s3, "kinds/whole.bin", data)
    assert whole["etag"] == hashlib.md5(data).hexdigest()
    multi = put(s3, "kinds/multi.bin", data, multipart_mib=5)
    digests = b"".join(hashlib.md5(data[i:i + 5 * MIB]).digest() for i in range(0, len(data), 5 * MIB))
    assert multi["etag"] == f"{hashlib.md5(digests).hexdigest()}-3"
    layout, check = part_layout(s3, BUCKET, "kinds/multi.bin", multi["size"], multi["etag"])
    assert check == "multipart-md5" and layout == [(0, 5 * MIB), (5 * MIB, 10 * MIB), (10 * MIB, len(data))]


@pytest.mark.parametrize("kind", ["single", "multipart"])
@pytest.mark.parametrize("size", [0, 1, 300 * KIB - 1, 300 * KIB, 6 * MIB + 7])
def test_every_size_arrives_byte_for_byte_and_checked(s3, tmp_path, kind, size):
    """Empty, one byte, one short of a part, exactly parts, several parts plus a tail."""
    data = os.urandom(size)
    key = f"sizes/{kind}-{size}.bin"
    info = put(s3, key, data, multipart_mib=5 if kind == "multipart" and size > 0 else None)
    target = tmp_path / "out.bin"
    fetched = fetch_object(s3, BUCKET, key, target, part_bytes=100 * KIB, workers=4, **info)
    assert target.read_bytes() == data
    assert (fetched.size, fetched.fetched_bytes, fetched.resumed_bytes) == (size, size, 0)
    expected_check = "multipart-md5" if kind == "multipart" and size > 0 else "md5"
    assert fetched.check == expected_check
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # no partial file, no journal left


KILL_AFTER = """
import os, signal, sys
from pipeline.s3 import s3_client
from pipeline.transfer import fetch_object
bucket, key, target, size, etag, part, stop = sys.argv[1:8]
def progress(done, total):
    if done >= int(stop):  # killed as a machine or a scheduler kills: no clean-up at all
        os.kill(os.getpid(), signal.SIGKILL)
fetch_object(s3_client(), bucket, key, target, size=int(size), etag=etag, part_bytes=int(part), workers=2,
             on_progress=progress)
"""


def killed_midway(s3_server, key: str, info: dict, target: Path, part: int, stop_at: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER, BUCKET, key, str(target), str(info["size"]),
                           info["etag"], str(part), str(stop_at)],
                          cwd=ROOT, env={**os.environ, **s3_server.env()}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not target.exists()
    journal = json.loads(target.with_name(target.name + ".partial.json").read_text())
    assert journal["etag"] == info["etag"] and journal["done"]
    return journal


@pytest.mark.parametrize("kind", ["single", "multipart"])
def test_a_fetch_killed_midway_resumes_where_it_stopped(s3, s3_server, tmp_path, kind):
    data = os.urandom(16 * MIB + 5)
    key = f"resume/{kind}.bin"
    info = put(s3, key, data, multipart_mib=5 if kind == "multipart" else None)
    target = tmp_path / "w.bin"
    journal = killed_midway(s3_server, key, info, target, part=MIB, stop_at=6 * MIB)
    done = sum(end - start for index, (start, end) in enumerate(journal["layout"]) if str(index) in journal["done"])
    assert 0 < done < len(data)

    fetched = fetch_object(s3, BUCKET, key, target, part_bytes=MIB, workers=4, **info)
    assert (fetched.resumed_bytes, fetched.fetched_bytes) == (done, len(data) - done)  # nothing fetched twice
    assert sha(target) == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin"]


@pytest.mark.parametrize("kind", ["single", "multipart"])
def test_bytes_on_disk_that_differ_from_the_journal_are_caught_and_fetched_again(s3, s3_server, tmp_path, kind):
    """A journaled part whose bytes were lost (a crash before the page cache reached the disk)
    fails the content check; the partial file is dropped and the next fetch starts over."""
    data = os.urandom(12 * MIB + 1)
    key = f"corrupt/{kind}.bin"
    info = put(s3, key, data, multipart_mib=5 if kind == "multipart" else None)
    target = tmp_path / "w.bin"
    journal = killed_midway(s3_server, key, info, target, part=MIB, stop_at=MIB)
    first_done = min(int(i) for i in journal["done"])
    start = journal["layout"][first_done][0]
    with open(target.with_name("w.bin.partial"), "r+b") as handle:
        handle.seek(start + 10)
        handle.write(b"\0" * 64)
    with pytest.raises(ContentMismatch, match="ETag"):
        fetch_object(s3, BUCKET, key, target, part_bytes=MIB, workers=4, **info)
    assert not target.exists() and not target.with_name("w.bin.partial").exists()
    fetched = fetch_object(s3, BUCKET, key, target, part_bytes=MIB, workers=4, **info)
    assert fetched.resumed_bytes == 0 and target.read_bytes() == data


def test_an_object_replaced_between_attempts_is_fetched_whole_again(s3, s3_server, tmp_path):
    old, new = os.urandom(8 * MIB), os.urandom(8 * MIB)
    key = "replaced/between.bin"
    info = put(s3, key, old)
    target = tmp_path / "w.bin"
    killed_midway(s3_server, key, info, target, part=MIB, stop_at=3 * MIB)
    info = put(s3, key, new)  # same size, new content and ETag
    fetched = fetch_object(s3, BUCKET, key, target, part_bytes=MIB, workers=4, **info)
    assert fetched.resumed_bytes == 0 and target.read_bytes() == new


def test_an_object_replaced_during_a_fetch_is_never_mixed_in(s3, tmp_path):
    old, new = os.urandom(8 * MIB), os.urandom(8 * MIB)
    key = "replaced/during.bin"
    info = put(s3, key, old)
    target = tmp_path / "w.bin"
    replaced = []

    def replace_once(done, total):
        if not replaced:
            replaced.append(put(s3, key, new))

    with pytest.raises((ObjectChanged, ContentMismatch)):
        fetch_object(s3, BUCKET, key, target, part_bytes=MIB, workers=1, on_progress=replace_once, **info)
    assert not target.exists()
    fetched = fetch_object(s3, BUCKET, key, target, part_bytes=MIB, workers=4, **replaced[0])
    assert target.read_bytes() == new and fetched.check == "md5"
