"""Forwarding one request to an upstream and relaying its response (PROXY-*).

One client per child lifetime (a fresh pool each time, so a connection is never reused
across children, PROXY-10), configured for a proxy: no redirects followed, no cookies kept,
unbuffered responses streamed back chunk by chunk with back-pressure. ``Accept-Encoding: gzip``
is sent and a gzip body decoded: what was decoded loses ``Content-Encoding``/``Content-Length``
(PROXY-4), as treq does.

The client is treq's ``HTTPClient`` (health checks and other callers use it as such), with a
short path for forwarded requests (``ProxyHTTPClient.forward_request``) that uses Twisted's
HTTP/1.1 client without the work a proxy does not need per request: the upstream URL is parsed
once per URL (no hyperlink/IDNA per request), the request head is encoded in one pass over the
headers and written with a bytes body in one write (at once, on an idle kept-alive connection),
a ``chunked`` body is decoded one read at a time (one write to the client per read, however many
upstream chunks it held), and Twisted's pause of the connection until the body has a reader is
skipped when the relay reads it at once.

Size (~1000 lines): the one send with its retry loop, the one relay, the client's short path and
the body producers share this module's private helpers, so that there is exactly one forwarding
path to read.
"""
from __future__ import annotations

import os
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, BinaryIO, Callable, Optional

import attr
import treq.client
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from hyperlink import EncodedURL
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.web.client import (
    URI, Agent, BrowserLikePolicyForHTTPS, ContentDecoderAgent, GzipDecoder, HTTPConnectionPool,
    _HTTP11ClientFactory, _StandardEndpointFactory, PotentialDataLoss, RequestNotSent,
    RequestTransmissionFailed, ResponseDone, ResponseNeverReceived)
from twisted.web._newclient import HTTP11ClientProtocol, Request, _ensureValidMethod, _ensureValidURI
from twisted.web.http import _ChunkedTransferDecoder, _MalformedChunkedDataError, maxChunkSizeLineLength
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from llamaswap import tls
from llamaswap.errors import LlamaSwapError, UpstreamUnreachable, error_body
from llamaswap.wire import write_now

log = Logger(namespace="llamaswap.proxy")


class UpstreamTimeout(LlamaSwapError):
    """No response headers within the model's (or peer's) ``timeouts.responseHeader``."""

    status, kind, code = 504, "server_error", "upstream_timeout"


class ResponseHeaderTimeout(Exception):
    """The transport-level failure behind ``UpstreamTimeout``: ``seconds`` passed without headers."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no response headers within {seconds:g} s")
        self.seconds = seconds


#: PROXY-8: connect timeout until a model's ``timeouts.connect`` applies; no response timeout
#: unless ``timeouts.responseHeader`` asks for one (long generations are legitimate).
CONNECT_TIMEOUT = 10
#: ``timeouts.idleConn: 0`` (no limit): idle connections are kept this long (a day)
IDLE_FOREVER = 86400.0
#: PROXY-2: hop-by-hop headers never cross the proxy.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authorization", b"proxy-authenticate", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection"})
_READ_SIZE = 64 * 1024


@implementer(IBodyProducer)
class BytesProducer:
    """A fixed-length body from bytes, written at once (no global Cooperator)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IBodyProducer)
class FileSliceProducer:
    """A fixed-length body read from slices of a (spooled) file, chunk by chunk.

    ``parts`` is a list of ``bytes`` or ``(offset, length)`` slices of ``fileobj``, so a
    multipart body whose ``model`` field is rewritten is sent without copying it
    (RT-9). Writes happen on the injected clock, one chunk per turn, so a large upload
    never blocks the reactor; a paused transport pauses reading.
    """

    def __init__(self, fileobj: BinaryIO, parts: list, clock: Any) -> None:
        self._file = fileobj
        self._parts = list(parts)
        self._clock = clock
        self.length = sum(len(p) if isinstance(p, bytes) else p[1] for p in parts)
        self._consumer = None
        self._d: Optional[Deferred] = None
        self._call = None
        self._paused = False

    def startProducing(self, consumer: Any) -> Deferred:
        self._consumer = consumer
        self._queue = list(self._parts)
        self._d = Deferred(lambda _: self.stopProducing())
        self._schedule()
        return self._d

    def _schedule(self) -> None:
        if self._call is None and not self._paused:
            self._call = self._clock.callLater(0, self._step)

    def _step(self) -> None:
        self._call = None
        if self._d is None or self._paused:
            return
        if not self._queue:
            d, self._d = self._d, None
            d.callback(None)
            return
        part = self._queue[0]
        if isinstance(part, bytes):
            self._queue.pop(0)
            chunk = part
        else:
            offset, length = part
            self._file.seek(offset)
            chunk = self._file.read(min(length, _READ_SIZE))
            if not chunk:
                d, self._d = self._d, None
                d.errback(IOError("request body file ended early"))
                return
            if len(chunk) < length:
                self._queue[0] = (offset + len(chunk), length - len(chunk))
            else:
                self._queue.pop(0)
        self._consumer.write(chunk)
        self._schedule()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._d = None


def _to_body_producer(data: Any) -> IBodyProducer:
    if isinstance(data, bytes):
        return BytesProducer(data)
    return IBodyProducer(data)


class _ChunkedDecoder(_ChunkedTransferDecoder):
    """Twisted's decoder of a ``chunked`` body, handing over all the body bytes of one read in
    one piece (one write to the client and one look by the hooks, not one per upstream chunk;
    no delay: the read is over). The chunk-size lines, extensions and errors are checked as
    Twisted checks them; trailers are Twisted's own code."""

    def dataReceived(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        pos = 0
        pieces: list = []
        try:
            while pos < len(buf):
                state = self.state
                if state == "BODY":
                    end = pos + self.length
                    if len(buf) >= end:
                        pieces.append(memoryview(buf)[pos:end].tobytes())
                        pos = end
                        self.state = "CRLF"
                    else:
                        pieces.append(memoryview(buf)[pos:].tobytes())
                        self.length = end - len(buf)
                        pos = len(buf)
                elif state == "CRLF":
                    if len(buf) - pos < 2:
                        break
                    if buf[pos] != 13 or buf[pos + 1] != 10:
                        raise _MalformedChunkedDataError("Chunk did not end with CRLF")
                    pos += 2
                    self.state = "CHUNK_LENGTH"
                elif state == "CHUNK_LENGTH":
                    eol = buf.find(b"\r\n", pos + self._start)
                    if eol - pos >= maxChunkSizeLineLength or (
                            eol == -1 and len(buf) - pos > maxChunkSizeLineLength):
                        raise _MalformedChunkedDataError(
                            f"Chunk size line exceeds maximum of {maxChunkSizeLineLength} bytes.")
                    if eol == -1:
                        self._start = len(buf) - pos - 1  # the line starts at 0 once ``pos`` is cut
                        break
                    semicolon = buf.find(b";", pos, eol)
                    length_end = eol if semicolon == -1 else semicolon
                    try:
                        length = _hexint(buf[pos:length_end])
                    except ValueError:
                        raise _MalformedChunkedDataError("Chunk-size must be an integer.") from None
                    if semicolon != -1:
                        ext = buf[semicolon + 1:eol]
                        if ext and ext.translate(None, _chunkExtChars) != b"":
                            raise _MalformedChunkedDataError(f"Invalid characters in chunk extensions: {ext!r}.")
                    self.state = "TRAILER" if length == 0 else "BODY"
                    self.length = length
                    pos = eol + 2
                    self._start = 0
                else:  # the trailers and the end: Twisted's own, after the body so far
                    del buf[:pos]
                    pos = 0
                    if pieces:
                        chunk = b"".join(pieces)
                        pieces.clear()
                        self.dataCallback(chunk)
                    if not getattr(self, "_dataReceived_" + state)():
                        break
        finally:
            if pos:
                del buf[:pos]
            if pieces:
                self.dataCallback(b"".join(pieces))


def _chunked_decoders() -> Optional[dict]:
    """The transfer decoders of a forwarded response (``HTTPClientParser._transferDecoders``):
    ``_ChunkedDecoder`` where Twisted's decoder has the layout it builds on, else None (Twisted's
    own then)."""
    try:
        probe = _ChunkedTransferDecoder(lambda data: None, lambda rest: None)
        if not isinstance(probe._buffer, bytearray) or probe._start != 0 \
                or not callable(getattr(probe, "_dataReceived_TRAILER", None)):
            return None
    except Exception:  # pragma: no cover - another Twisted
        return None
    return {b"chunked": _ChunkedDecoder}


try:
    from twisted.web.http import _chunkExtChars, _hexint
    _DECODERS = _chunked_decoders()
except ImportError:  # pragma: no cover - another Twisted
    _DECODERS = None


class _ClientProtocol(HTTP11ClientProtocol):
    """Twisted's HTTP/1.1 client protocol, with two changes for relaying:

    * a ``chunked`` body is decoded by ``_ChunkedDecoder`` (one piece per read);
    * a pause of the connection asked for during a read (Twisted's response parser pauses it
      until the body has a reader, which the relay becomes at once) takes effect only if it
      still stands when the read is over: no stop and restart of reading for every response.
    """

    reading = False
    pause_pending = False

    def request(self, request: Any) -> Deferred:
        d = super().request(request)
        parser, proxy = self._parser, self._transportProxy
        if parser is not None and _DECODERS is not None:
            parser._transferDecoders = _DECODERS
        if proxy is not None and getattr(proxy, "_producer", None) is self.transport:
            proxy._producer = _ReadPauser(self)
        return d

    def dataReceived(self, data: bytes) -> None:
        self.reading = True
        try:
            super().dataReceived(data)
        finally:
            self.reading = False
            if self.pause_pending:
                self.pause_pending = False
                if self._parser is not None and self.transport is not None:
                    self.transport.pauseProducing()

    def _finishResponse_WAITING(self, rest: bytes) -> None:
        self.pause_pending = False  # Twisted resumes the connection here, whatever paused it
        super()._finishResponse_WAITING(rest)

    _finishResponse_TRANSMITTING = _finishResponse_WAITING


class _ReadPauser:
    """The producer a response's parser (and the relay's client) pause and resume: the upstream
    connection, with a pause asked for during a read put off until the read is over."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: _ClientProtocol) -> None:
        self.protocol = protocol

    def pauseProducing(self) -> None:
        protocol = self.protocol
        if protocol.reading:
            protocol.pause_pending = True
        elif protocol.transport is not None:
            protocol.transport.pauseProducing()

    def resumeProducing(self) -> None:
        protocol = self.protocol
        protocol.pause_pending = False
        if protocol.transport is not None:
            protocol.transport.resumeProducing()

    def stopProducing(self) -> None:
        protocol = self.protocol
        protocol.pause_pending = False
        if protocol.transport is not None:
            protocol.transport.stopProducing()

    def loseConnection(self) -> None:
        if self.protocol.transport is not None:
            self.protocol.transport.loseConnection()


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" line per upstream connection

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _ClientProtocol(self._quiescentCallback)


class _ProxyPool(HTTPConnectionPool):
    """The pool of one child's (or peer's) upstream connections, handing out a kept-alive one
    without a Deferred (``take``)."""

    _factory = _QuietClientFactory

    def take(self, key: Any) -> Any:
        """An idle pooled connection for ``key`` (its idle timer stopped), or None."""
        if self.retryAutomatically:
            return None  # the pool's own path wraps it for retries
        connections = self._connections.get(key)
        while connections:
            connection = connections.pop(0)
            self._timeouts.pop(connection).cancel()
            if connection.state == "QUIESCENT":
                return connection
        return None


class _Target:
    """One upstream URL, parsed once: the pool key, the path sent, the ``Host`` value."""

    __slots__ = ("uri", "key", "path", "host")

    def __init__(self, uri: URI, host: bytes) -> None:
        self.uri = uri
        self.key = (uri.scheme, uri.host, uri.port)
        self.path = _ensureValidURI(uri.originForm)
        self.host = host


#: methods seen, checked once each (``_ensureValidMethod``)
_METHODS: dict = {}
_BIG_BODY = 64 * 1024


class _ForwardRequest(Request):
    """A forwarded request whose head is encoded once by ``encode_head``; a bytes body goes out
    with it in one write. A producer body goes through Twisted's own body writing.

    :param on_sent: called once a bytes body (or an empty one) was written.
    """

    def __init__(self, method: bytes, target: _Target, headers: Headers, head: bytes,
                 body: Optional[bytes], producer: Any, persistent: bool,
                 on_sent: Optional[Callable[[], None]] = None) -> None:
        self.method = method
        self.uri = target.path
        self.headers = headers
        self.bodyProducer = producer
        self.persistent = persistent
        self._parsedURI = target.uri
        self._head = head
        self._body = body
        self._on_sent = on_sent

    def writeTo(self, transport: Any) -> Deferred:
        body = self._body
        if body is not None:
            if len(body) < _BIG_BODY:
                write_now(transport, self._head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            else:
                transport.writeSequence([self._head, b"Content-Length: %d\r\n\r\n" % len(body), body])
        elif self.bodyProducer is None:
            if self.method in (b"PUT", b"POST"):  # as Twisted: a body is expected, say it is empty
                write_now(transport, self._head + b"Content-Length: 0\r\n\r\n")
            else:
                write_now(transport, self._head + b"\r\n")
        else:
            return super().writeTo(transport)
        if self._on_sent is not None:
            self._on_sent()
        return succeed(None)

    def _writeHeaders(self, transport: Any, TEorCL: Optional[bytes]) -> None:
        transport.writeSequence([self._head, TEorCL or b"", b"\r\n"])


def encode_head(method: bytes, target: _Target, headers: Headers, persistent: bool) -> bytes:
    """The request line and header lines of a forwarded request (without the body's framing
    header and the blank line): ``headers`` as given, plus ``Accept-Encoding: gzip`` (the
    response is decoded, see the module's doc) and the upstream's ``Host`` unless given."""
    parts = [method, b" ", target.path, b" HTTP/1.1\r\n"]
    if not persistent:
        parts.append(b"Connection: close\r\n")
    raw = headers._rawHeaders if _RAW_HEADERS else dict(headers.getAllRawHeaders())
    for name, values in raw.items():
        for value in values:
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"Accept-Encoding: gzip\r\n")
    if _HOST not in raw:
        parts += (b"Host: ", target.host, b"\r\n")
    return b"".join(parts)


def _decoded(response: Any) -> Any:
    """``ContentDecoderAgent``'s gzip decoding, for a response that has a ``Content-Encoding``."""
    if response.headers.hasHeader(b"content-encoding"):
        return _GZIP._handleResponse(response)
    return response


_GZIP = ContentDecoderAgent(None, [(b"gzip", GzipDecoder)])


_FAST_KEYS = frozenset({"headers", "data", "unbuffered", "allow_redirects"})
#: HostnameEndpoint's "happy eyeballs" delay between addresses; its default (0.3 s) is also
#: how long a *refused* connection takes to fail, i.e. every health probe of a child that
#: is not listening yet. Upstreams are local: try the next address almost at once.
ATTEMPT_DELAY = 0.01


class _UpstreamEndpointFactory(_StandardEndpointFactory):
    """Agent endpoints for upstreams, one per (scheme, host, port), built once.

    ``http`` to an IP literal is a plain TCP endpoint (no resolver thread, no attempt
    delay: a refused connection fails at once); ``http`` to a name is a
    ``HostnameEndpoint`` with a short attempt delay; ``https`` is the same wrapped in TLS
    (``llamaswap.tls``: verified against the host name with the platform's trust roots, as
    Agent's own ``BrowserLikePolicyForHTTPS`` does).
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        super().__init__(reactor, BrowserLikePolicyForHTTPS(), connect_timeout, None)
        self._cache: dict = {}

    def set_connect_timeout(self, seconds: Optional[float]) -> None:
        """New connections time out after ``seconds`` (None: never)."""
        if seconds != self._connectTimeout:
            self._connectTimeout = seconds
            self._cache.clear()

    def endpointForURI(self, uri: Any) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            endpoint = self._cache[key] = self._make(uri)
        return endpoint

    def _make(self, uri: Any) -> Any:
        if uri.scheme not in (b"http", b"https"):
            return super().endpointForURI(uri)  # SchemeNotSupported
        host = uri.host.decode("ascii")
        timeout = self._connectTimeout
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=timeout,
                                        attemptDelay=ATTEMPT_DELAY)
        if uri.scheme == b"https":
            return tls.client_endpoint(host, endpoint)  # the TLS stack is loaded on first use
        return endpoint


class ProxyHTTPClient(treq.client.HTTPClient):
    """treq's ``HTTPClient`` with a short path for the forwarder's own requests.

    ``forward_request`` (what ``Forwarder`` uses) sends a request on a pooled connection
    directly: the URL parsed once per URL, the request head encoded in one pass over the
    headers, a bytes body written with it, no cookie, redirect or treq wrappers; the response
    is decoded as treq's ``ContentDecoderAgent`` would. It needs the pool and endpoint factory
    of ``make_http_client``. Every other call (health checks, tests) is treq's own.
    """

    #: the ``config.Timeouts`` applied (``apply_timeouts``), or None
    timeouts: Any = None

    def __init__(self, agent: Any, cookiejar: Any, data_to_body_producer: Callable, clock: Any = None,
                 pool: Any = None, endpoints: Any = None) -> None:
        super().__init__(agent, cookiejar=cookiejar, data_to_body_producer=data_to_body_producer)
        self._decoding = ContentDecoderAgent(agent, [(b"gzip", GzipDecoder)])
        self._uris: dict = {}
        self._targets: dict = {}
        #: the pool and endpoint factory it connects through (``make_http_client``'s), or None
        self._clock, self.pool, self.endpoints = clock, pool, endpoints
        self._header_timeout = 0.0

    def apply_timeouts(self, timeouts: Any) -> None:
        """Use a model's or peer's ``timeouts`` (a ``config.Timeouts``; 0 = no limit) from now on.

        ``connect`` bounds each new connection, ``idle_conn`` how long an idle one stays pooled,
        ``response_header`` the wait for the headers once the request body is sent (forwarded
        requests only: a health check has its own timeout). Cheap when nothing changed, so it
        can be called before every request (a reload may change them).
        """
        if timeouts is self.timeouts or timeouts == self.timeouts:
            return
        self.timeouts = timeouts
        if self.endpoints is not None:
            self.endpoints.set_connect_timeout(timeouts.connect or None)
        if self.pool is not None:
            self.pool.cachedConnectionTimeout = timeouts.idle_conn or IDLE_FOREVER
        self._header_timeout = float(timeouts.response_header or 0) if self._clock is not None else 0.0

    def forward_request(self, method: bytes, url: bytes, headers: Any, data: Any) -> Deferred:
        """Send a forwarded request; a Deferred firing with the (decoded) ``IResponse``.

        :param method: the request's method, as received.
        :param url: the absolute upstream URL.
        :param headers: the ``Headers`` to send (``upstream_headers``'); ``Host`` and
            ``Accept-Encoding`` are added.
        :param data: the body: bytes (possibly empty), or an ``IBodyProducer``.
        """
        pool = self.pool
        if not isinstance(pool, _ProxyPool) or self.endpoints is None or not isinstance(headers, Headers):
            return self.request(method.decode("ascii"), url, headers=headers, data=data,
                                unbuffered=True, allow_redirects=False)
        target = self._targets.get(url)
        if target is None:
            target = self._target(url)
        checked = _METHODS.get(method)
        if checked is None:  # sent upper-cased, as treq sends it
            checked = _ensureValidMethod(method.upper())
            if len(_METHODS) < 64:
                _METHODS[method] = checked
        persistent = pool.persistent
        head = encode_head(checked, target, headers, persistent)
        deadline = _HeaderDeadline(self._clock, self._header_timeout) if self._header_timeout else None
        on_sent = None
        if isinstance(data, bytes) or data is None:
            body, producer = data or None, None
            if deadline is not None and body is not None:
                on_sent = deadline.start
        else:
            body, producer = None, IBodyProducer(data)
            if deadline is not None:
                producer = _SentBody(producer, deadline.start)
        request = _ForwardRequest(checked, target, headers, head, body, producer, persistent, on_sent)
        connection = pool.take(target.key)
        if connection is not None:
            d = connection.request(request)
        else:
            d = pool.getConnection(target.key, self.endpoints.endpointForURI(target.uri))
            d.addCallback(_send_on, request)
        d.addCallback(_decoded)
        if deadline is None:
            return d
        return deadline.watch(d, started=body is None and producer is None)  # no body: at once

    def _target(self, url: bytes) -> _Target:
        """Parse ``url`` as treq and Agent would (IDNA, normalisation), once per URL."""
        uri = EncodedURL.from_text(url.decode("ascii")).to_uri().to_text().encode("ascii")
        parsed = URI.fromBytes(_ensureValidURI(uri.strip()))
        if parsed.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"Unsupported scheme: {parsed.scheme!r}")
        target = _Target(parsed, self._agent._computeHostValue(parsed.scheme, parsed.host, parsed.port))
        if len(self._targets) >= 256:
            self._targets.clear()
        self._targets[url] = target
        return target

    def request(self, method: str, url: Any, **kwargs: Any) -> Deferred:
        data = kwargs.get("data")
        if (kwargs.keys() <= _FAST_KEYS and kwargs.get("unbuffered") is True
                and kwargs.get("allow_redirects") is False and isinstance(url, bytes)
                and isinstance(kwargs.get("headers"), Headers)
                and not isinstance(data, (dict, list, tuple))):
            uri = self._uris.get(url)
            if uri is None:
                uri = EncodedURL.from_text(url.decode("ascii")).to_uri().to_text().encode("ascii")
                if len(self._uris) >= 256:
                    self._uris.clear()
                self._uris[url] = uri
            producer = self._data_to_body_producer(data) if data else None
            if not self._header_timeout:
                return self._decoding.request(method.encode("ascii").upper(), uri,
                                              headers=kwargs["headers"], bodyProducer=producer)
            deadline = _HeaderDeadline(self._clock, self._header_timeout)
            if producer is not None:
                producer = _SentBody(producer, deadline.start)
            d = self._decoding.request(method.encode("ascii").upper(), uri,
                                       headers=kwargs["headers"], bodyProducer=producer)
            return deadline.watch(d, started=producer is None)
        return super().request(method, url, **kwargs)


def _send_on(connection: Any, request: _ForwardRequest) -> Deferred:
    return connection.request(request)


class _HeaderDeadline:
    """``timeouts.responseHeader`` of one request: armed once its body is sent (at once without
    a body); on expiry the request is cancelled and fails with ``ResponseHeaderTimeout``."""

    def __init__(self, clock: Any, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds
        self.d: Optional[Deferred] = None
        self.call: Any = None
        self.sent = False
        self.expired = False
        self.answered = False  # (``d.called`` is true as soon as the connection is made)

    def watch(self, d: Deferred, started: bool) -> Deferred:
        self.d = d
        d.addBoth(self._done)
        if started or self.sent:
            self.start()
        return d

    def start(self) -> None:
        self.sent = True
        if self.d is not None and not self.answered and self.call is None:
            self.call = self.clock.callLater(self.seconds, self._expire)

    def _expire(self) -> None:
        self.call = None
        self.expired = True
        self.d.cancel()

    def _done(self, result: Any) -> Any:
        self.answered = True
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None
        if self.expired and isinstance(result, Failure):
            return Failure(ResponseHeaderTimeout(self.seconds))
        return result


@implementer(IBodyProducer)
class _SentBody:
    """A body producer that reports when the whole body was written."""

    def __init__(self, inner: Any, on_sent: Callable[[], None]) -> None:
        self._inner, self._on_sent = inner, on_sent
        self.length = inner.length

    def startProducing(self, consumer: Any) -> Deferred:
        def sent(result: Any) -> Any:
            self._on_sent()
            return result
        return self._inner.startProducing(consumer).addCallback(sent)

    def pauseProducing(self) -> None:
        self._inner.pauseProducing()

    def resumeProducing(self) -> None:
        self._inner.resumeProducing()

    def stopProducing(self) -> None:
        self._inner.stopProducing()


def make_http_client(reactor: Any, persistent: bool = True, max_per_host: int = 64):
    """A treq ``HTTPClient`` set up for proxying, and its pool (for one child lifetime)."""
    pool = _ProxyPool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = max_per_host
    pool.retryAutomatically = False  # PROXY-10 retries are ours, for every method
    endpoints = _UpstreamEndpointFactory(reactor, CONNECT_TIMEOUT)
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    no_cookies = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
    client = ProxyHTTPClient(agent, cookiejar=no_cookies, data_to_body_producer=_to_body_producer,
                             clock=reactor, pool=pool, endpoints=endpoints)
    return client, pool


def client_ip(request: Any) -> str:
    """The peer address of a twisted.web request ('' for unix sockets)."""
    peer = request.getClientAddress()
    return getattr(peer, "host", "") or ""


def _stores_canonical_names() -> bool:
    """Whether ``Headers`` keeps its values in ``_rawHeaders`` under canonical (``Header-Case``)
    names, as Twisted does since 24.10: then the hot paths below read and fill that dict
    directly (names and values already checked when they were added), else they go through
    the public methods."""
    try:
        h = Headers()
        h.addRawHeader(b"x-probe-name", b"v")
        return getattr(h, "_rawHeaders", None) == {b"X-Probe-Name": [b"v"]}
    except Exception:  # pragma: no cover - a Headers without that layout
        return False


_RAW_HEADERS = _stores_canonical_names()
try:
    from twisted.web.http_headers import _nameEncoder
    _canonical = _nameEncoder.encode
except ImportError:  # pragma: no cover - an older Twisted (the fast paths are off there)
    def _canonical(name: bytes) -> bytes:
        return b"-".join(word.capitalize() for word in name.split(b"-"))
#: what a forwarded request never carries upstream, by canonical name (PROXY-2)
_UP_DROP = frozenset(_canonical(n) for n in HOP_BY_HOP | {b"host", b"content-length", b"accept-encoding"})
_UP_DROP_AUTH = _UP_DROP | {_canonical(b"authorization"), _canonical(b"x-api-key")}
#: response headers never relayed (PROXY-5)
_DOWN_DROP = frozenset(_canonical(n) for n in HOP_BY_HOP | {b"content-length"})
_CONNECTION, _HOST = _canonical(b"connection"), _canonical(b"host")
_XFF, _XFH, _XFP = _canonical(b"x-forwarded-for"), _canonical(b"x-forwarded-host"), _canonical(b"x-forwarded-proto")
_CONTENT_TYPE, _CONTENT_ENCODING = _canonical(b"content-type"), _canonical(b"content-encoding")
_CONTENT_LENGTH = _canonical(b"content-length")
_SSE_HEADERS = ((_canonical(b"x-accel-buffering"), b"no"), (_canonical(b"cache-control"), b"no-cache"))


def upstream_headers(request: Any, strip_auth: bool, scheme: bytes) -> Headers:
    """PROXY-2: the headers sent upstream."""
    incoming = request.requestHeaders
    if not _RAW_HEADERS:
        return _upstream_headers_slow(request, incoming, strip_auth, scheme)
    raw = incoming._rawHeaders
    drop = _UP_DROP_AUTH if strip_auth else _UP_DROP
    named = None  # the headers Connection names are hop-by-hop too
    connection = raw.get(_CONNECTION)
    if connection:
        named = {token.strip().lower() for value in connection for token in value.split(b",")} - {b""}
    out = Headers()
    fields = out._rawHeaders
    for name, values in raw.items():
        if name not in drop and not (named and name.lower() in named):
            fields[name] = values[:]
    host = raw.get(_HOST)
    if host:
        fields[_XFH] = [host[0]]
    ip = client_ip(request).encode("ascii", "replace")
    previous = raw.get(_XFF)
    fields[_XFF] = [b", ".join(previous) + b", " + ip if previous else ip]
    if _XFP not in raw:
        fields[_XFP] = [scheme]
    return out


def _upstream_headers_slow(request: Any, incoming: Headers, strip_auth: bool, scheme: bytes) -> Headers:
    connection_named = set()
    for value in incoming.getRawHeaders(b"connection", []):
        connection_named |= {v.strip().lower() for v in value.split(b",") if v.strip()}
    drop = HOP_BY_HOP | connection_named | {b"host", b"content-length", b"accept-encoding"}
    if strip_auth:
        drop |= {b"authorization", b"x-api-key"}
    out = Headers()
    for name, values in incoming.getAllRawHeaders():
        if name.lower() not in drop:
            out.setRawHeaders(name, list(values))
    host = incoming.getRawHeaders(b"host")
    if host:
        out.setRawHeaders(b"x-forwarded-host", [host[0]])
    ip = client_ip(request).encode("ascii", "replace")
    previous = incoming.getRawHeaders(b"x-forwarded-for")
    forwarded = b", ".join(previous) + b", " + ip if previous else ip
    out.setRawHeaders(b"x-forwarded-for", [forwarded])
    if not incoming.hasHeader(b"x-forwarded-proto"):
        out.setRawHeaders(b"x-forwarded-proto", [scheme])
    return out


def copy_response_headers(response: Any, request: Any) -> bool:
    """PROXY-5: relay status and headers; return True for an SSE response."""
    request.setResponseCode(response.code, response.phrase or None)
    upstream, out = response.headers, request.responseHeaders
    if not _RAW_HEADERS:
        return _copy_response_headers_slow(response, request)
    fields = out._rawHeaders
    sse = False
    for name, values in upstream._rawHeaders.items():
        if name in _DOWN_DROP:
            continue
        if name == _CONTENT_ENCODING and not any(v.strip() for v in values):
            continue  # ContentDecoderAgent leaves an empty one behind when it decoded nothing
        if name == _CONTENT_TYPE and values and values[0][:17].lower() == b"text/event-stream":
            sse = True
        fields[name] = values[:]
    if response.length is not UNKNOWN_LENGTH:
        fields[_CONTENT_LENGTH] = [b"%d" % response.length]
    if sse:
        for name, value in _SSE_HEADERS:
            if name not in fields:
                fields[name] = [value]
    return sse


def _copy_response_headers_slow(response: Any, request: Any) -> bool:
    sse = False
    for name, values in response.headers.getAllRawHeaders():
        lname = name.lower()
        if lname in HOP_BY_HOP or lname == b"content-length":
            continue
        if lname == b"content-encoding" and not any(v.strip() for v in values):
            continue
        if lname == b"content-type" and values and values[0].lower().startswith(b"text/event-stream"):
            sse = True
        request.responseHeaders.setRawHeaders(name, list(values))
    if response.length is not UNKNOWN_LENGTH:
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % response.length])
    if sse:
        for name, value in ((b"x-accel-buffering", b"no"), (b"cache-control", b"no-cache")):
            if not request.responseHeaders.hasHeader(name):
                request.responseHeaders.setRawHeaders(name, [value])
    return sse


@attr.s(slots=True)
class RelayOutcome:
    """How relaying one upstream response to the client ended.

    :ivar status: the status the client was sent.
    :ivar bytes_sent: upstream body bytes written to the client.
    :ivar completed: the upstream body ended normally (``ResponseDone``/``PotentialDataLoss``).
    :ivar error: why the stream failed, or the request was answered with an error event
        instead of the upstream's body (the request record's ``stream_error``); None when
        completed.
    :ivar reason: the ``Failure`` that ended the upstream body early, when there was one.
    """

    status: int = attr.ib()
    bytes_sent: int = attr.ib(default=0)
    completed: bool = attr.ib(default=True)
    error: Optional[str] = attr.ib(default=None)
    reason: Optional[Failure] = attr.ib(default=None)


class _BodyRelay(Protocol):
    """Writes every upstream chunk to the client at once; a slow client pauses the upstream.

    ``done`` fires with a ``RelayOutcome`` once the upstream body ends; a complete body
    finishes the response first, a body that ends early is reported to the client first
    (PROXY-9, see ``_stream_failed``).
    """

    def __init__(self, request: Any, on_data: Optional[Callable[[bytes], None]], status: int,
                 sse: bool, model_id: str, tail: bytes) -> None:
        self.request = request
        self.done: Deferred = Deferred(self._cancel)
        self.on_data = on_data
        self.status = status
        self.sse = sse
        self.model_id = model_id
        self.last = tail  # ends with the last bytes relayed (PROXY-9 needs to know if a blank line ended them)
        self.registered = False
        self.nbytes = 0

    def _cancel(self, done: Deferred) -> None:
        """Stop the transfer (the client left, or the request was cancelled): the upstream
        connection is closed so the server stops generating, and the client's response no
        longer pulls from it."""
        if self.registered:
            self.registered = False
            try:
                self.request.unregisterProducer()
            except (AttributeError, RuntimeError):
                pass
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionMade(self) -> None:
        if not self.request.client_gone:
            self.request.registerProducer(self.transport, True)
            self.registered = True

    def dataReceived(self, data: bytes) -> None:
        request = self.request
        if request.client_gone:
            return
        request.write(data)
        self.nbytes += len(data)
        self.last = data if len(data) >= 4 else self.last[-4:] + data
        if self.on_data is not None:
            self.on_data(data)

    def _done(self, outcome: RelayOutcome) -> None:
        if not self.done.called:  # not cancelled while it waited for its turn
            self.done.callback(outcome)

    @property
    def tail(self) -> bytes:
        """The last (up to 4) bytes relayed."""
        return self.last[-4:]

    def connectionLost(self, reason: Failure) -> None:
        if self.registered:
            self.registered = False
            try:
                self.request.unregisterProducer()
            except (AttributeError, RuntimeError):
                pass
        if self.done.called:
            return
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            request = self.request
            if not request.client_gone and not request.finished:
                # the whole body is relayed, so the response is complete: the client gets its
                # end now, before releasing the model, parsing usage and the other bookkeeping,
                # which a burst of ends runs paced, the other streams' chunks relayed between
                request.finish()
            paced = getattr(request, "paced", None)
            if paced is None:
                self._done(RelayOutcome(self.status, self.nbytes))
            else:
                paced(self._done, RelayOutcome(self.status, self.nbytes))
            return
        error = _reason(reason.value)
        try:
            _stream_failed(self.request, self.tail, self.sse, self.model_id, error)
        except Exception:
            self.done.errback()
            return
        self.done.callback(RelayOutcome(self.status, self.nbytes, False, error, reason))


def _stream_failed(request: Any, tail: bytes, sse: bool, model_id: str, reason: str) -> None:
    """PROXY-9: never a silently truncated successful response."""
    if request.client_gone:
        return
    if sse:
        prefix = b"" if tail.endswith(b"\n\n") or tail.endswith(b"\r\n\r\n") else b"\n\n"
        message = f"upstream for model '{model_id}' closed the stream: {reason}"
        request.write(prefix + b"data: " + error_body("server_error", "upstream_error", message) + b"\n\n")
        request.finish()
    else:
        transport = request.channel.transport if request.channel else None
        if transport is not None:
            transport.abortConnection()


_RETRYABLE = (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)


class _Sending:
    """One ``Forwarder.send``: its attempt, and the PROXY-10 retry when the first one failed."""

    __slots__ = ("forwarder", "method", "http", "url", "headers", "body", "model_id", "still_ready",
                 "unreachable")

    def __init__(self, forwarder: "Forwarder", method: bytes, http: Any, url: bytes, headers: Any,
                 body: Callable[[], Any], model_id: str, still_ready: Callable[[], bool],
                 unreachable: Optional[Callable[[str], Exception]]) -> None:
        self.forwarder, self.method, self.http, self.url, self.headers = forwarder, method, http, url, headers
        self.body, self.model_id, self.still_ready, self.unreachable = body, model_id, still_ready, unreachable

    def attempt(self, client: Any, may_retry: bool) -> Deferred:
        try:
            fast = getattr(client, "forward_request", None)
            if fast is not None:
                d = fast(self.method, self.url, self.headers, self.body())
            else:  # any treq-like client
                d = client.request(self.method.decode("ascii"), self.url, headers=self.headers,
                                   data=self.body(), unbuffered=True, allow_redirects=False)
        except Exception:
            d = fail()
        return d.addErrback(self.failed, may_retry)

    def failed(self, failure: Failure, may_retry: bool) -> Any:
        e = failure.value
        if isinstance(e, CancelledError):
            return failure
        model_id = self.model_id
        if _cancelled(e):
            # the request was cancelled (client gone, or /api/inflight/<id>/cancel): Agent
            # wraps that in ResponseNeverReceived, which must not be retried
            return Failure(CancelledError())
        if isinstance(e, ResponseHeaderTimeout):
            raise UpstreamTimeout(f"upstream for model '{model_id}' sent no response headers within "
                                  f"{e.seconds:g} s (timeouts.responseHeader)")
        if may_retry and isinstance(e, _RETRYABLE) and self.still_ready():
            # PROXY-10: llama-server drops kept-alive connections after a stream; retry
            # once on a connection of its own, whatever the method.
            log.debug("retrying request to {model} on a new connection ({why})",
                      model=model_id, why=_reason(e))
            fresh = self.forwarder.fresh_client()
            timeouts = getattr(self.http, "timeouts", None)
            if timeouts is not None and hasattr(fresh, "apply_timeouts"):
                fresh.apply_timeouts(timeouts)
            return self.attempt(fresh, False)
        if self.unreachable is None:
            raise UpstreamUnreachable(f"upstream for model '{model_id}' unreachable: {_reason(e)}")
        raise self.unreachable(_reason(e))


class Forwarder:
    """Sends a request upstream and relays the response to a twisted.web request.

    ``send`` gets the response (one PROXY-10 retry), ``relay`` streams its body to the
    client, ``forward`` does both with the response's status and headers in between.

    :param reactor: used for the one fresh connection of a PROXY-10 retry.
    """

    def __init__(self, reactor: Any, fresh_client: Optional[Callable[[], Any]] = None) -> None:
        self.reactor = reactor
        # PROXY-10: the client for a retry, on a connection of its own (not pooled)
        self.fresh_client = fresh_client or (lambda: make_http_client(reactor, persistent=False)[0])

    def send(self, request: Any, *, http: Any, url: bytes, headers: Headers, body: Callable[[], Any],
             model_id: str, still_ready: Callable[[], bool],
             unreachable: Optional[Callable[[str], Exception]] = None) -> Deferred:
        """Send ``request``'s method to ``url``; a Deferred firing with the upstream response.

        :param body: a zero-argument callable returning a fresh body (bytes or producer)
            per attempt.
        :param still_ready: whether a PROXY-10 retry may be made.
        :param unreachable: builds the error raised when no response came, from a short
            reason; by default ``UpstreamUnreachable`` naming ``model_id`` (PROXY-8).
        """
        return _Sending(self, request.method, http, url, headers, body, model_id, still_ready,
                        unreachable).attempt(http, True)

    def relay(self, request: Any, response: Any, *, model_id: str, sse: bool,
              on_data: Optional[Callable[[bytes], None]] = None, status: Optional[int] = None,
              tail: bytes = b"") -> Deferred:
        """Stream ``response``'s body to ``request``; a Deferred firing with a ``RelayOutcome``.

        A body relayed whole finishes ``request`` before the Deferred fires.
        A body that ends early becomes an SSE error event (no ``[DONE]``) when ``sse``, else
        an aborted connection (PROXY-9); the outcome then carries the reason. Cancelling
        stops the upstream transfer.

        :param status: the status the client got (``response.code`` by default).
        :param tail: the last bytes already written to the response, when it did not start
            with this body (an error event is then separated from them correctly).
        """
        relay = _BodyRelay(request, on_data, response.code if status is None else status, sse,
                           model_id, tail)
        response.deliverBody(relay)
        return relay.done

    def forward(self, request: Any, *, http: Any, url: bytes, headers: Headers, body: Callable[[], Any],
                model_id: str, still_ready: Callable[[], bool],
                on_headers: Optional[Callable[[Any], None]] = None,
                on_data: Optional[Callable[[bytes], None]] = None,
                unreachable: Optional[Callable[[str], Exception]] = None) -> Deferred:
        """``send``, relay the status and headers (PROXY-5), then ``relay`` the body.

        :return: a Deferred firing with a ``RelayOutcome``; failing with ``unreachable``'s
            error (``UpstreamUnreachable``) before any response header was relayed (PROXY-8).
        """
        d = self.send(request, http=http, url=url, headers=headers, body=body, model_id=model_id,
                      still_ready=still_ready, unreachable=unreachable)
        return d.addCallback(self._respond, request, model_id, on_headers, on_data)

    def _respond(self, response: Any, request: Any, model_id: str,
                 on_headers: Optional[Callable[[Any], None]],
                 on_data: Optional[Callable[[bytes], None]]) -> Deferred:
        sse = copy_response_headers(response, request)
        if on_headers is not None:
            on_headers(response)
        return self.relay(request, response, model_id=model_id, sse=sse, on_data=on_data)


# -- WebSocket passthrough -----------------------------------------------------------------------

#: the longest upstream answer head to a WebSocket upgrade that is read
_MAX_UPGRADE_HEAD = 64 * 1024


def is_websocket_upgrade(request: Any) -> bool:
    """A WebSocket upgrade request (``Connection: upgrade`` and ``Upgrade: websocket``, any case,
    comma-separated or repeated), as llama-swap recognises one."""
    def has(name: bytes, token: bytes) -> bool:
        return any(part.strip().lower() == token for value in request.requestHeaders.getRawHeaders(name, [])
                   for part in value.split(b","))
    return request.method == b"GET" and has(b"connection", b"upgrade") and has(b"upgrade", b"websocket")


class WebSocketRefused(LlamaSwapError):
    """The upstream did not switch protocols (no ``101``) for a WebSocket upgrade."""

    status, kind, code = 502, "server_error", "upstream_error"


class _UpstreamSide(Protocol):
    """The upstream end of a WebSocket tunnel: first its answer head, then raw frames."""

    def __init__(self) -> None:
        self.head: Deferred = Deferred(lambda d: self.transport and self.transport.abortConnection())
        self.closed: Deferred = Deferred()
        self.buffer = b""
        self.peer: Any = None  # the client's transport, once the tunnel is open

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.write(data)
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end >= 0 and not self.head.called:
            self.head.callback(end + 4)
        elif len(self.buffer) > _MAX_UPGRADE_HEAD and not self.head.called:
            self.head.errback(WebSocketRefused("upstream answered the WebSocket upgrade with an oversized head"))

    def connectionLost(self, reason: Failure) -> None:
        if not self.head.called:
            self.head.errback(reason)
        if self.peer is not None:
            self.peer.loseConnection()
        if not self.closed.called:
            self.closed.callback(None)


class _ClientSide(Protocol):
    """The client end of a WebSocket tunnel (the connection twisted.web hands over)."""

    def __init__(self, upstream: _UpstreamSide) -> None:
        self.upstream = upstream

    def dataReceived(self, data: bytes) -> None:
        self.upstream.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:
        self.upstream.transport.loseConnection()


class _OneProtocol(Factory):
    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance


def websocket_request_head(method: bytes, url: bytes, headers: Headers, request: Any) -> tuple[bytes, Any]:
    """The upgrade request sent upstream, and the endpoint URI: ``headers`` (PROXY-2's) plus the
    ``Connection``/``Upgrade`` pair a WebSocket needs and the upstream's ``Host``."""
    from twisted.web.client import URI

    uri = URI.fromBytes(url)
    upgrade = request.requestHeaders.getRawHeaders(b"upgrade", [b"websocket"])[0]
    lines = [method + b" " + (uri.originForm or b"/") + b" HTTP/1.1", b"Host: " + uri.netloc,
             b"Connection: Upgrade", b"Upgrade: " + upgrade]
    for name, values in headers.getAllRawHeaders():
        if name.lower() in (b"host", b"connection", b"upgrade"):
            continue
        lines.extend(name + b": " + value for value in values)
    return b"\r\n".join(lines) + b"\r\n\r\n", uri


async def tunnel_websocket(reactor: Any, request: Any, url: bytes, headers: Headers, model_id: str,
                           endpoints: Any = None) -> None:
    """Pass a WebSocket upgrade through to ``url`` and relay frames both ways until either side
    closes (``/upstream`` only; llama-swap passes WebSockets there too).

    The upstream's ``101`` head is relayed as is, then twisted.web hands the client's connection
    over (the request is then ``client_gone``: nothing more is written through it). No ``101``:
    ``WebSocketRefused`` (502) naming the upstream's status line; no connection:
    ``UpstreamUnreachable``.

    :param endpoints: an endpoint factory (the model's client's, for its connect timeout); a
        plain one on ``reactor`` by default.
    """
    head, uri = websocket_request_head(b"GET", url, headers, request)
    factory = endpoints if endpoints is not None else _UpstreamEndpointFactory(reactor, CONNECT_TIMEOUT)
    upstream = _UpstreamSide()
    try:
        await factory.endpointForURI(uri).connect(_OneProtocol(upstream))
    except CancelledError:
        raise
    except Exception as e:
        raise UpstreamUnreachable(f"upstream for model '{model_id}' unreachable: {_reason(e)}") from None
    try:
        upstream.transport.write(head)
        end = await upstream.head
    except CancelledError:
        upstream.transport.abortConnection()
        raise
    except LlamaSwapError:
        upstream.transport.abortConnection()
        raise
    except Exception as e:
        raise UpstreamUnreachable(f"upstream for model '{model_id}' unreachable: {_reason(e)}") from None
    answer, upstream.buffer = upstream.buffer[:end], upstream.buffer[end:]
    status_line = answer.split(b"\r\n", 1)[0]
    if status_line.split(b" ")[1:2] != [b"101"]:
        upstream.transport.abortConnection()
        raise WebSocketRefused(f"upstream for model '{model_id}' did not accept the WebSocket upgrade: "
                               f"{status_line.decode('latin-1')}")
    _take_over(request, upstream, answer)
    await upstream.closed


def _take_over(request: Any, upstream: _UpstreamSide, answer: bytes) -> None:
    """Hand the client's connection from twisted.web to the tunnel (Twisted's own WebSocket
    resource does it the same way)."""
    channel = request.channel
    client = channel.transport
    request.client_gone = True  # the HTTP exchange is over: never finish() this request
    request.record = None  # and a tunnel is no request of the activity
    client.write(answer + upstream.buffer)
    upstream.buffer = b""
    pending = b"".join(getattr(channel, "_dataBuffer", None) or [])  # sent early by the client
    side = _ClientSide(upstream)
    upgrade = getattr(channel, "_protocolUpgradeForWebsockets", None)
    if upgrade is not None:
        upgrade(side)
    else:  # an older Twisted lacks it: do what it does
        channel.dataReceived, channel.connectionLost = side.dataReceived, side.connectionLost
        side.makeConnection(client)
    upstream.peer = client
    if pending:
        upstream.transport.write(pending)
    try:  # back-pressure both ways: a slow reader pauses the other side
        client.unregisterProducer()
        client.registerProducer(upstream.transport, True)
        upstream.transport.registerProducer(client, True)
    except (AttributeError, RuntimeError):
        pass
    client.resumeProducing()


def _cancelled(e: BaseException) -> bool:
    """A transport failure that is a cancellation (``ResponseNeverReceived([CancelledError])``)."""
    reasons = getattr(e, "reasons", None) or ()
    return bool(reasons) and all(isinstance(r, Failure) and r.check(CancelledError) for r in reasons)


def _reason(e: BaseException) -> str:
    """A short human reason out of Twisted's nested failure wrappers."""
    reasons = getattr(e, "reasons", None)
    if reasons:
        inner = [r.value for r in reasons if isinstance(r, Failure)]
        texts = [_reason(v) for v in inner if not isinstance(v, (ResponseDone,))]
        if texts:
            return "; ".join(dict.fromkeys(texts))
    text = str(e) or type(e).__name__
    if isinstance(e, ConnectionError) or "Connection was refused" in text:
        return text
    return text


def file_size(fileobj: BinaryIO) -> int:
    fileobj.seek(0, os.SEEK_END)
    size = fileobj.tell()
    fileobj.seek(0)
    return size


class UsageTap:
    """Feeds one forwarded response to a usage parser, when there is a factory for one.

    :param factory: ``(status, upstream headers) -> parser | None`` (the web context's
        ``response_observer_factory``), or None.

    ``on_headers`` and ``on_data`` are the forwarder's hooks; ``usage()`` is the parsed result.
    """

    __slots__ = ("factory", "parser")

    def __init__(self, factory: Optional[Callable[[int, Any], Any]]) -> None:
        self.factory = factory
        self.parser: Any = None

    def on_headers(self, response: Any) -> None:
        if self.factory is not None:
            self.parser = self.factory(response.code, response.headers)

    def on_data(self, chunk: bytes) -> None:
        if self.parser is not None:
            self.parser.feed(chunk)

    def usage(self) -> Optional[dict]:
        return self.parser.result() if self.parser is not None else None

