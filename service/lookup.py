"""Reading a stored face, generation or job back for a caller, with the same rules
everywhere (the HTTP API, the job runner and ``instantid render``): an unknown, malformed
or expired id is :class:`NotFound`, another API key's record is :class:`Forbidden`."""

from __future__ import annotations

from typing import TypeVar

from .errors import Forbidden, NotFound
from .keys import FACE_ID, GENERATION_ID, face_key, job_key, record_key
from .records import FaceRecord, GenerationRecord, JobRecord, _Owned
from .storage import ObjectNotFound, Storage

Owned = TypeVar("Owned", bound=_Owned)


def load_owned(storage: Storage, model: type[Owned], key: str, owner: str, *, what: str, ident: str,
               field: str | None = None, delete_expired: bool = False, missing_ok: bool = False) -> Owned | None:
    try:
        record = model.model_validate(storage.get_json(key))
    except ObjectNotFound:
        if missing_ok:
            return None
        raise NotFound(f"no {what} {ident!r}", field) from None
    if record.owner != owner:
        raise Forbidden(f"{what} {ident!r} belongs to another API key", field)
    if record.expired():  # past its retention: gone (the Janitor deletes it, or we do now)
        if delete_expired:
            storage.delete(key)
        raise NotFound(f"{what} {ident!r} has expired", field)
    return record


def load_face(storage: Storage, face_id: str, owner: str, *, field: str | None = "face_id",
              delete_expired: bool = False) -> FaceRecord:
    """``delete_expired``: the service deletes an expired face it comes across (its own
    store); a reader of another's store (the offline renderer) leaves it."""
    if not FACE_ID.fullmatch(face_id):
        raise NotFound(f"no face {face_id!r}", field)
    return load_owned(storage, FaceRecord, face_key(face_id), owner, what="face", ident=face_id, field=field,
                      delete_expired=delete_expired)


def check_generation_id(generation_id: str) -> str:
    if not GENERATION_ID.fullmatch(generation_id):
        raise NotFound(f"no generation {generation_id!r}")
    return generation_id


def load_generation(storage: Storage, generation_id: str, owner: str) -> GenerationRecord:
    check_generation_id(generation_id)
    return load_owned(storage, GenerationRecord, record_key(generation_id), owner, what="generation",
                      ident=generation_id)


def load_job(storage: Storage, generation_id: str, owner: str) -> JobRecord | None:
    """The job of an async generation; None when there is none (a synchronous one)."""
    check_generation_id(generation_id)
    return load_owned(storage, JobRecord, job_key(generation_id), owner, what="generation", ident=generation_id,
                      missing_ok=True)
