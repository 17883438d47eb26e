"""The audit log: an append-only record, in the service's storage, of what was done with
registered faces: each registration (with its consent attestation's existence), each use
in a generation, each erasure. Ids, the API key's owner id and the time only: never an
image, an embedding or the attestation's text (the face record holds that).

Each entry is its own object, ``audit/<yyyy>/<mm>/<dd>/<microseconds>-<random>.json``,
created if absent (never overwritten), so entries from many replicas never collide and an
entry, once written, stays. The Janitor does not sweep ``audit/``; keep it as long as the
operator must (a bucket lifecycle rule, or object lock, decides that at the store)."""

from __future__ import annotations

import secrets
import time

from .storage import Storage, json_bytes

AUDIT_PREFIX = "audit"
EVENTS = ("face_registered", "face_used", "face_erased")


def audit(storage: Storage, event: str, *, owner: str, face_id: str, generation_id: str | None = None,
          row_id: str | None = None, reason: str | None = None, generations: int | None = None,
          at: float | None = None) -> str:
    """Append one entry; return its key. A use names the generation, or the offline
    render's row (``row_id``); an erasure with cascade says how many generations went
    with the face (``generations``)."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    at = time.time() if at is None else at
    day = time.strftime("%Y/%m/%d", time.gmtime(at))
    key = f"{AUDIT_PREFIX}/{day}/{int(at * 1_000_000):017d}-{secrets.token_hex(6)}.json"
    entry = {"event": event, "at": at, "owner": owner, "face_id": face_id}
    if generation_id is not None:
        entry["generation_id"] = generation_id
    if row_id is not None:
        entry["row_id"] = row_id
    if reason is not None:
        entry["reason"] = reason
    if generations is not None:
        entry["generations"] = generations
    if not storage.put_if_absent(key, json_bytes(entry)):
        raise RuntimeError(f"audit entry {key} exists already")  # 48 random bits: never in practice
    return key


def entries(storage: Storage) -> list[dict]:
    """Every entry, oldest first (for operators and tests)."""
    return [storage.get_json(key) for key in sorted(storage.list_keys(AUDIT_PREFIX)) if key.endswith(".json")]
