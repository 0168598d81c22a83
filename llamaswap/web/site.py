"""The ``Site``: our request class (body limits, the client-gone flag, the request's
record) and the access log."""
from __future__ import annotations

import tempfile
from io import BytesIO
from typing import Any, Optional

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from llamaswap.errors import error_body
from llamaswap.web.context import RequestRecord, WebContext

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
        self.record = RequestRecord(endpoint=endpoint, started=self._site.clock.seconds(),
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

    # -- the response --------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        record = self.record
        if record is not None and record.ttfb is None and data:
            # the first body byte sent, whoever writes it (upstream relay, loading
            # progress, a llamaswap error)
            record.ttfb = self._site.clock.seconds() - record.started
        super().write(data)

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


def send_queued(transport: Any) -> None:
    """Send what a client connection has queued at once, as far as the socket takes it.

    Twisted sends written data when the reactor next finds the socket writable, that is after
    everything else the current event causes. For a plain TCP connection (also under TLS)
    with nothing stopping it, this sends it now; whatever the socket does not take, or any
    error, is left to the reactor as usual. Other transports are left alone.
    """
    if transport is not None and type(transport) is not tcp.Server:
        transport = getattr(transport, "transport", None)  # TLS: the connection beneath
    if type(transport) is not tcp.Server or not transport.connected or transport.disconnecting:
        return
    try:
        if transport._writeDisconnecting or not (
                transport._tempDataBuffer or transport.offset < len(transport.dataBuffer)):
            return
    except AttributeError:  # pragma: no cover - a FileDescriptor without that layout
        return
    if transport.doWrite() is not None:
        transport.startWriting()  # the reactor calls doWrite again and handles what it says


class AccessLogSite(Site):
    """``Site`` with our request class, JSON errors and the access log.

    :param app: the resources' ``WebContext``; its clock times requests.
    :param reactor: what twisted.web's channels use (timeouts).
    """

    requestFactory = LlamaSwapRequest

    def __init__(self, resource: Resource, app: WebContext, reactor: Any, log: Optional[Logger] = None) -> None:
        super().__init__(resource, reactor=reactor)
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
        self.alog.info("{line}", line=line)
