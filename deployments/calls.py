"""Calling another deployment within a deadline, with Ray's errors translated into the
service's typed errors (:mod:`service.errors`) at this one place: a full queue is
:class:`Overloaded`, a dead or missing replica :class:`Unavailable`, a passed deadline
:class:`Timeout`; an error raised by the callee arrives as itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from pipeline.errors import InstantIDError
from service.errors import Overloaded, Timeout, Unavailable


def unwrap(error: BaseException) -> BaseException:
    """The error the callee raised, out of Ray's wrappers."""
    from ray.exceptions import RayTaskError

    while isinstance(error, RayTaskError) and getattr(error, "cause", None) is not None:
        error = error.cause
    return error


def translate(raw: BaseException, what: str, retry_after_s: int) -> BaseException:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    error = unwrap(raw)
    if isinstance(error, InstantIDError):
        return error
    if isinstance(error, BackPressureError):
        return Overloaded("the service is at capacity; retry later", retry_after_s)
    if isinstance(error, (RayActorError, DeploymentUnavailableError)):
        return Unavailable(f"{what} is unavailable; retry later", retry_after_s)
    return error


async def call(response, deadline: float, what: str, *, retry_after_s: int = 5, upstream: tuple = ()):
    """Await a DeploymentResponse (or any awaitable) until ``deadline`` (monotonic clock).
    On timeout or cancellation, it and ``upstream`` are cancelled too."""
    try:
        return await asyncio.wait_for(response, timeout=max(0.001, deadline - time.monotonic()))
    except (asyncio.TimeoutError, asyncio.CancelledError) as stop:
        for pending in (response, *upstream):
            if hasattr(pending, "cancel"):  # a DeploymentResponse (a plain coroutine is closed already)
                pending.cancel()
        if isinstance(stop, asyncio.CancelledError):
            raise
        raise Timeout(f"{what} did not finish in time") from None
    except InstantIDError as error:
        # a callee's typed error, out of Ray's wrapper: the wrapper (also an InstantIDError) would
        # show Ray's traceback, with whatever the frames held, as its message
        raise unwrap(error) from None
    except Exception as raw:
        raise translate(raw, what, retry_after_s) from None


async def stream(response, deadline: float, what: str, *, retry_after_s: int = 5) -> AsyncIterator:
    """Iterate a streaming DeploymentResponse until ``deadline``, like :func:`call`."""
    iterator = response.__aiter__()
    while True:
        try:
            item = await call(iterator.__anext__(), deadline, what, retry_after_s=retry_after_s,
                              upstream=(response,))
        except StopAsyncIteration:
            return
        yield item
