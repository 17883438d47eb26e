"""Generator: the InstantID diffusion stage, batching compatible requests.

``@serve.batch`` collects requests; inside a batch, requests are grouped by what an SDXL
batch must share (size, steps, scheduler, LoRA, CFG, IdentityNet window) and each group
is rendered as one batch, every image keeping its own prompt, seed, face and scales, so
a request's images are the same whether it was batched or not.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import numpy as np
from ray import serve

from pipeline import get_pipeline
from pipeline.pipeline import Cancelled, RenderItem, RenderOptions
from pipeline.weights import resolve_weights

from . import metrics
from .jobs import GenerationJob, RenderedImages


def _count_images(jobs: list[GenerationJob]) -> int:
    return sum(job.params.num_images for job in jobs)


@serve.deployment(name="Generator", max_ongoing_requests=8)
class Generator:
    def __init__(self, postprocessor, weights: str, device: str = "auto", dtype: str = "auto",
                 cache: str | None = None, s3_endpoint: str | None = None, min_batch_images: int = 1,
                 optimizations: str | None = None) -> None:
        # Images go from here to the Postprocessor directly: the result then completes (and
        # is recorded) even if the ingress that asked for it went away.
        self.postprocessor = postprocessor
        paths = resolve_weights(weights, components=("sdxl", "instantid"), cache_dir=cache, s3_endpoint=s3_endpoint)
        self.pipe = get_pipeline(paths, device=device, dtype=dtype, load_face=False, optimizations=optimizations)
        # a single request of the largest allowed num_images must always fit one batch
        self.min_batch_images = min_batch_images
        self._cancelled: set[str] = set()  # ids whose callers went away (timeout, disconnect)
        self._listeners: dict[str, tuple] = {}  # id -> (event loop, queue) of its progress stream
        self._rendering = 0  # batches being rendered now

    def reconfigure(self, config: dict) -> None:
        size = max(int(config.get("max_batch_images", 4)), self.min_batch_images)
        self._generate_batch.set_max_batch_size(size)
        self._generate_batch.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.05)))

    def ready(self) -> dict:
        return {"stage": "generator", "device": str(self.pipe.device), "dtype": str(self.pipe.dtype)}

    def status(self) -> dict:
        """What this replica is doing (for operators and tests)."""
        return {"rendering": self._rendering, "streams": len(self._listeners)}

    async def generate(self, job: GenerationJob):
        """Render ``job`` (batched with compatible others), then have it stored. A stream
        (call with ``handle.options(stream=True)``): ``{"type": "progress", "step", "total"}``
        while denoising, ``{"type": "stage", "stage": "storing"}``, then
        ``{"type": "result", "result": StoredImages}``. Cancelling the stream stops the
        render at its next step when no other request shares the batch."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        self._listeners[job.id] = (loop, queue)
        batch = asyncio.ensure_future(self._generate_batch(job))
        try:
            while not batch.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({batch, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield {"type": "progress", **getter.result()}
                else:
                    getter.cancel()
            while not queue.empty():
                yield {"type": "progress", **queue.get_nowait()}
            outcome = batch.result()
            if isinstance(outcome, BaseException):
                raise outcome
            yield {"type": "stage", "stage": "storing"}
            yield {"type": "result", "result": await self.postprocessor.store.remote(outcome, job.output)}
        except (asyncio.CancelledError, GeneratorExit):
            if not batch.done():  # the render stops at its next step if no one else waits
                self._cancelled.add(job.id)  # (the render removes its ids when it ends)
            batch.cancel()
            raise
        finally:
            self._listeners.pop(job.id, None)

    def _publish(self, ids: set[str], step: int, total: int) -> None:
        """From the render thread: progress to the streams of the requests in the batch."""
        for job_id in ids:
            listener = self._listeners.get(job_id)
            if listener is not None:
                loop, queue = listener
                loop.call_soon_threadsafe(queue.put_nowait, {"step": step, "total": total})

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05, batch_size_fn=_count_images)
    async def _generate_batch(self, jobs: list[GenerationJob]) -> list[RenderedImages | BaseException]:
        return await asyncio.to_thread(self._render, jobs)

    def _render(self, jobs: list[GenerationJob]) -> list[RenderedImages | BaseException]:
        outcomes: list[RenderedImages | BaseException | None] = [None] * len(jobs)
        groups: dict[RenderOptions, list[tuple[int, list[RenderItem]]]] = defaultdict(list)
        for index, job in enumerate(jobs):
            try:
                options, items = self.pipe.plan(job.params, job.face)
                groups[options].append((index, items))
            except Exception as error:
                outcomes[index] = error
        for options, members in groups.items():
            items = [item for _, job_items in members for item in job_items]
            started = time.perf_counter()
            ids = {jobs[index].id for index, _ in members}

            def stop_when_abandoned(step: int, total: int, ids=ids) -> None:
                if ids <= self._cancelled:
                    raise Cancelled("every request of this batch was cancelled")
                self._publish(ids, step, total)

            self._rendering += 1
            try:
                images, timings = self.pipe.render(items, options, on_step=stop_when_abandoned)
            except Exception as error:  # the whole group failed (e.g. a bad LoRA file)
                for index, _ in members:
                    outcomes[index] = error
                continue
            finally:
                self._rendering -= 1
                self._cancelled -= ids
            elapsed = time.perf_counter() - started
            metrics.batch_size().observe(len(items))
            metrics.diffusion_seconds_per_step().observe(timings["denoise"] / 1000 / options.num_inference_steps)
            metrics.images_generated().inc(len(items))
            timings = {**timings, "render": round(elapsed * 1000, 2)}
            offset = 0
            for index, job_items in members:
                mine = images[offset : offset + len(job_items)]
                offset += len(job_items)
                outcomes[index] = RenderedImages(
                    id=jobs[index].id,
                    images=[np.asarray(image, dtype=np.uint8) for image in mine],
                    seeds=[item.seed for item in job_items],
                    width=options.width,
                    height=options.height,
                    batch_size=len(items),
                    timings_ms=timings,
                )
        return outcomes
