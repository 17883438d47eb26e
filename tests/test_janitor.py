import time

from deployments.janitor import sweep
from service.audit import entries
from service.keys import claim_key, lease_key, mark_deleted, record_key
from service.storage import LocalStorage

OLD, NEW, JOB_OLD, JOB_NEW = (f"g_{name:_<22}" for name in ("old", "new", "jobold", "jobnew"))
NO_ORPHANS = {"orphan_generations": 0, "stale_claims": 0, "partial_uploads": 0}
HOUR = 3600.0


def test_sweep_deletes_only_what_outlived_its_retention(tmp_path):
    store = LocalStorage(tmp_path, signing_key=b"k")
    now = time.time()
    store.put_json("faces/f_old.json", {"expires_at": now - 1, "face_id": "f_old", "owner": "o1",
                                        "face": {"embedding": [1.0]}})
    store.put_json("faces/f_new.json", {"expires_at": now + 3600})
    store.put("generations/" + OLD + "/0.png", b"png")
    store.put_json("generations/" + OLD + "/renders/r.json", {})
    store.put_json("generations/" + OLD + "/record.json", {"expires_at": now - 1})
    store.put("generations/" + NEW + "/0.png", b"png")
    store.put_json("generations/" + NEW + "/record.json", {"expires_at": now + 3600})
    for job, expires in ((JOB_OLD, now - 1), (JOB_NEW, now + 3600)):  # a job: its record, input and lease
        store.put_json(f"jobs/{job}/record.json", {"expires_at": expires})
        store.put_json(f"jobs/{job}/input.json", {"params": {}})
        store.put_json(f"jobs/active/{job}.json", {"holder": None})
    mark_deleted(store, OLD, "owner", keep_s=-1)  # a deleted mark past its time, and one still needed
    mark_deleted(store, NEW, "owner", keep_s=3600)
    # the places of a key whose jobs never finished (all lapsed), and of a key with one still counted
    store.put_json("jobs/owners/o1.json", {"expires_at": now - 1, "jobs": {JOB_OLD: now - 1}})
    store.put_json("jobs/owners/o2.json", {"expires_at": now + 3600, "jobs": {JOB_OLD: now - 1, JOB_NEW: now + 3600}})
    store.put_json(f"uses/f_old/{OLD}.json", {"expires_at": now - 1})  # the link from a face to what it made
    store.put_json(f"uses/f_new/{NEW}.json", {"expires_at": now + 3600})
    assert sweep(store) == {"faces": 1, "generations": 1, "jobs": 1, "deleted_marks": 1, "job_places": 1,
                            "face_uses": 1, **NO_ORPHANS}
    # the expired face's erasure is in the audit log (ids and time only)
    [entry] = entries(store)
    assert {k: v for k, v in entry.items() if k != "at"} == {"event": "face_erased", "owner": "o1", "face_id": "f_old",
                                                             "reason": "expired"}
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()
                  and ".locks" not in p.parts and "audit" not in p.parts) == sorted([
        "faces/f_new.json", f"generations/{NEW}/0.png", f"generations/{NEW}/record.json",
        f"jobs/{JOB_NEW}/input.json", f"jobs/{JOB_NEW}/record.json", f"jobs/active/{JOB_NEW}.json",
        f"jobs/deleted/{NEW}.json", "jobs/owners/o2.json", f"uses/f_new/{NEW}.json"])
    assert sweep(store) == {"faces": 0, "generations": 0, "jobs": 0, "deleted_marks": 0, "job_places": 0,
                            "face_uses": 0, **NO_ORPHANS}


def left_over(store, written: float) -> tuple[str, ...]:
    """What writers that died leave, and what live ones hold, as written at ``written``
    (claims are held for a minute)."""
    orphan, running, done, storing = (f"g_{name:_<22}" for name in ("orphan", "running", "done", "storing"))
    store.put("generations/" + orphan + "/0.png", b"png")  # images stored, the record never written
    store.put_json(claim_key(orphan), {"attempt": "a", "expires_at": written + 60})
    store.put("generations/" + running + "/0.png", b"png")  # a job whose lease is held: not an orphan
    store.put_json(lease_key(running), {"holder": "r1"})
    store.put_json(record_key(done), {"expires_at": written + 30 * 86400})  # a claim its holder never released
    store.put_json(claim_key(done), {"attempt": "b", "expires_at": written + 60})
    return orphan, running, done, storing


def test_what_dead_writers_left_is_swept_once_it_is_older_than_orphans_s(tmp_path):
    import os

    store = LocalStorage(tmp_path, signing_key=b"k")
    now = time.time()
    orphan, running, done, storing = left_over(store, now - 2 * HOUR)
    for path in tmp_path.rglob("*"):  # all of it written two hours ago ...
        os.utime(path, (now - 2 * HOUR, now - 2 * HOUR))
    store.put("generations/" + storing + "/0.png", b"png")  # ... but one render storing its images right now
    partial = tmp_path / "generations" / storing / ".part-x1"  # and a write that died half-way, long ago
    partial.write_bytes(b"half")
    os.utime(partial, (now - 2 * HOUR, now - 2 * HOUR))
    fresh = tmp_path / "generations" / storing / ".part-x2"  # and one under way now
    fresh.write_bytes(b"half")
    assert sweep(store, now=now, orphans_s=HOUR) == {
        **{k: 0 for k in ("faces", "generations", "jobs", "deleted_marks", "job_places", "face_uses")},
        "orphan_generations": 1, "stale_claims": 1, "partial_uploads": 1}
    assert store.list_keys(f"generations/{orphan}") == []
    assert store.list_keys(f"generations/{running}") == [f"generations/{running}/0.png"]
    assert store.list_keys(f"generations/{done}") == [record_key(done)]
    assert store.list_keys(f"generations/{storing}") == [f"generations/{storing}/0.png"]
    assert not partial.exists() and fresh.exists()
    assert sweep(store, now=now, orphans_s=HOUR) == {**{k: 0 for k in ("faces", "generations", "jobs",
                                                                       "deleted_marks", "job_places", "face_uses")},
                                                     **NO_ORPHANS}


def test_orphans_and_unfinished_multipart_uploads_are_swept_on_s3(s3_server, monkeypatch):
    """SeaweedFS's own modification times and multipart uploads (a clock moved ahead stands
    for the hour that passed)."""
    from service.storage import open_storage

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3_server.client().create_bucket(Bucket="janitor-tests")
    store = open_storage("s3://janitor-tests/p", endpoint_url=s3_server.endpoint)
    now = time.time()
    orphan, running, done, _ = left_over(store, now)
    client = s3_server.client()
    upload = client.create_multipart_upload(Bucket="janitor-tests", Key=f"p/generations/{orphan}/1.png")
    client.upload_part(Bucket="janitor-tests", Key=f"p/generations/{orphan}/1.png", PartNumber=1,
                       UploadId=upload["UploadId"], Body=b"x" * 1024)
    other = client.create_multipart_upload(Bucket="janitor-tests", Key="elsewhere/1.png")  # not this store's
    assert sweep(store, now=now + 30, orphans_s=HOUR)["orphan_generations"] == 0  # not old enough yet
    swept = sweep(store, now=now + 2 * HOUR, orphans_s=HOUR)
    assert {k: swept[k] for k in NO_ORPHANS} == {"orphan_generations": 1, "stale_claims": 1, "partial_uploads": 1}
    assert store.list_keys(f"generations/{orphan}") == [] and store.exists(f"generations/{running}/0.png")
    assert store.list_keys(f"generations/{done}") == [record_key(done)]
    uploads = client.list_multipart_uploads(Bucket="janitor-tests").get("Uploads", [])
    assert [u["UploadId"] for u in uploads] == [other["UploadId"]]
    client.abort_multipart_upload(Bucket="janitor-tests", Key="elsewhere/1.png", UploadId=other["UploadId"])


class CountingStorage(LocalStorage):
    """A local store that counts its listings of each prefix (on S3 each is a paged LIST)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.listings: dict[str, int] = {}

    def list_keys(self, prefix: str) -> list[str]:  # list_modified lists through it
        self.listings[prefix] = self.listings.get(prefix, 0) + 1
        return super().list_keys(prefix)


def test_one_sweep_lists_the_generations_once_and_an_erased_one_is_no_orphan(tmp_path):
    """Expired generations and orphans swept together from one listing of ``generations/``;
    what the expiry sweep erased is not counted again as an orphan."""
    import os

    store = CountingStorage(tmp_path, signing_key=b"k")
    now = time.time()
    orphan, _, _, _ = left_over(store, now - 2 * HOUR)
    store.put("generations/" + OLD + "/0.png", b"png")
    store.put_json(record_key(OLD), {"expires_at": now - 1})
    for path in tmp_path.rglob("*"):
        os.utime(path, (now - 2 * HOUR, now - 2 * HOUR))
    swept = sweep(store, now=now, orphans_s=HOUR)
    assert (swept["generations"], swept["orphan_generations"]) == (1, 1)
    assert store.list_keys(f"generations/{OLD}") == [] and store.list_keys(f"generations/{orphan}") == []
    assert store.listings["generations"] == 1
