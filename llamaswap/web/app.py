"""What resources share (``App``) and the record of one model-dispatched request."""
from __future__ import annotations

from typing import Any, Callable, Optional

import attr
from twisted.logger import Logger

from llamaswap.proxy import Forwarder


@attr.s(slots=True, kw_only=True, eq=False)
class RequestRecord:
    """One model-dispatched request, handed to ``App.request_listeners`` once, when it ends.

    The request owns it (``LlamaSwapRequest.begin_record``); ``serve`` fills in the model,
    queue wait, stream error and usage; the request sets the status, duration and time to
    first byte when its response ends, whatever ended it.

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
    model: str = attr.ib(default="")
    status: Optional[int] = attr.ib(default=None)
    duration: Optional[float] = attr.ib(default=None)
    ttfb: Optional[float] = attr.ib(default=None)
    queue_wait: Optional[float] = attr.ib(default=None)
    stream_error: Optional[str] = attr.ib(default=None)
    usage: Optional[dict] = attr.ib(default=None)
    #: ``serve`` still runs (the forwarder may end the response before ``serve`` learns
    #: how the stream ended): the record is emitted when ``serve`` lets go of it.
    serving: bool = attr.ib(default=False, repr=False)

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


class App:
    """What resources need from the rest of the daemon, in one place.

    :param router: the ``ModelRouter`` (its ``config`` is always the current one).
    :param logs: the ``LogBroadcaster``.
    :param forwarder: the ``Forwarder``.
    :param clock: ``IReactorTime``: every time the request layer reads comes from it.
    :param started: the daemon start time (``created`` of /v1/models); now by default.
    """

    def __init__(self, router: Any, logs: Any, forwarder: Forwarder, clock: Any,
                 log: Optional[Logger] = None, started: Optional[float] = None) -> None:
        self.router = router
        self.logs = logs
        self.forwarder = forwarder
        self.clock = clock
        self.log = log or Logger(namespace="llamaswap.http")
        self.started = int(started if started is not None else clock.seconds())
        #: each called with the ``RequestRecord`` of every finished model-dispatched request
        self.request_listeners: list[Callable[[RequestRecord], None]] = []
        #: ``(status, upstream headers) -> parser | None``; a parser's ``feed(chunk)`` sees
        #: every relayed body chunk and its ``result()`` becomes the record's ``usage``.
        self.response_observer_factory: Optional[Callable[[int, Any], Any]] = None
        self.reload: Optional[Callable[[], dict]] = None  # set by the service

    @property
    def config(self) -> Any:
        return self.router.config

    def emit(self, record: RequestRecord) -> None:
        """Hand a finished request's record to every listener; one failing spoils nothing."""
        for listener in self.request_listeners:
            try:
                listener(record)
            except Exception:
                self.log.failure("request listener failed")
