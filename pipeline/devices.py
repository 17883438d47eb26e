"""Which device and dtype the models run on: ``auto`` picks CUDA when it is usable, and fp32 on
CPU, bf16 (else fp16) on a GPU; and the machine by name, for reports (benchmarks, evaluations)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from .errors import InvalidParameter

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameter("device", "cuda was asked for but no CUDA device is usable")
    return device


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """fp32 on CPU; bf16 on GPUs that support it, else fp16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device is None or device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPE_NAMES:
        raise InvalidParameter("dtype", f"unknown dtype {dtype!r}; choose auto, float32, float16 or bfloat16")
    return DTYPE_NAMES[dtype]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, str]:
    """``hardware``: the CPU (and GPU) by name; ``device``: where the models ran."""
    cores = os.cpu_count() or 1
    name = f"{cpu_name()} ({cores} cores)"
    device = "cpu"
    try:
        if torch.cuda.is_available():
            device = f"cuda:{torch.cuda.get_device_name(0)}"
            name = f"{torch.cuda.get_device_name(0)} + {name}"
    except Exception:  # pragma: no cover - a broken driver
        pass
    return {"hardware": name, "device": device}
