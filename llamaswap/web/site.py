"""The ``Site``: our request class (body limits, the client-gone flag, the request's
record) and the access log."""
from __future__ import annotations

import tempfile
import time
from io import BytesIO
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site

try:  # what twisted.web's Site builds: HTTP/1.1, or HTTP/2 when negotiated over TLS
    from twisted.web.http import _GenericHTTPChannelProtocol
except ImportError:  # pragma: no cover - a twisted.web without it
    _GenericHTTPChannelProtocol = None

from llamaswap.errors import error_body
from llamaswap.web.context import RequestRecord, WebContext
from llamaswap.wire import send_queued, write_now

#: request bodies bigger than this are spooled to a temporary file.
SPOOL_BYTES = 1024 * 1024


class LlamaSwapRequest(Request):
    """Spools large bodies, refuses ones over ``maxRequestBody`` while receiving them, and
    writes one access-log line when the response ends (or 499 when the client left).

    Every time it reads comes from its site's clock.

    :ivar client_gone: the client left before the response was finished (set from
        ``notifyFinish``, watched once rendering returned with the response still open);
        nothing written after that reaches anyone.
    :ivar record: the ``RequestRecord`` of a model-dispatched request (``begin_record``),
        emitted to the web context's listeners when the response ends; None on other routes.
    """

    # multipart bodies are ours to parse (invalid_multipart), not twisted.web's.
    _parsePOSTFormSubmission = False
    client_gone = False
    record: Optional[RequestRecord] = None
    #: the configured key the request carried (``llamaswap.auth``; None without one) and whether
    #: it may use the management endpoints; set by the root before any lookup.
    api_key: Any = None
    admin = True
    _work: Optional[Deferred] = None  # cancelled when the client leaves
    _received = 0
    _refused = False
    _logged = False
    #: when the request was ready to process (its record's start, time waited for the pacer included)
    _processing: Optional[float] = None

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        # twisted.web's __init__ sets this on the instance from the Site, hiding the class
        # attribute: without this, every POST paid for an email-package Content-Type parse.
        self._parsePOSTFormSubmission = False
        self._site = channel.site  # the channel is gone once the response ends
        self._started = self._site.clock.seconds()

    # -- the request's record and the client ---------------------------------------------------

    def begin_record(self, endpoint: str) -> RequestRecord:
        """Make this a model-dispatched request at ``endpoint`` (a route pattern)."""
        started = self._processing if self._processing is not None else self._site.clock.seconds()
        self.record = RequestRecord(endpoint=endpoint, started=started,
                                    id=self._site.app.request_ids(),
                                    key=self.api_key.name if self.api_key is not None else "",
                                    method=self.method.decode("latin-1"),
                                    path=self.path.decode("latin-1", "replace"))
        return self.record

    def cancel_when_gone(self, work: Deferred) -> None:
        """Cancel ``work`` (an async render) if the client leaves before the response ends."""
        if self.client_gone:
            work.cancel()
        else:
            self._work = work

    def render(self, resrc: Resource) -> None:
        super().render(resrc)
        if not self.finished:
            # still open (NOT_DONE_YET): from now on the client may leave before the end
            self.notifyFinish().addErrback(self._client_left)

    def _client_left(self, reason: Failure) -> None:
        self.client_gone = True
        work, self._work = self._work, None
        if work is not None:
            work.cancel()

    # -- the body ------------------------------------------------------------------------------

    def gotLength(self, length: Optional[int]) -> None:
        self._received = 0
        if length is not None and length > self.site_limit():
            self._refuse()
            return
        # a body of known length that stays in memory anyway needs no spooling wrapper
        self.content = BytesIO() if length is not None and length <= SPOOL_BYTES \
            else tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)

    def site_limit(self) -> int:
        return self._site.max_request_body()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.site_limit():
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        """413 while the body arrives; nothing is started, the connection closes."""
        self._refused = True
        self.content = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        limit = self.site_limit()
        body = error_body("invalid_request_error", "request_too_large",
                          f"request body larger than maxRequestBody ({limit} bytes)")
        transport = self.channel.transport
        # llamaswap's errors carry ACAO * when the request had an Origin.
        cors = b"Access-Control-Allow-Origin: *\r\n" if self.requestHeaders.hasHeader(b"origin") else b""
        transport.write(b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: application/json\r\n"
                        + cors + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        self.channel.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        """Process the request now, or, within a burst of requests, once the streams already
        running had their turn (``llamaswap.pacing``)."""
        site = self._site
        self._processing = site.clock.seconds()
        if site.pacer is None:
            super().process()
        else:
            site.pacer.run(self._process_paced)

    def _process_paced(self) -> None:
        if self._disconnected:
            return  # the client left while the request waited: nothing to answer
        super().process()

    def paced(self, work: Any, *args: Any) -> None:
        """Call ``work(*args)`` now, or later in a burst (the site's pacer): bookkeeping that
        need not hold the streams still running."""
        pacer = self._site.pacer
        if pacer is None:
            work(*args)
        else:
            pacer.run(work, *args)

    # -- the response --------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        record = self.record
        if record is not None and record.ttfb is None and data:
            # the first body byte sent, whoever writes it (upstream relay, loading
            # progress, a llamaswap error)
            record.ttfb = self._site.clock.seconds() - record.started
        super().write(data)
        channel = self.channel
        if type(channel) is LlamaSwapChannel and channel.held is not None:
            channel.send_held()  # a head without body bytes (HEAD, 204, an empty write)

    def finish(self) -> None:
        transport = self.channel.transport if self.channel is not None else None
        super().finish()  # lets go of the channel
        # the response's last bytes leave now, not after the bookkeeping below (and whatever
        # else runs before the reactor's next turn): the client does not wait for either
        send_queued(transport)
        self._ended(self.code)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if not self.finished:
            self._ended(499)  # a client that left is not an error

    def _ended(self, status: int) -> None:
        if self._logged or self._refused and status == 499:
            return
        self._logged = True
        site = self._site
        now = site.clock.seconds()
        site.access_log(self, status, now - self._started)
        record, self.record = self.record, None
        if record is not None:
            ctype = self.responseHeaders.getRawHeaders(b"content-type")
            if ctype:
                record.content_type = ctype[0].decode("latin-1")
        if record is not None and record.end(status, now, self.sentLength):
            site.app.emit(record)


class LlamaSwapChannel(HTTPChannel):
    """``HTTPChannel`` whose responses go out as they are written (``llamaswap.wire``), the
    head together with the first body bytes: one ``send`` for a short response or a streamed
    chunk, where Twisted's queueing costs a wait for the reactor's next turn and two
    ``epoll_ctl`` calls each time.

    A head with no body bytes after it (HEAD, 204, an empty write) is sent by
    ``LlamaSwapRequest.write`` at the end of the write, or else when the response ends."""

    #: the response head, held until the body's first bytes (or the end of the write)
    held: Optional[list] = None
    #: the transport the two answers below were read from, and them: a connection's local
    #: address and security do not change, and every request asked (a ``getsockname`` and an
    #: interface adaptation each time)
    _asked: Any = None
    _host: Any = None
    _secure = False

    def _answers(self) -> None:
        transport = self.transport
        if self._asked is not transport:
            self._host = transport.getHost()
            self._secure = super().isSecure()
            self._asked = transport

    def getHost(self) -> Any:
        self._answers()
        return self._host

    def isSecure(self) -> bool:
        self._answers()
        return self._secure

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        if not isinstance(headers, Headers):  # Twisted's sanitising path for other header types
            super().writeHeaders(version, code, reason, headers)
            return
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head.extend((name, b": ", value, b"\r\n"))
        head.append(b"\r\n")
        self.held = head

    def write(self, data: bytes) -> None:
        self._send((data,))

    def writeSequence(self, iovec: Any) -> None:
        self._send(iovec)

    def send_held(self) -> None:
        self._send(())

    def requestDone(self, request: Any) -> None:
        if self.held is not None:  # a head without body bytes, from a request that did not send it
            self.send_held()
        super().requestDone(request)

    def _send(self, parts: Any) -> None:
        held = self.held
        if held is not None:
            self.held = None
            held.extend(parts)
            parts = held
        if self.transport is not None:
            write_now(self.transport, b"".join(parts))


def _channel_protocol(site: "AccessLogSite") -> Any:
    """What ``Site.protocol`` builds, with :class:`LlamaSwapChannel` for HTTP/1.1."""
    channel = LlamaSwapChannel()
    return _GenericHTTPChannelProtocol(channel) if _GenericHTTPChannelProtocol is not None else channel


class AccessLogSite(Site):
    """``Site`` with our request class, JSON errors and the access log.

    :param app: the resources' ``WebContext``; its clock times requests.
    :param reactor: what twisted.web's channels use (timeouts).
    :param pacer: a ``llamaswap.pacing.Pacer``: requests start, and their bookkeeping runs,
        through it (None: at once).
    """

    requestFactory = LlamaSwapRequest
    protocol = _channel_protocol

    def __init__(self, resource: Resource, app: WebContext, reactor: Any, log: Optional[Logger] = None,
                 pacer: Any = None) -> None:
        super().__init__(resource, reactor=reactor)
        self.pacer = pacer
        self.app = app
        self.clock = app.clock
        self.alog = log or Logger(namespace="llamaswap.access")
        self.displayTracebacks = False

    def max_request_body(self) -> int:
        return self.app.config.max_request_body

    def log(self, request: Request) -> None:
        pass  # twisted's combined log is replaced by access_log()

    def access_log(self, request: Request, status: int, duration: float) -> None:
        path = request.path or b""
        if path in (b"/health", b"/metrics"):
            return
        headers = request.requestHeaders
        forwarded = headers.getRawHeaders(b"x-forwarded-for")
        real_ip = headers.getRawHeaders(b"x-real-ip")
        if forwarded:
            ip = forwarded[0].split(b",")[0].strip().decode("latin-1")
        elif real_ip:
            ip = real_ip[0].strip().decode("latin-1")
        else:
            ip = getattr(request.getClientAddress(), "host", "") or "-"
        agent = (headers.getRawHeaders(b"user-agent") or [b""])[0].decode("latin-1")
        line = (f'Request {ip} "{request.method.decode("latin-1")} {request.uri.decode("latin-1")} '
                f'{request.clientproto.decode("latin-1")}" {status} {request.sentLength} '
                f'"{agent}" {duration:.3f}s')
        key = getattr(request, "api_key", None)
        if key is not None and self.app.config.api_key_scopes:
            line += f" key={key.name}"  # the key's name only, never the key
        # Logger.info("{line}", line=line) without its per-call checks (a sorted list of the
        # levels, a format test): the same event, to the same observer
        log = self.alog
        log.observer({"log_logger": log, "log_level": LogLevel.info, "log_namespace": log.namespace,
                      "log_source": log.source, "log_format": "{line}", "log_time": time.time(), "line": line})
