"""What resources share (``WebContext``) and the record of one model-dispatched request."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Optional

import attr
from twisted.logger import Logger

from llamaswap.captures import CaptureBuffer
from llamaswap.proxy import Forwarder
from llamaswap.web.inflight import InflightRequests

__all__ = ["RequestRecord", "WebContext"]


@attr.s(slots=True, kw_only=True, eq=False)
class RequestRecord:
    """One model-dispatched request, handed to ``WebContext.request_listeners`` once, when it ends.

    The request owns it (``LlamaSwapRequest.begin_record``); ``serve`` fills in the model,
    queue wait, stream error and usage; the request sets the status, duration and time to
    first byte when its response ends, whatever ended it.

    :ivar id: the request's activity id, unique over the daemon's life (and over restarts when the
        activity store persists): ``/api/captures/<id>``, ``/api/inflight/<id>/cancel`` and the
        activity rows use it.
    :ivar endpoint: the route pattern (``/v1/chat/completions``, ``/upstream``), never the raw path.
    :ivar started: ``clock.seconds()`` when dispatching began.
    :ivar model: the resolved model id or peer label; "" when the request failed before that.
    :ivar status: the status sent; 499 when the client left first.
    :ivar duration: seconds from ``started`` to the end of the response.
    :ivar ttfb: seconds from ``started`` to the first body byte sent.
    :ivar queue_wait: seconds from admission to the grant of the model.
    :ivar stream_error: why the upstream stream failed, when it did.
    :ivar usage: ``{"input", "output", "cached", "prompt_per_second", "tokens_per_second"}``
        (each possibly None) parsed from the response, or None.
    """

    endpoint: str = attr.ib()
    started: float = attr.ib()
    id: int = attr.ib(default=0)
    model: str = attr.ib(default="")
    status: Optional[int] = attr.ib(default=None)
    duration: Optional[float] = attr.ib(default=None)
    ttfb: Optional[float] = attr.ib(default=None)
    queue_wait: Optional[float] = attr.ib(default=None)
    stream_error: Optional[str] = attr.ib(default=None)
    usage: Optional[dict] = attr.ib(default=None)
    #: the name of the API key the request carried ("" without one); never the key itself
    key: str = attr.ib(default="")
    #: the request's method and path (no query string), as the client sent them
    method: str = attr.ib(default="")
    path: str = attr.ib(default="")
    #: the response's ``Content-Type`` ("" when it had none)
    content_type: str = attr.ib(default="")
    #: ``{"selector": id}`` when a selector chose the model (llama-swap's activity metadata)
    metadata: Optional[dict] = attr.ib(default=None)
    #: ``serve`` still runs (the forwarder may end the response before ``serve`` learns
    #: how the stream ended): the record is emitted when ``serve`` lets go of it.
    serving: bool = attr.ib(default=False, repr=False)
    #: the request's ``captures.CaptureDraft`` while it runs (captures on, a captured route);
    #: ``WebContext.emit`` hands it to the capture ring.
    capture: Any = attr.ib(default=None, repr=False)

    def end(self, status: int, now: float, sent: int) -> bool:
        """The response ended with ``status`` after ``sent`` body bytes.

        :returns: whether the record is complete and may be emitted now.
        """
        self.status = status
        self.duration = now - self.started
        if self.ttfb is None and sent and status != 499:
            self.ttfb = self.duration  # a llamaswap answer: written at once
        return not self.serving

    def let_go(self) -> bool:
        """``serve`` is done with the record.

        :returns: whether the response had already ended (the record may be emitted now).
        """
        self.serving = False
        return self.status is not None


@attr.s(frozen=True, slots=True, eq=False)
class WebContext:
    """Everything the resources, the site and the request layer use, given once when it is built.

    It holds no state of its own: the router's ``config`` is always the current one, and a
    reload replaces nothing here.

    :param router: the ``ModelRouter``.
    :param logs: the ``LogBroadcaster`` (``/logs``, ``/logs/stream``).
    :param forwarder: the ``Forwarder`` that relays upstream answers.
    :param clock: ``IReactorTime``: every time the request layer reads comes from it.
    :param log: the ``llamaswap.http`` logger.
    :param started: the daemon start time (``created`` of /v1/models); now by default.
    :param reload: ``() -> outcome``: re-read and apply the config file (``POST
        /api/config/reload``); None answers that reloading is unavailable.
    :param request_listeners: each called with the ``RequestRecord`` of every finished
        model-dispatched request (metrics, the event hub).
    :param response_observer_factory: ``(status, upstream headers) -> parser | None``; a
        parser's ``feed(chunk)`` sees every relayed body chunk and its ``result()`` becomes
        the record's ``usage``.
    :param peer_http: what peer requests go through: ``peers.PeerClients`` (a client per peer,
        with its timeouts), or any treq client.
    :param request_ids: ``() -> int``: the next request's activity id (the activity store seeds it
        past the ids it already holds); a counter from 1 by default.
    :param inflight: the ``InflightRequests`` (``/api/inflight``); one on ``clock`` by default.
    :param captures: the ``CaptureBuffer`` (``/api/captures``); by default one sized by the
        current config's ``captureBuffer``.
    """

    router: Any = attr.ib()
    logs: Any = attr.ib()
    forwarder: Forwarder = attr.ib()
    clock: Any = attr.ib()
    log: Logger = attr.ib(kw_only=True, factory=lambda: Logger(namespace="llamaswap.http"))
    started: int = attr.ib(kw_only=True, converter=int,
                           default=attr.Factory(lambda self: self.clock.seconds(), takes_self=True))
    reload: Optional[Callable[[], dict]] = attr.ib(kw_only=True, default=None)
    request_listeners: tuple = attr.ib(kw_only=True, default=(), converter=tuple)
    response_observer_factory: Optional[Callable[[int, Any], Any]] = attr.ib(kw_only=True, default=None)
    peer_http: Any = attr.ib(kw_only=True, default=None)
    request_ids: Callable[[], int] = attr.ib(kw_only=True, factory=lambda: itertools.count(1).__next__)
    inflight: Any = attr.ib(kw_only=True, default=attr.Factory(
        lambda self: InflightRequests(self.clock, self.log), takes_self=True))
    captures: Any = attr.ib(kw_only=True, default=attr.Factory(
        lambda self: CaptureBuffer(lambda: self.router.config.capture_buffer_mb), takes_self=True))

    @property
    def config(self) -> Any:
        return self.router.config

    def emit(self, record: RequestRecord) -> None:
        """Hand a finished request's record to every listener; one failing spoils nothing.
        Its capture, if any, is kept first."""
        if record.capture is not None:
            try:
                self.captures.request_finished(record)
            except Exception:
                self.log.failure("keeping the capture of request {id} failed", id=record.id)
        for listener in self.request_listeners:
            try:
                listener(record)
            except Exception:
                self.log.failure("request listener failed")
