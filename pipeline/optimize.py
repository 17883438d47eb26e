"""Speed settings of the InstantID pipeline: each an opt-in field of :class:`Optimizations`.

The defaults are the faithful, numerically safest path (what the pipeline did before any
of these existed): fp32 on CPU and bf16/fp16 on GPU, eager PyTorch, IdentityNet on both
halves of the classifier-free-guidance batch, the VAE decoded in fp32 when the model runs
in fp16. Every speed-up is one switch; :func:`check_optimizations` refuses bad
combinations (before any weights are read) and :func:`apply_optimizations` applies the
rest, in this order, in one place:

1. ``dtype``            chosen at load time (``from_weights`` loads in it)
2. ``few_step``         a step-distilled LoRA fused into the UNet weights (then unloaded
                        from peft: no LoRA cost per step), and its steps/guidance/scheduler
                        as the pipeline's defaults
3. ``vae_fp16_fix``     an fp16-fixed VAE in place of the SDXL VAE; ``vae_tiling``
4. ``fuse_qkv``         fused q|k|v (self-attention) and k|v (cross-attention) projections
                        in the UNet and IdentityNet, and fused face k|v in the adapter
5. ``channels_last``    UNet, IdentityNet and VAE weights in NHWC
6. ``compile``          ``torch.compile`` of the repeated transformer blocks ("regional",
                        diffusers' ``compile_repeated_blocks``) or of the UNet and
                        IdentityNet forwards ("full"); last, so that it compiles what the
                        steps above produced

What the render loop needs of them is resolved once, at assembly, into
:class:`RenderSettings`: ``identitynet_cond_only`` (changes the result: IdentityNet on the
conditional half only, zero residuals for the unconditional half, as diffusers'
``guess_mode`` does), whether the VAE decodes upcast (``vae_decode``), whether projections
are fused and whether the models are compiled. Face stage: ``face_providers``,
``face_batch``.

LoRAs per request: a LoRA lives on the unfused projections. Without ``compile``, a fused
pipeline bypasses its fused layers while a request LoRA is active. With ``compile`` and
``fuse_qkv`` together the fused state is fixed at load (switching it would recompile every
block), so request LoRAs are refused (``InvalidParameter`` on ``lora``): a server that
serves LoRAs leaves ``fuse_qkv`` off (``few_step`` LoRAs are merged at load and are fine).

Already the default and kept: SDPA (``F.scaled_dot_product_attention``) in every
attention layer, the adapter's included; IdentityNet not called outside
``control_guidance_start/end``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidParameter, WeightsNotFound

if TYPE_CHECKING:
    import torch

DTypeName = Literal["auto", "fp32", "fp16", "bf16"]
FewStepKind = Literal["lcm", "lightning", "hyper"]

# What each few-step preset sets, for the step-distilled SDXL LoRA the user provides.
FEW_STEP_PRESETS: dict[str, dict[str, Any]] = {
    # LCM-LoRA SDXL: the InstantID demo's LCM settings (5 steps, guidance 1.5, LCM scheduler)
    "lcm": {"num_inference_steps": 5, "guidance_scale": 1.5, "scheduler": "lcm"},
    # SDXL-Lightning LoRAs (2/4/8 steps): Euler with trailing timesteps, no CFG
    "lightning": {"num_inference_steps": 4, "guidance_scale": 0.0, "scheduler": "euler_trailing"},
    # Hyper-SD SDXL LoRAs (1/2/4/8 steps): DDIM with trailing timesteps, no CFG
    "hyper": {"num_inference_steps": 8, "guidance_scale": 0.0, "scheduler": "ddim_trailing"},
}

# A named bundle for the command line: every switch that keeps the result within float
# tolerance of the default ("fast"), and that plus the one that changes it ("fastest").
BUNDLES: dict[str, dict[str, Any]] = {
    "fast": {"fuse_qkv": True, "channels_last": True, "compile": "regional"},
    "fastest": {"fuse_qkv": True, "channels_last": True, "compile": "regional", "identitynet_cond_only": True},
}
_DTYPE_SHORTHANDS = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16", "bf16": "bf16",
                     "bfloat16": "bf16"}
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class FewStep(BaseModel):
    """A step-distilled SDXL LoRA the user provides, with the settings it was distilled for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: FewStepKind = Field(description="lcm (LCM-LoRA), lightning (SDXL-Lightning), hyper (Hyper-SD)")
    lora: str = Field(description="The LoRA file (.safetensors).")
    steps: int | None = Field(None, ge=1, le=50, description="Override the preset's step count (e.g. an 8-step LoRA).")
    lora_scale: float = Field(1.0, ge=0.0, le=2.0)

    def param_defaults(self) -> dict[str, Any]:
        preset = dict(FEW_STEP_PRESETS[self.kind])
        if self.steps is not None:
            preset["num_inference_steps"] = self.steps
        return preset


class Optimizations(BaseModel):
    """Speed settings; every default is today's faithful path. See the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: DTypeName = Field("auto", description="auto: fp32 on CPU, bf16 (else fp16) on GPU.")
    fuse_qkv: bool = Field(False, description="Fused attention projections (UNet, IdentityNet, face K/V).")
    channels_last: bool = Field(False, description="NHWC weights for UNet, IdentityNet and VAE.")
    compile: Literal["off", "regional", "full"] = Field(
        "off", description="torch.compile the repeated transformer blocks, or the UNet/IdentityNet forwards."
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor", description="inductor makes kernels; the others only check that the model traces."
    )
    identitynet_cond_only: bool = Field(
        False, description="Under CFG, IdentityNet on the conditional half only (changes the result)."
    )
    vae_decode: Literal["auto", "upcast", "native"] = Field(
        "auto", description="auto: fp32 when the model is fp16 and the VAE asks for it; upcast: always fp32; "
                            "native: the model's dtype."
    )
    vae_tiling: bool = Field(False, description="Decode in overlapping tiles (memory for large images).")
    vae_fp16_fix: str | None = Field(None, description="A diffusers AutoencoderKL folder fine-tuned to stay "
                                                       "finite in fp16 (e.g. sdxl-vae-fp16-fix).")
    few_step: FewStep | None = None
    face_providers: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto"
    face_batch: bool = Field(False, description="One recognition call for all the photos of a request "
                                                "(analyze_many; the served face stage always makes one call "
                                                "for all the requests of a batch).")

    @field_validator("few_step", mode="before")
    @classmethod
    def _few_step_text(cls, value):
        if isinstance(value, str):  # "KIND:PATH[:STEPS]" from the command line
            kind, _, rest = value.partition(":")
            path, steps = rest, None
            head, _, tail = rest.rpartition(":")
            if head and tail.isdigit():
                path, steps = head, int(tail)
            if not path:
                raise ValueError("expected KIND:LORA_FILE[:STEPS], e.g. lcm:lcm-lora-sdxl.safetensors")
            return {"kind": kind, "lora": path, "steps": steps}
        return value

    # ------------------------------------------------------------------ helpers
    def enabled(self) -> dict[str, Any]:
        """The settings that differ from the defaults."""
        return self.model_dump(exclude_defaults=True, mode="json")

    def label(self) -> str:
        on = self.enabled()
        return ",".join(k if v is True else f"{k}={v}" for k, v in on.items()) or "default"

    def param_defaults(self) -> dict[str, Any]:
        """Generation parameters the settings imply (a few-step preset's steps, guidance, scheduler)."""
        return self.few_step.param_defaults() if self.few_step is not None else {}

    @classmethod
    def parse(cls, spec: "str | list[str] | dict | Optimizations | None") -> "Optimizations":
        """From ``None``, a dict, or names as the CLI takes them: ``fuse_qkv,channels_last``,
        ``compile`` (= regional), ``compile=full``, ``bf16``, ``vae_tiling``,
        ``few_step=lcm:FILE``, the bundles ``fast`` and ``fastest``. Errors are
        :class:`InvalidParameter` naming the setting."""
        if spec is None:
            return cls()
        if isinstance(spec, Optimizations):
            return spec
        if isinstance(spec, dict):
            return _validate(cls, spec)
        tokens = [spec] if isinstance(spec, str) else list(spec)
        values: dict[str, Any] = {}
        for token in (t.strip() for text in tokens for t in text.split(",")):
            if not token:
                continue
            name, has_value, value = token.partition("=")
            name = name.strip().replace("-", "_")
            if not has_value:
                if name in BUNDLES:
                    values.update(BUNDLES[name])
                elif name in _DTYPE_SHORTHANDS:
                    values["dtype"] = _DTYPE_SHORTHANDS[name]
                elif name == "compile":
                    values["compile"] = "regional"
                elif name in cls.model_fields and cls.model_fields[name].annotation is bool:
                    values[name] = True
                else:
                    raise InvalidParameter("optimize", f"unknown setting {name!r}; known: {', '.join(known_names())}")
            elif name in cls.model_fields:
                values[name] = _bool(value) if cls.model_fields[name].annotation is bool else value.strip()
            else:
                raise InvalidParameter("optimize", f"unknown setting {name!r}; known: {', '.join(known_names())}")
        return _validate(cls, values)


def known_names() -> list[str]:
    return [*Optimizations.model_fields, *BUNDLES, *_DTYPE_SHORTHANDS]


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise InvalidParameter("optimize", f"expected true or false, got {text!r}")


def _validate(cls, values: dict) -> Optimizations:
    try:
        return cls.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "optimize"
        raise InvalidParameter(f"optimize.{field}", str(first.get("msg", "is invalid"))) from None


# ---------------------------------------------------------------------- resolution and checks


def resolve_load_settings(
    opts: Optimizations, device: "torch.device", dtype: "str | torch.dtype", providers: Any
) -> tuple["torch.dtype", Any]:
    """The dtype and face providers to load with, given the call's own ``dtype`` and
    ``providers`` arguments and the settings (which may not contradict each other), then
    :func:`check_optimizations`."""
    from .devices import resolve_dtype

    if opts.dtype != "auto":
        if not (isinstance(dtype, str) and dtype == "auto") and resolve_dtype(dtype) != resolve_dtype(opts.dtype):
            raise InvalidParameter("dtype", f"dtype={dtype!r} contradicts optimizations dtype={opts.dtype!r}")
        dtype = opts.dtype
    resolved = resolve_dtype(dtype, device)
    if opts.face_providers != "auto":
        if providers != "auto":
            raise InvalidParameter("providers", "give face providers either as providers= or as "
                                                "optimizations face_providers, not both")
        providers = face_provider_list(opts.face_providers)
    check_optimizations(opts, device, resolved)
    return resolved, providers


def face_provider_list(name: str) -> list[str] | str:
    return {
        "auto": "auto",
        "cpu": ["CPUExecutionProvider"],
        "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    }[name]


def check_optimizations(opts: Optimizations, device: "torch.device", dtype: "torch.dtype") -> None:
    """Refuse combinations that cannot work or make no sense, with the setting's name.
    Runs before any weights are read."""
    import torch

    on_gpu = device.type == "cuda"
    if dtype == torch.float16 and not on_gpu:
        raise InvalidParameter("dtype", "fp16 needs a CUDA device (CPU half-precision kernels are slow or "
                                        "missing); use fp32 or bf16 on CPU")
    if opts.compile == "off" and (opts.compile_mode != "default" or opts.compile_backend != "inductor"):
        raise InvalidParameter("compile_mode", "compile_mode/compile_backend need compile=regional or full")
    if opts.compile_mode in _CUDA_GRAPH_MODES and not on_gpu:
        raise InvalidParameter("compile_mode", f"{opts.compile_mode} uses CUDA graphs, which need a CUDA device")
    if opts.vae_fp16_fix is not None:
        if opts.vae_decode == "upcast":
            raise InvalidParameter("vae_fp16_fix", "conflicts with vae_decode=upcast: an fp16-fixed VAE exists to "
                                                   "decode in fp16 without the fp32 upcast")
        config = Path(opts.vae_fp16_fix) / "config.json"
        if not config.is_file():
            raise WeightsNotFound("config.json", str(opts.vae_fp16_fix), "vae_fp16_fix must be a diffusers "
                                                                         "AutoencoderKL folder")
    elif opts.vae_decode == "native" and dtype == torch.float16:
        raise InvalidParameter("vae_decode", "the SDXL VAE overflows in fp16 (black or NaN images): keep "
                                             "vae_decode=auto (decodes in fp32), run in bf16, or give vae_fp16_fix")
    if opts.few_step is not None and not Path(opts.few_step.lora).is_file():
        raise InvalidParameter("few_step.lora", f"no LoRA file at {opts.few_step.lora}")


def vae_upcasts(opts: Optimizations, vae) -> bool:
    """Whether the VAE decodes in fp32 rather than in its own dtype."""
    import torch

    if opts.vae_decode == "upcast":
        return vae.dtype != torch.float32
    if opts.vae_decode == "native" or opts.vae_fp16_fix is not None:
        return False
    return vae.dtype == torch.float16 and bool(vae.config.force_upcast)


# ---------------------------------------------------------------------- application


def apply_optimizations(sdxl, opts: Optimizations) -> list[tuple[str, float]]:
    """Apply ``opts`` to the models of a loaded SDXL ControlNet pipeline (UNet with the
    adapter's processors installed, IdentityNet as its ``controlnet``, VAE), in the
    documented order. Returns what was done, with seconds each (compilation itself happens
    at the first call of each shape: see :meth:`InstantIDPipeline.warmup`)."""
    applied: list[tuple[str, float]] = []

    def step(name: str, fn) -> None:
        started = time.perf_counter()
        fn()
        applied.append((name, round(time.perf_counter() - started, 3)))

    if opts.few_step is not None:
        step(f"few_step:{opts.few_step.kind}", lambda: _fuse_few_step_lora(sdxl, opts.few_step))
    if opts.vae_fp16_fix is not None:
        step("vae_fp16_fix", lambda: _swap_vae(sdxl, opts.vae_fp16_fix))
    if opts.vae_tiling:
        step("vae_tiling", sdxl.vae.enable_tiling)
    if opts.fuse_qkv:
        step("fuse_qkv", lambda: fuse_projections(sdxl.unet, sdxl.controlnet))
    if opts.channels_last:
        step("channels_last", lambda: to_channels_last(sdxl.unet, sdxl.controlnet, sdxl.vae))
    if opts.compile != "off":
        step(f"compile:{opts.compile}", lambda: compile_models(sdxl.unet, sdxl.controlnet, opts))
    return applied


def optimize_extra_controlnet(net, opts: Optimizations) -> list[str]:
    """The speed settings IdentityNet gets, for an extra ControlNet loaded later (its
    attention already runs through our :class:`~pipeline.adapter.AttnProcessor`). A request
    LoRA never reaches these nets, so their fused projections stay on."""
    from diffusers.models.attention_processor import Attention

    done = []
    if opts.fuse_qkv:
        for module in net.modules():
            if isinstance(module, Attention) and not getattr(module, "fused_projections", False):
                module.fuse_projections()
        done.append("fuse_qkv")
    if opts.channels_last:
        to_channels_last(net)
        done.append("channels_last")
    if opts.compile != "off":
        kwargs: dict[str, Any] = {"backend": opts.compile_backend}
        if opts.compile_backend == "inductor" and opts.compile_mode != "default":
            kwargs["mode"] = opts.compile_mode
        for part in (regional_blocks(net) if opts.compile == "regional" else [net]):
            part.compile(**kwargs)
        done.append(f"compile:{opts.compile}")
    return done


@dataclass(frozen=True)
class RenderSettings:
    """What the render loop needs of the speed settings, resolved once when the pipeline
    is assembled (after :func:`apply_optimizations`)."""

    identitynet_cond_only: bool  # under CFG, IdentityNet on the conditional half only
    vae_upcast: bool  # decode in fp32 rather than in the VAE's own dtype
    fused_projections: bool  # fused attention projections exist (fuse_qkv)
    compiled: bool  # torch.compile is on: the models' attributes must not change after load

    @property
    def lora_allowed(self) -> bool:
        """A request LoRA lives on the unfused projections: with fused projections that
        are compiled in, using one would switch them off and recompile every block."""
        return not (self.fused_projections and self.compiled)


def render_settings(opts: Optimizations, sdxl) -> RenderSettings:
    return RenderSettings(
        identitynet_cond_only=opts.identitynet_cond_only,
        vae_upcast=vae_upcasts(opts, sdxl.vae),
        fused_projections=opts.fuse_qkv,
        compiled=opts.compile != "off",
    )


def to_channels_last(*models) -> None:
    """NHWC weights: cuDNN then picks its channels-last convolution kernels (inputs follow
    the weights' layout)."""
    import torch

    for model in models:
        model.to(memory_format=torch.channels_last)


def _fuse_few_step_lora(sdxl, few_step: FewStep) -> None:
    try:
        sdxl.load_lora_weights(few_step.lora, adapter_name="few_step")
    except Exception as error:  # diffusers/peft raise many kinds for a bad file
        raise InvalidParameter("few_step.lora", f"cannot load {Path(few_step.lora).name}: {error}") from None
    sdxl.fuse_lora(lora_scale=few_step.lora_scale, adapter_names=["few_step"])
    sdxl.unload_lora_weights()  # the merged weights stay; no LoRA layers are left to run


def _swap_vae(sdxl, folder: str) -> None:
    from diffusers import AutoencoderKL

    weight = next(sdxl.unet.parameters())
    try:
        vae = AutoencoderKL.from_pretrained(folder, dtype=weight.dtype)
    except Exception as error:
        raise InvalidParameter("vae_fp16_fix", f"cannot load a VAE from {folder}: {error}") from None
    sdxl.register_modules(vae=vae.to(weight.device).eval().requires_grad_(False))


def fuse_projections(unet, controlnet) -> int:
    """Fuse the attention projections of the UNet and IdentityNet (diffusers'
    ``Attention.fuse_projections``: q|k|v for self-attention, k|v for cross-attention) and
    the adapter's face k|v. Our processors use the fused layers whenever
    ``attn.fused_projections`` is set (IdentityNet gets them too: diffusers' own processor
    would ignore the fused layers). Returns the number of attention layers fused."""
    from diffusers.models.attention_processor import Attention

    from .adapter import AttnProcessor, IdentityAttnProcessor

    count = 0
    for model in (unet, controlnet):
        for module in model.modules():
            if isinstance(module, Attention) and not getattr(module, "fused_projections", False):
                module.fuse_projections()
                count += 1
    for processor in unet.attn_processors.values():
        if isinstance(processor, IdentityAttnProcessor):
            processor.fuse()
    controlnet.set_attn_processor(AttnProcessor())
    return count


def set_fused_projections(unet, controlnet, on: bool) -> None:
    """Use (``on``) or bypass the fused projections made by :func:`fuse_projections`. A
    LoRA applied per request lives on the unfused ``to_q``/``to_k``/``to_v``, so the
    pipeline bypasses the fused layers while one is active."""
    for model in (unet, controlnet):
        for module in model.modules():
            if hasattr(module, "to_qkv") or hasattr(module, "to_kv"):
                module.fused_projections = on


def regional_blocks(model) -> list:
    """The repeated transformer blocks of a UNet or IdentityNet (the "regions"): the
    classes the UNet declares as ``_repeated_blocks`` (diffusers' ``BasicTransformerBlock``)."""
    from diffusers import UNet2DConditionModel

    names = set(UNet2DConditionModel._repeated_blocks)
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_models(unet, controlnet, opts: Optimizations) -> None:
    """``regional``: diffusers' ``compile_repeated_blocks`` (``torch.compile`` of each
    repeated transformer block, compiled once and reused by every block of the same
    shapes). diffusers 0.42 declares ``_repeated_blocks`` on the UNet but not on
    ``ControlNetModel``, whose blocks are the same class: they are compiled the same way.
    ``full``: the UNet and IdentityNet forwards."""
    kwargs: dict[str, Any] = {"backend": opts.compile_backend}
    if opts.compile_backend == "inductor" and opts.compile_mode != "default":
        kwargs["mode"] = opts.compile_mode
    if opts.compile == "regional":
        for model in (unet, controlnet):
            if getattr(type(model), "_repeated_blocks", None):
                model.compile_repeated_blocks(**kwargs)
            else:
                for block in regional_blocks(model):
                    block.compile(**kwargs)
    else:
        unet.compile(**kwargs)
        controlnet.compile(**kwargs)
