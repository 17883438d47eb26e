"""Erasing what an API key owns: one generation (``DELETE /v1/generations/{id}``), or a
registered face and, with ``cascade``, every generation made from it
(``DELETE /v1/faces/{id}?cascade=true``).

A face knows its generations through one small object per use,
``uses/<face_id>/<generation_id>.json`` (:func:`record_use`), written before the render
starts and kept as long as results are. A generation is erased the one way whatever asks
for it: its deleted mark first (whatever still runs for it writes nothing more and erases
what it wrote last), then its objects, then its place in its key's count of jobs.

A use recorded while its face is being erased cannot escape the cascade: the use is
written, then the face is looked for; the cascade erases the generations it lists, deletes
the face, then lists again. A use written before the face was deleted is in the second
list; one written after finds no face and is withdrawn (the request is refused, 404).
"""

from __future__ import annotations

import time

from .audit import audit
from .errors import NotFound
from .keys import USES_PREFIX, erase_generation, face_key, mark_deleted, use_key
from .lookup import load_face, load_generation, load_job
from .places import JobPlaces
from .storage import ObjectNotFound, Storage


def record_use(storage: Storage, face_id: str, generation_id: str, owner: str, keep_s: float,
               field: str = "face_id") -> None:
    """Link ``generation_id`` to the face it is made from, and log the use; refused (404
    naming ``field``) when the face was erased meanwhile."""
    now = time.time()
    storage.put_json(use_key(face_id, generation_id), {"face_id": face_id, "generation_id": generation_id,
                                                       "owner": owner, "created_at": now, "expires_at": now + keep_s})
    if not storage.exists(face_key(face_id)):  # erased since it was read: its cascade may not see this use
        storage.delete(use_key(face_id, generation_id))
        raise NotFound(f"face {face_id!r} was erased", field)
    audit(storage, "face_used", owner=owner, face_id=face_id, generation_id=generation_id, at=now)


def uses_of(storage: Storage, face_id: str) -> list[str]:
    """The ids of the generations recorded as made from ``face_id`` (not yet expired)."""
    prefix = f"{USES_PREFIX}/{face_id}/"
    return [key[len(prefix):].removesuffix(".json") for key in storage.list_keys(prefix) if key.endswith(".json")]


def erase_owned_generation(storage: Storage, places: JobPlaces, generation_id: str, owner: str,
                           keep_s: float) -> None:
    """Erase one of ``owner``'s generations (NotFound/Forbidden as a read of it would be)."""
    job = load_job(storage, generation_id, owner)
    if job is None:
        load_generation(storage, generation_id, owner)
    _erase(storage, places, generation_id, owner, keep_s)


def _erase(storage: Storage, places: JobPlaces, generation_id: str, owner: str, keep_s: float) -> bool:
    """Mark deleted, erase, give the job's place back; whether anything was stored."""
    mark_deleted(storage, generation_id, owner, keep_s)  # first: every writer checks it
    erased = erase_generation(storage, generation_id) > 0
    places.give_back(owner, generation_id)
    return erased


def erase_face(storage: Storage, places: JobPlaces, face_id: str, owner: str, *, cascade: bool,
               keep_s: float) -> int:
    """Erase ``owner``'s face ``face_id`` and its use links; with ``cascade``, every
    generation made from it too (running ones are canceled). Returns how many generations
    were erased (ones already gone, by expiry or their own delete, do not count)."""
    load_face(storage, face_id, owner, delete_expired=True)
    erased: set[str] = set()
    if cascade:
        erased |= _erase_uses(storage, places, face_id, owner, keep_s)
    storage.delete(face_key(face_id))
    if cascade:  # uses recorded while the first pass ran (see the module's docstring)
        erased |= _erase_uses(storage, places, face_id, owner, keep_s)
    for generation_id in uses_of(storage, face_id):
        storage.delete(use_key(face_id, generation_id))
    audit(storage, "face_erased", owner=owner, face_id=face_id, reason="deleted",
          generations=len(erased) if cascade else None)
    return len(erased)


def _erase_uses(storage: Storage, places: JobPlaces, face_id: str, owner: str, keep_s: float) -> set[str]:
    erased = set()
    for generation_id in uses_of(storage, face_id):
        try:
            if storage.get_json(use_key(face_id, generation_id)).get("owner") != owner:
                continue  # (never: only the face's own key can use it)
        except ObjectNotFound:
            continue
        if _erase(storage, places, generation_id, owner, keep_s):
            erased.add(generation_id)
        storage.delete(use_key(face_id, generation_id))
    return erased
