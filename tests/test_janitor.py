import time

from deployments.janitor import sweep
from service.audit import entries
from service.keys import mark_deleted
from service.storage import LocalStorage

OLD, NEW, JOB_OLD, JOB_NEW = (f"g_{name:_<22}" for name in ("old", "new", "jobold", "jobnew"))


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
    assert sweep(store) == {"faces": 1, "generations": 1, "jobs": 1, "deleted_marks": 1, "job_places": 1}
    # the expired face's erasure is in the audit log (ids and time only)
    [entry] = entries(store)
    assert {k: v for k, v in entry.items() if k != "at"} == {"event": "face_erased", "owner": "o1", "face_id": "f_old",
                                                             "reason": "expired"}
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()
                  and ".locks" not in p.parts and "audit" not in p.parts) == sorted([
        "faces/f_new.json", f"generations/{NEW}/0.png", f"generations/{NEW}/record.json",
        f"jobs/{JOB_NEW}/input.json", f"jobs/{JOB_NEW}/record.json", f"jobs/active/{JOB_NEW}.json",
        f"jobs/deleted/{NEW}.json", "jobs/owners/o2.json"])
    assert sweep(store) == {"faces": 0, "generations": 0, "jobs": 0, "deleted_marks": 0, "job_places": 0}
