"""The one store step (:mod:`service.store`): a deleted result is never stored, and one
deleted while it is being stored is erased again."""

import numpy as np
import pytest

from service.errors import Canceled
from service.keys import deleted_key, generation_prefix, mark_deleted, record_key
from service.storage import LocalStorage
from service.store import store_result

GID = "g_" + "s" * 22
IMAGES = [np.full((16, 16, 3), 200, np.uint8), np.zeros((16, 16, 3), np.uint8)]


def files(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts)


def store(storage):
    return store_result(storage, IMAGES, prefix=generation_prefix(GID), fmt="png", quality=90,
                        record_key=record_key(GID), record={"id": GID}, log_renders=GID, tombstone=deleted_key(GID))


def test_a_result_is_stored_once_with_its_record_and_render_log(tmp_path):
    storage = LocalStorage(tmp_path, signing_key=b"k")
    first, again = store(storage), store(storage)
    assert first.fresh and not again.fresh and again.record == first.record
    assert first.record["keys"] == [f"generations/{GID}/0.png", f"generations/{GID}/1.png"]
    assert len([f for f in files(tmp_path) if "/renders/" in f]) == 1


def test_a_deleted_result_is_not_stored(tmp_path):
    storage = LocalStorage(tmp_path, signing_key=b"k")
    mark_deleted(storage, GID, "owner", keep_s=60)
    with pytest.raises(Canceled, match="deleted"):
        store(storage)
    assert files(tmp_path) == [f"jobs/deleted/{GID}.json"]


def test_a_result_deleted_while_it_is_stored_is_erased_again(tmp_path):
    class DeletedMidway(LocalStorage):
        """The DELETE lands (its mark, then its erase) between two of the store step's writes."""

        def put(self, key, data, content_type="application/octet-stream"):
            super().put(key, data, content_type)
            if key.endswith("/0.png"):
                mark_deleted(self, GID, "owner", keep_s=60)
                for stored in self.list_keys(generation_prefix(GID)):
                    self.delete(stored)

    storage = DeletedMidway(tmp_path, signing_key=b"k")
    with pytest.raises(Canceled, match="deleted"):
        store(storage)
    assert files(tmp_path) == [f"jobs/deleted/{GID}.json"]  # the second image, record and log are gone too
