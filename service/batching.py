"""The one render path, for the served Generator and ``instantid render`` alike: validated
requests and their analysed faces -> render groups (requests an SDXL batch can share:
same size, steps, scheduler, LoRA, CFG, IdentityNet window) -> one batched render per
group -> each request's images split out again.

Every image keeps its own prompt, seed, face and scales, so a request's images are the
same whether it was batched or not. One request's bad parameters fail that request only;
a group's render error fails that group's requests only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import InstantIDError
from pipeline.face import FaceInfo
from pipeline.params import GenerationParams

from .errors import Canceled

if TYPE_CHECKING:  # the model code (torch) is imported where it renders, not where results are passed on
    from pipeline.pipeline import RenderItem, RenderOptions

    Groups = dict[RenderOptions, list[tuple[int, list[RenderItem]]]]  # options -> (request index, its items)


@dataclass
class RenderRequest:
    id: str
    params: GenerationParams  # ``lora`` already resolved to a path on this node; ``seed`` set
    face: FaceInfo
    image: bytes | None = None  # img2img/inpainting: the picture (encoded, as sent)
    mask: bytes | None = None  # inpainting: its mask
    controls: tuple[bytes, ...] = ()  # the extra ControlNets' images (params.controlnets), in order
    people: tuple[FaceInfo, ...] = ()  # several people: one face per params.people entry (pipeline.people)


@dataclass
class RenderedImages:
    id: str
    images: list[np.ndarray]  # HxWx3 uint8
    seeds: list[int]
    width: int
    height: int
    batch_size: int  # images rendered together in the batch that made these
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class GroupReport:
    """One rendered group, for metrics: its options, image count and timings."""

    options: RenderOptions
    images: int
    timings_ms: dict[str, float]


Outcome = RenderedImages | BaseException


def plan_groups(pipe, requests: Sequence[RenderRequest]) -> tuple[Groups, dict[int, BaseException]]:
    """Requests -> render groups keyed by what they share; requests that cannot be
    planned are returned as errors by index."""
    groups: Groups = {}
    errors: dict[int, BaseException] = {}
    for index, request in enumerate(requests):
        try:
            options, items = pipe.plan(request.params, request.face, **pictures(request))
        except InstantIDError as error:
            errors[index] = error
            continue
        groups.setdefault(options, []).append((index, items))
    return groups, errors


def pictures(request: RenderRequest) -> dict:
    """A request's picture and mask, decoded (within the image limits)."""
    from pipeline.images import load_image

    return {"image": load_image(request.image, field="image") if request.image is not None else None,
            "mask": load_image(request.mask, field="mask_image") if request.mask is not None else None,
            "control_images": [load_image(data, field=f"controlnets[{k}].image")
                               for k, data in enumerate(request.controls)],
            "people": request.people}


def render_requests(pipe, requests: Sequence[RenderRequest], *,
                    on_step: Callable[[list[int], int, int], None] | None = None,
                    stop: Callable[[list[int]], bool] | None = None,
                    on_group: Callable[[GroupReport], None] | None = None) -> list[Outcome]:
    """Render ``requests`` (batched by group) and return one outcome per request, in order.

    ``on_step(indices, step, total)`` hears each denoising step of a group;
    ``stop(indices)`` is asked before each step and ends the group's render (its requests
    get :class:`~service.errors.Canceled`) when it says so."""
    from pipeline.pipeline import Cancelled

    outcomes: list[Outcome | None] = [None] * len(requests)
    groups, errors = plan_groups(pipe, requests)
    for index, error in errors.items():
        outcomes[index] = error
    for options, members in groups.items():
        indices = [index for index, _ in members]
        items = [item for _, request_items in members for item in request_items]

        def step_callback(step: int, total: int, indices=indices) -> None:
            if stop is not None and stop(indices):
                raise Cancelled("every request of this batch was cancelled")
            if on_step is not None:
                on_step(indices, step, total)

        started = time.perf_counter()
        try:
            images, timings = pipe.render(items, options, on_step=step_callback)
        except Cancelled:
            for index in indices:
                outcomes[index] = Canceled("the render was cancelled")
            continue
        except Exception as error:  # noqa: BLE001 - the whole group failed (e.g. a bad LoRA file)
            for index in indices:
                outcomes[index] = error
            continue
        timings = {**timings, "render": round((time.perf_counter() - started) * 1000, 2)}
        if on_group is not None:
            on_group(GroupReport(options, len(items), timings))
        offset = 0
        for index, request_items in members:
            mine = images[offset: offset + len(request_items)]
            offset += len(request_items)
            outcomes[index] = RenderedImages(
                id=requests[index].id, images=[np.asarray(image, dtype=np.uint8) for image in mine],
                seeds=[item.seed for item in request_items], width=options.width, height=options.height,
                batch_size=len(items), timings_ms=timings)
    return outcomes  # type: ignore[return-value]
