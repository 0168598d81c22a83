"""Request/response captures: what a model-dispatched request sent and got back, kept in a
memory ring for ``GET /api/captures/<id>`` (llama-swap's ``captureBuffer``).

A capture has llama-swap's ``ReqRespCapture`` shape::

    {"id": 12, "req_path": "/v1/chat/completions",
     "req_headers": {"Content-Type": "application/json", "Authorization": "[REDACTED]"},
     "req_body": "<base64>", "resp_headers": {...}, "resp_body": "<base64>"}

The id is the request's activity id (``RequestRecord.id``), so the activity rows, the in-flight
list and the captures name a request alike. Header maps hold the first value of each header under
its canonical name (``Content-Type``); the values of ``Authorization``, ``Proxy-Authorization``,
``Cookie``, ``Set-Cookie`` and ``X-Api-Key`` are replaced by ``[REDACTED]``. Bodies are base64;
a part a route does not keep is ``null``:

* audio and image routes keep less (``CAPTURE_FIELDS_BY_PATH``, llama-swap's masks), every other
  route keeps all four parts;
* a response whose status is not 200 keeps no response body.

Only POST requests to the model routes are captured (``/upstream/<model>/<path>`` too when
``<path>`` is one of them), as llama-swap meters them. Every part is compressed (zlib) as it
arrives, so a streamed answer is never held whole; the ring counts compressed bytes and drops the
oldest captures when a new one does not fit. A capture bigger than the whole ring is not kept.
``captureBuffer: 0`` turns capturing off and empties the ring; the size is read from the current
config at every capture, so a reload applies at once.
"""
from __future__ import annotations

import base64
import collections
import json
import zlib
from typing import Any, Callable, Iterable, Optional

import attr

__all__ = [
    "CAPTURE_FIELDS_BY_PATH", "CaptureBuffer", "CaptureDraft", "REQ_BODY", "REQ_HEADERS", "RESP_BODY",
    "RESP_HEADERS", "REDACTED", "capture_fields_for", "header_map"]

REQ_HEADERS, REQ_BODY, RESP_HEADERS, RESP_BODY = 1, 2, 4, 8
_ALL = REQ_HEADERS | REQ_BODY | RESP_HEADERS | RESP_BODY

#: llama-swap's per-route masks: large audio/image payloads are not kept.
CAPTURE_FIELDS_BY_PATH = {
    "/v1/audio/speech": REQ_HEADERS | REQ_BODY | RESP_HEADERS,
    "/v1/audio/voices": REQ_HEADERS | RESP_HEADERS | RESP_BODY,
    "/v1/audio/transcriptions": REQ_HEADERS | RESP_HEADERS | RESP_BODY,
    "/v1/images/generations": REQ_HEADERS | REQ_BODY | RESP_HEADERS,
    "/v1/images/edits": REQ_HEADERS | RESP_HEADERS,
    "/sdapi/v1/txt2img": REQ_HEADERS | REQ_BODY | RESP_HEADERS,
    "/sdapi/v1/img2img": REQ_HEADERS | RESP_HEADERS,
}

#: header values never kept in clear (captures and the in-flight list)
SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})
REDACTED = "[REDACTED]"
_LEVEL = 1  # fast: every part is compressed on the reactor thread as it arrives


def capture_fields_for(route: str) -> int:
    """The parts kept for ``route`` (a bit mask of ``REQ_HEADERS``, ``REQ_BODY``, ...)."""
    return CAPTURE_FIELDS_BY_PATH.get(route, _ALL)


def canonical_header_name(name: str) -> str:
    """``content-type`` -> ``Content-Type``, as Go (and so llama-swap) spells header names."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def header_map(headers: Any, skip: Iterable[bytes] = (b"host",)) -> dict[str, str]:
    """The first value of every header of a twisted ``Headers``, sensitive ones redacted."""
    skipped = {s.lower() for s in skip}
    out: dict[str, str] = {}
    for name, values in headers.getAllRawHeaders():
        if name.lower() in skipped or not values:
            continue
        key = canonical_header_name(name.decode("latin-1"))
        if key in out:
            continue
        out[key] = REDACTED if key.lower() in SENSITIVE_HEADERS else values[0].decode("latin-1")
    return out


class _Compressed:
    """One body part, compressed as it arrives; ``None`` once it outgrew ``limit``."""

    __slots__ = ("_z", "parts", "size", "limit")

    def __init__(self, limit: int) -> None:
        self._z = zlib.compressobj(_LEVEL)
        self.parts: Optional[list] = []
        self.size = 0
        self.limit = limit

    def feed(self, data: bytes) -> None:
        if self.parts is None or not data:
            return
        out = self._z.compress(data)
        if out:
            self.parts.append(out)
            self.size += len(out)
            if self.size > self.limit:
                self.parts, self._z = None, None  # too big to keep: give up on it

    def close(self) -> Optional[bytes]:
        if self.parts is None:
            return None
        self.parts.append(self._z.flush())
        return b"".join(self.parts)


@attr.s(slots=True, eq=False)
class CaptureDraft:
    """The capture of one request while it runs; ``CaptureBuffer.request_finished`` keeps it.

    :ivar fields: the parts kept (``capture_fields_for`` of the route).
    :ivar too_big: a part outgrew the ring: nothing is kept.
    """

    id: int = attr.ib()
    req_path: str = attr.ib()
    fields: int = attr.ib()
    limit: int = attr.ib()
    req_headers: Optional[dict] = attr.ib(default=None)
    req_body: Optional[bytes] = attr.ib(default=None)  # compressed
    resp_headers: Optional[dict] = attr.ib(default=None)
    _resp: Optional[_Compressed] = attr.ib(default=None)
    too_big: bool = attr.ib(default=False)

    def set_request(self, headers: Any, body: Optional[bytes]) -> None:
        """The client's headers and the body sent upstream (None when not at hand)."""
        if self.fields & REQ_HEADERS:
            self.req_headers = header_map(headers)
        if self.fields & REQ_BODY and body is not None:
            part = _Compressed(self.limit)
            part.feed(body)
            self.req_body = part.close()
            self.too_big = self.too_big or self.req_body is None

    def on_response(self, headers: Any) -> None:
        """The response's headers, as sent to the client (``Content-Encoding`` left out)."""
        if self.fields & RESP_HEADERS:
            self.resp_headers = header_map(headers, skip=(b"content-encoding",))
        if self.fields & RESP_BODY:
            self._resp = _Compressed(self.limit)

    def on_data(self, chunk: bytes) -> None:
        if self._resp is not None:
            self._resp.feed(chunk)

    def finish(self, status: Optional[int]) -> Optional["_Stored"]:
        """The stored form, or None when a part was too big. Not 200: no response body."""
        resp_body = None
        if self._resp is not None:
            resp_body = self._resp.close()
            if resp_body is None:
                self.too_big = True
            if status != 200:
                resp_body = None
        if self.too_big:
            return None
        meta = json.dumps([self.req_path, self.req_headers, self.resp_headers],
                          separators=(",", ":")).encode("utf-8")
        return _Stored(zlib.compress(meta, _LEVEL), self.req_body, resp_body)


@attr.s(slots=True, frozen=True)
class _Stored:
    meta: bytes = attr.ib()
    req_body: Optional[bytes] = attr.ib()
    resp_body: Optional[bytes] = attr.ib()

    @property
    def size(self) -> int:
        return len(self.meta) + len(self.req_body or b"") + len(self.resp_body or b"")


def _b64(data: Optional[bytes]) -> Optional[str]:
    return None if data is None else base64.b64encode(zlib.decompress(data)).decode("ascii")


class CaptureBuffer:
    """The ring of captures, bounded by ``captureBuffer`` megabytes of compressed data.

    :param megabytes: ``() -> int``: the current ``captureBuffer`` (0 turns capturing off).
    """

    def __init__(self, megabytes: Callable[[], int]) -> None:
        self._megabytes = megabytes
        self._items: collections.OrderedDict[int, _Stored] = collections.OrderedDict()
        self.size = 0

    @property
    def limit(self) -> int:
        """The ring's size in bytes (0: off)."""
        return max(0, int(self._megabytes() or 0)) * 1024 * 1024

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def draft(self, request_id: int, req_path: str, route: str) -> Optional[CaptureDraft]:
        """A draft for a request at ``route`` whose upstream path is ``req_path``; None when off."""
        limit = self.limit
        if not limit:
            return None
        return CaptureDraft(request_id, req_path, capture_fields_for(route), limit)

    def request_finished(self, record: Any) -> None:
        """Keep the capture of a finished request (``record.capture``), if it has one."""
        draft = getattr(record, "capture", None)
        if draft is None:
            return
        record.capture = None
        stored = draft.finish(record.status)
        if stored is not None:
            self.add(draft.id, stored)

    def add(self, request_id: int, stored: _Stored) -> bool:
        limit = self.limit
        if stored.size > limit:
            self._trim(limit)
            return False
        old = self._items.pop(request_id, None)
        if old is not None:
            self.size -= old.size
        self._trim(limit - stored.size)
        self._items[request_id] = stored
        self.size += stored.size
        return True

    def _trim(self, room: int) -> None:
        """Drop the oldest captures until at most ``room`` bytes are held."""
        while self._items and self.size > room:
            _, dropped = self._items.popitem(last=False)
            self.size -= dropped.size

    def has(self, request_id: int) -> bool:
        """Whether the capture of ``request_id`` is kept (the activity rows' ``has_capture``)."""
        limit = self.limit
        self._trim(limit)  # a reload may have made the ring smaller (or turned it off)
        return bool(limit) and request_id in self._items

    def get(self, request_id: int) -> Optional[dict]:
        """The capture in llama-swap's JSON shape, or None."""
        if not self.has(request_id):
            return None
        stored = self._items[request_id]
        req_path, req_headers, resp_headers = json.loads(zlib.decompress(stored.meta))
        return {"id": request_id, "req_path": req_path, "req_headers": req_headers,
                "req_body": _b64(stored.req_body), "resp_headers": resp_headers,
                "resp_body": _b64(stored.resp_body)}

    def __len__(self) -> int:
        return len(self._items)
