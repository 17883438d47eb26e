"""Request bodies, bounded before they are parsed: a JSON body may hold at most
:data:`MAX_JSON_VALUES` values (a byte count of its commas and openings, no parse), and is
then parsed in a worker thread, not on the replica's event loop. A body of millions of tiny
values (48 MiB of ``[],``) would otherwise cost seconds of the replica's CPU and gigabytes of
its memory. The API's routes are :class:`BoundedJSONRoute`\\ s."""

import asyncio
import json

from fastapi.routing import APIRoute
from starlette.requests import Request

from service.errors import PayloadTooLarge

# far above any real request (a few photos, a prompt, a few dozen fields) and cheap to parse
MAX_JSON_VALUES = 100_000


def json_values_at_most(body: bytes) -> int:
    """An upper bound of the number of values in a JSON text: one per separator or opening
    (commas in strings count too, which only makes the bound higher)."""
    return body.count(b",") + body.count(b"[") + body.count(b"{") + 1


class OffLoopJSONRequest(Request):
    async def json(self):
        if not hasattr(self, "_parsed"):
            self._parsed = await asyncio.to_thread(json.loads, await self.body())
        return self._parsed


class BoundedJSONRoute(APIRoute):
    """FastAPI's route, with its request's body counted before it is parsed (off the loop)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def bounded_json(request: Request):
            request = OffLoopJSONRequest(request.scope, request.receive)
            body = await request.body()
            if body and json_values_at_most(body) > MAX_JSON_VALUES:
                raise PayloadTooLarge(f"the request body holds more than {MAX_JSON_VALUES} JSON values")
            return await handler(request)

        return bounded_json
