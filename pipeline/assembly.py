"""Assembling the SDXL ControlNet pipeline InstantID runs on: from a weights tree (a
diffusers folder or one original-layout checkpoint, the IdentityNet, the ip-adapter file),
or from another SDXL pipeline or a dict of its parts."""

from __future__ import annotations

from pathlib import Path

import torch

from .adapter import read_adapter_file
from .dtype_cache import paths_in_dtype
from .errors import InvalidParameter, InvalidWeights
from .prefetch import model_files, prefetching
from .weights import HUB_REPOS, WeightsPaths

SDXL_MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")


def load_sdxl_parts(paths: WeightsPaths, dtype: torch.dtype, device: torch.device, *, prefetch: bool = True,
                    dtype_cache: str | Path | None = None):
    """The SDXL ControlNet pipeline (the IdentityNet as its ControlNet) on ``device`` in
    ``dtype``, and the ip-adapter file's contents. ``prefetch``: the files read ahead of
    the loader, in the order it reads them (:mod:`pipeline.prefetch`); ``dtype_cache``:
    model folders and the ip-adapter in another dtype read from their copy in ``dtype``,
    made once (:mod:`pipeline.dtype_cache`)."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    if dtype_cache is not None:
        paths = paths_in_dtype(paths, dtype, Path(dtype_cache))
    models = {} if paths.sdxl_is_single_file else sdxl_models(paths.sdxl)
    # in the order they load: the IdentityNet, SDXL's models one by one, the ip-adapter
    sdxl_files = [paths.sdxl] if paths.sdxl_is_single_file else model_files(paths.sdxl, list(models))
    with prefetching([*model_files(paths.controlnet), *sdxl_files, paths.ip_adapter], enabled=prefetch) as ahead:
        def read(files: list[Path]) -> None:  # a model loads once its files are in memory
            if ahead is not None:
                ahead.wait_for(files)

        read(model_files(paths.controlnet))
        controlnet = ControlNetModel.from_pretrained(str(paths.controlnet), dtype=dtype)
        if paths.sdxl_is_single_file:
            read([paths.sdxl])
            sdxl = load_single_file(paths.sdxl, paths.sdxl_config or HUB_REPOS["sdxl"], controlnet, dtype)
        else:
            loaded = {}
            for name, cls in models.items():
                read(model_files(paths.sdxl / name))
                loaded[name] = cls.from_pretrained(str(paths.sdxl / name), dtype=dtype)
            sdxl = StableDiffusionXLControlNetPipeline.from_pretrained(  # the rest: tokenizers, scheduler
                str(paths.sdxl), controlnet=controlnet, dtype=dtype, add_watermarker=False, **loaded
            )
        read([paths.ip_adapter])
        adapter = read_adapter_file(paths.ip_adapter)
        sdxl.to(device)
    return sdxl, adapter


def sdxl_models(folder: Path) -> dict[str, type]:
    """The model classes of an SDXL folder's weighted parts, by name, from its
    ``model_index.json`` (parts it leaves empty or lacks a folder for are left to the
    pipeline's loader, as are tokenizers and the scheduler)."""
    import importlib
    import json

    index = json.loads((folder / "model_index.json").read_text())
    models = {}
    for name in sorted(SDXL_MODELS):  # the order a pipeline loads its parts: by name
        library, class_name = (index.get(name) or [None, None])[:2]
        if library in ("diffusers", "transformers") and class_name and (folder / name).is_dir():
            cls = getattr(importlib.import_module(library), class_name, None)
            if cls is not None:
                models[name] = cls
    return models


def load_single_file(path: Path, config: str, controlnet, dtype: torch.dtype):
    """SDXL from one original-layout checkpoint (component configs from ``config``: a local
    diffusers folder or a hub repo). Whatever goes wrong surfaces as one
    :class:`InvalidWeights` naming the file; tensors the file lacks are named too (diffusers
    leaves them unloaded, which would only fail later and without a name)."""
    from diffusers import StableDiffusionXLControlNetPipeline

    try:
        sdxl = StableDiffusionXLControlNetPipeline.from_single_file(
            str(path), controlnet=controlnet, dtype=dtype, config=config, add_watermarker=False
        )
    except Exception as error:  # diffusers raises many kinds for a bad or unrecognised file
        detail = " ".join(f"{type(error).__name__}: {error}".split())
        if "meta tensor" in detail:  # a tensor diffusers expected was not in the file
            detail = f"the file lacks tensors the model needs ({detail[:200]})"
        raise InvalidWeights(
            f"{path.name}: cannot load it as an SDXL checkpoint (configs from {config}): {detail[:600]}"
        ) from error
    missing = [
        f"{component}.{name}"
        for component in SDXL_MODELS
        for name, tensor in [*getattr(sdxl, component).named_parameters(), *getattr(sdxl, component).named_buffers()]
        if tensor.is_meta
    ]
    if missing:
        raise InvalidWeights(
            f"{path.name}: the checkpoint lacks {len(missing)} tensor(s) of the SDXL model: {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else "")
        )
    return sdxl


def controlnet_pipeline(sdxl, controlnet):
    """An SDXL ControlNet pipeline from one, from another SDXL pipeline, or from a dict of
    parts, with ``controlnet`` (when given) as its ControlNet."""
    from diffusers import StableDiffusionXLControlNetPipeline

    if isinstance(sdxl, StableDiffusionXLControlNetPipeline) and controlnet is None:
        return sdxl
    parts = dict(sdxl) if isinstance(sdxl, dict) else dict(getattr(sdxl, "components", {}))
    if not parts:
        raise InvalidParameter("sdxl", "expected an SDXL pipeline or a dict of its parts")
    controlnet = controlnet if controlnet is not None else parts.get("controlnet")
    if controlnet is None:
        raise InvalidParameter("controlnet", "the IdentityNet (a ControlNetModel) is needed")
    for name in ("unet", "vae", "scheduler"):
        if parts.get(name) is None:
            raise InvalidParameter(f"sdxl.{name}", "is needed")
    names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    return StableDiffusionXLControlNetPipeline(**{name: parts.get(name) for name in names}, controlnet=controlnet,
                                               add_watermarker=False)
