"""Step-level serving, Ray-free: render requests join one running
:class:`pipeline.stepping.StepLoop` at its next denoising step and leave it when their
images are decoded (the Generator's ``batching: step``).

One thread steps the loop while there is work and sleeps when there is none; callers
submit from their own threads (planning, encoding and preparing a request happen there,
between the loop's forwards). Requests that cannot share a forward (another size, LoRA,
...) form their own group; the loop runs the group holding the oldest image, the oldest
images first within a group, at most ``max_images`` images per forward.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import InvalidParameter

from .batching import Outcome, RenderedImages, RenderRequest, pictures
from .errors import Canceled

if TYPE_CHECKING:
    from pipeline.stepping import Request, StepLoop

IDLE_WAKE_S = 1.0  # an idle loop looks for work at least this often (a missed wake-up costs this much)


class ContinuousRenderer:
    """Drives a step loop for ``pipe`` in a thread of its own (started here, ended by
    :meth:`close`). ``on_forward(images, seconds)`` hears every forward (metrics)."""

    def __init__(self, pipe, max_images: int = 4, on_forward: Callable[[int, float], None] | None = None) -> None:
        from pipeline.stepping import StepLoop

        self.pipe = pipe
        self.loop: StepLoop = StepLoop(pipe, max_images, on_forward=on_forward)
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._drive, name="instantid-step-loop", daemon=True)
        self._thread.start()

    @property
    def max_images(self) -> int:
        return self.loop.max_images

    @max_images.setter
    def max_images(self, value: int) -> None:
        self.loop.max_images = value  # read at each step: applies from the next one

    def submit(self, request: RenderRequest, *, on_step: Callable[[int, int], None] | None = None,
               on_done: Callable[["Request"], None] | None = None) -> "Request":
        """Plan and prepare ``request`` and put it in the loop (blocking: call it from a
        worker thread). Bad parameters raise here, for this request only."""
        if self._closed:
            raise InvalidParameter("batching", "the step loop was closed")
        options, items = self.pipe.plan(request.params, request.face, **pictures(request))
        handle = self.loop.add(items, options, on_step=on_step, on_done=on_done)
        self._wake.set()
        return handle

    def cancel(self, handle: "Request") -> None:
        """Take its images out of the loop (they stop at the next step boundary)."""
        self.loop.cancel(handle, Canceled("the render was cancelled"))

    @staticmethod
    def outcome(request: RenderRequest, handle: "Request") -> Outcome:
        """A settled request's outcome, as the static path gives it."""
        if handle.error is not None:
            return handle.error
        options = handle.options
        return RenderedImages(
            id=request.id, images=[np.asarray(image, dtype=np.uint8) for image in handle.images],
            seeds=[item.seed for item in handle.items], width=options.width, height=options.height,
            batch_size=max(1, round(handle.mean_batch)), timings_ms=handle.timings_ms())

    def status(self) -> dict:
        """Requests in the loop: started (``rendering``) and not yet in a forward."""
        requests = {id(s.request): s.request for s in self.loop.slots()}.values()
        started = sum(1 for r in requests if r.started)
        return {"rendering": started, "waiting": len(requests) - started, "images": self.loop.pending}

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def _drive(self) -> None:
        while not self._closed:
            self._wake.clear()
            try:
                busy = self.loop.step()
            except Exception as error:  # noqa: BLE001 - a fault outside a forward: its images fail, the loop lives
                for handle in {id(s.request): s.request for s in self.loop.slots()}.values():
                    self.loop.cancel(handle, error)
                continue
            if not busy:
                self._wake.wait(IDLE_WAKE_S)
