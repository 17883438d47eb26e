"""Weights in the dtype they are loaded in, converted once per node.

A model folder whose safetensors hold another floating dtype than the one the pipeline
runs in (fp32 files for an fp16 GPU, fp16 files for bf16 on a CPU) is converted on every
load: every tensor is read, converted and copied. :func:`in_dtype` makes, once, a mirror of
the folder under the cache with those files converted (other files hard-linked), and
returns it; every later load on the node reads tensors that need no conversion (and half
the bytes, for fp32 files). The mirror is keyed by the source files' names, sizes and
modification times and by the dtype, built under a temporary name and renamed when
complete, under a file lock, so processes that start together convert once and never read
half a mirror. Integers and non-floating tensors are kept as they are; values are those of
``tensor.to(dtype)``, as a load in that dtype makes them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import torch

from .weights import WeightsPaths

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
FLOAT_CODES = set(SAFETENSORS_DTYPES.values())


def header_dtypes(path: Path) -> set[str]:
    """The dtype codes of a safetensors file's tensors (from its JSON header only)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


def needs_conversion(path: Path, dtype: torch.dtype) -> bool:
    return path.suffix == ".safetensors" and bool((header_dtypes(path) & FLOAT_CODES) - {SAFETENSORS_DTYPES[dtype]})


def _key(folder: Path, dtype: torch.dtype) -> str:
    digest = hashlib.sha256(str(dtype).encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _convert(source: Path, target: Path, dtype: torch.dtype) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
        for name in handle.keys():
            tensor = handle.get_tensor(name)
            tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    save_file(tensors, str(target), metadata=metadata)


def _mirror(folder: Path, building: Path, dtype: torch.dtype) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        target = building / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        if needs_conversion(path, dtype):
            _convert(path, target, dtype)
        else:
            try:
                os.link(path, target)
            except OSError:  # another filesystem, or links not allowed
                shutil.copy2(path, target)


def in_dtype(folder: Path, dtype: torch.dtype, cache_dir: Path) -> Path:
    """``folder`` itself when none of its safetensors needs converting to ``dtype``;
    otherwise its mirror in ``dtype`` under ``cache_dir`` (made now if missing)."""
    folder = Path(folder)
    if dtype not in SAFETENSORS_DTYPES or not any(needs_conversion(p, dtype) for p in folder.rglob("*.safetensors")):
        return folder
    mirror = Path(cache_dir) / "in-dtype" / f"{folder.name}-{SAFETENSORS_DTYPES[dtype].lower()}-{_key(folder, dtype)}"
    if mirror.is_dir():
        return mirror
    try:
        return _make(folder, mirror, dtype)
    except OSError:  # a full or read-only cache: load from the source (converting as it loads)
        return folder


def _make(folder: Path, mirror: Path, dtype: torch.dtype) -> Path:
    from filelock import FileLock

    mirror.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(mirror) + ".lock"):
        if mirror.is_dir():  # another process made it while this one waited
            return mirror
        building = mirror.with_name(mirror.name + f".partial-{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        try:
            _mirror(folder, building, dtype)
            os.rename(building, mirror)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return mirror


def paths_in_dtype(paths: WeightsPaths, dtype: torch.dtype, cache_dir: Path) -> WeightsPaths:
    """``paths`` with the SDXL folder and the IdentityNet read from their copies in
    ``dtype`` (:func:`in_dtype`); a single-file SDXL checkpoint is read as it is."""
    from dataclasses import replace

    if paths.sdxl_is_single_file:
        return paths
    return replace(paths, sdxl=in_dtype(paths.sdxl, dtype, cache_dir), controlnet=in_dtype(paths.controlnet, dtype,
                                                                                             cache_dir))
