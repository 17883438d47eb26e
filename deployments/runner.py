"""JobRunner: runs async generations as durable jobs (:mod:`service.jobs`).

A job runs inside one ``run(job_id)`` request that lasts as long as the job, so Serve's
autoscaler counts running jobs as ongoing requests and a replica being stopped (downscale,
redeploy) waits for them during its graceful shutdown. The runner holds the job's lease
and renews it; when the replica is told to stop, it hands its jobs over at once (cancels
their renders, frees their leases, submits them again through the deployment's handle).
When a replica dies without a word, its leases expire. Every replica sweeps for jobs whose
lease is free or expired and submits them, so every job is finished by someone: with the
same seeds, the same bytes, stored once.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import secrets
import time

from ray import serve

from service.errors import Canceled, Overloaded, Unavailable, public_error
from service.jobs import JobStore
from service.keys import erase_generation
from service.records import JobError, JobRecord, Progress
from service.storage import open_storage

from service.config import AppArgs
from .flow import GenerationFlow
from .messages import Pictures
from .replica import replica_is_stopping
from .views import Views
from .webhooks import deliver, key_secret, resolve_target

logger = logging.getLogger("ray.serve")
MAX_ATTEMPTS = 10  # runners a job may be started on (takeovers, hand-overs) before it is failed
TICK_S = 0.25  # how often a running job's runner looks at its lease, its replica and its progress


def delivery_id(job_id: str, event: str) -> str:
    """The same for every delivery of one job's event, by whichever runner makes it: a
    runner that takes a job over while its first runner was delivering delivers again
    (delivery is at least once), and the receiver knows it for the same event."""
    return hashlib.sha256(f"{job_id}\0{event}".encode()).hexdigest()[:24]


class _Lease:
    """Keeps a job's lease renewed in the background; ``lost`` is set when another runner
    holds it now."""

    def __init__(self, jobs: JobStore, job_id: str, holder: str, version: str) -> None:
        self.jobs, self.job_id, self.holder, self.version = jobs, job_id, holder, version
        self.lost = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.jobs.lease_s / 3)
            try:
                version = await asyncio.to_thread(self.jobs.renew, self.job_id, self.holder, self.version)
            except Exception as error:  # noqa: BLE001 - the store may be down: try again
                logger.warning("job %s: lease not renewed: %s", self.job_id, error)
                continue
            if version is None:
                self.lost.set()
                return
            self.version = version

    async def release(self) -> None:
        self._task.cancel()
        if not self.lost.is_set():
            await asyncio.to_thread(self.jobs.release, self.job_id, self.version)

    def stop(self) -> None:
        self._task.cancel()


@serve.deployment(name="JobRunner", max_ongoing_requests=32, graceful_shutdown_timeout_s=60)
class JobRunner:
    def __init__(self, face, generator, args: dict) -> None:
        self.args = AppArgs.model_validate(args)
        self.webhook_key = self.args.signing_keys().webhook
        storage = open_storage(self.args.storage, endpoint_url=self.args.s3_endpoint_url)
        self.jobs = JobStore(storage, self.args.job_lease_s)
        self.flow = GenerationFlow(face, generator, self.args, storage)
        self.views = Views(storage, self.args.url_expiry_s, self.args.public_url)
        context = serve.get_replica_context()
        self.holder = context.replica_id.to_full_id_str() + "/" + secrets.token_hex(4)
        self._app = context.app_name
        self._running: set[str] = set()
        self._submitted: dict[str, asyncio.Task] = {}  # job id -> our submission still in flight
        self._sweeper = asyncio.get_event_loop().create_task(self._sweep())

    def ready(self) -> dict:
        return {"stage": "jobrunner", "running": len(self._running)}

    def status(self) -> dict:
        """What this replica is doing (for operators and tests)."""
        return {"holder": self.holder, "running": sorted(self._running)}

    # ------------------------------------------------------------------ one job
    async def run(self, job_id: str) -> str:
        """Run the job to its end (render, record, webhook) unless another runner holds
        it. Returns what happened: done, held, handed_over or lost."""
        if job_id in self._running or replica_is_stopping():
            return "held"
        version = await asyncio.to_thread(self.jobs.acquire, job_id, self.holder)
        if version is None:
            return "held"
        self._running.add(job_id)
        lease = _Lease(self.jobs, job_id, self.holder, version)
        try:
            return await self._run(job_id, lease)
        except asyncio.CancelledError:  # our caller went away: someone else will run it
            await asyncio.shield(lease.release())
            raise
        finally:
            lease.stop()
            self._running.discard(job_id)

    async def _run(self, job_id: str, lease: _Lease) -> str:
        record = await asyncio.to_thread(self.jobs.record, job_id)
        if record is None:  # erased meanwhile (deleted)
            await asyncio.to_thread(erase_generation, self.flow.storage, job_id)
            await asyncio.to_thread(self.jobs.finish, job_id)
            return "done"
        if not record.ended and record.attempts >= MAX_ATTEMPTS:  # never loop on a job that cannot end
            await self._save(record, status="failed", stage="done", error=JobError(
                code="internal_error", message=f"the job was started {record.attempts} times without ending"))
        if not record.ended:
            record.attempts += 1
            outcome = await self._render(record, lease)
            if outcome != "done":
                return outcome
        if await asyncio.to_thread(self.jobs.deleted, job_id):  # deleted while it ran: no webhook, erased again
            await asyncio.to_thread(erase_generation, self.flow.storage, job_id)
            await asyncio.to_thread(self.jobs.finish, job_id, record.owner)
            return "done"
        if lease.lost.is_set():  # another runner took the job over: it delivers and finishes
            return "lost"
        if record.webhook is not None and record.webhook.delivered is None:
            try:
                await self._deliver(record)
            except Exception:  # noqa: BLE001 - a delivery that cannot be made is recorded, not retried forever
                logger.exception("job %s: webhook not delivered", job_id)
                await self._save(record, webhook=record.webhook.model_copy(
                    update={"delivered": False, "last_error": "internal error"}))
        await asyncio.to_thread(self.jobs.finish, job_id, record.owner)
        return "done"

    async def _render(self, record: JobRecord, lease: _Lease) -> str:
        """Render the job, watching for a lost lease and this replica being stopped (every
        tick), and for a cancel (every fourth); progress reaches the record at most once a
        tick. The record ends final unless the job was handed over or lost."""
        pending: dict = {}
        await self._save(record, {}, status="running", stage="rendering")

        def on_event(event: dict) -> None:
            pending["stage"] = event["stage"]
            if "step" in event:
                pending["progress"] = Progress(step=event["step"], total=event["total"])

        work = asyncio.get_running_loop().create_task(self._work(record, on_event))
        for tick in itertools.count(1):
            done, _ = await asyncio.wait({work}, timeout=TICK_S)
            if done:
                break
            if lease.lost.is_set():
                work.cancel()
                return "lost"
            if replica_is_stopping():
                work.cancel()
                await lease.release()
                self._submit(record.id)
                return "handed_over"
            if tick % 4 == 0 and await asyncio.to_thread(self.jobs.cancel_requested, record.id):  # or deleted
                work.cancel()
                await asyncio.wait({work})
                await self._save(record, pending, status="canceled", stage="done",
                                 error=JobError(code="canceled", message="canceled by request"))
                return "done"
            if pending:
                await self._save(record, pending)
                pending.clear()
        try:
            stored = work.result()
        except Exception as error:  # noqa: BLE001 - a job ends in a state, always
            shown = public_error(error)
            await self._save(record, pending, status="canceled" if isinstance(error, Canceled) else "failed",
                             stage="done", error=JobError(code=shown.code, message=shown.message, field=shown.field))
            return "done"
        shown = pending.get("progress") or record.progress
        if shown is not None:  # a job that succeeded made every step, whichever step's event it saw last
            pending["progress"] = Progress(step=shown.total, total=shown.total)
        await self._save(record, pending, status="succeeded", stage="done",
                         timings_ms={**record.timings_ms, **stored.timings_ms})
        return "done"

    async def _work(self, record: JobRecord, on_event):
        """Face and render. A full or missing Generator is no reason for a job to fail: it
        waits and tries again (backing off up to 10 s) until the job's deadline."""
        job = await asyncio.to_thread(self.jobs.input, record.id)
        people = await self.flow.people_faces(job.people, record.owner)  # several people: one face each
        if people:
            face = people[0]
        elif job.face is not None:
            face = job.face.to_info()
        else:
            face = await self.flow.registered_face(job.face_id, record.owner, job.pose)
        deadline = time.monotonic() + self.args.request_timeout_s
        backoff = 0.5
        while True:
            try:
                return await self.flow.render(record.id, record.owner, job.params, face, job.output,
                                              record.request_hash, deadline, on_event,
                                              Pictures(job.image, job.mask_image, tuple(job.controls)), people)
            except (Overloaded, Unavailable):
                if time.monotonic() + backoff > deadline:
                    raise
                on_event({"stage": "queued"})
                await asyncio.sleep(backoff)
                backoff = min(10.0, backoff * 2)

    async def _save(self, record: JobRecord, pending: dict | None = None, **changes) -> None:
        """Write the record with ``pending`` progress and ``changes`` (the latter win);
        nothing is written for a deleted job (:meth:`JobStore.write`)."""
        for name, value in {**(pending or {}), **changes}.items():
            setattr(record, name, value)
        record.updated_at = time.time()
        await asyncio.to_thread(self.jobs.write, record)

    async def _deliver(self, record: JobRecord) -> None:
        from service.lookup import load_generation

        result = None
        if record.status == "succeeded":
            result = await asyncio.to_thread(load_generation, self.flow.storage, record.id, record.owner)
        event = f"generation.{record.status}"
        outcome = await deliver(
            record.webhook.url, self.views.job(record, result, None), event=event,
            secret=key_secret(self.webhook_key, record.owner), delivery_id=delivery_id(record.id, event),
            attempts=self.args.webhook_max_attempts, backoff_s=self.args.webhook_backoff_s,
            check=lambda url: resolve_target(url, self.args.webhook_allowlist, self.args.webhook_allow_private))
        await self._save(record, webhook=record.webhook.model_copy(
            update={k: v for k, v in outcome.items() if k != "url"}))

    # ------------------------------------------------------------------ takeovers
    def _submit(self, job_id: str) -> None:
        """Have the job run by some replica of this deployment (possibly this one); at most
        one submission of a job from this replica is in flight."""
        if job_id in self._submitted:
            return
        handle = serve.get_deployment_handle("JobRunner", app_name=self._app)

        async def submit() -> None:
            try:
                await handle.run.remote(job_id)
            except Exception as error:  # noqa: BLE001 - the sweep submits it again
                logger.info("job %s: submission ended: %s", job_id, error)

        task = asyncio.get_running_loop().create_task(submit())
        self._submitted[job_id] = task
        task.add_done_callback(lambda _: self._submitted.pop(job_id, None))

    async def _sweep(self) -> None:
        """Submit the jobs nobody runs (a free lease: handed over or never started; an
        expired one: its runner died)."""
        while True:
            await asyncio.sleep(max(0.5, self.args.job_lease_s / 4))
            if replica_is_stopping():
                return
            try:
                waiting = await asyncio.to_thread(self.jobs.waiting)
            except Exception as error:  # noqa: BLE001 - the store may be down: next time
                logger.warning("job sweep failed: %s", error)
                continue
            for job_id in waiting:
                if job_id not in self._running:
                    self._submit(job_id)
