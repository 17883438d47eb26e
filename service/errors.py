"""Typed errors of the service layer (beside the pipeline's in :mod:`pipeline.errors`).

Each has a stable ``code``; they are plain picklable exceptions, so they cross actor
boundaries unchanged. Which HTTP status a code becomes is decided at the ingress only
(:mod:`deployments.problems`); a job record or a renderer row keeps the code and message.
"""

from __future__ import annotations

from typing import NamedTuple

from pipeline.errors import InstantIDError


class _FieldError(InstantIDError):
    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(_FieldError):
    """No such (or no longer an unexpired) face, generation or job."""

    code = "not_found"


class Forbidden(_FieldError):
    """It exists but belongs to another API key."""

    code = "forbidden"


class Unauthorized(InstantIDError):
    code = "unauthorized"


class InvalidHost(InstantIDError):
    """The request names a host (its Host header) this server does not answer to."""

    code = "invalid_host"


class PayloadTooLarge(InstantIDError):
    """A request body over what the server takes (bytes, or values in its JSON)."""

    code = "payload_too_large"


class NotCancellable(InstantIDError):
    code = "not_cancellable"


class Canceled(InstantIDError):
    """The work was stopped by a cancel (of the client, or a DELETE)."""

    code = "canceled"


class Timeout(InstantIDError):
    code = "timeout"


class _RetryLater(InstantIDError):
    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(_RetryLater):
    """A queue is full: try again later."""

    code = "overloaded"


class Unavailable(_RetryLater):
    """A stage is down or being replaced: try again later."""

    code = "unavailable"


class RateLimited(_RetryLater):
    """A per-key limit (``rate_limited``) or daily quota (``quota_exceeded``) is used up."""

    def __init__(self, code: str, message: str, retry_after_s: int) -> None:
        super().__init__(message, retry_after_s)
        self.code = code


# codes clients see as they are; any other error is shown as internal_error
PUBLIC_CODES = frozenset({
    "invalid_json", "invalid_image", "invalid_host", "unauthorized", "forbidden", "not_found", "payload_too_large",
    "image_too_large", "no_face", "invalid_parameter", "not_cancellable", "canceled", "rate_limited",
    "quota_exceeded", "overloaded", "unavailable", "storage_unavailable", "timeout",
})


class PublicError(NamedTuple):
    """How an error is shown to a client, in a response, a job record or a renderer row."""

    code: str
    message: str
    field: str | None = None
    retry_after_s: int | None = None


def public_error(error: BaseException) -> PublicError:
    """The one mapping from any exception to what a client may see: a typed error keeps
    its code, message and field; anything unexpected says no more than ``internal_error``."""
    code = getattr(error, "code", None)
    if isinstance(error, InstantIDError) and code in PUBLIC_CODES:
        return PublicError(code, str(error), getattr(error, "field", None), getattr(error, "retry_after_s", None))
    return PublicError("internal_error", "internal error")


class Reported(InstantIDError):
    """An error reported earlier (a job's), raised again with its code."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.field = code, field
