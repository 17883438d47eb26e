"""Durable async jobs: a job is records in storage plus a lease, never a task in one
process.

* ``jobs/<id>/record.json`` — what clients see (:class:`~service.records.JobRecord`).
* ``jobs/<id>/input.json`` — what to render (:class:`~service.records.JobInput`).
* ``jobs/active/<id>.json`` — the lease (:class:`~service.records.Lease`): it exists until
  the job is finished (rendered, recorded, webhook delivered). Whoever runs the job holds it
  and renews it; whoever finds it free or expired may take the job over, with one atomic
  conditional write, so exactly one runner holds a job at a time.

A rerun of a job makes the same bytes (its seed is fixed in its input) and the store step
is idempotent (:mod:`service.store`), so a takeover never duplicates output.
"""

from __future__ import annotations

import time

from .keys import active_job_ids, cancel_key, is_deleted, job_input_key, job_key, lease_key
from .places import JobPlaces
from .records import JobInput, JobRecord, Lease
from .storage import ObjectNotFound, Storage, json_bytes


class JobStore:
    def __init__(self, storage: Storage, lease_s: float) -> None:
        self.storage = storage
        self.lease_s = lease_s
        self.places = JobPlaces(storage)  # each owner's count of unfinished jobs

    # ------------------------------------------------------------------ records
    def create(self, record: JobRecord, job_input: JobInput) -> bool:
        """Store a new job, whose place in its owner's count was taken (:attr:`places`):
        its record (created atomically: False when a job of this id exists), its input, then
        its lease (free: any runner may take it from then on)."""
        if not self.storage.put_if_absent(job_key(record.id), json_bytes(record.model_dump(mode="json"))):
            return False
        self.storage.put(job_input_key(record.id), json_bytes(job_input.model_dump(mode="json")),
                         "application/json")
        self.storage.put_if_absent(lease_key(record.id), json_bytes(Lease().model_dump()))
        return True

    def record(self, job_id: str) -> JobRecord | None:
        try:
            return JobRecord.model_validate(self.storage.get_json(job_key(job_id)))
        except ObjectNotFound:
            return None

    def write(self, record: JobRecord) -> bool:
        """Write the record, unless the job was deleted: then nothing is written (or, when
        the mark appears while this writes, the record is erased again). False then."""
        if self.deleted(record.id):
            return False
        self.storage.put_json(job_key(record.id), record.model_dump(mode="json"))
        if self.deleted(record.id):
            self.storage.delete(job_key(record.id))
            return False
        return True

    def deleted(self, job_id: str) -> bool:
        return is_deleted(self.storage, job_id)

    def input(self, job_id: str) -> JobInput:
        return JobInput.model_validate(self.storage.get_json(job_input_key(job_id)))

    def request_cancel(self, job_id: str) -> None:
        self.storage.put_json(cancel_key(job_id), {"at": time.time()})

    def cancel_requested(self, job_id: str) -> bool:
        """A cancel was asked for, or the job was deleted (its deleted mark cancels it too)."""
        return self.storage.exists(cancel_key(job_id)) or self.deleted(job_id)

    # ------------------------------------------------------------------ leases
    def _lease(self, job_id: str) -> tuple[Lease, str] | None:
        try:
            data, version = self.storage.get_versioned(lease_key(job_id))
        except ObjectNotFound:
            return None
        return Lease.model_validate_json(data), version

    def acquire(self, job_id: str, holder: str) -> str | None:
        """Take the job's lease if it is free, expired or already ``holder``'s: the lease
        version to renew it with, or None (held by a live runner, or the job is finished)."""
        found = self._lease(job_id)
        if found is None:
            return None
        lease, version = found
        if lease.holder not in (None, holder) and lease.expires_at > time.time():
            return None
        return self._write_lease(job_id, Lease(holder=holder, expires_at=time.time() + self.lease_s), version)

    def renew(self, job_id: str, holder: str, version: str) -> str | None:
        """Extend the lease; None when it is no longer ours (taken over, or finished)."""
        return self._write_lease(job_id, Lease(holder=holder, expires_at=time.time() + self.lease_s), version)

    def release(self, job_id: str, version: str) -> bool:
        """Hand the job over: the lease becomes free at once (any runner may take it)."""
        return self._write_lease(job_id, Lease(holder=None, expires_at=0.0), version) is not None

    def finish(self, job_id: str, owner: str | None = None) -> None:
        """The job is done for good: its input, its place in its ``owner``'s count and its
        lease go (its record stays)."""
        self.storage.delete(job_input_key(job_id))
        self.storage.delete(cancel_key(job_id))
        if owner is not None:
            self.places.give_back(owner, job_id)
        self.storage.delete(lease_key(job_id))

    def _write_lease(self, job_id: str, lease: Lease, version: str) -> str | None:
        return self.storage.put_if_match(lease_key(job_id), json_bytes(lease.model_dump()), version)

    def waiting(self) -> list[str]:
        """Jobs whose lease is free or expired: nobody runs them now."""
        now, ids = time.time(), []
        for job_id in active_job_ids(self.storage):
            found = self._lease(job_id)
            if found is not None and (found[0].holder is None or found[0].expires_at < now):
                ids.append(job_id)
        return ids
