"""Places in an API key's count of unfinished async jobs, exact across replicas.

One object per key, ``jobs/owners/<owner>.json``, holds the ids of its unfinished jobs and
when each place lapses (a job that never finishes is not counted past its retention). It
changes only by conditional writes (create if absent, else ``If-Match`` the version read),
so two replicas taking the last place at the same instant cannot both get it: one write
fails, that replica reads again and finds the cap reached."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable

from .keys import owner_places_key
from .storage import ObjectNotFound, Storage, StorageUnavailable, json_bytes

# conflicting writes come only from one key's own concurrent submissions
MAX_TRIES = 40


class JobPlaces:
    def __init__(self, storage: Storage, clock: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self.clock = clock  # what "now" is when places lapse (tests set it)

    def _read(self, owner: str) -> tuple[dict[str, float], str | None]:
        try:
            data, version = self.storage.get_versioned(owner_places_key(owner))
        except ObjectNotFound:
            return {}, None
        now = self.clock()
        jobs = json.loads(data).get("jobs", {})
        return {job_id: lapses for job_id, lapses in jobs.items() if lapses > now}, version

    def _write(self, owner: str, jobs: dict[str, float], version: str | None) -> bool:
        data = json_bytes({"expires_at": max(jobs.values(), default=0.0), "jobs": jobs})
        if version is None:
            return self.storage.put_if_absent(owner_places_key(owner), data)
        return self.storage.put_if_match(owner_places_key(owner), data, version) is not None

    def _change(self, owner: str, change) -> bool:
        """Apply ``change(jobs) -> bool`` (False: nothing to write, answer False) until one
        conditional write of its result wins."""
        for attempt in range(MAX_TRIES):
            jobs, version = self._read(owner)
            if not change(jobs):
                return False
            if self._write(owner, jobs, version):
                return True
            time.sleep(random.uniform(0, 0.01 * (attempt + 1)))  # another write won: read again
        raise StorageUnavailable(f"the job count of one API key changed {MAX_TRIES} times while it was updated")

    def take(self, owner: str, job_id: str, lapses_at: float, cap: int) -> bool:
        """A place for ``job_id`` (True when it has one already), or False: ``cap`` taken."""
        def add(jobs: dict[str, float]) -> bool:
            if job_id not in jobs and len(jobs) >= cap:
                return False
            jobs[job_id] = lapses_at
            return True

        return self._change(owner, add)

    def give_back(self, owner: str, job_id: str) -> None:
        def remove(jobs: dict[str, float]) -> bool:
            return jobs.pop(job_id, None) is not None

        self._change(owner, remove)

    def count(self, owner: str) -> int:
        return len(self._read(owner)[0])
