"""The HTTP ingress: the API's routes. What they stand on lives in modules of one concern
each: keys and limits (:mod:`.security`), image references (:mod:`.inputs`), the work of
a generation (:mod:`.flow`), answers (:mod:`.views`), errors as HTTP (:mod:`.problems`),
the page and stored files (:mod:`.web`); records, jobs and claims in :mod:`service`."""

import asyncio
import secrets
import time
from dataclasses import asdict

import numpy as np

from fastapi import Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from ray import serve

from pipeline.controlnets import available_annotators, available_controlnets
from pipeline.errors import InvalidParameter
from pipeline.images import ImageLimits, decode_image_bytes
from pipeline.optimize import Optimizations
from pipeline.params import seed_from
from pipeline.provenance import inspect
from pipeline.schedulers import SCHEDULERS
from pipeline.styles import style_names
from pipeline.watermark import Watermark
from pipeline.weights import ExtraWeights
from service import claims
from service.audit import audit
from service.config import AppArgs
from service.erasure import erase_face, erase_owned_generation
from service.errors import Canceled, NotCancellable, RateLimited
from service.jobs import JobStore
from service.keys import face_key, is_deleted
from service.lookup import load_face, load_generation, load_job
from service.records import Consent, FaceRecord, OutputSpec, StoredFace
from service.storage import open_storage

from . import problems, web
from .api import (ErrorResponse, FaceAnalysis, FaceErasure, FaceRegistration, FaceRequest, FaceResponse,
                  GenerationRequest, GenerationResponse, Health, Job, UploadRequest, UploadResponse, VerifyRequest,
                  VerifyResponse, WebhookSecret)
from . import submissions
from .bodies import BoundedJSONRoute
from .flow import GenerationFlow
from .health import stage_health
from .inputs import ImageInputs
from .persons import check_photos
from .security import AuthFirst, EventStreams, Gate, HostCheck, StreamTicket, caller, host_name
from .submissions import Submissions
from .views import Views
from .webhooks import check_target, key_secret

ERRORS = {status: {"model": ErrorResponse} for status in problems.DOCUMENTED}
# errors of a route whose success is another media type (the event stream) are still JSON
JSON_ERRORS = {status: {"description": "Error", "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}} for status in problems.DOCUMENTED}
app = problems.API(title="InstantID", version="1", description="Identity-preserving SDXL generation from face photos. "
              'Errors are JSON: `{"error": {"code", "message", "field"}}` with a stable `code`.')
app.router.route_class = BoundedJSONRoute  # (before the routes below are declared)
problems.install(app)
app.add_middleware(AuthFirst)  # a key and its rate, from the headers, before anything else
app.add_middleware(HostCheck)  # (added last: outermost) the Host header names this server
web.mount(app)


def _off_loop(fn, *args, **kwargs):
    return asyncio.to_thread(fn, *args, **kwargs)


def _preferences(header: str) -> dict:
    """RFC 7240 ``Prefer``: ``respond-async`` (answer 202 with a job) and ``wait=N`` (wait
    at most N seconds for a synchronous answer, then 504; the server's own limit still holds)."""
    found: dict = {}
    for token in header.lower().replace(";", ",").split(","):
        name, _, value = token.strip().partition("=")
        if name == "respond-async":
            found[name] = True
        elif name == "wait" and value.strip().isdigit():
            found["wait"] = float(value.strip())
    return found


async def stream_of_owned_generation(generation_id: str, request: Request,
                                     owner: str = Depends(caller)) -> StreamTicket:
    """A place among the caller's open event streams, once ``generation_id`` is known to be
    theirs (404/403, then 429 over the key's cap, before any stream starts)."""
    storage = request.app.state.storage
    if await _off_loop(load_job, storage, generation_id, owner) is None:
        await _off_loop(load_generation, storage, generation_id, owner)
    return request.app.state.streams.open(owner)


@serve.deployment(name="Ingress", max_ongoing_requests=64)
@serve.ingress(app)
class Ingress:
    def __init__(self, face, generator, runner, limiter, janitor, args: dict) -> None:
        # (the janitor is bound here only so that the app deploys it: it works on its own)
        self.args = args = AppArgs.model_validate(args)
        keys = args.signing_keys()
        self.storage = open_storage(args.storage, signing_key=keys.url.encode(), endpoint_url=args.s3_endpoint_url,
                                    presign_endpoint_url=args.presign_endpoint_url)
        self.webhook_key = keys.webhook
        self.jobs = JobStore(self.storage, args.job_lease_s)
        self.flow = GenerationFlow(face, generator, args, self.storage)
        self.inputs = ImageInputs(args.limits, args.input_buckets, args.s3_endpoint_url, args.presign_endpoint_url)
        self.submissions = Submissions(self.flow, self.inputs, self.jobs, runner, args.retention.results_s,
                                       args.request_timeout_s)
        self.views = Views(self.storage, args.url_expiry_s, args.public_url)
        self.gate = Gate(args, limiter)
        # a few-step preset's steps, guidance and scheduler stand in for what a request leaves out
        self.param_defaults = Optimizations.parse(args.optimizations).param_defaults()
        app.state.gate, app.state.storage = self.gate, self.storage
        app.state.allowed_hosts = frozenset(host_name(h) for h in args.allowed_hosts)
        app.state.streams = EventStreams(args.fairness.event_streams_per_key, args.retry_after_s)
        app.max_body_size = args.limits.max_body_bytes  # Starlette refuses bigger bodies with 413
        self.image_limits = ImageLimits(max_bytes=args.limits.max_image_bytes, max_pixels=args.limits.max_image_pixels,
                                        max_side=args.limits.max_image_side, min_side=8)
        self.watermark = Watermark(args.watermark.service)  # reads marks even when marking is off now
        credentials = args.provenance.credentials(args.watermark.service)  # manifests signed by it read as trusted
        self.trust_anchors = credentials.trust_anchors() if credentials is not None else None

    @app.get("/healthz", response_model=Health, responses={503: {"model": ErrorResponse}})
    async def healthz(self):
        """Whether every stage has a healthy replica, as Serve's own health checks see it
        (it never waits behind renders)."""
        return await stage_health()

    # ------------------------------------------------------------------ generations
    @app.post("/v1/generations", response_model=GenerationResponse, responses={**ERRORS, 202: {"model": Job}})
    async def create_generation(self, body: GenerationRequest, request: Request, owner: str = Depends(caller)):
        """Generate images. With an ``Idempotency-Key`` header, a retried request (same key,
        same body) returns the first result and is rendered once. With ``Prefer:
        respond-async`` (or ``"async": true``, or a ``webhook_url``) the answer is 202 with a
        durable job to follow at ``GET /v1/generations/{id}`` (and ``/events``). ``Prefer:
        wait=N`` bounds a synchronous request to N seconds (504 after)."""
        started = time.monotonic()
        prefer = _preferences(request.headers.get("prefer", ""))
        deadline = started + min(self.args.request_timeout_s, prefer.get("wait", float("inf")))
        body = body.with_defaults(self.param_defaults)
        self._check_limits(body)
        run_async = body.run_async or body.webhook_url is not None or "respond-async" in prefer
        if body.webhook_url is not None:
            await _off_loop(self._check_webhook, body.webhook_url)  # resolves the host: off the loop
        key = request.headers.get("idempotency-key")
        generation_id, request_hash = submissions.generation_id(owner, key, body)
        if key is not None and await _off_loop(is_deleted, self.storage, generation_id):
            raise Canceled(f"generation {generation_id!r} was deleted; a new Idempotency-Key makes a new one")
        # the seed is fixed here: a rerun (a retry, a job taken over) makes the same images
        params = body.generation_params(seed=body.seed if body.seed is not None else seed_from(generation_id))
        base = str(request.base_url)
        if run_async:
            existing = await _off_loop(self.jobs.record, generation_id) if key else None
            if existing is None:
                existing = await self._start_job(generation_id, owner, body, params, request_hash, deadline)
            elif existing.request_hash != request_hash:
                raise claims.mismatch()
            return JSONResponse(self.views.job(existing, None, base), status_code=202,
                                headers={"Location": f"/v1/generations/{generation_id}"})
        attempt = secrets.token_hex(8)
        if key is not None:  # a retry gets the first result: its images are not charged or rendered again
            done = await self.submissions.earlier_result(generation_id, request_hash, attempt, deadline)
            if done is not None:
                return JSONResponse(self.views.generation(done, base), headers={"Idempotent-Replayed": "true"})
        try:
            await self.gate.charge_images(owner, body.num_images)
            pictures = await self.submissions.pictures(body, owner)
            face, people = await self.submissions.faces(body, owner, deadline, pictures, generation_id)
            face_ms = (time.monotonic() - started) * 1000
            stored = await self.flow.render(generation_id, owner, params, face,
                                            OutputSpec(format=body.output_format, quality=body.quality),
                                            request_hash, deadline, pictures=pictures, people=people)
        finally:
            if key is not None:
                await _off_loop(claims.release, self.storage, generation_id, attempt)
        timings = {"face": round(face_ms, 2), **stored.timings_ms, "total": round((time.monotonic() - started) * 1000,
                                                                                    2)}
        return JSONResponse(self.views.generation(stored.record, base, timings),
                            headers={"Idempotent-Replayed": "true"} if stored.replayed else None)

    @app.get("/v1/generations/{generation_id}", response_model=Job, responses=ERRORS)
    async def get_generation(self, generation_id: str, request: Request, owner: str = Depends(caller)):
        """A generation: its status and progress while it runs, its images once done."""
        return await self._view(generation_id, owner, str(request.base_url))

    @app.delete("/v1/generations/{generation_id}", status_code=204, responses=ERRORS)
    async def delete_generation(self, generation_id: str, owner: str = Depends(caller)):
        """Erase a generation: its images, its record, its job. Final: a job still running
        (on whichever replica) is canceled, writes nothing more and erases what it wrote
        last; a retry with the same ``Idempotency-Key`` is refused."""
        await _off_loop(erase_owned_generation, self.storage, self.jobs.places, generation_id, owner,
                        self.args.retention.results_s)
        return Response(status_code=204)

    @app.post("/v1/generations/{generation_id}/cancel", response_model=Job, status_code=202, responses=ERRORS)
    async def cancel_generation(self, generation_id: str, request: Request, owner: str = Depends(caller)):
        """Stop a job between two denoising steps (on whichever replica runs it)."""
        job = await _off_loop(load_job, self.storage, generation_id, owner)
        if job is None or job.ended:
            raise NotCancellable(f"generation {generation_id!r} is not running")
        await _off_loop(self.jobs.request_cancel, generation_id)
        return JSONResponse(self.views.job(job, None, str(request.base_url)), status_code=202)

    @app.get("/v1/generations/{generation_id}/events", response_class=EventSourceResponse, responses=JSON_ERRORS)
    async def generation_events(self, generation_id: str, request: Request,
                                ticket: StreamTicket = Depends(stream_of_owned_generation)):
        """Server-sent events: the job (as ``GET /v1/generations/{id}`` shows it) on every
        change, ``event: progress``, then once ``event: done`` with the final state. An API
        key holds at most ``fairness.event_streams_per_key`` streams open on a replica."""
        owner, last = ticket.owner, None
        try:  # a client going away cancels this request: the ticket goes back at once
            while True:
                view = await self._view(generation_id, owner, str(request.base_url))
                done = view["status"] in ("succeeded", "failed", "canceled")
                if view != last:
                    yield ServerSentEvent(event="done" if done else "progress", data=view)
                    last = view
                if done:
                    return
                await asyncio.sleep(0.25)
        finally:
            ticket.close()

    @app.get("/v1/webhooks/secret", response_model=WebhookSecret, responses=ERRORS)
    async def webhook_secret(self, owner: str = Depends(caller)):
        """The secret this API key's webhook signatures are made with."""
        return {"secret": key_secret(self.webhook_key, owner)}

    # ------------------------------------------------------------------ faces
    @app.post("/v1/faces", response_model=FaceResponse, status_code=201, responses=ERRORS)
    async def create_face(self, body: FaceRegistration, owner: str = Depends(caller)):
        """Register a face once, render it many times. Needs a consent attestation; the
        registration, each use and the erasure are written to the audit log."""
        job = await self.inputs.face_job(body.face_images, body.pose_image, body.face_combine, owner)
        face = await self.flow.analyze(job, time.monotonic() + self.args.request_timeout_s)
        now = time.time()
        record = FaceRecord(face_id="f_" + secrets.token_urlsafe(16), owner=owner, created_at=now,
                            expires_at=now + self.args.retention.faces_s, face=StoredFace.of(face),
                            consent=Consent(**body.consent.model_dump(), attested_at=now))
        await _off_loop(self.storage.put_json, face_key(record.face_id), record.model_dump(mode="json"))
        await _off_loop(audit, self.storage, "face_registered", owner=owner, face_id=record.face_id, at=now)
        return JSONResponse(self.views.face(record), status_code=201)

    @app.get("/v1/faces/{face_id}", response_model=FaceResponse, responses=ERRORS)
    async def get_face(self, face_id: str, owner: str = Depends(caller)):
        return self.views.face(await _off_loop(load_face, self.storage, face_id, owner, delete_expired=True))

    @app.delete("/v1/faces/{face_id}", status_code=204, responses={**ERRORS, 200: {"model": FaceErasure}})
    async def delete_face(self, face_id: str, cascade: bool = False, owner: str = Depends(caller)):
        """Erase a registered face (204). With ``?cascade=true``, every generation made from
        it goes too, running ones canceled: 200 with how many were erased."""
        erased = await _off_loop(erase_face, self.storage, self.jobs.places, face_id, owner, cascade=cascade,
                                 keep_s=self.args.retention.results_s)
        if not cascade:
            return Response(status_code=204)
        return JSONResponse({"face_id": face_id, "generations_erased": erased})

    @app.post("/v1/faces/analyze", response_model=FaceAnalysis, responses=ERRORS)
    async def analyze_face(self, body: FaceRequest, owner: str = Depends(caller)):
        """The face the service finds in these photos (box, keypoints, score); nothing is
        stored. The web page uses it to preview the detection."""
        job = await self.inputs.face_job(body.face_images, body.pose_image, body.face_combine, owner)
        face = await self.flow.analyze(job, time.monotonic() + self.args.request_timeout_s)
        return {"face": StoredFace.of(face).public().model_dump()}

    # ------------------------------------------------------------------ uploads
    @app.post("/v1/uploads", response_model=UploadResponse, status_code=201, responses=ERRORS)
    async def create_upload(self, body: UploadRequest, owner: str = Depends(caller)):
        """Where to upload one photo (a presigned S3 POST: send ``fields`` and then the file,
        as multipart form data, to ``url``); then name it as ``image`` in ``face_images`` or
        ``pose_image``. Only this API key may use it; the store refuses more than
        ``max_bytes``."""
        upload = await _off_loop(self.inputs.upload, owner, body.content_type, self.args.url_expiry_s)
        return JSONResponse(upload, status_code=201)

    # ------------------------------------------------------------------ provenance
    @app.post("/v1/verify", response_model=VerifyResponse, responses=ERRORS)
    async def verify(self, body: VerifyRequest, owner: str = Depends(caller)):
        """Read the invisible watermark and the C2PA manifest of a picture: whether this
        service made it, the generation it names, whether the manifest validates (as
        `instantid verify IMAGE` does). Nothing is stored."""
        data = await self.inputs.image_bytes(body.image, "image", owner)
        return await _off_loop(self._verify, data)

    def _verify(self, data: bytes) -> dict:
        picture = np.asarray(decode_image_bytes(data, field="image", limits=self.image_limits))
        reading = self.watermark.read(picture)
        manifest = inspect(data, trust_anchors_pem=self.trust_anchors)
        return {"watermark": reading.as_dict(), "c2pa": asdict(manifest) if manifest is not None else None,
                "width": picture.shape[1], "height": picture.shape[0]}

    @app.get("/v1/options")
    async def options(self):
        """What this server offers (the web page reads it): styles, schedulers, limits."""
        limits = self.args.limits
        extras = ExtraWeights(self.args.weights, self.args.weights_cache, self.args.s3_endpoint_url)
        controlnets, annotators = await _off_loop(lambda: (available_controlnets(extras),
                                                           available_annotators(extras)))
        return {"styles": style_names(), "schedulers": list(SCHEDULERS), "loras": sorted(self.args.loras),
                "controlnets": controlnets, "annotators": annotators,
                "auth_required": not self.args.auth.disabled,
                "limits": {"max_face_images": limits.max_face_images, "max_num_images": limits.max_num_images,
                           "max_side": limits.max_side, "max_steps": limits.max_steps}}

    # ------------------------------------------------------------------ helpers
    def _check_limits(self, body: GenerationRequest) -> None:
        limits = self.args.limits
        for name in ("width", "height"):
            value = getattr(body, name)
            if value is not None and value > limits.max_side:
                raise InvalidParameter(name, f"must be at most {limits.max_side} on this server")
        if body.num_inference_steps > limits.max_steps:
            raise InvalidParameter("num_inference_steps", f"must be at most {limits.max_steps} on this server")
        if body.num_images > limits.max_num_images:
            raise InvalidParameter("num_images", f"must be at most {limits.max_num_images} on this server")
        if not body.people and (body.face_images is None) == (body.face_id is None):
            raise InvalidParameter("face_images", "give either face_images or face_id (exactly one), or people")
        check_photos(body, limits)  # several people: their photos together
        for name in ("mask_image", "strength"):
            if getattr(body, name) is not None and body.image is None:
                raise InvalidParameter(name, "needs image (the picture to start from)")
        if body.lora is not None and body.lora not in self.args.loras:
            raise InvalidParameter("lora", f"unknown LoRA {body.lora!r}; this server offers {sorted(self.args.loras)}")

    async def _start_job(self, generation_id: str, owner: str, body: GenerationRequest, params, request_hash,
                         deadline: float):
        """Take the job's place in its key's count (429 when the cap is reached), charge its
        images and start it; a job that does not start gives its place back."""
        cap = self.args.fairness.jobs_per_key
        lapses_at = time.time() + self.args.retention.results_s
        if not await _off_loop(self.jobs.places.take, owner, generation_id, lapses_at, cap):
            raise RateLimited("rate_limited", f"this API key has {cap} jobs not finished; wait for one to end",
                              self.args.retry_after_s)
        try:
            await self.gate.charge_images(owner, body.num_images)
            return await self.submissions.start_job(generation_id, owner, body, params, request_hash, deadline)
        except BaseException:
            if await _off_loop(self.jobs.record, generation_id) is None:  # not started (by a retry either)
                await _off_loop(self.jobs.places.give_back, owner, generation_id)
            raise

    def _check_webhook(self, url: str) -> None:
        if not self.args.webhook_allowlist:
            raise InvalidParameter("webhook_url", "this server has no webhook allowlist: webhooks are off")
        check_target(url, self.args.webhook_allowlist, self.args.webhook_allow_private)

    async def _view(self, generation_id: str, owner: str, base_url: str) -> dict:
        job = await _off_loop(load_job, self.storage, generation_id, owner)
        if job is None:  # a synchronous generation
            return self.views.finished(await _off_loop(load_generation, self.storage, generation_id, owner), base_url)
        result = None
        if job.status == "succeeded":
            result = await _off_loop(load_generation, self.storage, generation_id, owner)
        return self.views.job(job, result, base_url)
