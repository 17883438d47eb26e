"""The InstantID pipeline on diffusers' SDXL ControlNet machinery.

:class:`InstantIDPipeline` composes a :class:`~diffusers.StableDiffusionXLControlNetPipeline`
(for loading, prompt encoding, LoRA and VAE helpers) with the Resampler, the
decoupled-attention processors and the face stage, and runs its own denoising loop:

* IdentityNet (the ControlNet) gets only the 16 face tokens as ``encoder_hidden_states``
  and the keypoint image as its condition; the UNet gets text tokens followed by face tokens.
* The classifier-free-guidance branch uses the negative prompt and the Resampler applied
  to an all-zero embedding.
* IdentityNet is not called outside ``control_guidance_start/end``.
* Every image has its own seed, prompt and scales, so an image is the same whether it is
  rendered alone or inside a batch.

* A guidance-distilled UNet (``time_cond_proj_dim`` set) gets each image's guidance as an
  embedding and no unconditional branch, as diffusers' SDXL pipelines do.

:meth:`InstantIDPipeline.from_components` assembles the pipeline from loaded parts (and
:meth:`InstantIDPipeline.from_weights` loads the parts, then calls it). Speed settings are
opt-in (:class:`~pipeline.optimize.Optimizations`); they are applied there, once, and what
the render loop needs of them is resolved there too. The defaults are the faithful path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .adapter import (AdapterWeightsError, AttnProcessor, FaceRegionMask, install_adapter_processors,
                      load_adapter_layers, load_image_proj, token_grids)
from .assembly import SDXL_MODELS, controlnet_pipeline, load_sdxl_parts  # noqa: F401 - SDXL_MODELS re-exported
from .controlnets import Annotators, ExtraControl, ExtraControlNets, control_images_for, split_images
from .devices import resolve_device, resolve_dtype
from .errors import InstantIDError, InvalidParameter
from .face import FaceAnalyzer, FaceInfo
from .identitynet import ControlInputs, box_mask, scale_residual, to_tensor, window_keeps
from .images import ImageInput, load_image
from .img2img import (StartImage, default_strength, encode_pictures, frame_mask, frame_picture, keep_unmasked_pixels,
                      latent_mask, start_step, truncate_schedule)
from .keypoints import Frame, draw_keypoints, reference_size
from .optimize import (Optimizations, RenderSettings, apply_optimizations, check_optimizations, render_settings,
                       resolve_load_settings, set_fused_projections)
from .params import GenerationParams, parse_params
from .prompts import PromptTooLong, encode_weighted, sequence_length
from .schedulers import make_scheduler
from .styles import apply_style
from .weights import ExtraWeights, WeightsPaths, resolve_weights

StepCallback = Callable[[int, int], None]


class Cancelled(InstantIDError):
    """Raised by a step callback to stop a generation between two steps."""

    code = "canceled"


@dataclass
class RenderItem:
    """One image to render. Prompts are final (style applied); ``kps`` and ``face_box`` are
    in output pixels."""

    prompt: str
    negative_prompt: str | None
    embedding: np.ndarray
    kps: np.ndarray
    seed: int
    guidance_scale: float = 5.0
    ip_adapter_scale: float = 0.8
    controlnet_conditioning_scale: float = 0.8
    face_box: tuple[float, float, float, float] | None = None
    controls: tuple[np.ndarray, ...] = ()  # extra ControlNets' control images (HxWx3 uint8), as options.controlnets
    control_scales: tuple[float, ...] = ()  # and their strengths
    init_image: np.ndarray | None = None  # img2img/inpainting: the picture, HxWx3 uint8 at the output size
    mask: np.ndarray | None = None  # inpainting: HxW uint8 at the output size, 255 where to repaint


@dataclass(frozen=True)
class RenderOptions:
    """What every image of one batch shares (requests are batched only when equal)."""

    width: int
    height: int
    num_inference_steps: int = 30
    scheduler: str = "euler"
    do_cfg: bool = True
    control_guidance_start: float = 0.0
    control_guidance_end: float = 1.0
    lora: str | None = None
    lora_scale: float = 1.0
    enhance_face_region: bool = False
    text_tokens: int | None = None  # weighted prompts' embedding rows (pipeline.prompts); None: plain encoding
    strength: float | None = None  # img2img/inpainting (pipeline.img2img); None: text-to-image
    inpaint: bool = False  # the items carry masks
    controlnets: tuple[tuple[str, float, float], ...] = ()  # extra ControlNets: (name, window start, window end)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    width: int
    height: int
    face: FaceInfo
    timings_ms: dict[str, float] = field(default_factory=dict)


class InstantIDPipeline:
    """Face photos + prompt -> identity-preserving SDXL images. See the module docstring."""

    def __init__(self, sdxl, image_proj: torch.nn.Module, face: FaceAnalyzer | None,
                 optimizations: Optimizations | None = None, *, applied: list[tuple[str, float]] | None = None,
                 settings: RenderSettings | None = None, extras: ExtraWeights | None = None) -> None:
        """Wrap already assembled parts; :meth:`from_components` is the assembly (adapter
        installed, speed settings applied). ``settings``: what the render loop needs of the
        speed settings (default: resolved here from ``optimizations``). ``extras``: where
        extra ControlNets and annotators are found (:class:`~pipeline.weights.ExtraWeights`)."""
        self.sdxl = sdxl
        self.image_proj = image_proj
        self.face = face
        self.optimizations = optimizations or Optimizations()
        self.applied = list(applied or [])  # what apply_optimizations did, seconds each
        self.settings = settings or render_settings(self.optimizations, sdxl)
        self.num_face_tokens = int(image_proj.latents.shape[1])
        weight = next(sdxl.unet.parameters())  # fixed at assembly (diffusers' .device/.dtype walk every module)
        self._device, self._dtype = weight.device, weight.dtype
        # a guidance-distilled UNet takes the guidance as an embedding instead of an
        # unconditional branch (diffusers' SDXL pipelines do the same)
        self._guidance_dim = sdxl.unet.config.time_cond_proj_dim
        self._lock = threading.Lock()
        self._loras: dict[str, str] = {}
        self._fused = self.settings.fused_projections  # whether the fused projections are in use now
        cross = sdxl.unet.config.cross_attention_dim
        out_dims = image_proj.proj_out.out_features
        if out_dims != cross:
            raise AdapterWeightsError(f"the Resampler makes {out_dims}-wide tokens but the UNet attends over {cross}")
        self.sdxl.set_progress_bar_config(disable=True)
        self.extra_controlnets = ExtraControlNets(extras, self._device, self._dtype, cross, self.optimizations)
        self.annotators = Annotators(extras, self._device, self._dtype)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_components(
        cls,
        sdxl,
        adapter: dict,
        *,
        controlnet=None,
        face: FaceAnalyzer | None = None,
        optimizations: Optimizations | dict | str | None = None,
        extras: ExtraWeights | str | Path | None = None,
    ) -> "InstantIDPipeline":
        """Assemble InstantID from loaded components; every way of loading ends here.

        ``sdxl``: a :class:`~diffusers.StableDiffusionXLControlNetPipeline` whose
        ``controlnet`` is the IdentityNet; or another SDXL pipeline, or a dict of its parts
        (``unet``, ``vae``, ``scheduler``, optionally the text encoders and tokenizers),
        with the IdentityNet as ``controlnet``. ``adapter``: the ip-adapter file's contents
        (``{"image_proj": ..., "ip_adapter": ...}`` as :func:`~pipeline.adapter.read_adapter_file`
        returns them, published key scheme, loaded strictly). ``face``: the face stage, if
        any. ``optimizations``: applied here, once; what the render loop needs of them is
        resolved here too (:class:`~pipeline.optimize.RenderSettings`).

        The models stay on the device and in the dtype they are in (move them first);
        the Resampler and the adapter layers follow the UNet."""
        opts = Optimizations.parse(optimizations)
        sdxl = controlnet_pipeline(sdxl, controlnet)
        weight = next(sdxl.unet.parameters())
        if opts.dtype != "auto" and resolve_dtype(opts.dtype) != weight.dtype:
            raise InvalidParameter("dtype", f"the models are {weight.dtype} but optimizations ask for {opts.dtype}")
        check_optimizations(opts, weight.device, weight.dtype)
        for name in ("image_proj", "ip_adapter"):
            if name not in adapter:
                raise AdapterWeightsError(f"the adapter weights lack the group {name!r}")
        image_proj = load_image_proj(adapter["image_proj"]).to(device=weight.device, dtype=weight.dtype)
        layers = install_adapter_processors(sdxl.unet, num_tokens=int(adapter["image_proj"]["latents"].shape[1]))
        load_adapter_layers(layers, adapter["ip_adapter"])
        # IdentityNet's attention through the same SDPA processor (it knows fused projections)
        sdxl.controlnet.set_attn_processor(AttnProcessor())
        applied = apply_optimizations(sdxl, opts)
        return cls(sdxl, image_proj, face, opts, applied=applied, settings=render_settings(opts, sdxl),
                   extras=extras if isinstance(extras, ExtraWeights) or extras is None else ExtraWeights(extras))

    @classmethod
    def from_weights(
        cls,
        weights: str | Path | WeightsPaths,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        providers: str | Sequence[str] = "auto",
        load_face: bool = True,
        optimizations: Optimizations | dict | str | None = None,
        prefetch: bool = True,
        dtype_cache: str | Path | None = None,
        **resolve_kwargs,
    ) -> "InstantIDPipeline":
        """Load every component from a weights root (see :mod:`pipeline.weights`) and
        assemble them with :meth:`from_components`. ``optimizations``: speed settings
        (:class:`~pipeline.optimize.Optimizations`, a dict of its fields, or names as
        ``instantid generate --optimize`` takes them); a bad combination is refused before
        any weights are read. ``prefetch``: a thread reads the weight files ahead of the
        loader (:mod:`pipeline.prefetch`; the same weights either way). ``dtype_cache``: a
        folder where model folders whose files hold another dtype than the one loaded are
        kept converted, once per node (:mod:`pipeline.dtype_cache`; the same values as a
        conversion while loading)."""
        opts = Optimizations.parse(optimizations)
        device = resolve_device(device)
        dtype, providers = resolve_load_settings(opts, device, dtype, providers)
        if load_face:
            from .face import select_providers

            select_providers(providers)  # an unusable provider is refused before reading weights
        if not isinstance(weights, WeightsPaths):
            needed = ("sdxl", "instantid", "antelopev2") if load_face else ("sdxl", "instantid")
            weights = resolve_weights(weights, components=needed, **resolve_kwargs)
        sdxl, adapter = load_sdxl_parts(weights, dtype, device, prefetch=prefetch, dtype_cache=dtype_cache)
        face = FaceAnalyzer(weights.antelopev2, providers=providers, batch_recognition=opts.face_batch) \
            if load_face else None
        return cls.from_components(sdxl, adapter, face=face, optimizations=opts, extras=weights.extras)

    @property
    def param_defaults(self) -> dict:
        """Generation parameters this pipeline's settings imply (a few-step preset's
        steps, guidance and scheduler); explicit parameters win."""
        return self.optimizations.param_defaults()

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.sdxl.vae_scale_factor

    # ------------------------------------------------------------------ face
    def analyze_faces(
        self, images: ImageInput | Sequence[ImageInput], *, pose: ImageInput | None = None, combine: str = "mean"
    ) -> FaceInfo:
        if self.face is None:
            raise InvalidParameter("face", "this pipeline was loaded without the face stage")
        if not isinstance(images, (list, tuple)):
            images = [images]
        return self.face.analyze_many(list(images), pose=pose, combine=combine)

    # ------------------------------------------------------------------ high level
    def __call__(
        self,
        face: FaceInfo | ImageInput | Sequence[ImageInput],
        prompt: str = "",
        *,
        pose: ImageInput | None = None,
        image: ImageInput | None = None,
        mask_image: ImageInput | None = None,
        controlnets: Sequence[dict] | None = None,
        on_step: StepCallback | None = None,
        **params,
    ) -> GenerationResult:
        """Generate ``num_images`` images of the person in ``face`` (photos or a
        :class:`FaceInfo`). ``params`` are the fields of :class:`GenerationParams`.

        ``image`` restyles that picture (img2img, ``strength``); ``mask_image`` (white:
        repaint) repaints only part of it. The keypoints come from ``pose``, else from the
        face in ``image``, else from the first face photo. ``controlnets``: extra ControlNets,
        ``[{"type": "canny", "image": photo, "scale": 0.5, ...}]`` (:class:`ControlNetParams`
        plus the image)."""
        entries, control_sources = split_images(controlnets)
        spec = parse_params(GenerationParams, prompt=prompt, **{**self.param_defaults, **params,
                                                                  "controlnets": entries})
        control_images = [load_image(source, field=f"controlnets[{k}].image")
                          for k, source in enumerate(control_sources)]
        picture = load_image(image, field="image") if image is not None else None
        mask = load_image(mask_image, field="mask_image") if mask_image is not None else None
        started = time.perf_counter()
        info = face if isinstance(face, FaceInfo) else \
            self.analyze_faces(face, pose=pose if pose is not None else picture)
        face_ms = (time.perf_counter() - started) * 1000
        options, items = self.plan(spec, info, image=picture, mask=mask, control_images=control_images)
        images, timings = self.render(items, options, on_step=on_step)
        timings = {"face": face_ms, **timings}
        return GenerationResult(images, [i.seed for i in items], options.width, options.height, info, timings)

    def plan(self, spec: GenerationParams, face: FaceInfo, *, image: Image.Image | None = None,
             mask: Image.Image | None = None, control_images: Sequence[Image.Image] = ()
             ) -> tuple[RenderOptions, list[RenderItem]]:
        """Turn validated parameters, an analysed face, (img2img, inpainting) the starting
        picture and its mask, and the extra ControlNets' images into render items."""
        self.check_lora(spec.lora)
        if image is None and (mask is not None or spec.strength is not None):
            raise InvalidParameter("mask_image" if mask is not None else "strength",
                                   "needs image (the picture to start from)")
        width, height = self.output_size(spec, face, image.size if image is not None else None)
        source, kps, bbox = face.image_size, np.asarray(face.kps, float), np.asarray(face.bbox, float)
        if image is not None and tuple(source) == reference_size(*image.size):
            # the face was found in the picture, which the face stage stretched to multiples of 64: back
            # to the picture's own pixels, so that the keypoints land on its face once both are framed
            factor = np.array(image.size, float) / np.array(source, float)
            source, kps, bbox = image.size, kps * factor, bbox * np.tile(factor, 2)
        frame = Frame(source, (width, height))
        kps = frame.points(kps)
        box = tuple(float(v) for v in frame.box(bbox))
        prompt, negative = apply_style(spec.style, spec.prompt, spec.negative_prompt)
        strength = default_strength(spec.strength, mask is not None) if image is not None else None
        picture = frame_picture(image, (width, height)) if image is not None else None
        framed_mask = frame_mask(mask, image.size, (width, height)) if mask is not None else None
        controls = control_images_for(spec.controlnets, control_images, (width, height), self.extra_controlnets,
                                      self.annotators)
        options = RenderOptions(
            width=width,
            height=height,
            num_inference_steps=spec.num_inference_steps,
            scheduler=spec.scheduler,
            do_cfg=spec.do_cfg,
            control_guidance_start=spec.control_guidance_start,
            control_guidance_end=spec.control_guidance_end,
            lora=spec.lora,
            lora_scale=spec.lora_scale,
            enhance_face_region=spec.enhance_face_region,
            text_tokens=self._text_tokens(prompt, negative) if spec.prompt_weighting else None,
            strength=strength,
            inpaint=mask is not None,
            controlnets=tuple((c.type, c.control_guidance_start, c.control_guidance_end) for c in spec.controlnets),
        )
        if strength is not None:
            start_step(options.num_inference_steps, strength)  # refused now, not at render
        items = [
            RenderItem(
                prompt=prompt,
                negative_prompt=negative,
                embedding=np.asarray(face.embedding, dtype=np.float32),
                kps=kps,
                seed=seed,
                guidance_scale=spec.guidance_scale,
                ip_adapter_scale=spec.ip_adapter_scale,
                controlnet_conditioning_scale=spec.controlnet_conditioning_scale,
                face_box=box,
                init_image=picture,
                mask=framed_mask,
                controls=controls,
                control_scales=tuple(c.scale for c in spec.controlnets),
            )
            for seed in spec.seeds()
        ]
        return options, items

    def _text_tokens(self, prompt: str, negative: str | None) -> int:
        try:
            return sequence_length(self.sdxl.tokenizer, prompt, negative)
        except PromptTooLong as error:  # the styled prompt: a style adds its own words
            raise InvalidParameter(error.field, str(error)) from None

    def output_size(self, spec: GenerationParams, face: FaceInfo,
                    picture_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """Explicit width/height, else the reference rule applied to the starting picture
        (img2img) or the face's picture."""
        default_w, default_h = reference_size(*(picture_size or face.image_size))
        width = spec.width or (default_w if spec.height is None else _round8(spec.height * default_w / default_h))
        height = spec.height or (default_h if spec.width is None else _round8(spec.width * default_h / default_w))
        factor = self.vae_scale_factor
        for name, value in (("width", width), ("height", height)):
            if value % factor:
                raise InvalidParameter(name, f"must be a multiple of {factor}, got {value}")
        return width, height

    # ------------------------------------------------------------------ LoRA
    def check_lora(self, lora: str | None) -> None:
        """Refuse a request LoRA this pipeline cannot use: with ``compile`` and ``fuse_qkv``
        the fused projections are compiled in and stay on (a LoRA needs them off)."""
        if lora is not None and not self.settings.lora_allowed:
            raise InvalidParameter("lora", "this pipeline was loaded with compile and fuse_qkv: its fused projections "
                                           "are compiled in, and a LoRA needs the unfused ones (load without "
                                           "fuse_qkv to serve LoRAs)")

    def _activate_lora(self, lora: str | None, scale: float) -> None:
        self.check_lora(lora)
        if self.settings.fused_projections and not self.settings.compiled:
            fused = lora is None  # a LoRA lives on the unfused projections
            if fused != self._fused:
                set_fused_projections(self.sdxl.unet, self.sdxl.controlnet, on=fused)
                self._fused = fused
        if lora is None:
            if self._loras:
                self.sdxl.disable_lora()
            return
        if lora not in self._loras:
            path = Path(lora)
            if not path.exists():
                raise InvalidParameter("lora", f"no LoRA file at {lora}")
            name = f"lora{len(self._loras)}"
            try:
                self.sdxl.load_lora_weights(str(path), adapter_name=name)
            except Exception as error:  # diffusers/peft raise many kinds for a bad file
                raise InvalidParameter("lora", f"cannot load {path.name}: {error}") from None
            self._loras[lora] = name
        self.sdxl.enable_lora()
        self.sdxl.set_adapters([self._loras[lora]], adapter_weights=[scale])

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def render(
        self, items: Sequence[RenderItem], options: RenderOptions, *, on_step: StepCallback | None = None
    ) -> tuple[list[Image.Image], dict[str, float]]:
        """Render a batch of images that share ``options``. Not re-entrant: calls are
        serialised, since diffusers components are not safe to use from two threads."""
        # 1. check inputs (before any model work)
        self._check(items, options)
        with self._lock:
            return self._render(list(items), options, on_step)

    def warmup(self, width: int, height: int, *, batch: int = 1, num_inference_steps: int = 2,
               guidance_scale: float = 5.0, scheduler: str = "euler", enhance_face_region: bool = False) -> float:
        """Render ``batch`` throw-away images of ``width`` x ``height`` through the path a
        request takes (CFG at the default guidance, IdentityNet on, a face box, per-image
        scales) and return the seconds taken. With ``compile`` on, the first call at each
        new shape compiles (tens of seconds on a GPU): see :meth:`warmup_shapes`."""
        started = time.perf_counter()
        layout = np.array([[0.4, 0.4], [0.6, 0.4], [0.5, 0.55], [0.42, 0.7], [0.58, 0.7]])
        kps = layout * [width, height]
        box = (0.3 * width, 0.3 * height, 0.7 * width, 0.8 * height)
        width_in = int(self.image_proj.proj_in.in_features)
        items = [RenderItem(prompt="a portrait", negative_prompt=None, embedding=np.zeros(width_in, np.float32),
                            kps=kps, seed=k, guidance_scale=guidance_scale, face_box=box) for k in range(batch)]
        options = RenderOptions(width=width, height=height, num_inference_steps=num_inference_steps,
                                scheduler=scheduler, do_cfg=guidance_scale > 1.0,
                                enhance_face_region=enhance_face_region)
        self.render(items, options)
        return time.perf_counter() - started

    def warmup_shapes(self, shapes: Sequence[Sequence[int]], **options) -> dict[tuple[int, int, int], float]:
        """:meth:`warmup` for each ``(width, height, batch)`` a server will render (call it
        before taking traffic); ``options`` as :meth:`warmup` takes them. Returns the
        seconds per shape."""
        checked = []
        for k, shape in enumerate(shapes):
            values = tuple(shape) if isinstance(shape, (list, tuple)) else ()
            if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
                raise InvalidParameter(f"warmup_shapes[{k}]", f"expected (width, height, batch), got {shape!r}")
            checked.append(values)
        return {(w, h, b): self.warmup(w, h, batch=b, **options) for w, h, b in checked}

    def _check(self, items: Sequence[RenderItem], options: RenderOptions) -> None:
        if not items:
            raise InvalidParameter("items", "nothing to render")
        factor = self.vae_scale_factor
        for name in ("width", "height"):
            value = getattr(options, name)
            if value < factor or value % factor:
                raise InvalidParameter(name, f"must be a positive multiple of {factor}, got {value}")
        if options.num_inference_steps < 1:
            raise InvalidParameter("num_inference_steps", "must be at least 1")
        self.check_lora(options.lora)
        if not 0 <= options.control_guidance_start < options.control_guidance_end <= 1:
            raise InvalidParameter("control_guidance_start", "the IdentityNet window must satisfy 0 <= start < end <= 1")
        if options.strength is not None:
            start_step(options.num_inference_steps, options.strength)
        elif options.inpaint:
            raise InvalidParameter("strength", "inpainting needs a strength")
        width = int(self.image_proj.proj_in.in_features)
        picture = (options.height, options.width)
        for k, item in enumerate(items):
            if np.asarray(item.embedding).size != width:
                raise InvalidParameter(f"items[{k}].embedding", f"must have {width} values")
            if np.asarray(item.kps).shape != (5, 2):
                raise InvalidParameter(f"items[{k}].kps", "must be 5 (x, y) keypoints")
            for name, wanted, shape in (("init_image", options.strength is not None, (*picture, 3)),
                                        ("mask", options.inpaint, picture)):
                value = getattr(item, name)
                if (value is not None) != wanted:
                    raise InvalidParameter(f"items[{k}].{name}", "is needed in this mode" if wanted
                                           else "is given but the options' mode does not use it")
                if value is not None and (np.asarray(value).shape != shape or np.asarray(value).dtype != np.uint8):
                    raise InvalidParameter(f"items[{k}].{name}", f"must be uint8 of shape {shape}")
            if not len(item.controls) == len(item.control_scales) == len(options.controlnets):
                raise InvalidParameter(f"items[{k}].controls", f"must be {len(options.controlnets)} control images "
                                                               "and strengths, one per extra ControlNet")
            for j, control in enumerate(item.controls):
                if np.asarray(control).shape != (*picture, 3) or np.asarray(control).dtype != np.uint8:
                    raise InvalidParameter(f"items[{k}].controls[{j}]", f"must be uint8 of shape {(*picture, 3)}")

    def _render(self, items: list[RenderItem], options: RenderOptions, on_step: StepCallback | None):
        device, dtype = self.device, self.dtype
        cfg = options.do_cfg and self._guidance_dim is None  # a guidance-distilled UNet: see __init__
        # IdentityNet on the conditional half only (opt-in; changes the result): the
        # unconditional half gets zero residuals, as diffusers' guess_mode does
        cond_only = cfg and self.settings.identitynet_cond_only
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        self._activate_lora(options.lora, options.lora_scale)

        # 2. encode: text per item (identical alone or batched), face tokens
        text, pooled = self._encode_text(items, cfg, options.lora_scale if options.lora else None,
                                         weighted=options.text_tokens is not None)
        embeddings = torch.from_numpy(np.stack([np.asarray(i.embedding, np.float32).reshape(-1) for i in items]))
        embeddings = embeddings.to(device=device, dtype=dtype)[:, None, :]
        face_tokens = self.image_proj(embeddings)
        if cfg:
            face_tokens = torch.cat([self.image_proj(torch.zeros_like(embeddings)), face_tokens])
        unet_tokens = torch.cat([text, face_tokens], dim=1)
        timings["encode"] = _ms(clock, device)

        # 3. prepare: keypoint images, masks, per-item scales, noise, timesteps
        clock = time.perf_counter()
        size = (options.width, options.height)
        condition = torch.stack([to_tensor(draw_keypoints(i.kps, size)) for i in items]).to(device, dtype)
        mask = None
        if options.enhance_face_region:
            mask = torch.stack([box_mask(i.face_box, size) for i in items]).to(device, dtype)

        def per_item(values: list[float]) -> torch.Tensor:
            tensor = torch.tensor(values, device=device, dtype=dtype)
            return torch.cat([tensor, tensor]) if cfg else tensor

        ip_scale = per_item([i.ip_adapter_scale for i in items])
        cn_scale = per_item([i.controlnet_conditioning_scale for i in items]).view(-1, 1, 1, 1)
        guidance = torch.tensor([i.guidance_scale for i in items], device=device, dtype=dtype).view(-1, 1, 1, 1)
        if cfg:
            condition = torch.cat([condition, condition])
            mask = torch.cat([mask, mask]) if mask is not None else None
        time_ids = self._time_ids(options, len(items) * (2 if cfg else 1), pooled.shape[-1], dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        scheduler = make_scheduler(options.scheduler, self.sdxl.scheduler.config)
        scheduler.set_timesteps(options.num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        start = None
        if options.strength is not None:  # img2img/inpainting: the schedule's tail, from the pictures
            timesteps, first = truncate_schedule(scheduler, options.num_inference_steps, options.strength)
            pictures = encode_pictures(self.sdxl.vae, [i.init_image for i in items], upcast=self.settings.vae_upcast,
                                       device=device, dtype=dtype)
            masks = latent_mask([i.mask for i in items], pictures.shape[-2:], device=device, dtype=dtype) \
                if options.inpaint else None
            start = StartImage(pictures, masks, first)
        generators = [torch.Generator("cpu").manual_seed(i.seed) for i in items]
        noise = self._initial_noise(generators, options)
        latents = start.initial_latents(noise, scheduler, timesteps) if start is not None \
            else noise * scheduler.init_noise_sigma
        timestep_cond = self._guidance_embedding(items)
        keeps = window_keeps(len(timesteps), options.control_guidance_start, options.control_guidance_end)
        attention_kwargs = {"ip_adapter_scale": ip_scale}
        if mask is not None:  # resized once per level, to each level's real token grid
            attention_kwargs["ip_adapter_mask"] = FaceRegionMask(mask, token_grids(self.sdxl.unet, latents.shape[-2:]))
        control = ControlInputs(face_tokens, condition, added, cn_scale, mask)
        if cond_only:
            control = control.second_half()
        extras = [ExtraControl.of(self.extra_controlnets.get(name), j, items, window_keeps(len(timesteps), *window),
                                  cfg, per_item) for j, (name, *window) in enumerate(options.controlnets)]
        timings["prepare"] = _ms(clock, device)

        # 4. denoise
        clock = time.perf_counter()
        extra_step = {"generator": generators} if "generator" in _step_params(scheduler) else {}
        for step, t in enumerate(timesteps):
            model_input = torch.cat([latents, latents]) if cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            down, mid = None, None
            if keeps[step]:
                down, mid = self.sdxl.controlnet(
                    model_input[len(items):] if cond_only else model_input,
                    t,
                    encoder_hidden_states=control.face_tokens,
                    controlnet_cond=control.condition,
                    conditioning_scale=1.0,
                    added_cond_kwargs=control.added,
                    return_dict=False,
                )
                down = [scale_residual(d, control.scale, control.mask) for d in down]
                mid = scale_residual(mid, control.scale, control.mask)
                if cond_only:
                    down = [torch.cat([torch.zeros_like(d), d]) for d in down]
                    mid = torch.cat([torch.zeros_like(mid), mid])
            for extra in extras:
                down, mid = extra.add_residuals(down, mid, step, model_input, t, text, added)
            prediction = self.sdxl.unet(
                model_input,
                t,
                encoder_hidden_states=unet_tokens,
                timestep_cond=timestep_cond,
                cross_attention_kwargs=attention_kwargs,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                added_cond_kwargs=added,
                return_dict=False,
            )[0]
            if cfg:
                uncond, cond = prediction.chunk(2)
                prediction = uncond + guidance * (cond - uncond)
            latents = scheduler.step(prediction, t, latents, **extra_step, return_dict=False)[0]
            if start is not None:
                latents = start.keep_unmasked(latents, noise, scheduler, timesteps, step)
            if on_step is not None:
                on_step(step + 1, len(timesteps))
        timings["denoise"] = _ms(clock, device)

        # 5. decode
        clock = time.perf_counter()
        images = self._decode(latents)
        if options.inpaint:
            images = [keep_unmasked_pixels(image, i.init_image, i.mask) for image, i in zip(images, items)]
        timings["decode"] = _ms(clock, device)
        return images, timings

    def _encode_text(self, items: list[RenderItem], cfg: bool, lora_scale: float | None, *, weighted: bool = False):
        cache: dict[tuple[str, str | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        cond, uncond, pooled, uncond_pooled = [], [], [], []
        for item in items:
            key = (item.prompt, item.negative_prompt)
            if key in cache:
                pass
            elif weighted:
                cache[key] = encode_weighted(self.sdxl.text_encoder, self.sdxl.text_encoder_2, self.sdxl.tokenizer,
                                             item.prompt, item.negative_prompt, cfg=cfg, device=self.device,
                                             lora_scale=lora_scale)
            else:
                cache[key] = self.sdxl.encode_prompt(
                    prompt=item.prompt,
                    device=self.device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=cfg,
                    negative_prompt=item.negative_prompt,
                    lora_scale=lora_scale,
                )
            embeds, negative, pool, negative_pool = cache[key]
            cond.append(embeds)
            pooled.append(pool)
            if cfg:
                uncond.append(negative)
                uncond_pooled.append(negative_pool)
        text = torch.cat(uncond + cond) if cfg else torch.cat(cond)
        pool = torch.cat(uncond_pooled + pooled) if cfg else torch.cat(pooled)
        return text.to(self.dtype), pool.to(self.dtype)

    def _time_ids(self, options: RenderOptions, rows: int, pooled_dim: int, dtype) -> torch.Tensor:
        size = (options.height, options.width)
        ids = self.sdxl._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=pooled_dim)
        return ids.to(self.device).repeat(rows, 1)

    def _initial_noise(self, generators, options: RenderOptions) -> torch.Tensor:
        """Each image's noise from its own generator (the scheduler scales it)."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (
            len(generators),
            self.sdxl.unet.config.in_channels,
            options.height // self.vae_scale_factor,
            options.width // self.vae_scale_factor,
        )
        return randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype)

    def _guidance_embedding(self, items: list[RenderItem]) -> torch.Tensor | None:
        """Guidance-distilled UNets (``time_cond_proj_dim`` set, e.g. LCM-distilled SDXL) take
        each image's guidance scale as an embedding, one row per image: they run without
        the unconditional branch (see :meth:`_render`)."""
        dim = self._guidance_dim
        if dim is None:
            return None
        scales = torch.tensor([i.guidance_scale - 1.0 for i in items])
        embedding = self.sdxl.get_guidance_scale_embedding(scales, embedding_dim=dim)
        return embedding.to(device=self.device, dtype=self.dtype)

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.sdxl.vae
        upcast = self.settings.vae_upcast  # default: fp16 with a VAE that asks for it
        model_dtype = vae.dtype
        decode_dtype = torch.float32 if upcast else vae.dtype
        config = vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        if upcast:
            vae.to(torch.float32)
        try:
            pixels = vae.decode(latents.to(decode_dtype), return_dict=False)[0]
        finally:
            if upcast:
                vae.to(model_dtype)
        return self.sdxl.image_processor.postprocess(pixels.float(), output_type="pil")


def _round8(value: float) -> int:
    return max(8, int(round(value / 8)) * 8)


def _ms(since: float, device: torch.device | None = None) -> float:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)  # GPU work is asynchronous: time it done, not queued
    return round((time.perf_counter() - since) * 1000, 2)


def _step_params(scheduler) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)
