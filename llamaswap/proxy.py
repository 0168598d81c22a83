"""Forwarding one request to an upstream and relaying its response (PROXY-*).

treq is used through one ``HTTPClient`` per child lifetime (a fresh pool each time, so a
connection is never reused across children, PROXY-10), configured for a proxy: no
redirects followed, no cookies kept, unbuffered responses streamed back chunk by chunk
with back-pressure. treq always sends ``Accept-Encoding: gzip`` and decodes: what it
decoded loses ``Content-Encoding``/``Content-Length`` (PROXY-4).

Size (~520 lines): the one send with its retry loop, the one relay and the body producers share
this module's private helpers, so that there is exactly one forwarding path to read.
"""
from __future__ import annotations

import os
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, BinaryIO, Callable, Optional

import attr
import treq.client
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from hyperlink import EncodedURL
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.web.client import (
    Agent, BrowserLikePolicyForHTTPS, ContentDecoderAgent, GzipDecoder, HTTPConnectionPool,
    _HTTP11ClientFactory, _StandardEndpointFactory, PotentialDataLoss, RequestNotSent,
    RequestTransmissionFailed, ResponseDone, ResponseNeverReceived)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from llamaswap.errors import UpstreamUnreachable, error_body

log = Logger(namespace="llamaswap.proxy")

#: PROXY-8: connect timeout; no response timeout (long generations are legitimate).
CONNECT_TIMEOUT = 10
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


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" line per upstream connection


_FAST_KEYS = frozenset({"headers", "data", "unbuffered", "allow_redirects"})
#: HostnameEndpoint's "happy eyeballs" delay between addresses; its default (0.3 s) is also
#: how long a *refused* connection takes to fail, i.e. every health probe of a child that
#: is not listening yet. Upstreams are local: try the next address almost at once.
ATTEMPT_DELAY = 0.01


class _UpstreamEndpointFactory(_StandardEndpointFactory):
    """Agent endpoints for upstreams, one per (scheme, host, port), built once.

    ``http`` to an IP literal is a plain TCP endpoint (no resolver thread, no attempt
    delay: a refused connection fails at once); ``http`` to a name is a
    ``HostnameEndpoint`` with a short attempt delay; ``https`` is Agent's own.
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        super().__init__(reactor, BrowserLikePolicyForHTTPS(), connect_timeout, None)
        self._cache: dict = {}

    def endpointForURI(self, uri: Any) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            endpoint = self._cache[key] = self._make(uri)
        return endpoint

    def _make(self, uri: Any) -> Any:
        if uri.scheme != b"http":
            return super().endpointForURI(uri)
        host = uri.host.decode("ascii")
        timeout = self._connectTimeout
        if isIPAddress(host):
            return TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=timeout)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=timeout)
        return HostnameEndpoint(self._reactor, host, uri.port, timeout=timeout, attemptDelay=ATTEMPT_DELAY)


class ProxyHTTPClient(treq.client.HTTPClient):
    """treq's ``HTTPClient`` with a short path for the forwarder's own requests.

    A forwarded request (``Headers``, bytes or producer body, ``unbuffered=True``,
    ``allow_redirects=False``) goes straight to ``ContentDecoderAgent(agent, gzip)``: the
    same agent chain treq builds, minus what is a no-op for us (a ``CookieAgent`` over a
    jar that accepts no cookie, redirect handling that is off, treq's response wrapper),
    and with treq's URL normalisation (hyperlink, IDNA) cached per URL. Every other call
    (health checks, tests) is treq's own.
    """

    def __init__(self, agent: Any, cookiejar: Any, data_to_body_producer: Callable) -> None:
        super().__init__(agent, cookiejar=cookiejar, data_to_body_producer=data_to_body_producer)
        self._decoding = ContentDecoderAgent(agent, [(b"gzip", GzipDecoder)])
        self._uris: dict = {}

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
            return self._decoding.request(method.encode("ascii").upper(), uri,
                                          headers=kwargs["headers"], bodyProducer=producer)
        return super().request(method, url, **kwargs)


def make_http_client(reactor: Any, persistent: bool = True, max_per_host: int = 64):
    """A treq ``HTTPClient`` set up for proxying, and its pool (for one child lifetime)."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = _QuietClientFactory
    pool.maxPersistentPerHost = max_per_host
    pool.retryAutomatically = False  # PROXY-10 retries are ours, for every method
    agent = Agent.usingEndpointFactory(reactor, _UpstreamEndpointFactory(reactor, CONNECT_TIMEOUT), pool=pool)
    no_cookies = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
    client = ProxyHTTPClient(agent, cookiejar=no_cookies, data_to_body_producer=_to_body_producer)
    return client, pool


def client_ip(request: Any) -> str:
    """The peer address of a twisted.web request ('' for unix sockets)."""
    peer = request.getClientAddress()
    return getattr(peer, "host", "") or ""


def upstream_headers(request: Any, strip_auth: bool, scheme: bytes) -> Headers:
    """PROXY-2: the headers sent upstream."""
    incoming = request.requestHeaders
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
    sse = False
    for name, values in response.headers.getAllRawHeaders():
        lname = name.lower()
        if lname in HOP_BY_HOP or lname == b"content-length":
            continue
        if lname == b"content-encoding" and not any(v.strip() for v in values):
            continue  # ContentDecoderAgent leaves an empty one behind when it decoded nothing
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

    ``done`` fires with a ``RelayOutcome`` once the upstream body ends; a body that ends
    early is reported to the client first (PROXY-9, see ``_stream_failed``).
    """

    def __init__(self, request: Any, on_data: Optional[Callable[[bytes], None]], status: int,
                 sse: bool, model_id: str, tail: bytes) -> None:
        self.request = request
        self.done: Deferred = Deferred(self._cancel)
        self.on_data = on_data
        self.status = status
        self.sse = sse
        self.model_id = model_id
        self.tail = tail  # the last bytes relayed (PROXY-9 needs to know if a blank line ended them)
        self.registered = False
        self.nbytes = 0

    def _cancel(self, done: Deferred) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionMade(self) -> None:
        if not self.request.client_gone:
            self.request.registerProducer(self.transport, True)
            self.registered = True

    def dataReceived(self, data: bytes) -> None:
        if self.request.client_gone:
            return
        self.request.write(data)
        self.nbytes += len(data)
        self.tail = (self.tail + data)[-4:]
        if self.on_data is not None:
            self.on_data(data)

    def connectionLost(self, reason: Failure) -> None:
        if self.registered:
            self.registered = False
            try:
                self.request.unregisterProducer()
            except (AttributeError, RuntimeError):
                pass
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(RelayOutcome(self.status, self.nbytes))
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
        method = request.method.decode("ascii")

        def attempt(client: Any, may_retry: bool) -> Deferred:
            try:
                d = client.request(method, url, headers=headers, data=body(),
                                   unbuffered=True, allow_redirects=False)
            except Exception:
                d = fail()
            return d.addErrback(failed, may_retry)

        def failed(failure: Failure, may_retry: bool) -> Any:
            if failure.check(CancelledError):
                return failure
            e = failure.value
            if may_retry and isinstance(e, _RETRYABLE) and still_ready():
                # PROXY-10: llama-server drops kept-alive connections after a stream; retry
                # once on a connection of its own, whatever the method.
                log.debug("retrying request to {model} on a new connection ({why})",
                          model=model_id, why=_reason(e))
                return attempt(self.fresh_client(), False)
            if unreachable is None:
                raise UpstreamUnreachable(f"upstream for model '{model_id}' unreachable: {_reason(e)}")
            raise unreachable(_reason(e))

        return attempt(http, True)

    def relay(self, request: Any, response: Any, *, model_id: str, sse: bool,
              on_data: Optional[Callable[[bytes], None]] = None, status: Optional[int] = None,
              tail: bytes = b"") -> Deferred:
        """Stream ``response``'s body to ``request``; a Deferred firing with a ``RelayOutcome``.

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

