"""The HTTP ingress: authentication, input decoding and limits, orchestration of the
stages through DeploymentHandles, and the one place where errors become HTTP statuses."""


import asyncio
import base64
import binascii
import hashlib
import json
import re
import secrets
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve

from pipeline.errors import ImageTooLarge, InstantIDError, InvalidImage, InvalidParameter
from pipeline.face import FaceInfo
from pipeline.optimize import Optimizations
from pipeline.params import invalid_parameter_from_errors, seed_from
from pipeline.s3 import S3Location, s3_client
from pipeline.schedulers import SCHEDULERS
from pipeline.styles import style_names

from . import metrics
from .api import (
    ErrorResponse,
    FaceAnalysis,
    FaceRequest,
    FaceResponse,
    GenerationRequest,
    GenerationResponse,
    Health,
    Job,
    WebhookSecret,
)
from .auth import LOCAL_OWNER, KeyRing, bearer_token
from .config import AppArgs
from .jobs import FaceJob, GenerationJob, OutputSpec
from .storage import LocalStorage, ObjectNotFound, cancel_key, erase_generation, job_key, open_storage, record_key
from .webhooks import check_target, deliver, key_secret

WEB = Path(__file__).resolve().parent / "web"
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
PAGE_HEADERS = {
    # everything the page needs comes from here; images may come from the object store
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src * data: blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
FACE_ID = re.compile(r"^f_[A-Za-z0-9_-]{22}$")
GENERATION_ID = re.compile(r"^g_[A-Za-z0-9_-]{22}$")
DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)

STATUS = {
    "invalid_json": 400,
    "invalid_image": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "payload_too_large": 413,
    "image_too_large": 413,
    "no_face": 422,
    "invalid_parameter": 422,
    "not_cancellable": 409,
    "rate_limited": 429,
    "quota_exceeded": 429,
    "overloaded": 503,
    "unavailable": 503,
    "storage_unavailable": 503,
    "timeout": 504,
}


def public_error(error: InstantIDError) -> tuple[int, str, str]:
    """How a typed pipeline error is shown to clients, in a response or a failed job: its
    HTTP status, stable code and message (an unexpected one says no more than that)."""
    status = STATUS.get(error.code, 500)
    if status == 500:
        return 500, "internal_error", "internal error"
    return status, error.code, str(error)


class HTTPProblem(Exception):
    """An error response decided here: status, stable code, message, optional field."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers or {}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    metrics.errors().inc(tags={"code": code})
    body = {"error": {"code": code, "message": message, **({"field": field} if field else {})}}
    return JSONResponse(body, status_code=status, headers=headers)


ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 422, 429, 503, 504)}
app = FastAPI(
    title="InstantID",
    version="1",
    description="Identity-preserving SDXL generation from face photos. Errors are JSON: "
    '`{"error": {"code", "message", "field"}}` with a stable `code`.',
)


@app.exception_handler(HTTPProblem)
async def _problem(request: Request, error: HTTPProblem) -> JSONResponse:
    return error_response(error.status, error.code, error.message, error.field, error.headers)


@app.exception_handler(InstantIDError)
async def _pipeline_error(request: Request, error: InstantIDError) -> JSONResponse:
    status, code, message = public_error(error)
    return error_response(status, code, message, getattr(error, "field", None))


@app.exception_handler(RequestValidationError)
async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = error.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        return error_response(400, "invalid_json", "the request body is not valid JSON")
    if not problems or [part for part in problems[0].get("loc", ()) if part != "body"] == []:
        return error_response(422, "invalid_parameter", "body: must be a JSON object", "body")
    problem = invalid_parameter_from_errors(problems, skip=("body",))
    return error_response(422, "invalid_parameter", str(problem), problem.field)


@app.exception_handler(StarletteHTTPException)
async def _routing(request: Request, error: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed here"}.get(
        error.status_code, str(error.detail))
    return error_response(error.status_code, code, message, headers=getattr(error, "headers", None))


@app.exception_handler(Exception)
async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    return error_response(500, "internal_error", "internal error")


class BodyLimit:
    """Refuses bodies over ``max_bytes`` with 413 before the app parses them. The limit is
    set from the configuration when the ingress replica starts."""

    max_bytes = 48 * 1024 * 1024

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = error_response(413, "payload_too_large", f"the request body is over {self.max_bytes} bytes")
        await response(scope, receive, send)


app.add_middleware(BodyLimit)


FINAL_STATUSES = ("succeeded", "failed", "canceled")


class LocalJob:
    """An async job running in this replica: its record, its task, and a way to wait for
    its next change."""

    def __init__(self, record: dict) -> None:
        self.record = record
        self.pending: dict = {}  # progress not yet written to storage
        self.task: asyncio.Task | None = None
        self.cancel_requested = False
        self.write_lock = asyncio.Lock()  # one storage write of the record at a time, in order
        self._event = asyncio.Event()

    @property
    def ended(self) -> bool:
        return self.record["status"] in FINAL_STATUSES

    def cancel(self) -> None:
        """Stop the render; a job that has ended (e.g. delivering its webhook) goes on."""
        if self.ended:
            return
        self.cancel_requested = True
        if self.task is not None:
            self.task.cancel()

    def changed(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            pass


def _unwrap(error: BaseException) -> BaseException:
    from ray.exceptions import RayTaskError

    while isinstance(error, RayTaskError) and getattr(error, "cause", None) is not None:
        error = error.cause
    return error


@serve.deployment(name="Ingress", max_ongoing_requests=64)
@serve.ingress(app)
class Ingress:
    def __init__(self, face, generator, postprocessor, limiter, janitor, args: dict) -> None:
        self.face, self.generator, self.postprocessor = face, generator, postprocessor
        self.limiter, self.janitor = limiter, janitor
        self.args = AppArgs(**args)
        self.keys = KeyRing(self.args.auth.api_key_sha256, self.args.auth.api_keys_env)
        if not self.args.auth.disabled and len(self.keys) == 0:
            raise ValueError(f"auth is on but no API key digest is configured (nor in ${self.args.auth.api_keys_env})")
        self.storage = open_storage(self.args.storage, signing_key=self.args.url_signing_key.encode(),
                                    endpoint_url=self.args.s3_endpoint_url,
                                    presign_endpoint_url=self.args.presign_endpoint_url)
        self._inputs = None
        self._jobs: dict[str, LocalJob] = {}  # async jobs this replica is running
        # what the Generator's speed settings imply (a few-step preset's steps, guidance and
        # scheduler) stands in for what a request leaves out
        self.param_defaults = Optimizations.parse(self.args.optimizations).param_defaults()
        BodyLimit.max_bytes = self.args.limits.max_body_bytes

    # ------------------------------------------------------------------ helpers
    def _owner(self, request: Request) -> str:
        if self.args.auth.disabled:
            return LOCAL_OWNER
        token = bearer_token(request.headers.get("authorization"))
        owner = self.keys.owner(token) if token else None
        if owner is None:
            raise HTTPProblem(401, "unauthorized", "a valid API key is required (Authorization: Bearer <key>)",
                              headers={"WWW-Authenticate": "Bearer"})
        return owner

    async def _admit(self, owner: str, images: int = 0) -> None:
        """Per-key rate limit and daily image quota (429 with Retry-After)."""
        limits = self.args.rate_limits
        if limits.requests_per_minute is None and limits.images_per_day is None:
            return
        verdict = await self._await(self.limiter.check.remote(owner, images), time.monotonic() + 10, "rate limiter")
        if not verdict["allowed"]:
            message = ("too many requests for this API key; slow down" if verdict["reason"] == "rate_limited"
                       else f"this API key's daily image quota is used up ({verdict.get('remaining', 0)} left)")
            raise HTTPProblem(429, verdict["reason"], message, headers={"Retry-After": str(verdict["retry_after"])})

    async def _await(self, response, deadline: float, what: str, upstream: tuple = ()):
        """Await a DeploymentResponse within the request's deadline, translating Ray's
        errors. On timeout or client disconnect, it and ``upstream`` are cancelled."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        try:
            return await asyncio.wait_for(response, timeout=max(0.001, deadline - time.monotonic()))
        except (asyncio.TimeoutError, asyncio.CancelledError) as stop:
            for pending in (response, *upstream):
                if hasattr(pending, "cancel"):  # a DeploymentResponse (a plain coroutine is closed already)
                    pending.cancel()
            if isinstance(stop, asyncio.CancelledError):
                raise
            raise HTTPProblem(504, "timeout", f"{what} did not finish within {self.args.request_timeout_s:g} s") from None
        except Exception as raw:
            error = _unwrap(raw)
            if isinstance(error, InstantIDError):
                raise error from None
            if isinstance(error, BackPressureError):
                raise HTTPProblem(503, "overloaded", "the service is at capacity; retry later",
                                  headers={"Retry-After": str(self.args.retry_after_s)}) from None
            if isinstance(error, (RayActorError, DeploymentUnavailableError)):
                raise HTTPProblem(503, "unavailable", f"{what} is unavailable; retry later",
                                  headers={"Retry-After": str(self.args.retry_after_s)}) from None
            raise

    async def _image_bytes(self, ref: str, field: str) -> bytes:
        limits = self.args.limits
        if ref.startswith("s3://"):
            return await asyncio.to_thread(self._s3_image, ref, field)
        if re.match(r"^[a-z][a-z0-9+.-]*://", ref, re.I):
            raise InvalidParameter(field, "only data: URLs, base64 and s3:// URIs of allowed buckets are accepted")
        payload = ref
        match = DATA_URL.match(ref)
        if match:
            if not match.group("b64"):
                raise InvalidImage("data: URLs must be base64-encoded", field)
            payload = ref[match.end() :]
        elif ref.startswith("data:"):
            raise InvalidImage("is a malformed data: URL", field)
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise ImageTooLarge(f"is over {limits.max_image_bytes} bytes", field)
        try:
            return base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidImage("is neither base64 nor a base64 data: URL", field) from None

    def _s3_image(self, ref: str, field: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        where = S3Location.parse(ref, field=field)
        if where.bucket not in self.args.input_buckets or not where.prefix:
            raise InvalidParameter(field, f"s3 bucket {where.bucket!r} is not one this server reads images from")
        if any(part in ("", ".", "..") for part in where.prefix.split("/")) or len(where.prefix) > 1024:
            raise InvalidParameter(field, "the s3 key must be a plain path (no empty, '.' or '..' segments)")
        if self._inputs is None:
            self._inputs = s3_client(self.args.s3_endpoint_url)
        try:
            head = self._inputs.head_object(Bucket=where.bucket, Key=where.prefix)
            if head["ContentLength"] > self.args.limits.max_image_bytes:
                raise ImageTooLarge(f"is {head['ContentLength']} bytes, over {self.args.limits.max_image_bytes}", field)
            return self._inputs.get_object(Bucket=where.bucket, Key=where.prefix)["Body"].read()
        except ClientError as error:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound") or status == 404:
                raise InvalidParameter(field, f"no object at {ref}") from None
            if status < 500:  # refused (e.g. access denied): a problem with the reference
                raise InvalidParameter(field, f"cannot read {ref}") from None
            raise HTTPProblem(503, "storage_unavailable", f"{field}: could not read {ref}") from None
        except BotoCoreError:
            raise HTTPProblem(503, "storage_unavailable", f"{field}: could not read {ref}") from None

    async def _face_job(self, refs: list[str], pose: str | None, combine: str) -> FaceJob:
        if len(refs) > self.args.limits.max_face_images:
            raise InvalidParameter("face_images", f"at most {self.args.limits.max_face_images} photos")
        names = [f"face_images[{i}]" for i in range(len(refs))]
        images = [await self._image_bytes(ref, name) for ref, name in zip(refs, names)]
        pose_bytes = await self._image_bytes(pose, "pose_image") if pose else None
        return FaceJob(images=images, pose=pose_bytes, combine=combine, names=names)

    async def _storage(self, fn, *args):
        return await asyncio.to_thread(fn, *args)

    async def _face_record(self, face_id: str, owner: str) -> dict:
        if not FACE_ID.match(face_id):
            raise HTTPProblem(404, "not_found", f"no face {face_id!r}", "face_id")
        try:
            record = await self._storage(self.storage.get_json, f"faces/{face_id}.json")
        except ObjectNotFound:
            raise HTTPProblem(404, "not_found", f"no face {face_id!r}", "face_id") from None
        if record["owner"] != owner:
            raise HTTPProblem(403, "forbidden", f"face {face_id!r} belongs to another API key", "face_id")
        if record.get("expires_at", float("inf")) < time.time():  # past its retention: gone
            await self._storage(self.storage.delete, f"faces/{face_id}.json")
            raise HTTPProblem(404, "not_found", f"no face {face_id!r}", "face_id")
        return record

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
        if (body.face_images is None) == (body.face_id is None):
            raise InvalidParameter("face_images", "give either face_images or face_id (exactly one)")
        if body.lora is not None and body.lora not in self.args.loras:
            raise InvalidParameter("lora", f"unknown LoRA {body.lora!r}; this server offers {sorted(self.args.loras)}")

    def _absolute(self, request: Request | None, url: str) -> str:
        if "://" in url:
            return url
        base = self.args.public_url or (str(request.base_url) if request is not None else "")
        return base.rstrip("/") + url

    # ------------------------------------------------------------------ routes
    @app.get("/healthz", response_model=Health, responses={503: {"model": ErrorResponse}})
    async def healthz(self):
        deadline = time.monotonic() + 10
        try:
            stages = await asyncio.gather(*(self._await(h.ready.remote(), deadline, "health check")
                                            for h in (self.face, self.generator, self.postprocessor,
                                                      self.limiter, self.janitor)))
        except Exception as error:
            detail = getattr(error, "message", None) or type(error).__name__
            return error_response(503, "unavailable", f"not every stage is ready: {detail}")
        return {"status": "ok", "stages": list(stages)}

    @app.post("/v1/generations", response_model=GenerationResponse, responses={**ERRORS, 202: {"model": Job}})
    async def create_generation(self, body: GenerationRequest, request: Request):
        """Generate images. With an ``Idempotency-Key`` header, a retried request (same key,
        same body) returns the first result and is rendered once. With ``Prefer:
        respond-async`` (or ``"async": true``, or a ``webhook_url``) the answer is 202 with a
        job to follow at ``GET /v1/generations/{id}`` (and ``/events``)."""
        started = time.monotonic()
        owner = self._owner(request)
        body = body.with_defaults(self.param_defaults)
        self._check_limits(body)
        run_async = body.run_async or body.webhook_url is not None or "respond-async" in request.headers.get(
            "prefer", "").lower()
        if body.webhook_url is not None:
            await asyncio.to_thread(self._check_webhook, body.webhook_url)  # resolves the host: off the loop
        idempotency_key = request.headers.get("idempotency-key")
        request_hash = attempt = None
        if idempotency_key is None:
            generation_id = "g_" + secrets.token_urlsafe(16)
        else:  # a retry gets the first attempt's job or result, and is neither charged nor rendered again
            generation_id, request_hash = self._idempotent_id(owner, idempotency_key, body)
            existing = await self._load_job(generation_id) if run_async else None
            if existing is not None:
                if existing.get("request_hash") != request_hash:
                    raise InvalidParameter("Idempotency-Key", "was already used with a different request")
                return JSONResponse(await self._job_view(request, existing), status_code=202,
                                    headers={"Location": f"/v1/generations/{generation_id}"})
            attempt = secrets.token_hex(8)
            record = await self._claim(generation_id, request_hash, attempt, started + self.args.request_timeout_s)
            if record is not None:
                return self._replay(request, record)
            if body.seed is None:  # a re-render after a lost attempt makes the same images
                body = body.model_copy(update={"seed": seed_from(generation_id)})
        try:
            await self._admit(owner, body.num_images)
            if run_async:  # the job holds the claim (if any) until it ends
                job = await self._start_job(generation_id, owner, body, request_hash, attempt)
                return JSONResponse(await self._job_view(request, job.record), status_code=202,
                                    headers={"Location": f"/v1/generations/{generation_id}"})
        except BaseException:
            if attempt is not None:
                await self._release(generation_id, attempt)
            raise
        try:
            stored, face_ms = await self._generate(generation_id, owner, body, request_hash,
                                                   started + self.args.request_timeout_s)
        finally:
            if attempt is not None:
                await self._release(generation_id, attempt)
        timings = {"face": round(face_ms, 2), **stored.timings_ms,
                   "total": round((time.monotonic() - started) * 1000, 2)}
        response = self._generation_body(request, stored.record, stored.urls, timings)
        return JSONResponse(response, headers={"Idempotent-Replayed": "true"} if stored.replayed else None)

    async def _generate(self, generation_id: str, owner: str, body: GenerationRequest, request_hash: str | None,
                        deadline: float, on_event=None):
        """Face, render, store: the work behind both the synchronous and the async API.
        ``on_event(dict)`` hears the stage changes and denoising progress."""
        started = time.monotonic()
        notify = on_event or (lambda event: None)
        # 1. the face: analysed now, or registered earlier
        notify({"stage": "face"})
        if body.face_id is not None:
            face_record = await self._face_record(body.face_id, owner)
            face = FaceInfo.from_dict(face_record["face"])
            if body.pose_image:
                job = await self._face_job([body.pose_image], None, "mean")
                posed = await self._await(self.face.embed.remote(job), deadline, "face analysis")
                face = FaceInfo(posed.bbox, posed.kps, face.det_score, face.embedding, posed.image_size)
        else:
            job = await self._face_job(body.face_images, body.pose_image, body.face_combine)
            face = await self._await(self.face.embed.remote(job), deadline, "face analysis")
        face_ms = (time.monotonic() - started) * 1000

        # 2. render and store: the Generator hands the images to the Postprocessor, which
        #    writes the generation's record once they are stored
        notify({"stage": "rendering", "step": 0, "total": body.num_inference_steps})
        lora = self.args.loras.get(body.lora) if body.lora else None
        record = {"owner": owner, "face": face.to_dict(), "request_hash": request_hash,
                  "expires_at": time.time() + self.args.retention.results_s}
        output = OutputSpec(f"generations/{generation_id}", body.output_format, body.quality,
                            self.args.url_expiry_s, record)
        job = GenerationJob(generation_id, body.generation_params(lora=lora), face, output)
        for retry in range(2):  # once more if the replica died under us: the proxy would do the same
            try:
                stream = self.generator.options(stream=True).generate.remote(job)
                async for event in self._stream(stream, deadline, "generation"):
                    if event["type"] == "result":
                        return event["result"], face_ms
                    notify({"stage": event.get("stage", "rendering"),
                            **{k: event[k] for k in ("step", "total") if k in event}})
                raise HTTPProblem(503, "unavailable", "the generation ended without a result")
            except HTTPProblem as problem:
                if problem.code != "unavailable" or retry:
                    raise

    async def _stream(self, stream, deadline: float, what: str):
        """Iterate a streaming DeploymentResponse within the deadline, translating errors
        like :meth:`_await`; the stream is cancelled on timeout or cancellation."""
        iterator = stream.__aiter__()
        while True:
            try:
                event = await self._await(iterator.__anext__(), deadline, what, upstream=(stream,))
            except StopAsyncIteration:
                return
            yield event

    # ------------------------------------------------------------------ async jobs
    def _check_webhook(self, url: str) -> None:
        if not self.args.webhook_allowlist:
            raise InvalidParameter("webhook_url", "this server has no webhook allowlist: webhooks are off")
        check_target(url, self.args.webhook_allowlist, self.args.webhook_allow_private)

    async def _load_job(self, generation_id: str) -> dict | None:
        local = self._jobs.get(generation_id)
        if local is not None:
            return local.record
        try:
            return await self._storage(self.storage.get_json, job_key(generation_id))
        except ObjectNotFound:
            return None

    async def _start_job(self, generation_id: str, owner: str, body: GenerationRequest,
                         request_hash: str | None, attempt: str | None) -> "LocalJob":
        now = time.time()
        record = {"id": generation_id, "owner": owner, "status": "queued", "stage": "queued", "progress": None,
                  "created_at": now, "updated_at": now, "heartbeat_at": now,
                  "expires_at": now + self.args.retention.results_s,
                  "error": None, "request_hash": request_hash,
                  "webhook": {"url": body.webhook_url} if body.webhook_url else None}
        job = LocalJob(record)
        self._jobs[generation_id] = job
        # the task exists before anything awaits (a cancel or DELETE always finds it); it runs
        # once this first write (taken before it, under the job's write lock) is done
        job.task = asyncio.get_running_loop().create_task(self._run_job(job, body, attempt))
        await self._write_job(job)
        return job

    async def _run_job(self, job: "LocalJob", body: GenerationRequest, attempt: str | None) -> None:
        record = job.record
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(job))
        try:
            await self._update(job, status="running")

            def on_event(event: dict) -> None:
                changes = {"stage": event["stage"]}
                if "step" in event:
                    changes["progress"] = {"step": event["step"], "total": event["total"]}
                job.pending.update(changes)
                job.changed()

            deadline = time.monotonic() + self.args.request_timeout_s
            flusher = asyncio.get_running_loop().create_task(self._flush_progress(job))
            try:
                stored, face_ms = await self._generate(record["id"], record["owner"], body, record["request_hash"],
                                                       deadline, on_event)
            finally:
                flusher.cancel()
            await self._update(job, status="succeeded", stage="done", timings_ms={"face": round(face_ms, 2),
                                                                                 **stored.timings_ms})
        except asyncio.CancelledError:
            if not job.cancel_requested:  # the replica is stopping: the heartbeat tells the others
                raise
            await self._update(job, status="canceled", stage="done",
                               error={"code": "canceled", "message": "canceled by request"})
        except HTTPProblem as problem:
            await self._update(job, status="failed", stage="done",
                               error={"code": problem.code, "message": problem.message, "field": problem.field})
        except InstantIDError as error:
            _, code, message = public_error(error)
            await self._update(job, status="failed", stage="done",
                               error={"code": code, "message": message, "field": getattr(error, "field", None)})
        except Exception:  # noqa: BLE001 - a job ends in a state, always
            await self._update(job, status="failed", stage="done",
                               error={"code": "internal_error", "message": "internal error"})
        finally:
            heartbeat.cancel()
            try:
                if attempt is not None:
                    await self._release(record["id"], attempt)
                if record.get("webhook") and job.ended:  # not when the replica stops mid-job
                    await self._deliver(job)
            finally:
                self._jobs.pop(record["id"], None)
                job.changed()

    async def _update(self, job: "LocalJob", **changes) -> None:
        now = time.time()
        job.record.update(job.pending)
        job.pending.clear()
        job.record.update(changes, updated_at=now, heartbeat_at=now)
        job.changed()
        await self._write_job(job)

    async def _write_job(self, job: "LocalJob") -> None:
        """Store the job's record as it is now. Writes (heartbeat, progress, final state,
        webhook outcome) go one at a time, each taking the record when it starts, so the
        last one stored is the newest; a writer cancelled meanwhile (the heartbeat when the
        job ends) still lets its write finish before the next begins."""
        async with job.write_lock:
            write = asyncio.ensure_future(
                self._storage(self.storage.put_json, job_key(job.record["id"]), dict(job.record)))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                await asyncio.wait({write})
                raise

    async def _flush_progress(self, job: "LocalJob") -> None:
        """Progress reaches storage at most once a second (SSE on this replica sees every
        step at once); a cancel asked for on another replica is noticed here."""
        while True:
            await asyncio.sleep(1.0)
            if job.pending:
                await self._update(job)
            if await self._storage(self.storage.exists, cancel_key(job.record["id"])):
                job.cancel()

    async def _heartbeat(self, job: "LocalJob") -> None:
        while True:
            await asyncio.sleep(max(1.0, self.args.job_heartbeat_timeout_s / 4))
            await self._update(job)

    async def _deliver(self, job: "LocalJob") -> None:
        record = job.record
        payload = await self._job_view(None, record)
        outcome = await deliver(
            record["webhook"]["url"], payload, event=f"generation.{record['status']}",
            secret=key_secret(self.args.webhook_signing_key, record["owner"]), delivery_id=secrets.token_hex(12),
            attempts=self.args.webhook_max_attempts, backoff_s=self.args.webhook_backoff_s,
            check=lambda url: check_target(url, self.args.webhook_allowlist, self.args.webhook_allow_private))
        record["webhook"].update({k: v for k, v in outcome.items() if k != "url"})
        await self._write_job(job)

    async def _job_view(self, request: Request | None, record: dict) -> dict:
        """The API view of a job record (with its result once it succeeded)."""
        status = record["status"]
        if status in ("queued", "running") and record["id"] not in self._jobs and \
                time.time() - record.get("heartbeat_at", 0) > self.args.job_heartbeat_timeout_s:
            status = "failed"  # its replica stopped: report it, do not wait forever
            record = {**record, "status": status, "stage": "done",
                      "error": {"code": "worker_lost", "message": "the replica running this job stopped"}}
        view = {k: record.get(k) for k in ("id", "status", "stage", "progress", "created_at", "updated_at", "error")}
        view.update(images=[], face=None, batch_size=None, timings_ms=record.get("timings_ms") or {})
        if status == "succeeded":
            try:
                result = await self._storage(self.storage.get_json, record_key(record["id"]))
                urls = [self.storage.url(key, self.args.url_expiry_s) for key in result["keys"]]
                body = self._generation_body(request, result, urls, view["timings_ms"])
                view.update(images=body["images"], face=body["face"], batch_size=body["batch_size"])
            except ObjectNotFound:
                pass
        return view

    @app.post("/v1/generations/{generation_id}/cancel", response_model=Job, status_code=202, responses=ERRORS)
    async def cancel_generation(self, generation_id: str, request: Request):
        """Stop a job between two denoising steps."""
        owner = self._owner(request)
        record = await self._owned_job(generation_id, owner)
        if record is None or record["status"] not in ("queued", "running"):
            raise HTTPProblem(409, "not_cancellable", f"generation {generation_id!r} is not running")
        local = self._jobs.get(generation_id)
        if local is not None:
            local.cancel()
        else:  # running on another replica: it sees the marker within a second
            await self._storage(self.storage.put, cancel_key(generation_id), b"{}", "application/json")
        return JSONResponse(await self._job_view(request, record), status_code=202)

    async def _owned_job(self, generation_id: str, owner: str) -> dict | None:
        if not GENERATION_ID.match(generation_id):
            raise HTTPProblem(404, "not_found", f"no generation {generation_id!r}")
        record = await self._load_job(generation_id)
        if record is None:
            return None
        if record["owner"] != owner:
            raise HTTPProblem(403, "forbidden", f"generation {generation_id!r} belongs to another API key")
        if record.get("expires_at", float("inf")) < time.time():
            raise HTTPProblem(404, "not_found", f"generation {generation_id!r} has expired")
        return record

    @app.get("/v1/generations/{generation_id}/events", response_class=StreamingResponse,
             responses={**ERRORS, 200: {"description": "Server-sent events",
                                        "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
    async def generation_events(self, generation_id: str, request: Request):
        """Server-sent events: the job (as ``GET /v1/generations/{id}`` shows it) on every
        change, ``event: progress``, then once ``event: done`` with the final state."""
        owner = self._owner(request)
        record = await self._owned_job(generation_id, owner)
        if record is None:
            await self._generation_record(generation_id, owner)  # a synchronous one: 404/403 as GET does
            record = {"id": generation_id, "owner": owner, "status": "succeeded", "stage": "done"}

        async def events():
            last, quiet = None, 0.0
            while True:
                local = self._jobs.get(generation_id)
                current = local.record if local is not None else (await self._load_job(generation_id) or record)
                view = await self._job_view(request, {**current, **(local.pending if local else {})})
                done = view["status"] in FINAL_STATUSES
                if view != last:
                    yield f"event: {'done' if done else 'progress'}\ndata: {json.dumps(view)}\n\n"
                    last, quiet = view, 0.0
                elif quiet > 15:
                    yield ": keep-alive\n\n"
                    quiet = 0.0
                if done:
                    return
                started = time.monotonic()
                if local is not None:
                    await local.wait(1.0)
                else:
                    await asyncio.sleep(0.5)
                quiet += time.monotonic() - started

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/webhooks/secret", response_model=WebhookSecret, responses=ERRORS)
    async def webhook_secret(self, request: Request):
        """The secret this API key's webhook signatures are made with."""
        return {"secret": key_secret(self.args.webhook_signing_key, self._owner(request))}

    # ------------------------------------------------------------------ idempotency
    def _idempotent_id(self, owner: str, key: str, body: GenerationRequest) -> tuple[str, str]:
        if not 1 <= len(key) <= 255 or not key.isprintable():
            raise InvalidParameter("Idempotency-Key", "must be 1 to 255 printable characters")
        digest = hashlib.sha256(f"{owner}\n{key}".encode()).digest()
        generation_id = "g_" + base64.urlsafe_b64encode(digest).decode()[:22]
        return generation_id, hashlib.sha256(body.model_dump_json().encode()).hexdigest()

    async def _claim(self, generation_id: str, request_hash: str, attempt: str, deadline: float) -> dict | None:
        """The stored record when this key already completed; else claim the work (an
        atomic create; while another live attempt holds the claim, wait for its record)
        and return None."""
        claim_key = f"generations/{generation_id}/claim.json"
        claim = json.dumps({"attempt": attempt, "request_hash": request_hash,
                            "expires_at": time.time() + self.args.request_timeout_s}).encode()
        while True:
            try:
                record = await self._storage(self.storage.get_json, record_key(generation_id))
                if record.get("request_hash") != request_hash:
                    raise InvalidParameter("Idempotency-Key", "was already used with a different request")
                return record
            except ObjectNotFound:
                pass
            if await self._storage(self.storage.put_if_absent, claim_key, claim):
                return None
            try:
                held = await self._storage(self.storage.get_json, claim_key)
            except ObjectNotFound:
                continue  # released meanwhile: look again
            if held.get("request_hash") != request_hash:
                raise InvalidParameter("Idempotency-Key", "was already used with a different request")
            if held["expires_at"] < time.time():  # its attempt died: take over
                await self._storage(self.storage.delete, claim_key)
                continue
            if time.monotonic() > deadline:
                raise HTTPProblem(504, "timeout", "an earlier attempt with this Idempotency-Key is still running")
            await asyncio.sleep(0.25)

    async def _release(self, generation_id: str, attempt: str) -> None:
        claim_key = f"generations/{generation_id}/claim.json"
        try:
            if (await self._storage(self.storage.get_json, claim_key)).get("attempt") == attempt:
                await self._storage(self.storage.delete, claim_key)
        except (ObjectNotFound, InstantIDError):
            pass

    def _replay(self, request: Request, record: dict) -> JSONResponse:
        urls = [self.storage.url(key, self.args.url_expiry_s) for key in record["keys"]]
        body = self._generation_body(request, record, urls, {})
        return JSONResponse(body, headers={"Idempotent-Replayed": "true"})

    def _generation_body(self, request: Request, record: dict, urls: list[str], timings: dict) -> dict:
        face = {k: record["face"][k] for k in ("bbox", "kps", "det_score", "image_size")}
        images = [{"url": self._absolute(request, url), "seed": seed, "width": record["width"],
                   "height": record["height"]} for url, seed in zip(urls, record["seeds"])]
        return {"id": record["id"], "images": images, "face": face, "timings_ms": timings,
                "batch_size": record["batch_size"]}

    async def _generation_record(self, generation_id: str, owner: str) -> dict:
        if not GENERATION_ID.match(generation_id):
            raise HTTPProblem(404, "not_found", f"no generation {generation_id!r}")
        try:
            record = await self._storage(self.storage.get_json, record_key(generation_id))
        except ObjectNotFound:
            raise HTTPProblem(404, "not_found", f"no generation {generation_id!r}") from None
        if record["owner"] != owner:
            raise HTTPProblem(403, "forbidden", f"generation {generation_id!r} belongs to another API key")
        if record.get("expires_at", float("inf")) < time.time():
            raise HTTPProblem(404, "not_found", f"generation {generation_id!r} has expired")
        return record

    @app.get("/v1/generations/{generation_id}", response_model=Job, responses=ERRORS)
    async def get_generation(self, generation_id: str, request: Request):
        """A generation: its status and progress while it runs, its images once done."""
        owner = self._owner(request)
        record = await self._owned_job(generation_id, owner)
        if record is None:  # a synchronous generation
            result = await self._generation_record(generation_id, owner)
            record = {"id": generation_id, "owner": owner, "status": "succeeded", "stage": "done",
                      "created_at": result.get("created_at"), "updated_at": result.get("created_at")}
        return await self._job_view(request, record)

    @app.delete("/v1/generations/{generation_id}", status_code=204, responses=ERRORS)
    async def delete_generation(self, generation_id: str, request: Request):
        """Erase a generation: its images, its record, its job; a running job is canceled."""
        owner = self._owner(request)
        job = await self._owned_job(generation_id, owner)
        if job is None:
            await self._generation_record(generation_id, owner)
        local = self._jobs.get(generation_id)
        if local is not None:
            local.cancel()
            await asyncio.wait({local.task}, timeout=30)
        await self._storage(erase_generation, self.storage, generation_id)
        return Response(status_code=204)

    @app.post("/v1/faces", response_model=FaceResponse, status_code=201, responses=ERRORS)
    async def create_face(self, body: FaceRequest, request: Request):
        deadline = time.monotonic() + self.args.request_timeout_s
        owner = self._owner(request)
        await self._admit(owner)
        job = await self._face_job(body.face_images, body.pose_image, body.face_combine)
        face = await self._await(self.face.embed.remote(job), deadline, "face analysis")
        face_id = "f_" + secrets.token_urlsafe(16)
        now = time.time()
        record = {"face_id": face_id, "owner": owner, "created_at": now,
                  "expires_at": now + self.args.retention.faces_s, "face": face.to_dict(with_embedding=True)}
        await self._storage(self.storage.put_json, f"faces/{face_id}.json", record)
        return JSONResponse(self._face_body(record), status_code=201)

    @staticmethod
    def _face_body(record: dict) -> dict:
        face = {k: record["face"][k] for k in ("bbox", "kps", "det_score", "image_size")}
        return {"face_id": record["face_id"], "face": face, "created_at": record["created_at"]}

    @app.get("/v1/faces/{face_id}", response_model=FaceResponse, responses=ERRORS)
    async def get_face(self, face_id: str, request: Request):
        return self._face_body(await self._face_record(face_id, self._owner(request)))

    @app.delete("/v1/faces/{face_id}", status_code=204, responses=ERRORS)
    async def delete_face(self, face_id: str, request: Request):
        await self._face_record(face_id, self._owner(request))
        await self._storage(self.storage.delete, f"faces/{face_id}.json")
        return Response(status_code=204)

    @app.post("/v1/faces/analyze", response_model=FaceAnalysis, responses=ERRORS)
    async def analyze_face(self, body: FaceRequest, request: Request):
        """The face the service finds in these photos (box, keypoints, score); nothing is
        stored. The web page uses it to preview the detection."""
        await self._admit(self._owner(request))
        job = await self._face_job(body.face_images, body.pose_image, body.face_combine)
        face = await self._await(self.face.embed.remote(job), time.monotonic() + self.args.request_timeout_s,
                                 "face analysis")
        return {"face": {k: v for k, v in face.to_dict().items()}}

    @app.get("/v1/options")
    async def options(self):
        """What this server offers (the web page reads it): styles, schedulers, limits."""
        limits = self.args.limits
        return {"styles": style_names(), "schedulers": list(SCHEDULERS), "loras": sorted(self.args.loras),
                "auth_required": not self.args.auth.disabled,
                "limits": {"max_face_images": limits.max_face_images, "max_num_images": limits.max_num_images,
                           "max_side": limits.max_side, "max_steps": limits.max_steps}}

    @app.get("/", include_in_schema=False)
    async def page(self):
        return Response((WEB / "index.html").read_bytes(), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str):
        if name not in STATIC:
            raise HTTPProblem(404, "not_found", "no such file")
        return Response((WEB / name).read_bytes(), media_type=STATIC[name], headers=PAGE_HEADERS)

    @app.get("/v1/files/{key:path}", include_in_schema=False)
    async def get_file(self, key: str, expires: int = 0, signature: str = ""):
        if not isinstance(self.storage, LocalStorage):
            raise HTTPProblem(404, "not_found", "files are served by the object store")
        if not self.storage.verify(key, expires, signature):
            raise HTTPProblem(403, "forbidden", "the link is invalid or has expired")
        try:
            data = await self._storage(self.storage.get, key)
        except (ObjectNotFound, InvalidParameter):
            raise HTTPProblem(404, "not_found", "no such file") from None
        media = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "json": "application/json"}
        return Response(data, media_type=media.get(key.rsplit(".", 1)[-1], "application/octet-stream"))
