"""Idempotency claims: one attempt at a time renders a generation that has an
``Idempotency-Key``; a retry gets the first attempt's result.

A claim is an object created atomically (create-if-absent) with an expiry. A retry that
finds a live claim waits for the record of the attempt holding it; one that finds an
expired claim (its attempt died) takes it over with one atomic conditional write
(replace-if-unchanged), so two retries can never both win it.
"""

from __future__ import annotations

import asyncio
import json
import time

from pipeline.errors import InvalidParameter

from .errors import Timeout
from .keys import claim_key, record_key
from .records import GenerationRecord
from .storage import ObjectNotFound, Storage, json_bytes


def mismatch() -> InvalidParameter:
    return InvalidParameter("Idempotency-Key", "was already used with a different request")


def _stored_record(storage: Storage, generation_id: str, request_hash: str) -> GenerationRecord | None:
    try:
        record = GenerationRecord.model_validate(storage.get_json(record_key(generation_id)))
    except ObjectNotFound:
        return None
    if record.request_hash != request_hash:
        raise mismatch()
    return record


def try_claim(storage: Storage, generation_id: str, request_hash: str, attempt: str,
              hold_s: float) -> tuple[str, GenerationRecord | None]:
    """One look: ``("done", record)`` when the generation is stored, ``("won", None)`` when
    this attempt now holds the claim, ``("held", None)`` when a live attempt holds it."""
    record = _stored_record(storage, generation_id, request_hash)
    if record is not None:
        return "done", record
    claim = {"attempt": attempt, "request_hash": request_hash, "expires_at": time.time() + hold_s}
    key = claim_key(generation_id)
    if storage.put_if_absent(key, json_bytes(claim)):
        return "won", None
    try:
        data, version = storage.get_versioned(key)
    except ObjectNotFound:
        return "held", None  # released meanwhile: the next look decides
    held = json.loads(data)
    if held.get("request_hash") != request_hash:
        raise mismatch()
    if held.get("expires_at", 0) < time.time() and storage.put_if_match(key, json_bytes(claim), version):
        return "won", None  # its attempt died: taken over, atomically
    return "held", None


async def claim(storage: Storage, generation_id: str, request_hash: str, attempt: str, *, hold_s: float,
                deadline: float, poll_s: float = 0.25) -> GenerationRecord | None:
    """The stored record when the generation is complete; else None once this attempt
    holds the claim (waiting, until ``deadline`` on the monotonic clock, while another
    live attempt holds it)."""
    while True:
        state, record = await asyncio.to_thread(try_claim, storage, generation_id, request_hash, attempt, hold_s)
        if state != "held":
            return record
        if time.monotonic() > deadline:
            raise Timeout("an earlier attempt with this Idempotency-Key is still running")
        await asyncio.sleep(poll_s)


def release(storage: Storage, generation_id: str, attempt: str) -> None:
    """Drop the claim if this attempt still holds it."""
    key = claim_key(generation_id)
    try:
        held = storage.get_json(key)
    except ObjectNotFound:
        return
    if held.get("attempt") == attempt:
        storage.delete(key)
