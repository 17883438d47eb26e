import time

from deployments.janitor import sweep
from deployments.storage import LocalStorage


def test_sweep_deletes_only_what_outlived_its_retention(tmp_path):
    store = LocalStorage(tmp_path, signing_key=b"k")
    now = time.time()
    store.put_json("faces/f_old.json", {"expires_at": now - 1, "face": {"embedding": [1.0]}})
    store.put_json("faces/f_new.json", {"expires_at": now + 3600})
    store.put("generations/g_old/0.png", b"png")
    store.put_json("generations/g_old/renders/r.json", {})
    store.put_json("generations/g_old/record.json", {"expires_at": now - 1})
    store.put("generations/g_new/0.png", b"png")
    store.put_json("generations/g_new/record.json", {"expires_at": now + 3600})
    store.put_json("jobs/g_old.json", {"expires_at": now - 1})
    store.put_json("jobs/g_new.json", {"expires_at": now + 3600})
    assert sweep(store) == {"faces": 1, "generations": 1, "jobs": 1}
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "faces/f_new.json", "generations/g_new/0.png", "generations/g_new/record.json", "jobs/g_new.json"]
    assert sweep(store) == {"faces": 0, "generations": 0, "jobs": 0}
