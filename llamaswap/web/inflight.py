"""Requests in flight: ``GET /api/inflight`` lists them, ``POST /api/inflight/<id>/cancel`` ends one.

A model-dispatched request is in flight from the moment its model is known until its response
ends, whether it waits for a model, loads it or streams the answer. Its id is the request's
activity id (``RequestRecord.id``), the id of its activity row and of its capture.

``GET /api/inflight`` answers llama-swap's in-flight snapshot (the ``inflight`` message of its
event stream)::

    {"operation": "snapshot", "requests": [
      {"id": "7", "timestamp": "2026-08-22T09:29:57.25Z", "model": "qwen", "req_path": "/v1/chat/completions",
       "method": "POST", "req_headers": {"Content-Type": "application/json", "Authorization": "[REDACTED]"},
       "remote_ip": "127.0.0.1", "resp_headers": {}, "resp_bytes": 0, "elapsed_ms": 1250, "session_id": ""}]}

oldest first. ``session_id`` (llamaswap's addition: llama-swap's UI works it out itself) is the
value of the first ``ui.activity.session_id`` header the request carried, or ``""``.

A cancel answers ``{"msg": "ok"}`` (404 for an id not in flight) and ends the request as the
client leaving would: a request still waiting for its model leaves the queue, an upstream request
is aborted (so the server stops generating), and its concurrency slot and scheduler admission are
freed, so the next queued request goes on. The client is told:

* before any response byte: **502** ``request_cancelled``, llama-swap's status for it;
* in an event stream (the upstream's, or the loading-state one): an SSE error event with code
  ``request_cancelled``, then the stream ends without ``[DONE]``, as llama-swap's stream ends;
* in the middle of any other body: the connection is aborted (an incomplete response).
"""
from __future__ import annotations

import datetime
import json
from typing import Any, Callable, Optional

import attr
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET, Request

from llamaswap.captures import header_map
from llamaswap.errors import LlamaSwapError, MethodNotAllowed, NotFound, error_body
from llamaswap.proxy import client_ip
from llamaswap.web.render import JSON_TYPE, AppResource, write_error, write_json

__all__ = ["InflightEntry", "InflightPage", "InflightRequests", "RequestCancelled", "routes", "run_tracked"]

#: llama-swap's pace of ``upsert`` updates while a response's bytes are relayed: at most one per
#: request this often.
UPDATE_INTERVAL = 0.25


class RequestCancelled(LlamaSwapError):
    """The request was cancelled through ``POST /api/inflight/<id>/cancel``."""

    status, kind, code = 502, "server_error", "request_cancelled"


def rfc3339(seconds: float) -> str:
    """``2026-08-22T09:29:57.25Z``: Go's RFC3339Nano (trailing zeros of the fraction dropped), UTC."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += ("." + f"{moment.microsecond:06d}").rstrip("0")
    return text + "Z"


def session_id(headers: Headers, names: tuple) -> str:
    """The first non-empty value of the ``ui.activity.session_id`` headers, in their order."""
    for name in names:
        for value in headers.getRawHeaders(name.encode("latin-1"), []):
            if value:
                return value.decode("latin-1")
    return ""


@attr.s(slots=True, eq=False)
class InflightEntry:
    """One request in flight.

    :ivar work: the Deferred of the request's dispatching; cancelling it ends the request.
    :ivar cancelled: a cancel was asked for (the client is to be told, see the module docstring).
    :ivar tail: the last bytes of the upstream body relayed so far (an SSE error event must start
        on a line of its own).
    """

    id: int = attr.ib()
    started: float = attr.ib()
    model: str = attr.ib()
    path: str = attr.ib()
    method: str = attr.ib()
    #: the twisted.web request: its headers, client and response headers are read only when the
    #: entry is shown (``as_json``), which most requests never are
    request: Any = attr.ib(repr=False)
    session_headers: tuple = attr.ib(default=(), repr=False)
    resp_bytes: int = attr.ib(default=0)
    headers_relayed: bool = attr.ib(default=False)
    tail: bytes = attr.ib(default=b"")
    work: Optional[Deferred] = attr.ib(default=None)
    cancelled: bool = attr.ib(default=False)
    #: ``InflightRequests``'s hook for relayed bytes (the paced ``upsert``), set by ``begin``
    progress: Optional[Callable[["InflightEntry"], None]] = attr.ib(default=None, repr=False)
    last_emitted: float = attr.ib(default=0.0, repr=False)
    progress_call: Any = attr.ib(default=None, repr=False)

    @property
    def req_headers(self) -> dict:
        return header_map(self.request.requestHeaders)

    @property
    def resp_headers(self) -> dict:
        """The response's headers as sent to the client, once they were relayed."""
        return header_map(self.request.responseHeaders, skip=()) if self.headers_relayed else {}

    @property
    def remote_ip(self) -> str:
        return _remote_ip(self.request)

    @property
    def session_id(self) -> str:
        return session_id(self.request.requestHeaders, self.session_headers)

    def on_response(self, headers: Headers) -> None:
        """The response's status and headers were relayed (``headers``: as sent to the client,
        the request's ``responseHeaders``)."""
        self.headers_relayed = True

    def on_data(self, chunk: bytes) -> None:
        self.resp_bytes += len(chunk)
        self.tail = chunk[-4:] if len(chunk) >= 4 else (self.tail + chunk)[-4:]
        if self.progress is not None and chunk:
            self.progress(self)

    def cancel(self) -> None:
        self.cancelled = True
        if self.work is not None:
            self.work.cancel()

    def as_json(self, now: float) -> dict:
        return {"id": str(self.id), "timestamp": rfc3339(self.started), "model": self.model,
                "req_path": self.path, "method": self.method, "req_headers": self.req_headers,
                "remote_ip": self.remote_ip, "resp_headers": self.resp_headers,
                "resp_bytes": self.resp_bytes, "elapsed_ms": max(0, int((now - self.started) * 1000)),
                "session_id": self.session_id}


class InflightRequests:
    """The requests in flight, by id.

    :param clock: ``IReactorTime``: elapsed times come from it.
    :ivar observers: each called with llama-swap's update message (``{"operation": "upsert",
        "request": {...}}`` or ``{"operation": "remove", "id": "7"}``) when a request enters the
        list, gets its response headers, relays more bytes (at most once per ``UPDATE_INTERVAL``),
        or leaves it.
    """

    def __init__(self, clock: Any, log: Optional[Logger] = None) -> None:
        self.clock = clock
        self.log = log or Logger(namespace="llamaswap.http")
        self._entries: dict[int, InflightEntry] = {}
        self.observers: list[Callable[[dict], None]] = []

    def begin(self, request: Request, record: Any, path: str, session_headers: tuple = ()) -> InflightEntry:
        """``request`` (whose record is ``record``) is in flight; its upstream path is ``path``."""
        entry = InflightEntry(
            id=record.id, started=record.started, model=record.model, path=path,
            method=request.method.decode("latin-1"), request=request, session_headers=session_headers)
        self._entries[entry.id] = entry
        entry.last_emitted, entry.progress = self.clock.seconds(), self._progress
        self._upsert(entry)
        return entry

    def responded(self, entry: InflightEntry, headers: Headers) -> None:
        entry.on_response(headers)
        if self._entries.get(entry.id) is entry:
            entry.last_emitted = self.clock.seconds()
            self._upsert(entry)

    def _progress(self, entry: InflightEntry) -> None:
        """More bytes relayed: an ``upsert`` now when the last update is ``UPDATE_INTERVAL`` old,
        else one when it is (llama-swap's pace); nothing while nobody observes."""
        if not self.observers or entry.progress_call is not None or self._entries.get(entry.id) is not entry:
            return
        wait = entry.last_emitted + UPDATE_INTERVAL - self.clock.seconds()
        if wait > 0:
            entry.progress_call = self.clock.callLater(wait, self._paced_upsert, entry)
            return
        self._paced_upsert(entry)

    def _paced_upsert(self, entry: InflightEntry) -> None:
        entry.progress_call = None
        if self._entries.get(entry.id) is entry:
            entry.last_emitted = self.clock.seconds()
            self._upsert(entry)

    def end(self, entry: InflightEntry) -> None:
        if entry.progress_call is not None and entry.progress_call.active():
            entry.progress_call.cancel()
        if self._entries.get(entry.id) is entry:
            del self._entries[entry.id]
            if self.observers:
                self._notify({"operation": "remove", "id": str(entry.id)})

    def get(self, request_id: int) -> Optional[InflightEntry]:
        return self._entries.get(request_id)

    def cancel(self, request_id: int) -> bool:
        """Cancel the request in flight with this id; False when there is none."""
        entry = self._entries.get(request_id)
        if entry is None:
            return False
        entry.cancel()
        return True

    def snapshot(self) -> dict:
        now = self.clock.seconds()
        entries = sorted(self._entries.values(), key=lambda e: (e.started, e.id))
        return {"operation": "snapshot", "requests": [e.as_json(now) for e in entries]}

    def __len__(self) -> int:
        return len(self._entries)

    def _upsert(self, entry: InflightEntry) -> None:
        if self.observers:  # the message is built only for someone
            self._notify({"operation": "upsert", "request": entry.as_json(self.clock.seconds())})

    def _notify(self, update: dict) -> None:
        for observer in list(self.observers):
            try:
                observer(update)
            except Exception:  # a broken observer must not break a request
                self.log.failure("in-flight observer failed")


def _remote_ip(request: Request) -> str:
    """The client, as llama-swap's access log names it: X-Forwarded-For's first, X-Real-IP, peer."""
    headers = request.requestHeaders
    forwarded = headers.getRawHeaders(b"x-forwarded-for")
    if forwarded:
        return forwarded[0].split(b",")[0].strip().decode("latin-1")
    real = headers.getRawHeaders(b"x-real-ip")
    if real:
        return real[0].strip().decode("latin-1")
    return client_ip(request)


async def run_tracked(inflight: InflightRequests, request: Request, record: Any, path: str,
                      work: Callable[[InflightEntry], Any], session_headers: tuple = ()) -> None:
    """Run ``work(entry)`` (a coroutine function) with the request listed as in flight.

    A cancel through the API cancels the work; the client then gets what the module docstring
    says. The client leaving cancels it too, and nothing is written.
    """
    entry = inflight.begin(request, record, path, session_headers)
    d = ensureDeferred(work(entry))
    entry.work = d
    try:
        await d
    except CancelledError:
        if not entry.cancelled or request.client_gone:
            raise
        answer_cancelled(request, record, entry)
    finally:
        inflight.end(entry)


def answer_cancelled(request: Request, record: Any, entry: InflightEntry) -> None:
    """Tell the client its request was cancelled (see the module docstring)."""
    message = f"request {entry.id} was cancelled (POST /api/inflight/{entry.id}/cancel)"
    record.stream_error = "cancelled"
    if request.finished or request.client_gone:
        return
    ctype = (request.responseHeaders.getRawHeaders(b"content-type") or [b""])[0].lower()
    sse = ctype.startswith(b"text/event-stream") and (request.startedWriting or entry.headers_relayed)
    if sse:
        tail = entry.tail
        prefix = b"" if not tail or tail.endswith(b"\n\n") or tail.endswith(b"\r\n\r\n") else b"\n\n"
        request.write(prefix + b"data: " + error_body(RequestCancelled.kind, RequestCancelled.code, message)
                      + b"\n\n")
        request.finish()
    elif request.startedWriting:
        request.channel.transport.abortConnection()  # half a body: only an abort is honest
    else:
        request.responseHeaders = Headers()  # the upstream's headers, if any, were never sent
        write_error(request, RequestCancelled(message))


class InflightPage(AppResource):
    """``GET /api/inflight`` and ``POST /api/inflight/<id>/cancel``."""

    def render(self, request: Request):
        rest = request.postpath
        if rest and rest[-1] == b"":
            rest = rest[:-1]
        if not rest:
            return super().render(request)  # GET: the list; anything else: 405
        if len(rest) != 2 or rest[1] != b"cancel":
            write_error(request, NotFound(f"not found: {request.path.decode('latin-1')}"))
            return NOT_DONE_YET
        if request.method != b"POST":
            write_error(request, MethodNotAllowed(["OPTIONS", "POST"]))
            return NOT_DONE_YET
        return self._cancel(request, rest[0])

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", JSON_TYPE)
        return json.dumps(self.app.inflight.snapshot(), ensure_ascii=False,
                          separators=(",", ":")).encode("utf-8")

    def _cancel(self, request: Request, raw_id: bytes):
        try:
            request_id = int(raw_id.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            request_id = None
        if request_id is None or not self.app.inflight.cancel(request_id):
            write_error(request, NotFound("inflight request not found"))
            return NOT_DONE_YET
        write_json(request, 200, {"msg": "ok"})
        return NOT_DONE_YET


def routes(app: Any) -> dict:
    """This module's entries of the route table (``llamaswap.web.tree.routes``)."""
    from llamaswap.web.captures import CapturePage

    return {"/api/inflight": InflightPage(app), "/api/captures": CapturePage(app)}
