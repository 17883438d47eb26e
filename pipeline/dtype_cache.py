"""Weights in the dtype they are loaded in, converted once per node.

A model folder whose safetensors hold another floating dtype than the one the pipeline
runs in (fp32 files for an fp16 GPU, fp16 files for bf16 on a CPU) is converted on every
load: every tensor is read, converted and copied. :func:`in_dtype` makes, once, a mirror of
the folder under the cache with those files converted (other files hard-linked), and
returns it; every later load on the node reads tensors that need no conversion (and half
the bytes, for fp32 files). The mirror is keyed by the source files' names, sizes and
modification times and by the dtype, built under a temporary name and renamed when
complete, under a file lock, so processes that start together convert once and never read
half a mirror. :func:`adapter_in_dtype` does the same for the ip-adapter file (its copy is
a ``.safetensors`` file, mapped when loaded, where the published ``.bin`` is a pickle whose
tensors are converted on every load). Integers and non-floating tensors are kept as they
are; values are those of ``tensor.to(dtype)``, as a load in that dtype makes them."""

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


def _make(source: Path, target: Path, dtype: torch.dtype, build=_mirror) -> Path:
    """``build(source, partial, dtype)`` into a temporary name, renamed to ``target`` when
    complete, under a lock (one process builds; the others wait and take its result)."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.exists():  # another process made it while this one waited
            return target
        building = target.with_name(target.name + f".partial-{os.getpid()}")
        _remove(building)
        try:
            build(source, building, dtype)
            os.rename(building, target)
        finally:
            _remove(building)
    return target


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _adapter_dtypes(path: Path) -> set[torch.dtype]:
    """The floating dtypes of an ip-adapter file's tensors (the file is mapped, not read)."""
    from .adapter import read_adapter_file

    return {t.dtype for group in read_adapter_file(path).values() for t in group.values() if t.is_floating_point()}


def _convert_adapter(source: Path, target: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    from .adapter import read_adapter_file

    tensors = {f"{group}.{name}": (t.to(dtype) if t.is_floating_point() else t).contiguous()
               for group, state in read_adapter_file(source).items() for name, t in state.items()}
    save_file(tensors, str(target), metadata={"format": "pt"})


def adapter_in_dtype(path: Path, dtype: torch.dtype, cache_dir: Path) -> Path:
    """The ip-adapter file itself when its tensors are in ``dtype`` already; otherwise its
    copy in ``dtype`` under ``cache_dir`` (its ``.safetensors`` form, the same groups and
    names; made now if missing). A file that cannot be read is returned as it is, so that
    loading it reports what is wrong with it."""
    path = Path(path)
    try:
        if dtype not in SAFETENSORS_DTYPES or _adapter_dtypes(path) <= {dtype}:
            return path
    except Exception:  # noqa: BLE001 - the loader names the problem
        return path
    stat = path.stat()
    key = hashlib.sha256(f"{dtype}\0{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:20]
    copy = Path(cache_dir) / "in-dtype" / f"{path.stem}-{SAFETENSORS_DTYPES[dtype].lower()}-{key}.safetensors"
    if copy.is_file():
        return copy
    try:
        return _make(path, copy, dtype, build=_convert_adapter)
    except OSError:  # a full or read-only cache: load from the source (converting as it loads)
        return path


def paths_in_dtype(paths: WeightsPaths, dtype: torch.dtype, cache_dir: Path) -> WeightsPaths:
    """``paths`` with the SDXL folder, the IdentityNet and the ip-adapter read from their
    copies in ``dtype`` (:func:`in_dtype`, :func:`adapter_in_dtype`); a single-file SDXL
    checkpoint is read as it is."""
    from dataclasses import replace

    ip_adapter = adapter_in_dtype(paths.ip_adapter, dtype, cache_dir) if paths.ip_adapter else paths.ip_adapter
    if paths.sdxl_is_single_file:
        return replace(paths, ip_adapter=ip_adapter)
    return replace(paths, sdxl=in_dtype(paths.sdxl, dtype, cache_dir),
                   controlnet=in_dtype(paths.controlnet, dtype, cache_dir), ip_adapter=ip_adapter)
