import time
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.storage import LocalStorage, ObjectNotFound, S3Storage, StorageUnavailable, check_key, open_storage
from pipeline.errors import InvalidParameter
from pipeline.s3 import S3Location


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a/../b", "a//b", "", "a/.hidden", "x" * 600, "a b"])
def test_keys_are_plain_server_made_paths(key):
    with pytest.raises(InvalidParameter):
        check_key(key)


def test_local_store_roundtrip_atomic_and_signed_urls(tmp_path):
    store = LocalStorage(tmp_path / "s", signing_key=b"k")
    store.put("generations/g_1/0.png", b"png")
    store.put_json("faces/f_1.json", {"a": 1})
    assert store.get("generations/g_1/0.png") == b"png" and store.get_json("faces/f_1.json") == {"a": 1}
    assert not list((tmp_path / "s").rglob(".part-*"))
    url = store.url("generations/g_1/0.png", 60)
    assert url.startswith("/v1/files/generations/g_1/0.png?expires=")
    expires = int(url.split("expires=")[1].split("&")[0])
    signature = url.split("signature=")[1]
    assert store.verify("generations/g_1/0.png", expires, signature)
    assert not store.verify("generations/g_1/1.png", expires, signature)  # another file
    assert not store.verify("generations/g_1/0.png", expires + 1, signature)  # another expiry
    assert not LocalStorage(tmp_path / "s", signing_key=b"other").verify("generations/g_1/0.png", expires, signature)
    past = int(time.time()) - 1
    assert not store.verify("generations/g_1/0.png", past, store.signature("generations/g_1/0.png", past))
    store.delete("generations/g_1/0.png")
    with pytest.raises(ObjectNotFound):
        store.get("generations/g_1/0.png")
    assert not (tmp_path / "s" / "generations").exists()  # empty folders tidied


def test_s3_store_multipart_presigned_expiry_and_errors(s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    client = s3_server.client()
    client.create_bucket(Bucket="store-tests")
    store = open_storage("s3://store-tests/prefix", endpoint_url=s3_server.endpoint)
    assert isinstance(store, S3Storage)
    big = bytes(range(256)) * (40 * 1024)  # 10 MiB: above the multipart threshold
    store.put("big/object.bin", big)
    head = client.head_object(Bucket="store-tests", Key="prefix/big/object.bin")
    assert head["ContentLength"] == len(big) and "-" in head["ETag"]  # a multipart ETag
    assert store.get("big/object.bin") == big and store.exists("big/object.bin")
    url = store.url("big/object.bin", expires_s=2)
    assert httpx.get(url).content == big
    time.sleep(3)
    assert httpx.get(url).status_code == 403  # presigned URLs expire
    store.delete("big/object.bin")
    assert not store.exists("big/object.bin")
    with pytest.raises(ObjectNotFound):
        store.get("big/object.bin")
    wrong = S3Storage(S3Location("store-tests", "p"), endpoint_url="http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(StorageUnavailable):
        wrong.put("x", b"1")


def test_put_if_absent_is_atomic_in_both_stores(tmp_path, s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3_server.client().create_bucket(Bucket="claims")
    for store in (LocalStorage(tmp_path / "s", signing_key=b"k"), open_storage("s3://claims/x")):
        assert store.put_if_absent("locks/a.json", b"first") is True
        assert store.put_if_absent("locks/a.json", b"second") is False
        assert store.get("locks/a.json") == b"first"
        assert store.list_keys("locks") == ["locks/a.json"]
        # racing claims of a fresh key: exactly one wins, and its bytes are what is stored
        start = threading.Barrier(8)

        def claim(n: int) -> bool:
            start.wait()
            return store.put_if_absent("locks/race.json", f"claim {n}".encode())

        with ThreadPoolExecutor(8) as pool:
            won = list(pool.map(claim, range(8)))
        assert won.count(True) == 1
        assert store.get("locks/race.json") == f"claim {won.index(True)}".encode()


def test_put_if_match_replaces_only_the_version_read_in_both_stores(tmp_path, s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3_server.client().create_bucket(Bucket="leases")
    for store in (LocalStorage(tmp_path / "s", signing_key=b"k"), open_storage("s3://leases/x")):
        assert store.put_if_match("lease/none.json", b"x", "any-version") is None  # nothing to replace
        store.put("lease/a.json", b"v1")
        data, version = store.get_versioned("lease/a.json")
        assert data == b"v1"
        newer = store.put_if_match("lease/a.json", b"v2", version)
        assert newer is not None and newer != version and store.get_versioned("lease/a.json") == (b"v2", newer)
        assert store.put_if_match("lease/a.json", b"stale", version) is None  # read before v2: refused
        assert store.get("lease/a.json") == b"v2"
        # racing replacements of one version (e.g. takeovers of one expired lease): exactly one wins
        _, version = store.get_versioned("lease/a.json")
        start = threading.Barrier(8)

        def replace(n: int):
            start.wait()
            return store.put_if_match("lease/a.json", f"taker {n}".encode(), version)

        with ThreadPoolExecutor(8) as pool:
            won = [n for n, result in enumerate(pool.map(replace, range(8))) if result is not None]
        assert len(won) == 1 and store.get("lease/a.json") == f"taker {won[0]}".encode()
        assert store.list_keys("lease") == ["lease/a.json"]  # no lock files or temporaries listed
