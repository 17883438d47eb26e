"""Idempotency claims, job leases and the store step over both real stores (a local
folder and SeaweedFS), raced by threads: whatever the interleaving, one attempt wins."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pipeline.params import GenerationParams
from service import claims
from service.jobs import JobStore
from service.keys import claim_key, lease_key, record_key, render_log_prefix
from service.records import JobInput, JobRecord, StoredFace
from service.storage import LocalStorage, open_storage
from service.store import store_result

GENERATION = "g_" + "c" * 22


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, s3_server, monkeypatch):
    if request.param == "local":
        return LocalStorage(tmp_path / "store", signing_key=b"k")
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = "claims-" + str(time.time_ns())[-9:]
    s3_server.client().create_bucket(Bucket=bucket)
    return open_storage(f"s3://{bucket}/svc")


def race(count: int, fn):
    start = threading.Barrier(count)

    def run(n: int):
        start.wait()
        return fn(n)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def test_an_expired_claim_is_taken_over_by_exactly_one_retry(store):
    assert claims.try_claim(store, GENERATION, "hash", "first", hold_s=60) == ("won", None)
    assert claims.try_claim(store, GENERATION, "hash", "second", hold_s=60) == ("held", None)  # live: wait
    with pytest.raises(Exception, match="different request"):
        claims.try_claim(store, GENERATION, "other-hash", "third", hold_s=60)
    held = store.get_json(claim_key(GENERATION))
    store.put_json(claim_key(GENERATION), {**held, "expires_at": time.time() - 1})  # its attempt died
    outcomes = race(8, lambda n: claims.try_claim(store, GENERATION, "hash", f"retry-{n}", hold_s=60)[0])
    assert outcomes.count("won") == 1 and outcomes.count("held") == 7, outcomes
    assert store.get_json(claim_key(GENERATION))["attempt"] == f"retry-{outcomes.index('won')}"
    claims.release(store, GENERATION, "someone-else")  # only the holder releases
    assert store.exists(claim_key(GENERATION))
    claims.release(store, GENERATION, f"retry-{outcomes.index('won')}")
    assert not store.exists(claim_key(GENERATION))


def test_a_stored_result_is_returned_instead_of_a_claim(store):
    store.put_json(record_key(GENERATION), {"id": GENERATION, "owner": "o", "request_hash": "hash",
                                            "face": {"bbox": [0, 0, 1, 1], "kps": [[0, 0]] * 5, "det_score": 1,
                                                     "image_size": [1, 1]}})
    state, record = claims.try_claim(store, GENERATION, "hash", "late", hold_s=60)
    assert state == "done" and record.id == GENERATION


def job(store, lease_s: float = 30.0) -> tuple[JobStore, JobRecord]:
    jobs = JobStore(store, lease_s)
    face = StoredFace(bbox=[0, 0, 1, 1], kps=[[0, 0]] * 5, det_score=1.0, image_size=[8, 8], embedding=[0.5] * 4)
    record = JobRecord(id=GENERATION, owner="o", expires_at=time.time() + 60)
    assert jobs.create(record, JobInput(params=GenerationParams(seed=3), face=face))
    assert not jobs.create(record, JobInput(params=GenerationParams(seed=4), face=face))  # one job per id
    assert jobs.input(GENERATION).params.seed == 3 and jobs.input(GENERATION).face == face
    return jobs, record


def test_one_runner_at_a_time_holds_a_job_and_an_expired_lease_is_taken_over_once(store):
    jobs, _ = job(store)
    assert jobs.waiting() == [GENERATION]  # new: nobody runs it
    versions = race(6, lambda n: jobs.acquire(GENERATION, f"runner-{n}"))
    winners = [n for n, version in enumerate(versions) if version is not None]
    assert len(winners) == 1 and jobs.waiting() == []
    holder, version = f"runner-{winners[0]}", versions[winners[0]]
    version = jobs.renew(GENERATION, holder, version)
    assert version is not None and jobs.acquire(GENERATION, "runner-late") is None  # live: held
    lease = json.loads(store.get(lease_key(GENERATION)))
    store.put(lease_key(GENERATION), json.dumps({**lease, "expires_at": time.time() - 1}).encode())  # it died
    assert jobs.waiting() == [GENERATION]
    takers = race(6, lambda n: jobs.acquire(GENERATION, f"taker-{n}"))
    assert sum(v is not None for v in takers) == 1
    assert jobs.renew(GENERATION, holder, version) is None  # the old holder learns it lost the job
    taker = next(n for n, v in enumerate(takers) if v is not None)
    assert jobs.release(GENERATION, takers[taker])  # handed over: free at once
    assert jobs.waiting() == [GENERATION]
    jobs.finish(GENERATION)
    assert jobs.waiting() == [] and jobs.acquire(GENERATION, "anyone") is None  # finished: nothing to run
    assert jobs.record(GENERATION) is not None  # the record stays (until retention)


def test_racing_stores_of_one_result_store_it_once(store):
    images = [np.full((8, 8, 3), 120, np.uint8)]
    stored = race(4, lambda n: store_result(store, images, prefix=f"generations/{GENERATION}", fmt="png",
                                            quality=90, record_key=record_key(GENERATION),
                                            record={"id": GENERATION, "attempt": n}, log_renders=GENERATION))
    assert sum(s.fresh for s in stored) == 1
    assert len({json.dumps(s.record, sort_keys=True) for s in stored}) == 1  # all see the record that stands
    assert len(store.list_keys(render_log_prefix(GENERATION))) == 1
    assert store.list_keys(f"generations/{GENERATION}") == sorted(
        [f"generations/{GENERATION}/0.png", record_key(GENERATION), *store.list_keys(render_log_prefix(GENERATION))])
