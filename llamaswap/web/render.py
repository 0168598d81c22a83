"""Writing JSON answers and running async renders.

Every error llamaswap generates goes out through ``write_error`` as one OpenAI-shaped JSON
envelope; twisted.web's HTML error pages never reach a client.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Optional
from urllib.parse import unquote

from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from llamaswap.errors import LlamaSwapError, MethodNotAllowed, ModelNotFound, NotFound, to_openai_error

JSON_TYPE = b"application/json"
TEXT_TYPE = b"text/plain; charset=utf-8"


def write_json(request: Request, status: int, payload: Any, headers: Optional[dict] = None) -> None:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    _write(request, status, JSON_TYPE, body, headers)


def write_text(request: Request, status: int, text: str, headers: Optional[dict] = None) -> None:
    _write(request, status, TEXT_TYPE, text.encode("utf-8"), headers)


def _write(request: Request, status: int, ctype: bytes, body: bytes, headers: Optional[dict]) -> None:
    if request.client_gone or request.finished:
        return
    request.setResponseCode(status)
    request.setHeader(b"content-type", ctype)
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def write_error(request: Request, exc: BaseException, log: Optional[Logger] = None,
                failure: Optional[Failure] = None) -> None:
    """One JSON envelope for every error llamaswap generates; an abort once headers are out."""
    if request.client_gone or request.finished:
        return
    if not isinstance(exc, LlamaSwapError) and log is not None:
        log.failure("internal error on {path}", failure, path=request.path.decode("latin-1"))
    if request.startedWriting:
        request.channel.transport.abortConnection()  # headers are out: only abort is honest
        return
    status, headers, body = to_openai_error(exc)
    if request.requestHeaders.hasHeader(b"origin"):
        headers[b"Access-Control-Allow-Origin"] = b"*"
    request.responseHeaders.removeHeader(b"content-length")
    _write(request, status, JSON_TYPE, body, headers)


def not_found(request: Request) -> NotFound:
    return NotFound(f"not found: {request.path.decode('latin-1')}")


def async_render(method):
    """Run an async ``render_*``; cancel it when the client leaves; map errors to JSON."""

    @functools.wraps(method)
    def render(self, request: Request):
        d = ensureDeferred(method(self, request))
        request.cancel_when_gone(d)
        d.addCallbacks(_rendered, _render_failed, callbackArgs=(request,),
                       errbackArgs=(request, getattr(self, "log", None) or self.app.log))
        return NOT_DONE_YET

    return render


def _rendered(_: object, request: Request) -> None:
    if not request.client_gone and not request.finished:
        request.finish()


def _render_failed(f: Failure, request: Request, log: Logger) -> None:
    if f.check(CancelledError) or request.client_gone:
        return
    write_error(request, f.value, log, f)


class ErrorResource(Resource):
    """Answers every request with one error."""

    isLeaf = True

    def __init__(self, error: LlamaSwapError) -> None:
        super().__init__()
        self.error = error

    def render(self, request: Request):
        write_error(request, self.error)
        return NOT_DONE_YET


class NotFoundResource(Resource):
    """A JSON 404 naming the request's path."""

    isLeaf = True

    def render(self, request: Request):
        write_error(request, not_found(request))
        return NOT_DONE_YET


#: the one JSON 404 every unknown path gets
NOT_FOUND = NotFoundResource()


class JSONResource(Resource):
    """A resource whose 404/405 are JSON instead of twisted.web's HTML pages."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NOT_FOUND

    def render(self, request: Request):
        if request.method == b"HEAD":
            # twisted's base render_HEAD calls render_GET, which POST-only resources lack
            handler = getattr(self, "render_GET", None)
        else:
            handler = getattr(self, "render_" + request.method.decode("ascii", "replace"), None)
        if handler is None:
            allowed = sorted(m[len("render_"):] for m in dir(self) if m.startswith("render_")
                             and m != "render_HEAD")
            write_error(request, MethodNotAllowed(allowed + ["OPTIONS"]))
            return NOT_DONE_YET
        return handler(request)


class AppResource(JSONResource):
    """A JSON resource that works on the ``WebContext``; it answers every path below its own."""

    isLeaf = True

    def __init__(self, app: Any) -> None:
        super().__init__()
        self.app = app
        self.log = app.log

    def model_from_path(self, request: Request, prefix: bytes) -> str:
        """The model id (or alias, which may contain '/') after ``prefix``; ModelNotFound."""
        rest = request.path[len(prefix):].strip(b"/")
        name = unquote(rest.decode("latin-1"), encoding="utf-8", errors="replace")
        model_id = self.app.config.resolve(name) if name else None
        if model_id is None:
            raise ModelNotFound.named(name, self.app.config)
        return model_id


class Redirect(Resource):
    """An empty-bodied redirect to a fixed location."""

    isLeaf = True

    def __init__(self, location: bytes, code: int) -> None:
        super().__init__()
        self.location, self.code = location, code

    def render(self, request: Request) -> bytes:
        request.setResponseCode(self.code)
        request.setHeader(b"location", self.location)
        request.setHeader(b"content-type", TEXT_TYPE)
        return b""
