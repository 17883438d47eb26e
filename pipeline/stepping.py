"""Step-level (continuous) batching: images join and leave a running batch between
denoising steps.

:meth:`InstantIDPipeline.render` runs one batch from its first step to its last, so an
image that arrives meanwhile waits for all of it. Here every image in flight keeps its own
state — scheduler (multistep ones remember earlier outputs), timestep, step count,
guidance, scales, IdentityNet window, generator — and each call of :meth:`StepLoop.step`
runs one batched forward for the images of one group:

1. each image's latents scaled by its own scheduler, its own timestep per row;
2. IdentityNet (and each extra ControlNet) on the rows inside their window only; the others
   get zero residuals, which the UNet adds as it would add nothing;
3. the UNet on every row (text and face tokens, per-row adapter scale and face mask);
4. classifier-free guidance with each image's scale, then each image's scheduler steps its
   own slice; images at their last step are decoded and handed out, and waiting images of
   the group take their places (oldest first, up to ``max_images``).

The forward's rows do not depend on each other, so an image comes out as it would alone
(within float tolerance): the same per-image inputs as :meth:`InstantIDPipeline.render`.
Images share a forward only when their forward's shapes and weights agree: the
:func:`group_key` (size, LoRA, CFG on or off, the prompt encoding's length, face-region
masks on or off, the set of extra ControlNets). Among groups, :meth:`StepLoop.step` runs
the one holding the oldest image, so a group that keeps taking arrivals cannot hold the
loop for ever. Nothing here knows about Ray: the Generator drives a loop from one thread.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .adapter import FaceRegionMask, token_grids
from .errors import InvalidParameter
from .identitynet import box_mask, scale_residual, to_tensor, window_keeps
from .img2img import StartImage, encode_pictures, keep_unmasked_pixels, latent_mask, truncate_schedule
from .keypoints import draw_keypoints
from .schedulers import make_scheduler

if TYPE_CHECKING:
    from .pipeline import InstantIDPipeline, RenderItem, RenderOptions, StepCallback

_arrivals = itertools.count()


def group_key(options: "RenderOptions") -> tuple:
    """What images must share to run in one forward."""
    return (options.width, options.height, options.lora, options.lora_scale if options.lora else None,
            options.do_cfg, options.text_tokens, options.enhance_face_region or bool(options.people), options.people,
            tuple(name for name, *_ in options.controlnets))


@dataclass(eq=False)
class Request:
    """One call's images (they share options); done when each is rendered, or on failure.
    ``on_done(request)`` is called once, from the thread that settles it."""

    items: list
    options: Any
    on_step: Any = None
    on_done: Callable[["Request"], None] | None = None
    images: list = field(default_factory=list)
    error: BaseException | None = None
    slots: list = field(default_factory=list)
    reported: int = 0  # the last step on_step was told
    done: threading.Event = field(default_factory=threading.Event)
    forwards: int = 0  # forwards its images took part in ...
    shared: int = 0  # ... and the images of those forwards, summed
    times: dict[str, float] = field(default_factory=dict)  # perf_counter: added, first_step, last_step, done

    @property
    def started(self) -> bool:
        return self.forwards > 0

    @property
    def mean_batch(self) -> float:
        """Images per forward, on average over the forwards it took part in."""
        return self.shared / self.forwards if self.forwards else 0.0

    def result(self, timeout: float | None = None) -> list:
        if not self.done.wait(timeout):
            raise TimeoutError("the render did not finish in time")
        if self.error is not None:
            raise self.error
        return self.images

    def settle(self, error: BaseException | None = None) -> None:
        """End it (with ``error``, or its images); the first call wins."""
        with _settling:
            if self.done.is_set():
                return
            if error is not None:
                self.error = error
            self.times["done"] = time.perf_counter()
            self.done.set()
        if self.on_done is not None:
            self.on_done(self)

    def timings_ms(self) -> dict[str, float]:
        """Where its time went: preparing (encoding), waiting for a place, denoising, and
        decoding; ``render`` is all of it."""
        t = self.times
        marks = [("prepare", "submitted", "added"), ("queue", "added", "first_step"),
                 ("denoise", "first_step", "last_step"), ("decode", "last_step", "done"),
                 ("render", "submitted", "done")]
        return {name: round((t[b] - t[a]) * 1000, 2) for name, a, b in marks if a in t and b in t}


_settling = threading.Lock()


@dataclass(eq=False)
class _Slot:
    """One image in flight and everything its rows of a forward need."""

    request: Request
    index: int  # within its request
    arrival: int
    scheduler: Any
    timesteps: torch.Tensor
    keeps: list[bool]
    extra_keeps: list[list[bool]]
    latents: torch.Tensor  # (1, C, h, w)
    generator: torch.Generator
    noise: torch.Tensor
    start: StartImage | None
    text: torch.Tensor  # (rows, L, D): [uncond, cond] under CFG
    pooled: torch.Tensor
    face: torch.Tensor  # (rows, P * 16, D): a block of face tokens per person (P = 1 but for people)
    conditions: list[torch.Tensor]  # (1, 3, H, W) per person: their keypoints
    mask: torch.Tensor | None  # (1, P, H, W): each person's region
    controls: list[torch.Tensor]  # extra ControlNets' images, (1, 3, H, W) each
    control_scales: list[float]
    guidance_embedding: torch.Tensor | None
    step: int = 0

    @property
    def item(self):
        return self.request.items[self.index]

    @property
    def finished(self) -> bool:
        return self.step >= len(self.timesteps)


class StepLoop:
    """Images from many requests, rendered together step by step. ``add`` prepares a
    request's images (text and face encoding, noise, schedulers) and queues them; ``step``
    runs one denoising step of one group; ``run`` steps until nothing is left. One thread
    steps; others may ``add`` meanwhile (arrivals join at the next step)."""

    def __init__(self, pipe: "InstantIDPipeline", max_images: int = 8,
                 on_forward: Callable[[int, float], None] | None = None) -> None:
        self.pipe = pipe
        self.max_images = max_images
        self.on_forward = on_forward  # (images, seconds) after each forward, for metrics
        self._groups: dict[tuple, list[_Slot]] = {}  # by arrival
        self._lock = threading.Lock()
        self.forwards = 0  # batched forwards run (tests and benchmarks read these)
        self.batch_sizes: deque[int] = deque(maxlen=4096)  # the latest forwards' images

    @property
    def max_images(self) -> int:
        return self._max_images

    @max_images.setter
    def max_images(self, value: int) -> None:
        if int(value) < 1:
            raise InvalidParameter("max_images", "must be at least 1")
        self._max_images = int(value)

    # ------------------------------------------------------------------ admission
    def add(self, items: Sequence["RenderItem"], options: "RenderOptions",
            on_step: "StepCallback | None" = None, on_done: Callable[[Request], None] | None = None) -> Request:
        """Check and prepare ``items`` (one request); they start at the next step of
        their group. Bad input is refused here, before any step."""
        pipe = self.pipe
        items = list(items)
        pipe._check(items, options)
        request = Request(items, options, on_step, on_done)
        request.times["submitted"] = time.perf_counter()
        with pipe._lock:
            request.slots = [self._prepare(request, k) for k in range(len(items))]
        request.times["added"] = time.perf_counter()
        with self._lock:
            self._groups.setdefault(group_key(options), []).extend(request.slots)
        return request

    def slots(self) -> list[_Slot]:
        """The images in the loop now (a copy)."""
        with self._lock:
            return [slot for slots in self._groups.values() for slot in slots]

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(len(slots) for slots in self._groups.values())

    def cancel(self, request: Request, error: BaseException) -> None:
        """Take a request's images out (between steps) and fail it with ``error``."""
        with self._lock:
            for key, slots in list(self._groups.items()):
                kept = [s for s in slots if s.request is not request]
                if kept:
                    self._groups[key] = kept
                else:
                    del self._groups[key]
        request.settle(error)

    def _prepare(self, request: Request, index: int) -> _Slot:
        pipe, item, options = self.pipe, request.items[index], request.options
        device, dtype = pipe.device, pipe.dtype
        cfg = options.do_cfg and pipe._guidance_dim is None
        pipe._activate_lora(options.lora, options.lora_scale)
        text, pooled = pipe._encode_text([item], cfg, options.lora_scale if options.lora else None,
                                         weighted=options.text_tokens is not None)
        persons = item.persons()
        embedding = torch.from_numpy(np.stack([np.asarray(p.embedding, np.float32).reshape(1, -1) for p in persons]))
        embedding = embedding.to(device, dtype)
        face = pipe.image_proj(embedding)  # (P, 16, D)
        if cfg:
            face = torch.cat([pipe.image_proj(torch.zeros_like(embedding)), face])
        face = face.reshape(face.shape[0] // len(persons), -1, face.shape[-1])
        size = (options.width, options.height)
        conditions = [to_tensor(draw_keypoints(p.kps, size))[None].to(device, dtype) for p in persons]
        mask = torch.cat([box_mask(p.box, size) for p in persons])[None].to(device, dtype) \
            if options.enhance_face_region or options.people else None
        scheduler = make_scheduler(options.scheduler, pipe.sdxl.scheduler.config)
        scheduler.set_timesteps(options.num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        generator = torch.Generator("cpu").manual_seed(item.seed)
        noise = pipe._initial_noise([generator], options)
        start = None
        if options.strength is not None:
            timesteps, first = truncate_schedule(scheduler, options.num_inference_steps, options.strength)
            picture = encode_pictures(pipe.sdxl.vae, [item.init_image], upcast=pipe.settings.vae_upcast,
                                      device=device, dtype=dtype)
            masks = latent_mask([item.mask], picture.shape[-2:], device=device, dtype=dtype) \
                if options.inpaint else None
            start = StartImage(picture, masks, first)
        latents = start.initial_latents(noise, scheduler, timesteps) if start is not None \
            else noise * scheduler.init_noise_sigma
        return _Slot(
            request=request, index=index, arrival=next(_arrivals), scheduler=scheduler, timesteps=timesteps,
            keeps=window_keeps(len(timesteps), options.control_guidance_start, options.control_guidance_end),
            extra_keeps=[window_keeps(len(timesteps), *window) for _, *window in options.controlnets],
            latents=latents, generator=generator, noise=noise, start=start, text=text, pooled=pooled, face=face,
            conditions=conditions, mask=mask,
            controls=[to_tensor(c)[None].to(device, dtype) for c in item.controls],
            control_scales=list(item.control_scales),
            guidance_embedding=pipe._guidance_embedding([item]))

    # ------------------------------------------------------------------ stepping
    def run(self) -> None:
        while self.step():
            pass

    def step(self) -> bool:
        """One denoising step of the group holding the oldest image; False when idle."""
        with self._lock:
            if not self._groups:
                return False
            key = min(self._groups, key=lambda k: self._groups[k][0].arrival)
            slots = self._groups[key][: self.max_images]
        started = time.perf_counter()
        try:
            with self.pipe._lock, torch.inference_mode():
                self._forward(slots)
        except Exception as error:  # a failed forward fails the requests in it, not the loop
            for request in {id(s.request): s.request for s in slots}.values():
                self.cancel(request, error)
            return True
        self._count(slots, started)
        finished = [s for s in slots if s.finished]
        self._report(slots)
        if finished:
            try:
                self._finish(key, finished)
            except Exception as error:  # a failed decode fails the requests it held
                for request in {id(s.request): s.request for s in finished}.values():
                    self.cancel(request, error)
        return True

    def _forward(self, slots: list[_Slot]) -> None:
        pipe = self.pipe
        options = slots[0].request.options
        n = len(slots)
        cfg = options.do_cfg and pipe._guidance_dim is None
        cond_only = cfg and pipe.settings.identitynet_cond_only
        pipe._activate_lora(options.lora, options.lora_scale)

        # 1. each image's latents, scaled by its own scheduler, at its own timestep
        timesteps = [s.timesteps[s.step] for s in slots]
        scaled = torch.cat([s.scheduler.scale_model_input(s.latents, t) for s, t in zip(slots, timesteps)])
        t_rows = torch.stack([torch.as_tensor(t, dtype=torch.float32) for t in timesteps]).to(pipe.device)

        def rows(per_slot, doubled: bool = True) -> torch.Tensor:
            """Per-slot tensors in the render's row order ([uncond..., cond...] under CFG)."""
            if cfg and doubled:
                return torch.cat([p[:1] for p in per_slot] + [p[-1:] for p in per_slot])
            return torch.cat([p[-1:] for p in per_slot])

        model_input = torch.cat([scaled, scaled]) if cfg else scaled
        t_all = torch.cat([t_rows, t_rows]) if cfg else t_rows
        text, pooled, face = rows([s.text for s in slots]), rows([s.pooled for s in slots]), rows(
            [s.face for s in slots])
        double = (lambda x: torch.cat([x, x])) if cfg else (lambda x: x)
        mask = double(torch.cat([s.mask for s in slots])) if slots[0].mask is not None else None
        time_ids = pipe._time_ids(options, model_input.shape[0], pooled.shape[-1], pipe.dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids}

        def per_row(values: list[float]) -> torch.Tensor:
            return double(torch.tensor(values, device=pipe.device, dtype=pipe.dtype))

        # 2. IdentityNet and the extra ControlNets on the rows inside their windows
        inside = [k for k, s in enumerate(slots) if s.keeps[s.step]]
        picked = [n + k for k in inside] if cond_only else (inside + [n + k for k in inside] if cfg else inside)
        down = mid = None
        tokens = face.shape[1] // len(slots[0].conditions)
        for p in range(len(slots[0].conditions)):  # IdentityNet once per person, masked to their region
            person_down, person_mid = self._residuals(
                pipe.sdxl.controlnet, picked, model_input, t_all, face[:, p * tokens:(p + 1) * tokens],
                double(torch.cat([s.conditions[p] for s in slots])), added,
                per_row([s.item.controlnet_conditioning_scale for s in slots]),
                mask[:, p:p + 1] if mask is not None else None)
            if person_down is not None:
                down = person_down if down is None else [a + b for a, b in zip(down, person_down)]
                mid = person_mid if mid is None else mid + person_mid
        for j in range(len(options.controlnets)):
            net = pipe.extra_controlnets.get(options.controlnets[j][0])
            inside = [k for k, s in enumerate(slots) if s.extra_keeps[j][s.step]]
            more_down, more_mid = self._residuals(
                net, inside + [n + k for k in inside] if cfg else inside, model_input, t_all, text,
                double(torch.cat([s.controls[j] for s in slots])), added,
                per_row([s.control_scales[j] for s in slots]), None)
            if more_down is not None:
                down = more_down if down is None else [a + b for a, b in zip(down, more_down)]
                mid = more_mid if mid is None else mid + more_mid

        # 3. the UNet on every row
        attention_kwargs: dict[str, Any] = {"ip_adapter_scale": per_row([s.item.ip_adapter_scale for s in slots])}
        if mask is not None:
            attention_kwargs["ip_adapter_mask"] = FaceRegionMask(mask, token_grids(pipe.sdxl.unet, scaled.shape[-2:]))
        timestep_cond = torch.cat([s.guidance_embedding for s in slots]) if pipe._guidance_dim is not None else None
        prediction = pipe.sdxl.unet(
            model_input, t_all, encoder_hidden_states=torch.cat([text, face], dim=1), timestep_cond=timestep_cond,
            cross_attention_kwargs=attention_kwargs, down_block_additional_residuals=down,
            mid_block_additional_residual=mid, added_cond_kwargs=added, return_dict=False)[0]
        if cfg:
            uncond, cond = prediction.chunk(2)
            guidance = torch.tensor([s.item.guidance_scale for s in slots], device=pipe.device,
                                    dtype=pipe.dtype).view(-1, 1, 1, 1)
            prediction = uncond + guidance * (cond - uncond)

        # 4. each image's own scheduler steps its own slice
        for k, (slot, t) in enumerate(zip(slots, timesteps)):
            from .pipeline import _step_params

            extra = {"generator": [slot.generator]} if "generator" in _step_params(slot.scheduler) else {}
            slot.latents = slot.scheduler.step(prediction[k:k + 1], t, slot.latents, **extra, return_dict=False)[0]
            if slot.start is not None:
                slot.latents = slot.start.keep_unmasked(slot.latents, slot.noise, slot.scheduler, slot.timesteps,
                                                        slot.step)
            slot.step += 1

    def _count(self, slots: list[_Slot], started: float) -> None:
        now = time.perf_counter()
        n = len(slots)
        self.forwards += 1
        self.batch_sizes.append(n)
        for slot in slots:
            request = slot.request
            request.forwards += 1
            request.shared += n
            request.times.setdefault("first_step", started)
            if all(s.finished for s in request.slots):
                request.times.setdefault("last_step", now)
        if self.on_forward is not None:
            self.on_forward(n, now - started)

    def _residuals(self, net, picked: list[int], model_input, t_all, tokens, condition, added, scale, mask):
        """``net``'s residuals for the rows ``picked``, scaled (and masked), zero on the other
        rows; None when no row is picked."""
        if not picked:
            return None, None
        index = torch.tensor(picked, device=model_input.device)
        down, mid = net(model_input[index], t_all[index], encoder_hidden_states=tokens[index],
                        controlnet_cond=condition[index], conditioning_scale=1.0,
                        added_cond_kwargs={k: v[index] for k, v in added.items()}, return_dict=False)
        row_scale = scale[index].view(-1, 1, 1, 1)
        row_mask = mask[index] if mask is not None else None
        rows = model_input.shape[0]

        def spread(residual):
            residual = scale_residual(residual, row_scale, row_mask)
            if len(picked) == rows:
                return residual
            full = residual.new_zeros((rows, *residual.shape[1:]))
            return full.index_copy(0, index, residual)

        return [spread(d) for d in down], spread(mid)

    def _report(self, slots: list[_Slot]) -> None:
        """Per-step progress of each request (its slowest image), once per step it makes;
        a callback that raises cancels its request."""
        for request in {id(s.request): s.request for s in slots}.values():
            if request.on_step is None or request.done.is_set():
                continue
            done = min(s.step for s in request.slots)
            total = max(len(s.timesteps) for s in request.slots)
            if done and done != request.reported:
                request.reported = done
                try:
                    request.on_step(done, total)
                except Exception as error:
                    self.cancel(request, error)

    def _finish(self, key: tuple, finished: list[_Slot]) -> None:
        pipe = self.pipe
        live = [s for s in finished if not s.request.done.is_set()]
        with self._lock:
            slots = [s for s in self._groups.get(key, []) if s not in finished]
            if slots:
                self._groups[key] = slots
            else:
                self._groups.pop(key, None)
        if not live:
            return
        with pipe._lock, torch.inference_mode():
            images = pipe._decode(torch.cat([s.latents for s in live]))
        for slot, image in zip(live, images):
            request = slot.request
            if request.options.inpaint:
                image = keep_unmasked_pixels(image, slot.item.init_image, slot.item.mask)
            if not request.images:
                request.images = [None] * len(request.items)
            request.images[slot.index] = image
            if all(i is not None for i in request.images):
                request.settle()


