"""One S3 object into one local file: parallel ranged GETs, resumable, checked against the
object's content tag.

A file is fetched in parts (``Range`` GETs) by several threads at once, each writing its part
at its offset in ``<target>.partial``. A journal beside it (``<target>.partial.json``) lists
the parts already written, with the object's ETag and size: a fetch that was interrupted
(the process killed, the network gone) continues from there, as long as the object is still
the one it began with. Every GET carries ``If-Match`` with that ETag, so an object replaced
during the fetch is never mixed into it.

Before the file takes its final name its bytes are checked against the ETag: for an object
uploaded in one piece the ETag is the MD5 of its bytes; for a multipart upload it is the MD5
of its parts' MD5s followed by ``-N``, so the parts are fetched along the upload's own part
boundaries (``HEAD ?partNumber=1`` gives them) and each part's MD5 is taken while it is
written. An ETag of another form (some servers, SSE-KMS), or a multipart one whose part
boundaries the server does not tell, leaves only the size to check; the result says which
check was made.

The caller holds the file's lock (one fetch per file on a node: :mod:`pipeline.weights`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PART_BYTES = 16 * 1024 * 1024  # for objects uploaded in one piece
WORKERS = 8
_CHUNK = 1024 * 1024
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART = re.compile(r"^([0-9a-f]{32})-(\d+)$")


class ObjectChanged(Exception):
    """The object was replaced while it was being fetched (its ETag no longer matches)."""


class ContentMismatch(Exception):
    """The fetched bytes do not hash to the object's ETag."""


@dataclass(frozen=True)
class Fetched:
    path: Path
    size: int
    fetched_bytes: int  # this call's GETs
    resumed_bytes: int  # already there from an interrupted fetch
    parts: int
    check: str  # "md5", "multipart-md5" or "size"


def _quoted(etag: str) -> str:
    return f'"{etag}"'


def _is_precondition_failure(error: BaseException) -> bool:
    response = getattr(error, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "412") or status == 412


def part_layout(client, bucket: str, key: str, size: int, etag: str,
                part_bytes: int = PART_BYTES) -> tuple[list[tuple[int, int]], str]:
    """``[(start, end_exclusive)]`` and the check they allow: the upload's own parts for a
    multipart ETag (so each part's MD5 can be taken), else even parts of ``part_bytes``."""
    multipart = _MULTIPART.match(etag)
    if multipart:
        try:
            first = int(client.head_object(Bucket=bucket, Key=key, PartNumber=1)["ContentLength"])
        except Exception:  # a server without partNumber on HEAD: the part boundaries are unknown
            first = 0
        if first > 0 and -(-size // first) == int(multipart.group(2)):
            return [(start, min(start + first, size)) for start in range(0, size, first)], "multipart-md5"
    check = "md5" if _MD5.match(etag) else "size"
    return [(start, min(start + part_bytes, size)) for start in range(0, size, part_bytes)] or [(0, 0)], check


class _Journal:
    """The parts of ``<target>.partial`` already written (with their MD5s), for one ETag and
    size; rewritten atomically after each part."""

    def __init__(self, path: Path, etag: str, size: int, layout: list[tuple[int, int]]) -> None:
        self.path, self._lock = path, threading.Lock()
        self.identity = {"etag": etag, "size": size, "layout": [list(p) for p in layout]}
        self.done: dict[int, str] = {}
        try:
            saved = json.loads(path.read_text())
            if {k: saved.get(k) for k in self.identity} == self.identity:
                self.done = {int(i): str(md5) for i, md5 in saved.get("done", {}).items()}
        except (OSError, ValueError, AttributeError):
            pass  # none yet, or unreadable: start over

    def mark(self, index: int, md5: str) -> None:
        with self._lock:
            self.done[index] = md5
            spare = self.path.with_name(self.path.name + ".tmp")
            spare.write_text(json.dumps({**self.identity, "done": self.done}))
            os.replace(spare, self.path)

    def clear(self) -> None:
        self.done = {}
        self.path.unlink(missing_ok=True)


def fetch_object(client, bucket: str, key: str, target: str | os.PathLike, *, size: int, etag: str,
                 part_bytes: int = PART_BYTES, workers: int = WORKERS,
                 on_progress: Callable[[int, int], None] | None = None) -> Fetched:
    """Fetch ``s3://bucket/key`` (``size`` bytes, ``etag`` without quotes, both from a
    listing) into ``target``. Raises :class:`ObjectChanged` when the object is replaced
    meanwhile and :class:`ContentMismatch` when the bytes do not match its ETag (the partial
    file is then discarded: the next call starts over). ``on_progress(done, size)`` is
    called after each part is safely journaled."""
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    layout, check = part_layout(client, bucket, key, size, etag, part_bytes)
    journal = _Journal(target.with_name(target.name + ".partial.json"), etag, size, layout)
    try:
        if partial.stat().st_size != size:
            journal.clear()
    except FileNotFoundError:
        journal.clear()
    earlier = set(journal.done)
    resumed = sum(layout[i][1] - layout[i][0] for i in earlier)
    done_bytes = [resumed]
    progress_lock = threading.Lock()
    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, size)

        def fetch_part(index: int) -> None:
            start, end = layout[index]
            digest = hashlib.md5(usedforsecurity=False)
            if end > start:
                extra = {"IfMatch": _quoted(etag)} if etag else {}
                try:
                    body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **extra)["Body"]
                except Exception as error:
                    if _is_precondition_failure(error):
                        raise ObjectChanged(f"s3://{bucket}/{key} changed during the fetch") from None
                    raise
                offset = start
                try:
                    for chunk in body.iter_chunks(_CHUNK):
                        digest.update(chunk)
                        view = memoryview(chunk)
                        while view:  # a write may take fewer bytes than given
                            written = os.pwrite(fd, view, offset)
                            view, offset = view[written:], offset + written
                finally:
                    body.close()
                if offset != end:
                    raise ContentMismatch(f"s3://{bucket}/{key}: part at {start} gave {offset - start} bytes, "
                                          f"expected {end - start}")
            journal.mark(index, digest.hexdigest())
            if on_progress is not None:
                with progress_lock:
                    done_bytes[0] += end - start
                    now = done_bytes[0]
                on_progress(now, size)

        run_all(fetch_part, [i for i in range(len(layout)) if i not in journal.done], workers, "s3-part")
    finally:
        os.close(fd)
    try:
        _verify(partial, etag, check, layout, journal.done, earlier, f"s3://{bucket}/{key}")
    except ContentMismatch:
        journal.clear()
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    journal.clear()
    return Fetched(target, size, size - resumed, resumed, len(layout), check)


def run_all(work: Callable[[object], None], items: list, workers: int, name: str) -> None:
    """``work(item)`` for every item, ``workers`` at a time; the first failure stops what has
    not started yet and is raised once what runs has stopped."""
    if not items:
        return
    pool = ThreadPoolExecutor(max(1, min(workers, len(items))), thread_name_prefix=name)
    try:
        for future in [pool.submit(work, item) for item in items]:
            future.result()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _verify(path: Path, etag: str, check: str, layout: list[tuple[int, int]], md5s: dict[int, str],
            earlier: set[int], where: str) -> None:
    if path.stat().st_size != layout[-1][1]:
        raise ContentMismatch(f"{where}: {path.stat().st_size} bytes on disk, expected {layout[-1][1]}")
    if check == "multipart-md5":
        # the parts of this call were hashed as they were written; those written before an
        # interruption are hashed again from disk (the journal may have outlived bytes a crash lost)
        again = sorted(earlier)
        md5s = {**md5s, **dict(zip(again, _file_md5s(path, [layout[i] for i in again])))}
        combined = hashlib.md5(b"".join(bytes.fromhex(md5s[i]) for i in range(len(layout))),
                               usedforsecurity=False).hexdigest()
        got = f"{combined}-{len(layout)}"
    elif check == "md5":
        got = _file_md5s(path, [(0, layout[-1][1])])[0]
    else:
        return
    if got != etag:
        raise ContentMismatch(f"{where}: the fetched bytes hash to {got}, the object's ETag is {etag}")


def _file_md5s(path: Path, ranges: list[tuple[int, int]]) -> list[str]:
    """The MD5 of each byte range of a file, several at once (hashlib lets go of the GIL)."""
    def one(span: tuple[int, int]) -> str:
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as handle:
            handle.seek(span[0])
            left = span[1] - span[0]
            while left > 0:
                chunk = handle.read(min(_CHUNK * 8, left))
                if not chunk:
                    break
                digest.update(chunk)
                left -= len(chunk)
        return digest.hexdigest()

    if not ranges:
        return []
    with ThreadPoolExecutor(min(len(ranges), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(one, ranges))
