"""Assembling the SDXL ControlNet pipeline InstantID runs on: from one original-layout
checkpoint, or from another SDXL pipeline or a dict of its parts."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import InvalidParameter, InvalidWeights

SDXL_MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")


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
