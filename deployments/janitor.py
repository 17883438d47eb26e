"""Janitor: deletes what outlived its retention (faces, generations, jobs, deleted marks).

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
from service.keys import DELETED_PREFIX, OWNERS_PREFIX, erase_generation
from service.records import Expiring
from service.storage import ObjectNotFound, Storage, open_storage

logger = logging.getLogger("ray.serve")


def sweep(storage: Storage, now: float | None = None) -> dict[str, int]:
    """Delete every expired face, generation, job and deleted mark; return how many of each."""
    now = time.time() if now is None else now
    deleted = {"faces": 0, "generations": 0, "jobs": 0, "deleted_marks": 0, "job_places": 0}
    for key in storage.list_keys("faces"):
        record = _record(storage, key) if key.endswith(".json") else None
        if record is not None and _is_expired(record, now):  # (read once: the audit entry names its owner)
            storage.delete(key)
            audit(storage, "face_erased", owner=record.get("owner", ""), face_id=record.get("face_id", key),
                  reason="expired")
            deleted["faces"] += 1
    # deleted marks (kept as long as anything deleted could still run) and places in an owner's
    # count of unfinished jobs (a job that never finished is not counted past its retention)
    for prefix in (DELETED_PREFIX, OWNERS_PREFIX):
        for key in storage.list_keys(prefix):
            if key.endswith(".json") and _expired(storage, key, now):
                storage.delete(key)
                deleted["deleted_marks" if prefix == DELETED_PREFIX else "job_places"] += 1
    expired_jobs = [key.split("/")[1] for key in storage.list_keys("jobs")
                    if key.endswith("/record.json") and _expired(storage, key, now)]
    generations = {key.split("/")[1] for key in storage.list_keys("generations") if key.endswith("/record.json")
                   and _expired(storage, key, now)}
    for generation_id in sorted(generations | set(expired_jobs)):
        erase_generation(storage, generation_id)  # images, record and job alike
        deleted["generations" if generation_id in generations else "jobs"] += 1
    return deleted


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
    def __init__(self, storage: str, interval_s: float, s3_endpoint: str | None = None) -> None:
        self.storage = open_storage(storage, endpoint_url=s3_endpoint)
        self.interval_s = interval_s
        self._loop = asyncio.get_event_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sweep()
            except Exception as error:  # noqa: BLE001 - the store may be down: try again next time
                logger.warning("retention sweep failed: %s", error)

    async def sweep(self) -> dict[str, int]:
        return await asyncio.to_thread(sweep, self.storage)

    def ready(self) -> dict:
        return {"stage": "janitor"}
