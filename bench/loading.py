"""Weight loading: seconds to load a weights tree into a pipeline
(``InstantIDPipeline.from_weights``, face stage included) against the seconds to merely
read the same bytes, as a ratio, with the files in the page cache ("warm") and evicted
from it before each run ("cold", ``posix_fadvise(DONTNEED)``: best effort, no root
needed). A ratio near 1 means loading is I/O-bound; well above 1, the time goes to
building models and converting tensors."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

from .common import Results, summarize

COLUMNS = ("tree", "cache", "dtype", "files", "bytes", "read_median_s", "read_gb_per_s", "load_median_s",
           "load_min_s", "load_max_s", "load_spread_pct", "ratio_load_to_read")
CHUNK = 16 * 1024 * 1024


def tree_files(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and ".trt-cache" not in p.parts)


def evict(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(files: list[Path]) -> float:
    started = time.perf_counter()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(view):
                pass
    return time.perf_counter() - started


def load_once(root: Path, dtype: str) -> float:
    from pipeline.pipeline import InstantIDPipeline

    started = time.perf_counter()
    pipe = InstantIDPipeline.from_weights(root, device="cpu", dtype=dtype)
    elapsed = time.perf_counter() - started
    del pipe
    gc.collect()
    return elapsed


def run_loading(trees: list[tuple[str, Path]], out: Path, *, dtype: str, repeats: int, warmup: int,
                caches: tuple[str, ...] = ("warm", "cold")) -> Results:
    """``trees``: (name, root) pairs, e.g. the fixture tree and a published-size one."""
    results = Results(out, "loading", COLUMNS, repeats=repeats, warmup=warmup,
                      title="Weight loading: from_weights vs reading the same bytes",
                      table=("tree", "cache", "dtype", "bytes", "read_median_s", "read_gb_per_s", "load_median_s",
                             "load_spread_pct", "ratio_load_to_read"))
    for tree, root in trees:
        files = tree_files(root)
        size = sum(p.stat().st_size for p in files)
        for _ in range(warmup):  # imports, first-use initialisation
            read_all(files)
            load_once(root, dtype)
        for cache in caches:
            reads, loads = [], []
            for _ in range(repeats):
                if cache == "cold":
                    evict(files)
                reads.append(read_all(files))
                if cache == "cold":
                    evict(files)
                loads.append(load_once(root, dtype))
            r, ld = summarize(reads), summarize(loads)
            results.add(case=f"{tree}_{cache}", tree=tree, cache=cache, dtype=dtype, files=len(files), bytes=size,
                        read_median_s=r["median"], read_gb_per_s=size / r["median"] / 1e9,
                        load_median_s=ld["median"], load_min_s=ld["min"], load_max_s=ld["max"],
                        load_spread_pct=ld["spread_pct"], ratio_load_to_read=ld["median"] / r["median"])
    results.close()
    return results
