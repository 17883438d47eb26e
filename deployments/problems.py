"""The one place where errors become HTTP responses: every error code's status, the JSON
error body ``{"error": {"code", "message", "field"}}``, and the app's exception handlers."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.errors import InstantIDError
from pipeline.params import invalid_parameter_from_errors
from service.errors import public_error

from . import metrics

STATUS = {
    "invalid_json": 400,
    "invalid_image": 400,
    "invalid_host": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "not_cancellable": 409,
    "canceled": 409,
    "payload_too_large": 413,
    "image_too_large": 413,
    "no_face": 422,
    "invalid_parameter": 422,
    "rate_limited": 429,
    "quota_exceeded": 429,
    "overloaded": 503,
    "unavailable": 503,
    "storage_unavailable": 503,
    "timeout": 504,
    "internal_error": 500,
}
DOCUMENTED = (400, 401, 403, 404, 409, 413, 422, 429, 503, 504)


def error_response(code: str, message: str, field: str | None = None, retry_after_s: int | None = None,
                   headers: dict[str, str] | None = None, status: int | None = None) -> JSONResponse:
    metrics.errors().inc(tags={"code": code})
    headers = dict(headers or {})
    if retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
    if code == "unauthorized":
        headers["WWW-Authenticate"] = "Bearer"
    body = {"error": {"code": code, "message": message, **({"field": field} if field else {})}}
    return JSONResponse(body, status_code=status or STATUS.get(code, 500), headers=headers or None)


def problem(error: BaseException) -> JSONResponse:
    """The response for any exception (an unexpected one says no more than internal_error)."""
    return error_response(*public_error(error))


async def _typed(request: Request, error: InstantIDError) -> JSONResponse:
    return problem(error)


async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = error.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        return error_response("invalid_json", "the request body is not valid JSON")
    if not problems or [part for part in problems[0].get("loc", ()) if part != "body"] == []:
        return error_response("invalid_parameter", "body: must be a JSON object", "body")
    return problem(invalid_parameter_from_errors(problems, skip=("body", "query")))  # the parameter's own name


async def _routing(request: Request, error: StarletteHTTPException) -> JSONResponse:
    code, message = {
        404: ("not_found", f"no route {request.url.path}"),
        405: ("method_not_allowed", f"{request.method} is not allowed here"),
        413: ("payload_too_large", "the request body is too large"),
    }.get(error.status_code, ("http_error", str(error.detail)))
    return error_response(code, message, headers=getattr(error, "headers", None), status=error.status_code)


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    return problem(error)


def install(app: FastAPI) -> None:
    app.add_exception_handler(InstantIDError, _typed)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _routing)
    app.add_exception_handler(Exception, _unexpected)


class DeclaredBodyLimit:
    """Outermost: a body whose declared ``Content-Length`` is over the app's
    ``max_body_size`` is refused (413, JSON) before a byte of it is read. Bodies without a
    declared size are counted as they stream in by Starlette's own limit (FastAPI's
    ``max_body_size``), whose 413 reaches the handlers above; for declared sizes Starlette
    answers in plain text, hence this."""

    def __init__(self, app, limited) -> None:
        self.app, self.limited = app, limited

    async def __call__(self, scope, receive, send) -> None:
        limit = self.limited.max_body_size if scope["type"] == "http" else None
        declared = Headers(scope=scope).get("content-length") if limit is not None else None
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = error_response("payload_too_large", f"the request body is over {limit} bytes")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class API(FastAPI):
    """The FastAPI app, with :class:`DeclaredBodyLimit` around everything."""

    def build_middleware_stack(self):
        return DeclaredBodyLimit(super().build_middleware_stack(), self)
