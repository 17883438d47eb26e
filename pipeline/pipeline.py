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
from .keypoints import draw_keypoints, frame_face, reference_size
from .loras import LoraSwitch
from .optimize import (Optimizations, RenderSettings, apply_optimizations, check_optimizations, render_settings,
                       resolve_load_settings)
from .params import GenerationParams, parse_params
from .people import RenderPerson, place_people, split_people
from .prompts import PromptTooLong, encode_prompts, sequence_length
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
    people: tuple[RenderPerson, ...] = ()  # several people (pipeline.people): each their face, keypoints, region

    def persons(self) -> tuple[RenderPerson, ...]:
        """Who is in the picture: ``people``, or the one face (its box the region)."""
        return self.people or (RenderPerson(self.embedding, self.kps, self.face_box),)


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
    people: int = 0  # several people: how many each item places (their regions always mask)


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
        self.loras = LoraSwitch(sdxl, self.settings)
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
        folder where model folders (and the ip-adapter) whose files hold another dtype than
        the one loaded are kept converted, once per node (:mod:`pipeline.dtype_cache`; the
        same values as a conversion while loading)."""
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
        self, images: ImageInput | Sequence[ImageInput], *, pose: ImageInput | None = None, combine: str = "mean",
        **names
    ) -> FaceInfo:
        """One identity from photos (``names``: ``names``/``pose_name`` for error messages)."""
        if self.face is None:
            raise InvalidParameter("face", "this pipeline was loaded without the face stage")
        if not isinstance(images, (list, tuple)):
            images = [images]
        return self.face.analyze_many(list(images), pose=pose, combine=combine, **names)

    # ------------------------------------------------------------------ high level
    def __call__(
        self,
        face: FaceInfo | ImageInput | Sequence[ImageInput] | None = None,
        prompt: str = "",
        *,
        pose: ImageInput | None = None,
        image: ImageInput | None = None,
        mask_image: ImageInput | None = None,
        controlnets: Sequence[dict] | None = None,
        people: Sequence[dict] | None = None,
        on_step: StepCallback | None = None,
        **params,
    ) -> GenerationResult:
        """Generate ``num_images`` images of the person in ``face`` (photos or a
        :class:`FaceInfo`). ``params`` are the fields of :class:`GenerationParams`.

        ``image`` restyles that picture (img2img, ``strength``); ``mask_image`` (white:
        repaint) repaints only part of it. The keypoints come from ``pose``, else from the
        face in ``image``, else from the first face photo. ``controlnets``: extra ControlNets,
        ``[{"type": "canny", "image": photo, "scale": 0.5, ...}]`` (:class:`ControlNetParams`
        plus the image). ``people``: several people instead of ``face``,
        ``[{"face_images": photos | "face": FaceInfo, "box": [x1, y1, x2, y2] | "pose_image": photo}]``
        (:mod:`pipeline.people`; needs ``width`` and ``height``)."""
        entries, control_sources = split_images(controlnets)
        placements, sources = split_people(people)
        if placements and (face is not None or pose is not None):
            raise InvalidParameter("face" if face is not None else "pose", "give the faces in people when people "
                                                                            "is given")
        if face is None and not placements:
            raise InvalidParameter("face", "needs face photos (or a FaceInfo), or people")
        spec = parse_params(GenerationParams, prompt=prompt, **{**self.param_defaults, **params,
                                                                  "controlnets": entries, "people": placements})
        control_images = [load_image(source, field=f"controlnets[{k}].image")
                          for k, source in enumerate(control_sources)]
        picture = load_image(image, field="image") if image is not None else None
        mask = load_image(mask_image, field="mask_image") if mask_image is not None else None
        started = time.perf_counter()
        faces = [self._person_face(k, *source) for k, source in enumerate(sources)]
        info = faces[0] if faces else face if isinstance(face, FaceInfo) else \
            self.analyze_faces(face, pose=pose if pose is not None else picture)
        face_ms = (time.perf_counter() - started) * 1000
        options, items = self.plan(spec, info, image=picture, mask=mask, control_images=control_images,
                                   people=faces)
        images, timings = self.render(items, options, on_step=on_step)
        timings = {"face": face_ms, **timings}
        return GenerationResult(images, [i.seed for i in items], options.width, options.height, info, timings)

    def plan(self, spec: GenerationParams, face: FaceInfo | None, *, image: Image.Image | None = None,
             mask: Image.Image | None = None, control_images: Sequence[Image.Image] = (),
             people: Sequence[FaceInfo] = ()) -> tuple[RenderOptions, list[RenderItem]]:
        """Turn validated parameters, an analysed face (or, with ``spec.people``, one face
        per person: see :func:`~pipeline.people.place_people`), (img2img, inpainting) the
        starting picture and its mask, and the extra ControlNets' images into render items."""
        self.check_lora(spec.lora)
        if image is None and (mask is not None or spec.strength is not None):
            raise InvalidParameter("mask_image" if mask is not None else "strength",
                                   "needs image (the picture to start from)")
        width, height = self.output_size(spec, face, image.size if image is not None else None)
        persons = tuple(place_people(spec.people, people, (width, height))) if spec.people else ()
        if persons:  # the first person stands for the picture's face where one is asked for
            face_embedding, kps, box = persons[0].embedding, persons[0].kps, persons[0].box
        else:
            face_embedding, kps, box = np.asarray(face.embedding, dtype=np.float32), *frame_face(
                face, image.size if image is not None else None, (width, height))
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
            people=len(persons),
        )
        if strength is not None:
            start_step(options.num_inference_steps, strength)  # refused now, not at render
        items = [
            RenderItem(
                prompt=prompt,
                negative_prompt=negative,
                embedding=face_embedding,
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
                people=persons,
            )
            for seed in spec.seeds()
        ]
        return options, items

    def _person_face(self, k: int, face, pose) -> FaceInfo:
        """Person ``k``'s face: analysed from their photos (head pose from ``pose`` when
        given), or a :class:`FaceInfo` (posed by ``pose``'s face when given)."""
        field = f"people[{k}]"
        if isinstance(face, FaceInfo):
            if pose is None:
                return face
            posed = self.analyze_faces([pose], names=[f"{field}.pose_image"])
            return FaceInfo(posed.bbox, posed.kps, face.det_score, face.embedding, posed.image_size)
        photos = list(face) if isinstance(face, (list, tuple)) else [face]
        return self.analyze_faces(photos, pose=pose, names=[f"{field}.face_images[{i}]" for i in range(len(photos))],
                                  pose_name=f"{field}.pose_image")

    def _text_tokens(self, prompt: str, negative: str | None) -> int:
        try:
            return sequence_length(self.sdxl.tokenizer, prompt, negative)
        except PromptTooLong as error:  # the styled prompt: a style adds its own words
            raise InvalidParameter(error.field, str(error)) from None

    def output_size(self, spec: GenerationParams, face: FaceInfo,
                    picture_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """Explicit width/height, else the reference rule applied to the starting picture
        (img2img) or the face's picture."""
        if spec.width and spec.height:
            default_w, default_h = spec.width, spec.height
        else:
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
        """Refuse a request LoRA this pipeline cannot use (:class:`~pipeline.loras.LoraSwitch`)."""
        self.loras.check(lora)

    def _activate_lora(self, lora: str | None, scale: float) -> None:
        self.loras.activate(lora, scale)

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
            if len(item.people) != options.people:
                raise InvalidParameter(f"items[{k}].people", f"must place {options.people} people, as the options say")
            for name, person in [("", item)] + [(f".people[{j}]", p) for j, p in enumerate(item.people)]:
                if np.asarray(person.embedding).size != width:
                    raise InvalidParameter(f"items[{k}]{name}.embedding", f"must have {width} values")
                if np.asarray(person.kps).shape != (5, 2):
                    raise InvalidParameter(f"items[{k}]{name}.kps", "must be 5 (x, y) keypoints")
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
        # one block of face tokens per person (one person unless options.people), person by person
        persons = [item.persons() for item in items]
        embeddings = torch.from_numpy(np.stack([np.asarray(p.embedding, np.float32).reshape(-1)
                                                for people in persons for p in people]))
        embeddings = embeddings.to(device=device, dtype=dtype)[:, None, :]
        face_tokens = self.image_proj(embeddings)
        if cfg:
            face_tokens = torch.cat([self.image_proj(torch.zeros_like(embeddings)), face_tokens])
        face_tokens = face_tokens.reshape(face_tokens.shape[0] // len(persons[0]), -1, face_tokens.shape[-1])
        unet_tokens = torch.cat([text, face_tokens], dim=1)
        timings["encode"] = _ms(clock, device)

        # 3. prepare: keypoint images, masks, per-item scales, noise, timesteps
        clock = time.perf_counter()
        size = (options.width, options.height)
        conditions = [torch.stack([to_tensor(draw_keypoints(people[p].kps, size)) for people in persons]
                                  ).to(device, dtype) for p in range(len(persons[0]))]
        mask = None  # (B, P, H, W): each person's region
        if options.enhance_face_region or options.people:
            mask = torch.stack([torch.cat([box_mask(p.box, size) for p in people]) for people in persons]
                               ).to(device, dtype)

        def per_item(values: list[float]) -> torch.Tensor:
            tensor = torch.tensor(values, device=device, dtype=dtype)
            return torch.cat([tensor, tensor]) if cfg else tensor

        ip_scale = per_item([i.ip_adapter_scale for i in items])
        cn_scale = per_item([i.controlnet_conditioning_scale for i in items]).view(-1, 1, 1, 1)
        guidance = torch.tensor([i.guidance_scale for i in items], device=device, dtype=dtype).view(-1, 1, 1, 1)
        if cfg:
            conditions = [torch.cat([condition, condition]) for condition in conditions]
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
        controls = ControlInputs.per_person(face_tokens, conditions, added, cn_scale, mask)  # IdentityNet per person
        if cond_only:
            controls = [control.second_half() for control in controls]
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
                for control in controls:  # each person's residuals, masked to their region, summed
                    person_down, person_mid = self.sdxl.controlnet(
                        model_input[len(items):] if cond_only else model_input,
                        t,
                        encoder_hidden_states=control.face_tokens,
                        controlnet_cond=control.condition,
                        conditioning_scale=1.0,
                        added_cond_kwargs=control.added,
                        return_dict=False,
                    )
                    person_down = [scale_residual(d, control.scale, control.mask) for d in person_down]
                    person_mid = scale_residual(person_mid, control.scale, control.mask)
                    down = person_down if down is None else [a + b for a, b in zip(down, person_down)]
                    mid = person_mid if mid is None else mid + person_mid
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
        return encode_prompts(self.sdxl, [(i.prompt, i.negative_prompt) for i in items], cfg, lora_scale,
                              weighted=weighted, device=self.device, dtype=self.dtype)

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
