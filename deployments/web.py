"""What the ingress serves besides the API: the web page (``/``, ``/static/...``, files
from this package only, with a strict Content-Security-Policy) and, for a local store,
the stored files behind signed, expiring links (``/v1/files/...``)."""


import asyncio
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from service.errors import Forbidden, NotFound
from pipeline.errors import InvalidParameter
from service.storage import LocalStorage, ObjectNotFound
from service.store import content_type_of

WEB = Path(__file__).resolve().parent / "web"
PAGE_HEADERS = {
    # everything the page needs comes from here; images may come from the object store
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src * data: blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

# a stored image is private to its owner: no cache keeps it, no browser guesses its type
FILE_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

router = APIRouter(include_in_schema=False)


class PageFiles(StaticFiles):
    """The page's scripts and styles, with the page's headers."""

    async def get_response(self, path: str, scope):
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


@router.get("/")
async def page() -> Response:
    return Response((WEB / "index.html").read_bytes(), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/v1/files/{key:path}")
async def stored_file(key: str, request: Request, expires: int = 0, signature: str = "") -> Response:
    storage = request.app.state.storage
    if not isinstance(storage, LocalStorage):
        raise NotFound("files are served by the object store")
    if not storage.verify(key, expires, signature):
        raise Forbidden("the link is invalid or has expired")
    try:
        data = await asyncio.to_thread(storage.get, key)
    except (ObjectNotFound, InvalidParameter):
        raise NotFound("no such file") from None
    return Response(data, media_type=content_type_of(key), headers=FILE_HEADERS)


def mount(app) -> None:
    app.include_router(router)
    app.mount("/static", PageFiles(directory=WEB, html=False), name="static")
