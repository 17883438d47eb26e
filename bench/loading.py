"""Weight loading: seconds to load a weights tree into a pipeline
(``InstantIDPipeline.from_weights``, face stage included) against the seconds to merely
read the same bytes, as a ratio, with the files in the page cache ("warm": the other
paths' files evicted and these read once before the timed read) and evicted from it before
each run ("cold", ``posix_fadvise(DONTNEED)``: best effort, no root needed). A ratio
near 1 means loading is I/O-bound; well above 1, the time goes to building models and
converting tensors. Three paths side by side, alternating: ``plain``
(the loader alone: the reference), ``prefetch`` (a thread reads the files ahead of it,
:mod:`pipeline.prefetch`) and ``cached`` (prefetch, and the model folders read from a copy
already in the dtype loaded, :mod:`pipeline.dtype_cache`)."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

from .common import Results, summarize

COLUMNS = ("tree", "cache", "path", "dtype", "files", "bytes", "read_median_s", "read_gb_per_s", "load_median_s",
           "load_min_s", "load_max_s", "load_spread_pct", "ratio_load_to_read", "converted_once_s")
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


PATHS = ("plain", "prefetch", "cached")


def load_once(root: Path, dtype: str, path: str = "cached", dtype_cache: Path | None = None) -> float:
    """One ``from_weights``: ``plain`` (the loader alone), ``prefetch`` (the files read
    ahead of it), ``cached`` (prefetch, and model folders in another dtype read from
    their converted copy in ``dtype_cache``)."""
    from pipeline.pipeline import InstantIDPipeline

    started = time.perf_counter()
    pipe = InstantIDPipeline.from_weights(root, device="cpu", dtype=dtype, prefetch=path != "plain",
                                          dtype_cache=dtype_cache if path == "cached" else None)
    elapsed = time.perf_counter() - started
    del pipe
    gc.collect()
    return elapsed


def files_loaded(root: Path, dtype: str, dtype_cache: Path) -> tuple[list[Path], float]:
    """The files the ``cached`` path reads (the converted copies where there are some, made
    now if missing) and the seconds making them took."""
    from pipeline.devices import resolve_dtype
    from pipeline.dtype_cache import paths_in_dtype
    from pipeline.weights import resolve_weights

    paths = resolve_weights(root)
    started = time.perf_counter()
    copies = paths_in_dtype(paths, resolve_dtype(dtype), dtype_cache)
    converted_s = time.perf_counter() - started
    replaced = (paths.sdxl, paths.controlnet, paths.ip_adapter)
    rest = [p for p in tree_files(root) if not any(p.is_relative_to(f) for f in replaced)]
    return rest + tree_files(copies.sdxl) + tree_files(copies.controlnet) + [copies.ip_adapter], converted_s


def run_loading(trees: list[tuple[str, Path]], out: Path, *, dtype: str, repeats: int, warmup: int,
                dtype_cache: Path, caches: tuple[str, ...] = ("warm", "cold")) -> Results:
    """``trees``: (name, root) pairs, e.g. the fixture tree and a published-size one.
    ``dtype_cache``: where the ``cached`` path keeps its converted copies (made before
    the timed runs; the seconds that took are the rows' ``converted_once_s``)."""
    results = Results(out, "loading", COLUMNS, repeats=repeats, warmup=warmup,
                      title="Weight loading: from_weights vs reading the same bytes",
                      table=("tree", "cache", "path", "dtype", "bytes", "read_median_s", "read_gb_per_s",
                             "load_median_s", "load_spread_pct", "ratio_load_to_read", "converted_once_s"))
    for tree, root in trees:
        files = {path: tree_files(root) for path in PATHS}
        files["cached"], converted_s = files_loaded(root, dtype, dtype_cache)
        for _ in range(warmup):  # imports, first-use initialisation
            read_all(files["plain"])
            load_once(root, dtype, "plain")
        for cache in caches:
            reads, loads = {path: [] for path in PATHS}, {path: [] for path in PATHS}
            for _ in range(repeats):  # the paths alternate, each after a read of the files it loads
                for path in PATHS:
                    if cache == "cold":
                        evict(files[path])
                    else:  # warm: only this path's files in the page cache (the trees together may not fit)
                        own = set(files[path])
                        evict([f for other in PATHS if other != path for f in files[other] if f not in own])
                        read_all(files[path])
                    reads[path].append(read_all(files[path]))
                    if cache == "cold":
                        evict(files[path])
                    loads[path].append(load_once(root, dtype, path, dtype_cache))
            for path in PATHS:
                r, ld = summarize(reads[path]), summarize(loads[path])
                size = sum(p.stat().st_size for p in files[path])
                results.add(case=f"{tree}_{cache}_{path}", tree=tree, cache=cache, path=path, dtype=dtype,
                            files=len(files[path]), bytes=size, read_median_s=r["median"],
                            read_gb_per_s=size / r["median"] / 1e9, load_median_s=ld["median"], load_min_s=ld["min"],
                            load_max_s=ld["max"], load_spread_pct=ld["spread_pct"],
                            ratio_load_to_read=ld["median"] / r["median"],
                            converted_once_s=converted_s if path == "cached" else "")
    results.close()
    return results


# ----------------------------------------------------------------------------- per component

COMPONENT_COLUMNS = ("tree", "component", "path", "dtype", "files", "bytes", "read_median_s", "load_median_s",
                     "load_min_s", "load_max_s", "ratio_load_to_read")
COMPONENTS = ("unet", "controlnet", "text_encoder_2", "text_encoder", "vae", "ip_adapter")


def component_loads(root: Path, dtype: str, dtype_cache: Path | None) -> dict[str, tuple[list[Path], object]]:
    """Each model of the tree alone: (its weight files, a function loading it in ``dtype``
    as ``from_weights`` does), from the tree (``dtype_cache`` None) or from its copies in
    ``dtype`` (made if missing)."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from pipeline.adapter import read_adapter_file
    from pipeline.devices import resolve_dtype
    from pipeline.dtype_cache import paths_in_dtype
    from pipeline.prefetch import model_files
    from pipeline.weights import resolve_weights

    paths, torch_dtype = resolve_weights(root), resolve_dtype(dtype)
    if dtype_cache is not None:
        paths = paths_in_dtype(paths, torch_dtype, dtype_cache)
    sdxl, controlnet = paths.sdxl, paths.controlnet

    def model(cls, folder: Path):
        return model_files(folder), lambda: cls.from_pretrained(str(folder), dtype=torch_dtype)

    def adapter():
        state = read_adapter_file(paths.ip_adapter)
        return {group: {k: t.to(torch_dtype) for k, t in tensors.items()} for group, tensors in state.items()}

    return {"unet": model(UNet2DConditionModel, sdxl / "unet"), "controlnet": model(ControlNetModel, controlnet),
            "text_encoder_2": model(CLIPTextModelWithProjection, sdxl / "text_encoder_2"),
            "text_encoder": model(CLIPTextModel, sdxl / "text_encoder"), "vae": model(AutoencoderKL, sdxl / "vae"),
            "ip_adapter": ([paths.ip_adapter], adapter)}


def run_component_loading(trees: list[tuple[str, Path]], out: Path, *, dtype: str, repeats: int,
                          dtype_cache: Path) -> Results:
    """Each model alone, cold: its load against a cold read of its files, from the tree
    (``plain``: the conversion to ``dtype`` while loading) and from its copy already in
    ``dtype`` (``cached``). No prefetch: one model's files are read by its loader alone."""
    results = Results(out, "loading_components", COMPONENT_COLUMNS, repeats=repeats, warmup=1,
                      title="Weight loading per model, cold: its load vs a cold read of its files",
                      table=("tree", "component", "path", "dtype", "bytes", "read_median_s", "load_median_s",
                             "ratio_load_to_read"))
    for tree, root in trees:
        for path, cache in (("plain", None), ("cached", dtype_cache)):
            for component, (files, load) in component_loads(root, dtype, cache).items():
                load()  # warm-up: imports, first use
                reads, loads = [], []
                for _ in range(repeats):
                    evict(files)
                    reads.append(read_all(files))
                    evict(files)
                    started = time.perf_counter()
                    loaded = load()
                    loads.append(time.perf_counter() - started)
                    del loaded
                    gc.collect()
                r, ld = summarize(reads), summarize(loads)
                results.add(case=f"{tree}_{component}_{path}", tree=tree, component=component, path=path, dtype=dtype,
                            files=len(files), bytes=sum(p.stat().st_size for p in files), read_median_s=r["median"],
                            load_median_s=ld["median"], load_min_s=ld["min"], load_max_s=ld["max"],
                            ratio_load_to_read=ld["median"] / r["median"])
    results.close()
    return results
