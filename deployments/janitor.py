"""Janitor: deletes what outlived its retention (faces, generations, jobs, deleted marks,
face-use links), and what a writer that died left behind (orphaned images, stale claims,
uploads never completed).

The app also refuses expired data on every read, and bucket lifecycle rules
(``cluster/s3-lifecycle.json``) expire the same prefixes at the store; this sweep is what
enforces retention on any store, a local folder included. One replica, no CPU reserved.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from service.audit import audit
from service.keys import (DELETED_PREFIX, OWNERS_PREFIX, USES_PREFIX, active_job_ids, claim_key, erase_generation,
                          record_key)
from service.records import Expiring
from service.storage import ObjectNotFound, Storage, open_storage

logger = logging.getLogger("ray.serve")
ORPHANS_S = 3600.0


def sweep(storage: Storage, now: float | None = None, orphans_s: float = ORPHANS_S) -> dict[str, int]:
    """Delete every expired face, generation, job, deleted mark and face-use link, and what
    is left over by a writer that died (older than ``orphans_s``); return how many of each."""
    now = time.time() if now is None else now
    deleted = {"faces": 0, "generations": 0, "jobs": 0, "deleted_marks": 0, "job_places": 0, "face_uses": 0}
    for key in storage.list_keys("faces"):
        record = _record(storage, key) if key.endswith(".json") else None
        if record is not None and _is_expired(record, now):  # (read once: the audit entry names its owner)
            storage.delete(key)
            audit(storage, "face_erased", owner=record.get("owner", ""), face_id=record.get("face_id", key),
                  reason="expired")
            deleted["faces"] += 1
    # deleted marks (kept as long as anything deleted could still run), places in an owner's
    # count of unfinished jobs (a job that never finished is not counted past its retention),
    # and the links from a face to the generations made from it
    for prefix, kind in ((DELETED_PREFIX, "deleted_marks"), (OWNERS_PREFIX, "job_places"), (USES_PREFIX, "face_uses")):
        for key in storage.list_keys(prefix):
            if key.endswith(".json") and _expired(storage, key, now):
                storage.delete(key)
                deleted[kind] += 1
    expired_jobs = [key.split("/")[1] for key in storage.list_keys("jobs")
                    if key.endswith("/record.json") and _expired(storage, key, now)]
    listed = storage.list_modified("generations")  # one listing for both sweeps (a store lists slowly)
    generations = {key.split("/")[1] for key in listed if key.endswith("/record.json")
                   and _expired(storage, key, now)}
    erased = generations | set(expired_jobs)
    for generation_id in sorted(erased):
        erase_generation(storage, generation_id)  # images, record and job alike
        deleted["generations" if generation_id in generations else "jobs"] += 1
    left = {key: modified for key, modified in listed.items() if key.split("/")[1] not in erased}
    return deleted | sweep_orphans(storage, now, orphans_s, left)


def sweep_orphans(storage: Storage, now: float, orphans_s: float,
                  listed: dict[str, float] | None = None) -> dict[str, int]:
    """What a writer that died left, once older than ``orphans_s``: a generation's images
    without its record (the record is written last), an Idempotency-Key claim past its
    hold, and uploads never completed. A generation whose job still holds its lease is
    left alone, however old. ``listed``: the ``generations/`` keys and their modification
    times, when the caller listed them already."""
    before = now - orphans_s
    swept = {"orphan_generations": 0, "stale_claims": 0, "partial_uploads": storage.abort_partial(before)}
    objects: dict[str, dict[str, float]] = {}
    for key, modified in (storage.list_modified("generations") if listed is None else listed).items():
        objects.setdefault(key.split("/")[1], {})[key] = modified
    running = set(active_job_ids(storage))
    for generation_id, keys in sorted(objects.items()):
        if record_key(generation_id) in keys or generation_id in running or max(keys.values()) >= before:
            claim = _record(storage, claim_key(generation_id)) if claim_key(generation_id) in keys else None
            if claim is not None and record_key(generation_id) in keys and claim.get("expires_at", now) < before:
                storage.delete(claim_key(generation_id))  # its holder died after the record was written
                swept["stale_claims"] += 1
            continue
        for key in keys:  # no record, nothing running, nothing written lately: the claim, images and all
            storage.delete(key)
        swept["orphan_generations"] += 1
    return swept


def _record(storage: Storage, key: str) -> dict | None:
    try:
        return storage.get_json(key)
    except (ObjectNotFound, ValueError):
        return None


def _is_expired(record: dict, now: float) -> bool:
    try:
        return Expiring.model_validate(record).expired(now)
    except ValueError:
        return False


def _expired(storage: Storage, key: str, now: float) -> bool:
    record = _record(storage, key)
    return record is not None and _is_expired(record, now)


@serve.deployment(name="Janitor", num_replicas=1, max_ongoing_requests=4, ray_actor_options={"num_cpus": 0})
class Janitor:
    def __init__(self, storage: str, interval_s: float, s3_endpoint: str | None = None,
                 orphans_s: float = ORPHANS_S) -> None:
        self.storage = open_storage(storage, endpoint_url=s3_endpoint)
        self.interval_s, self.orphans_s = interval_s, orphans_s
        self._loop = asyncio.get_event_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sweep()
            except Exception as error:  # noqa: BLE001 - the store may be down: try again next time
                logger.warning("retention sweep failed: %s", error)

    async def sweep(self) -> dict[str, int]:
        return await asyncio.to_thread(sweep, self.storage, None, self.orphans_s)

    def ready(self) -> dict:
        return {"stage": "janitor"}
