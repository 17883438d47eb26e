"""Request bodies, bounded before they are parsed and not kept once they are: a JSON body may
hold at most :data:`MAX_JSON_VALUES` values (a byte count of its commas and openings, no
parse), is then parsed in a worker thread, not on the replica's event loop, and its raw bytes
are let go as soon as it is parsed. A body of millions of tiny values (48 MiB of ``[],``)
would otherwise cost seconds of the replica's CPU and gigabytes of its memory, and a request
that waits minutes for its render would hold its raw body as long. The API's routes are
:class:`BoundedJSONRoute`\\ s."""

import asyncio
import email.message
import json

from fastapi.routing import APIRoute
from starlette.requests import Request

from service.errors import PayloadTooLarge

# far above any real request (a few photos, a prompt, a few dozen fields) and cheap to parse
MAX_JSON_VALUES = 100_000
# what a parsed request answers for its raw body: FastAPI reads a body only when there is one
PARSED = b"{}"


def json_values_at_most(body: bytes) -> int:
    """An upper bound of the number of values in a JSON text: one per separator or opening
    (commas in strings count too, which only makes the bound higher)."""
    return body.count(b",") + body.count(b"[") + body.count(b"{") + 1


def is_json(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of this content type as JSON (with its default strict
    content types, a body without a type is not)."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


class OffLoopJSONRequest(Request):
    """A request whose JSON is parsed in a worker thread. Once :meth:`parse` succeeded it
    holds the parsed value only: its raw body is dropped."""

    async def parse(self) -> None:
        body = await self.body()
        if not body:
            return
        if json_values_at_most(body) > MAX_JSON_VALUES:
            raise PayloadTooLarge(f"the request body holds more than {MAX_JSON_VALUES} JSON values")
        if not is_json(self.headers.get("content-type")):
            return
        try:
            self._parsed = await asyncio.to_thread(json.loads, body)
        except (ValueError, RecursionError):
            return  # FastAPI parses it again and answers its own error
        self._body = PARSED

    async def json(self):
        if not hasattr(self, "_parsed"):
            self._parsed = await asyncio.to_thread(json.loads, await self.body())
        return self._parsed


class BoundedJSONRoute(APIRoute):
    """FastAPI's route, with its request's body counted before it is parsed (off the loop),
    and not kept after."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def bounded_json(request: Request):
            # a request of our own: the caller's keeps no copy of the body
            request = OffLoopJSONRequest(request.scope, request.receive)
            await request.parse()
            return await handler(request)

        return bounded_json
