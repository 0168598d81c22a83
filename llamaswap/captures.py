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
``<path>`` is one of them), as llama-swap meters them. A capture is compressed (zlib) in one
piece when its request ends; a response body longer than ``RAW_BODY_MAX`` is compressed as it
arrives instead, so a streamed answer is never held whole. The ring counts compressed bytes and
drops the oldest captures when a new one does not fit. A capture bigger than the whole ring is not kept.
``captureBuffer: 0`` turns capturing off and empties the ring; the size is read from the current
config at every capture, so a reload applies at once.
"""
from __future__ import annotations

import base64
import collections
import json
import zlib
from json.encoder import encode_basestring_ascii as _json_string
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
_LEVEL = 1  # fast: every capture is compressed on the reactor thread
#: a response body is held as it comes up to this size, then compressed as it comes
RAW_BODY_MAX = 16 * 1024
#: finished captures are compressed together once this many bytes of them are held
BLOCK_BYTES = 16 * 1024


def capture_fields_for(route: str) -> int:
    """The parts kept for ``route`` (a bit mask of ``REQ_HEADERS``, ``REQ_BODY``, ...)."""
    return CAPTURE_FIELDS_BY_PATH.get(route, _ALL)


def canonical_header_name(name: str) -> str:
    """``content-type`` -> ``Content-Type``, as Go (and so llama-swap) spells header names."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


#: raw header name -> (canonical name, redacted, lowercase raw name, the canonical name as a
#: JSON string): header maps are made for every captured or in-flight request, from a small
#: set of names
_NAMES: dict[bytes, tuple[str, bool, bytes, str]] = {}
_NAMES_MAX = 4096
_HOST = frozenset({b"host"})
_RESP_SKIP = frozenset({b"content-encoding"})
_REDACTED_JSON = _json_string(REDACTED)


def _name(raw: bytes) -> tuple[str, bool, bytes, str]:
    known = _NAMES.get(raw)
    if known is None:
        key = canonical_header_name(raw.decode("latin-1"))
        known = (key, key.lower() in SENSITIVE_HEADERS, raw.lower(), _json_string(key))
        if len(_NAMES) < _NAMES_MAX:  # bounded: names come from clients
            _NAMES[raw] = known
    return known


def header_map(headers: Any, skip: Iterable[bytes] = _HOST) -> dict[str, str]:
    """The first value of every header of a twisted ``Headers``, sensitive ones redacted."""
    skipped = skip if type(skip) is frozenset else frozenset(s.lower() for s in skip)  # ours: lowercase
    out: dict[str, str] = {}
    for name, values in headers.getAllRawHeaders():
        if not values:
            continue
        key, sensitive, lower, _ = _name(name)
        if key in out or lower in skipped:
            continue
        out[key] = REDACTED if sensitive else values[0].decode("latin-1")
    return out


def header_json(headers: Any, skip: Iterable[bytes] = _HOST) -> str:
    """``header_map`` as compact JSON (what ``json.dumps(header_map(...), separators=(",", ":"))``
    gives), written directly: a capture keeps its headers as JSON text."""
    skipped = skip if type(skip) is frozenset else frozenset(s.lower() for s in skip)  # ours: lowercase
    seen: set[str] = set()
    items: list[str] = []
    for name, values in headers.getAllRawHeaders():
        if not values:
            continue
        key, sensitive, lower, key_json = _name(name)
        if key in seen or lower in skipped:
            continue
        seen.add(key)
        items.append(key_json + ":" + (_REDACTED_JSON if sensitive else _json_string(values[0].decode("latin-1"))))
    return "{" + ",".join(items) + "}"


class _Segments:
    """One long-lived raw-deflate compressor: each ``pack`` is a segment that decompresses on its
    own (a full flush ends it and resets the dictionary), so a pack costs no compressor setup."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)

    def pack(self, data: bytes) -> bytes:
        try:
            return self._z.compress(data) + self._z.flush(zlib.Z_FULL_FLUSH)
        except BaseException:
            self._z = zlib.compressobj(_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)  # never a half segment
            raise


def _unpack(segment: bytes) -> bytes:
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(segment)


class _Body:
    """A response body as it is relayed: held as it comes up to ``RAW_BODY_MAX``, then compressed
    as it comes (a long stream is never held whole); ``too_big`` once the compressed part outgrew
    ``limit`` (it is then given up)."""

    __slots__ = ("raw", "raw_size", "_z", "parts", "size", "limit", "too_big")

    def __init__(self, limit: int) -> None:
        self.raw: list[bytes] = []
        self.raw_size = 0
        self._z: Any = None
        self.parts: list[bytes] = []  # the zlib stream so far, once compressing
        self.size = 0
        self.limit = limit
        self.too_big = False

    def feed(self, data: bytes) -> None:
        if self.too_big or not data:
            return
        if self._z is None:
            self.raw.append(data)
            self.raw_size += len(data)
            if self.raw_size <= RAW_BODY_MAX:
                return
            # a small window: one per long response in flight (~24 KiB, not ~256), and an event
            # stream repeats itself within a few hundred bytes
            self._z = zlib.compressobj(_LEVEL, zlib.DEFLATED, 12, 4)
            data, self.raw, self.raw_size = b"".join(self.raw), [], 0
        out = self._z.compress(data)
        if out:
            self.parts.append(out)
            self.size += len(out)
            if self.size > self.limit:
                self.too_big, self.parts, self._z = True, [], None  # too big to keep: give up on it

    @property
    def compressed(self) -> bool:
        return self._z is not None

    def close(self) -> bytes:
        """The raw body, or (``compressed``) its zlib stream."""
        if self._z is None:
            return b"".join(self.raw)
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
    req_headers: Optional[str] = attr.ib(default=None)  # as JSON (``header_json``)
    req_body: Optional[bytes] = attr.ib(default=None)  # as sent: compressed with the rest at the end
    resp_headers: Optional[str] = attr.ib(default=None)  # as JSON
    _resp: Optional[_Body] = attr.ib(default=None)
    too_big: bool = attr.ib(default=False)

    def set_request(self, headers: Any, body: Optional[bytes]) -> None:
        """The client's headers and the body sent upstream (None when not at hand)."""
        if self.fields & REQ_HEADERS:
            self.req_headers = header_json(headers)
        if self.fields & REQ_BODY and body is not None:
            self.req_body = body

    def on_response(self, headers: Any) -> None:
        """The response's headers, as sent to the client (``Content-Encoding`` left out)."""
        if self.fields & RESP_HEADERS:
            self.resp_headers = header_json(headers, skip=_RESP_SKIP)
        if self.fields & RESP_BODY:
            self._resp = _Body(self.limit)

    def on_data(self, chunk: bytes) -> None:
        if self._resp is not None:
            self._resp.feed(chunk)

    def finish(self, status: Optional[int]) -> Optional["_Stored"]:
        """The stored form (not compressed yet, but a response body long enough to be compressed
        as it came), or None when a part was too big. Not 200: no response body."""
        resp = self._resp
        if resp is not None and resp.too_big:
            self.too_big = True
        if self.too_big:
            return None
        # [path, request headers, response headers] as JSON, the header maps already JSON text
        meta = ("[" + _json_string(self.req_path) + "," + (self.req_headers or "null") + ","
                + (self.resp_headers or "null") + "]").encode("utf-8")
        req = self.req_body
        resp_raw, resp_stream = None, None
        if resp is not None and status == 200:
            body = resp.close()
            if resp.compressed:
                resp_stream = body
            else:
                resp_raw = body
        lengths = (len(meta), -1 if req is None else len(req), -1 if resp_raw is None else len(resp_raw))
        return _Stored(b"".join((meta, req or b"", resp_raw or b"")), lengths, resp_stream)


class _Block:
    """Captures compressed together: one segment of ``_Segments``, and how many of its captures
    the ring still keeps (its bytes are freed with the last one)."""

    __slots__ = ("data", "live")

    def __init__(self, data: bytes, live: int) -> None:
        self.data, self.live = data, live


class _Stored:
    """A kept capture: the metadata, the request body and a response body not compressed as it
    came, one after another (``lengths``: theirs, -1 for a part not kept). They are ``raw`` until
    the ring compresses them, then at ``offset`` in the uncompressed ``block``. A response body
    compressed as it came is its own zlib stream, ``resp_stream``."""

    __slots__ = ("raw", "block", "offset", "lengths", "resp_stream")

    def __init__(self, raw: bytes, lengths: tuple[int, int, int], resp_stream: Optional[bytes] = None) -> None:
        self.raw: Optional[bytes] = raw
        self.block: Optional[_Block] = None
        self.offset = 0
        self.lengths = lengths
        self.resp_stream = resp_stream

    @property
    def size(self) -> int:
        """The bytes it holds by itself (a block's bytes are counted with the block)."""
        return len(self.raw or b"") + len(self.resp_stream or b"")

    @property
    def span(self) -> int:
        n_meta, n_req, n_resp = self.lengths
        return n_meta + max(n_req, 0) + max(n_resp, 0)

    def parts(self) -> tuple[Any, Optional[bytes], Optional[bytes]]:
        """(path, request headers, response headers), the request body, the response body."""
        if self.raw is not None:
            data, at = self.raw, 0
        else:
            data, at = _unpack(self.block.data), self.offset
        n_meta, n_req, n_resp = self.lengths
        meta = json.loads(data[at:at + n_meta])
        at += n_meta
        req = data[at:at + n_req] if n_req >= 0 else None
        at += max(n_req, 0)
        resp = data[at:at + n_resp] if n_resp >= 0 else None
        if self.resp_stream is not None:
            resp = zlib.decompress(self.resp_stream)
        return meta, req, resp


def _b64(data: Optional[bytes]) -> Optional[str]:
    return None if data is None else base64.b64encode(data).decode("ascii")


class CaptureBuffer:
    """The ring of captures, bounded by ``captureBuffer`` megabytes of stored (compressed) data.

    Captures are compressed in blocks: a finished capture is held as it is until those held so
    reach ``BLOCK_BYTES``, then they are compressed together (one capture of that size or more
    alone, at once). Compressing many small captures in one go costs a fraction of compressing
    each (they share their headers and most of their shape, and the setup is paid once), and
    they take far less room. Every held byte counts: raw bytes while raw, a block's compressed
    bytes until the last of its captures is dropped.

    :param megabytes: ``() -> int``: the current ``captureBuffer`` (0 turns capturing off).
    """

    def __init__(self, megabytes: Callable[[], int]) -> None:
        self._megabytes = megabytes
        self._items: collections.OrderedDict[int, _Stored] = collections.OrderedDict()
        self.size = 0
        self._segments = _Segments()
        self._raw: list[tuple[int, _Stored]] = []  # captures not compressed yet, oldest first
        self._raw_bytes = 0

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
        if stored.raw is not None and len(stored.raw) >= BLOCK_BYTES:
            self._compress([(request_id, stored)])  # big enough to be a block of its own
        size = stored.size + (len(stored.block.data) if stored.block is not None else 0)
        if size > limit:
            self._trim(limit)
            return False
        old = self._items.pop(request_id, None)
        if old is not None:
            self._forget(old)
        self._trim(limit - size)
        self._items[request_id] = stored
        self.size += size
        if stored.raw is not None:
            self._raw.append((request_id, stored))
            self._raw_bytes += len(stored.raw)
            if self._raw_bytes >= BLOCK_BYTES:
                self._compress_held()
        return True

    def _compress(self, captures: list[tuple[int, _Stored]]) -> _Block:
        """Compress the raw part of ``captures`` into one block (sizes left to the caller)."""
        block = _Block(self._segments.pack(b"".join(s.raw for _, s in captures)), len(captures))
        offset = 0
        for _, stored in captures:
            stored.raw, stored.block, stored.offset = None, block, offset
            offset += stored.span
        return block

    def _compress_held(self) -> None:
        held = [(i, s) for i, s in self._raw if self._items.get(i) is s]  # not dropped meanwhile
        self._raw, self._raw_bytes = [], 0
        if not held:
            return
        raw = sum(len(s.raw) for _, s in held)
        block = self._compress(held)
        self.size += len(block.data) - raw
        self._trim(self.limit)  # incompressible data can come out a few bytes longer

    def _forget(self, stored: _Stored) -> None:
        """``stored`` left the ring: its bytes, and its block's once the block is empty."""
        self.size -= stored.size
        block = stored.block
        if block is not None:
            block.live -= 1
            if block.live == 0:
                self.size -= len(block.data)

    def _trim(self, room: int) -> None:
        """Drop the oldest captures until at most ``room`` bytes are held."""
        while self._items and self.size > room:
            _, dropped = self._items.popitem(last=False)
            self._forget(dropped)
        if not self._items:
            self._raw, self._raw_bytes = [], 0

    def has(self, request_id: int) -> bool:
        """Whether the capture of ``request_id`` is kept (the activity rows' ``has_capture``)."""
        limit = self.limit
        self._trim(limit)  # a reload may have made the ring smaller (or turned it off)
        return bool(limit) and request_id in self._items

    def get(self, request_id: int) -> Optional[dict]:
        """The capture in llama-swap's JSON shape, or None."""
        if not self.has(request_id):
            return None
        (req_path, req_headers, resp_headers), req_body, resp_body = self._items[request_id].parts()
        return {"id": request_id, "req_path": req_path, "req_headers": req_headers,
                "req_body": _b64(req_body), "resp_headers": resp_headers, "resp_body": _b64(resp_body)}

    def __len__(self) -> int:
        return len(self._items)
