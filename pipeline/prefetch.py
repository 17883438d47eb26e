"""Reading weight files ahead of the loader: a thread reads them in the order they will be
loaded, in large sequential reads, into the page cache, while the loading thread builds
models and converts tensors. Loading from cold storage then overlaps the disk with the
CPU instead of waiting on one page fault after another, and tensors the loader only maps
(files already in the dtype loaded) are in memory when loading ends. The loader may wait
for a model's files (:meth:`Prefetcher.wait_for`) before it loads that model: its page
faults then find the page cache and never race the thread for the disk, so the disk sees
one sequential reader while the CPU builds the model before. It only reads: what is
loaded, and how, is unchanged."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

CHUNK = 16 * 1024 * 1024


def model_files(folder: Path, components: Sequence[str] | None = None) -> list[Path]:
    """The weight files diffusers loads from a model folder (with ``components``: from
    those subfolders of a pipeline folder, in that order): in each folder its safetensors
    files without a variant infix (``model.fp16.safetensors`` is another variant), else
    such ``.bin`` files. Other files in the folders (other variants, other frameworks, a
    single-file checkpoint beside the subfolders) are not loaded, so not read ahead."""
    folder = Path(folder)
    if components is not None:
        return [p for name in components if (folder / name).is_dir() for p in model_files(folder / name)]
    plain = sorted(p for p in folder.iterdir() if p.is_file() and "." not in p.stem)
    return [p for p in plain if p.suffix == ".safetensors"] or [p for p in plain if p.suffix == ".bin"]


class Prefetcher:
    """Reads ``files`` once, front to back, on its own thread, until done or stopped."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.bytes_read = 0
        self._stop = threading.Event()
        self._passed: set[Path] = set()  # files read to their end (or skipped: unreadable)
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="weights-prefetch", daemon=True)

    def start(self) -> "Prefetcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def wait_for(self, files: Sequence[Path]) -> None:
        """Return once each of ``files`` was read to its end (or skipped: unreadable), or
        once the thread has ended (stopped, or done: for a file it was not given)."""
        wanted = {Path(f) for f in files}
        with self._progress:
            self._progress.wait_for(lambda: wanted <= self._passed or not self._thread.is_alive())

    def finish(self) -> None:
        """Wait until every file was read (the loader may be done before its lazily mapped
        tensors were read: then this reads them in)."""
        self._thread.join()

    def _run(self) -> None:
        try:
            self._read_all()
        finally:
            with self._progress:  # waiters see the thread end (is_alive turns false after this)
                self._passed.update(Path(f) for f in self.files)
                self._progress.notify_all()

    def _read_all(self) -> None:
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        for path in self.files:
            try:
                with open(path, "rb", buffering=0) as handle:
                    while not self._stop.is_set():
                        count = handle.readinto(view)
                        if not count:
                            break
                        self.bytes_read += count
            except OSError:  # the loader reports a file it cannot read; this thread only helps
                pass
            if self._stop.is_set():
                return
            with self._progress:
                self._passed.add(Path(path))
                self._progress.notify_all()


@contextmanager
def prefetching(files: list[Path], enabled: bool = True) -> Iterator[Prefetcher | None]:
    """Prefetch ``files`` while the body loads them. When the body succeeds, the files are
    read to their ends before this returns (every byte of the weights is in memory, even
    those the loader only mapped); when it fails, the thread stops at once."""
    if not enabled or not files:
        yield None
        return
    prefetcher = Prefetcher(files).start()
    try:
        yield prefetcher
    except BaseException:
        prefetcher.stop()
        raise
    prefetcher.finish()
