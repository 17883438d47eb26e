"""Generator: the InstantID diffusion stage, batching compatible requests in one of two
ways, chosen by ``batching`` in its ``user_config``:

* ``step`` (continuous): requests join a running batch at its next denoising step and
  leave it when their images are done (:class:`service.continuous.ContinuousRenderer`);
* ``request`` (static): ``@serve.batch`` collects requests;
  :func:`service.batching.render_requests` groups them by what an SDXL batch must share
  and renders each group as one batch from its first step to its last.

Either way every image keeps its own prompt, seed, face and scales. The images then go
straight to the Postprocessor, so a result completes (and is recorded) even when its
caller went away.

Per-step progress reaches each caller through its own queue (``generate`` is a stream);
each call also has its own cancel flag, so a cancelled call never affects a later one with
the same generation id (a retry).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from ray import serve

from pipeline import get_pipeline
from pipeline.errors import InvalidParameter
from pipeline.weights import default_cache_dir, resolve_weights
from service.batching import GroupReport, render_requests
from service.continuous import ContinuousRenderer

from . import metrics
from .messages import GenerationJob


@dataclass
class _Call:
    """One ``generate`` call waiting in (or rendering with) a batch."""

    job: GenerationJob
    loop: asyncio.AbstractEventLoop
    progress: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def publish(self, step: int, total: int) -> None:  # from the render thread
        self.loop.call_soon_threadsafe(self.progress.put_nowait, {"step": step, "total": total})


def _count_images(calls: list[_Call]) -> int:
    return sum(call.job.request.params.num_images for call in calls)


WARMUP_EAGER = (64, 64, 1)  # (width, height, batch) of the warm-up render without `compile`
BATCHING = ("step", "request")  # user_config ``batching``; the first is the default


def _observe_forward(images: int, seconds: float) -> None:
    metrics.batch_size().observe(images)
    metrics.diffusion_seconds_per_step().observe(seconds)


@serve.deployment(name="Generator", max_ongoing_requests=8)
class Generator:
    def __init__(self, postprocessor, weights: str, device: str = "auto", dtype: str = "auto",
                 cache: str | None = None, s3_endpoint: str | None = None, min_batch_images: int = 1,
                 optimizations: str | None = None, warmup_shapes: list | None = None) -> None:
        self.postprocessor = postprocessor
        paths = resolve_weights(weights, components=("sdxl", "instantid"), cache_dir=cache, s3_endpoint=s3_endpoint)
        # the node cache also keeps model folders converted to the dtype loaded (once per node)
        self.pipe = get_pipeline(paths, device=device, dtype=dtype, load_face=False, optimizations=optimizations,
                                 dtype_cache=cache or default_cache_dir())
        # a single request of the largest allowed num_images must always fit one batch
        self.min_batch_images = min_batch_images
        # ready only once it renders at full speed: the first render's one-time costs (kernels
        # loaded, memory pools grown; with `compile` on, each shape compiled) paid now, not inside
        # the first requests' timeouts. Compiled: every shape it will serve; eager: one small render.
        compiled = self.pipe.optimizations.compile != "off"
        timed = self.pipe.warmup_shapes((warmup_shapes or []) if compiled else [WARMUP_EAGER])
        self.warmed = [{"width": w, "height": h, "batch": b, "seconds": round(s, 2)}
                       for (w, h, b), s in timed.items()]
        self._rendering = 0  # batches being rendered now
        self._waiting: set[int] = set()  # ids (id()) of the calls not in a rendering batch yet
        self.batching = BATCHING[0]
        self.max_batch_images = max(4, min_batch_images)
        self._stepper: ContinuousRenderer | None = None  # made when first needed

    def reconfigure(self, config: dict) -> None:
        batching = str(config.get("batching", BATCHING[0]))
        if batching not in BATCHING:  # refused: the replica keeps its last good config
            raise InvalidParameter("batching", f"must be one of {list(BATCHING)}, not {batching!r}")
        self.batching = batching
        self.max_batch_images = max(int(config.get("max_batch_images", 4)), self.min_batch_images)
        self._generate_batch.set_max_batch_size(self.max_batch_images)
        self._generate_batch.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.05)))
        if self._stepper is not None:
            self._stepper.max_images = self.max_batch_images

    def ready(self) -> dict:
        return {"stage": "generator", "device": str(self.pipe.device), "dtype": str(self.pipe.dtype),
                "warmed": self.warmed, "batching": self.batching}

    def status(self) -> dict:
        """What this replica is doing (for operators and tests): requests rendering, and
        calls not rendering yet (in a batch queue, or waiting for their first step)."""
        stepping = self._stepper.status() if self._stepper is not None else {"rendering": 0, "waiting": 0}
        return {"batching": self.batching, "rendering": self._rendering + stepping["rendering"],
                "waiting": len(self._waiting) + stepping["waiting"]}

    def __del__(self) -> None:
        if getattr(self, "_stepper", None) is not None:
            self._stepper.close()

    async def generate(self, job: GenerationJob):
        """Render ``job`` (batched with compatible others), then have it stored. A stream:
        ``{"type": "stage", "stage": "rendering"}`` at once, ``{"type": "progress", "step",
        "total"}`` while denoising, ``{"type": "stage",
        "stage": "storing"}``, then ``{"type": "result", "result": StoredGeneration}``.
        Cancelling the stream stops the render at its next step when no other call
        shares its batch."""
        yield {"type": "stage", "stage": "rendering"}  # this replica has the call (it may have just started)
        call = _Call(job, asyncio.get_running_loop())
        if self.batching == "step":
            batch = asyncio.ensure_future(self._generate_stepped(call))
        else:
            self._waiting.add(id(call))
            batch = asyncio.ensure_future(self._generate_batch(call))
        try:
            while not batch.done():
                getter = asyncio.ensure_future(call.progress.get())
                await asyncio.wait({batch, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield {"type": "progress", **getter.result()}
                else:
                    getter.cancel()
            while not call.progress.empty():
                yield {"type": "progress", **call.progress.get_nowait()}
            outcome = batch.result()
            if isinstance(outcome, BaseException):
                raise outcome
            yield {"type": "stage", "stage": "storing"}
            stored = await self.postprocessor.store.remote(outcome, job.output, job.record, job.settings)
            yield {"type": "result", "result": stored}
        except (asyncio.CancelledError, GeneratorExit):
            call.cancelled.set()  # the render stops at its next step if no other call shares it
            batch.cancel()
            raise
        finally:
            self._waiting.discard(id(call))

    async def _generate_stepped(self, call: _Call):
        """Join the step loop; the outcome once the images are decoded. Cancelled: the
        images leave the loop at its next step."""
        if self._stepper is None:
            self._stepper = ContinuousRenderer(self.pipe, self.max_batch_images, on_forward=_observe_forward)
        stepper, loop = self._stepper, call.loop
        settled = loop.create_future()

        def on_done(_) -> None:  # from the loop's thread (or a cancel)
            loop.call_soon_threadsafe(lambda: settled.done() or settled.set_result(None))

        submitted = asyncio.ensure_future(asyncio.to_thread(
            stepper.submit, call.job.request, on_step=call.publish, on_done=on_done))
        try:
            handle = await asyncio.shield(submitted)
        except Exception as error:  # noqa: BLE001 - this request's parameters or its LoRA: it fails alone
            return error
        except asyncio.CancelledError:  # preparing goes on in its thread: its images leave once they are in
            submitted.add_done_callback(lambda done: done.exception() is None and stepper.cancel(done.result()))
            raise
        try:
            await settled
        except asyncio.CancelledError:
            stepper.cancel(handle)
            raise
        outcome = stepper.outcome(call.job.request, handle)
        if not isinstance(outcome, BaseException):
            metrics.images_generated().inc(len(outcome.images))
        return outcome

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05, batch_size_fn=_count_images)
    async def _generate_batch(self, calls: list[_Call]) -> list:
        return await asyncio.to_thread(self._render, calls)

    def _render(self, calls: list[_Call]) -> list:
        def on_step(indices: list[int], step: int, total: int) -> None:
            for index in indices:
                calls[index].publish(step, total)

        def on_group(report: GroupReport) -> None:
            metrics.batch_size().observe(report.images)
            metrics.diffusion_seconds_per_step().observe(
                report.timings_ms["denoise"] / 1000 / report.options.num_inference_steps)
            metrics.images_generated().inc(report.images)

        self._rendering += 1
        self._waiting.difference_update(id(call) for call in calls)
        try:
            return render_requests(self.pipe, [call.job.request for call in calls], on_step=on_step,
                                   stop=lambda indices: all(calls[i].cancelled.is_set() for i in indices),
                                   on_group=on_group)
        finally:
            self._rendering -= 1
