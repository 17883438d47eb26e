"""Erasing a face with the generations made from it (service/erasure.py), on a local store.
The HTTP route and a real S3 store are in test_serving."""

import time

import numpy as np
import pytest

from pipeline.face import FaceInfo
from service.audit import entries
from service.erasure import erase_face, erase_owned_generation, record_use, uses_of
from service.errors import Forbidden, NotFound
from service.keys import face_key, is_deleted, job_key, lease_key, record_key, use_key
from service.places import JobPlaces
from service.records import Face, FaceRecord, GenerationRecord, StoredFace
from service.storage import LocalStorage
from service.store import store_result

FACE, OTHER_FACE = "f_" + "a" * 22, "f_" + "b" * 22
G1, G2, G3, G4 = (f"g_{name:_<22}" for name in ("one", "two", "three", "four"))
KEEP_S = 3600


INFO = FaceInfo(bbox=(1.0, 2.0, 30.0, 40.0), kps=((5.0, 6.0),) * 5, det_score=0.9,
                embedding=np.ones(512, np.float32), image_size=(64, 64))


@pytest.fixture
def store(tmp_path):
    store = LocalStorage(tmp_path, signing_key=b"k")
    for face_id in (FACE, OTHER_FACE):
        record = FaceRecord(face_id=face_id, owner="o1", expires_at=time.time() + KEEP_S, face=StoredFace.of(INFO))
        store.put_json(face_key(face_id), record.model_dump(mode="json"))
    return store


def finished(store, generation_id: str, face_id: str | None) -> None:
    """A generation stored as the service stores it (two images and its record)."""
    if face_id is not None:
        record_use(store, face_id, generation_id, "o1", KEEP_S)
    images = [np.zeros((16, 16, 3), np.uint8)] * 2
    store_result(store, images, prefix=f"generations/{generation_id}", fmt="png", quality=90,
                 record_key=record_key(generation_id),
                 record=GenerationRecord(id=generation_id, owner="o1", face=Face.of(INFO),
                                         expires_at=time.time() + KEEP_S).model_dump(mode="json"))


def test_cascade_erases_the_generations_of_that_face_only_and_counts_them(store):
    places = JobPlaces(store)
    finished(store, G1, FACE)
    finished(store, G2, FACE)
    finished(store, G3, OTHER_FACE)
    finished(store, G4, None)  # made from photos sent with the request
    # a job made from the face, still running: its input, record, lease and place in its key's count
    record_use(store, FACE, "g_" + "j" * 22, "o1", KEEP_S)
    job = "g_" + "j" * 22
    store.put_json(job_key(job), {"id": job, "owner": "o1", "status": "running", "expires_at": time.time() + KEEP_S})
    store.put_json(lease_key(job), {"holder": "r1"})
    assert places.take("o1", job, time.time() + KEEP_S, cap=4)
    assert sorted(uses_of(store, FACE)) == sorted([G1, G2, job])

    assert erase_face(store, places, FACE, "o1", cascade=True, keep_s=KEEP_S) == 3
    for gone in (G1, G2, job):
        assert store.list_keys(f"generations/{gone}") == [] and store.list_keys(f"jobs/{gone}") == []
        assert is_deleted(store, gone)  # a render still running for it writes nothing more
    assert not store.exists(lease_key(job)) and places.count("o1") == 0
    assert not store.exists(face_key(FACE)) and uses_of(store, FACE) == []
    for kept in (G3, G4):
        assert len(store.list_keys(f"generations/{kept}")) == 3 and not is_deleted(store, kept)
    assert store.exists(face_key(OTHER_FACE)) and uses_of(store, OTHER_FACE) == [G3]
    erased = [e for e in entries(store) if e["event"] == "face_erased"]
    assert [(e["face_id"], e["reason"], e["generations"]) for e in erased] == [(FACE, "deleted", 3)]


def test_without_cascade_the_generations_stay_and_a_gone_generation_is_not_counted(store):
    places = JobPlaces(store)
    finished(store, G1, FACE)
    finished(store, G2, FACE)
    erase_owned_generation(store, places, G2, "o1", KEEP_S)  # deleted by its owner before
    assert erase_face(store, places, OTHER_FACE, "o1", cascade=False, keep_s=KEEP_S) == 0
    assert "generations" not in entries(store)[-1]
    assert erase_face(store, places, FACE, "o1", cascade=True, keep_s=KEEP_S) == 1
    with pytest.raises(NotFound):  # erased: a second erase is a 404
        erase_face(store, places, FACE, "o1", cascade=True, keep_s=KEEP_S)


def test_a_face_is_erased_only_by_its_own_key(store):
    with pytest.raises(Forbidden):
        erase_face(store, JobPlaces(store), FACE, "o2", cascade=True, keep_s=KEEP_S)
    assert store.exists(face_key(FACE))


def test_a_use_recorded_after_the_face_was_erased_is_withdrawn_and_refused(store):
    """The race the second listing closes: a request read the face just before its erasure
    and records its use after; it is refused and leaves nothing."""
    store.delete(face_key(FACE))
    with pytest.raises(NotFound) as refused:
        record_use(store, FACE, G1, "o1", KEEP_S)
    assert refused.value.field == "face_id"
    assert not store.exists(use_key(FACE, G1))
    assert [e["event"] for e in entries(store)] == []  # no use was logged


def test_uses_recorded_while_a_cascade_runs_are_erased_by_its_second_pass(store, monkeypatch):
    """A use written between the first listing and the face's deletion is in the second."""
    import service.erasure as erasure

    places, first_pass = JobPlaces(store), []
    real = erasure._erase_uses

    def erase_uses_then_a_request_arrives(*args):
        erased = real(*args)
        if not first_pass:
            first_pass.append(erased)
            finished(store, G2, FACE)  # the face still exists: the request goes ahead
        return erased

    finished(store, G1, FACE)
    monkeypatch.setattr(erasure, "_erase_uses", erase_uses_then_a_request_arrives)
    assert erase_face(store, places, FACE, "o1", cascade=True, keep_s=KEEP_S) == 2
    assert first_pass == [{G1}]
    assert store.list_keys(f"generations/{G2}") == [] and is_deleted(store, G2)
