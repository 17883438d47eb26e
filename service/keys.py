"""Where everything the service stores lives: the one storage key layout, and erasing a
generation. Every key is made here, from validated ids (never from user text).

    faces/<face_id>.json                 a registered face (embedding, keypoints, owner)
    uses/<face_id>/<generation_id>.json  a generation made from a registered face (so that erasing
                                         the face can erase them too: ``?cascade=true``)
    generations/<id>/<k>.<ext>           the images of a generation
    generations/<id>/record.json         its record, written last: its presence marks it complete
    generations/<id>/renders/<n>.json    one entry per render that was stored (how often it really ran)
    generations/<id>/claim.json          the Idempotency-Key claim of the attempt rendering it
    jobs/<id>/record.json                an async job: status, progress, error, webhook outcome
    jobs/<id>/input.json                 what the job renders (parameters and face); erased when it ends
    jobs/<id>/cancel.json                a cancel asked for on any replica
    jobs/active/<id>.json                the lease of a job not finished yet (who runs it, until when)
    jobs/deleted/<id>.json               a deleted generation's tombstone: whatever still runs for it
                                         writes nothing more, and erases what it wrote last
    jobs/owners/<owner>.json             this API key's jobs not finished yet (the per-key job cap counts them)

Everything under ``jobs/``, ``generations/`` and ``uses/`` expires with
``retention.results_s``, faces with ``retention.faces_s`` (the Janitor and the bucket
lifecycle rules); ``audit/`` is the operator's to keep (:mod:`service.audit`).
"""

from __future__ import annotations

import re
import time

from .storage import Storage

# ids are matched whole (fullmatch: "$" would let a trailing newline through)
FACE_ID = re.compile(r"f_[A-Za-z0-9_-]{22}")
GENERATION_ID = re.compile(r"g_[A-Za-z0-9_-]{22}")
ACTIVE_PREFIX = "jobs/active"
DELETED_PREFIX = "jobs/deleted"
OWNERS_PREFIX = "jobs/owners"
USES_PREFIX = "uses"


def face_key(face_id: str) -> str:
    return f"faces/{face_id}.json"


def use_key(face_id: str, generation_id: str) -> str:
    return f"{USES_PREFIX}/{face_id}/{generation_id}.json"


def generation_prefix(generation_id: str) -> str:
    return f"generations/{generation_id}"


def record_key(generation_id: str) -> str:
    """A finished generation's record (written last: its presence marks it complete)."""
    return f"generations/{generation_id}/record.json"


def claim_key(generation_id: str) -> str:
    return f"generations/{generation_id}/claim.json"


def render_log_prefix(generation_id: str) -> str:
    return f"generations/{generation_id}/renders"


def job_key(generation_id: str) -> str:
    return f"jobs/{generation_id}/record.json"


def job_input_key(generation_id: str) -> str:
    return f"jobs/{generation_id}/input.json"


def cancel_key(generation_id: str) -> str:
    return f"jobs/{generation_id}/cancel.json"


def lease_key(generation_id: str) -> str:
    return f"{ACTIVE_PREFIX}/{generation_id}.json"


def owner_places_key(owner: str) -> str:
    return f"{OWNERS_PREFIX}/{owner}.json"


def deleted_key(generation_id: str) -> str:
    return f"{DELETED_PREFIX}/{generation_id}.json"


def mark_deleted(storage: Storage, generation_id: str, owner: str, keep_s: float) -> None:
    """Leave the durable mark that the generation is deleted (kept ``keep_s``: as long as
    anything of it could still be running), before anything of it is erased."""
    now = time.time()
    storage.put_json(deleted_key(generation_id), {"owner": owner, "deleted_at": now, "expires_at": now + keep_s})


def is_deleted(storage: Storage, generation_id: str) -> bool:
    return storage.exists(deleted_key(generation_id))


def active_job_ids(storage: Storage) -> list[str]:
    """Ids of the jobs that hold a lease (not finished yet), from one listing."""
    ids = []
    for key in storage.list_keys(ACTIVE_PREFIX):
        name = key.rsplit("/", 1)[-1].removesuffix(".json")
        if GENERATION_ID.fullmatch(name):
            ids.append(name)
    return ids


def erase_generation(storage: Storage, generation_id: str) -> int:
    """Delete every stored piece of a generation: images and render log, then its record
    (last, so an interrupted erase leaves the record to find and erase again), then its
    job (input, cancel marker, lease and record; its place in its owner's count of
    unfinished jobs is :class:`~service.places.JobPlaces`'s to give back). Returns how
    many objects it deleted."""
    keys = storage.list_keys(generation_prefix(generation_id))
    for key in sorted(keys, key=lambda k: k == record_key(generation_id)):
        storage.delete(key)
    job = storage.list_keys(f"jobs/{generation_id}")  # input, cancel marker, record
    job = [*job, lease_key(generation_id)] if storage.exists(lease_key(generation_id)) else job
    for key in sorted(job, key=lambda k: k == job_key(generation_id)):
        storage.delete(key)
    return len(keys) + len(job)
