"""Failover selectors: targets tried in order, and a circuit breaker per target.

A selector with ``strategy: failover`` sends a request to its first target. The request moves on
to the next target when the one tried

* fails to start (``upstream_start_failed``, or a start refused with ``insufficient_memory``),
* answers a 5xx status, or
* drops the connection (or sends no headers within ``timeouts.responseHeader``),

before the client got any byte, and only then. Once a target's status and headers are relayed
the request stays with it: a stream that breaks later still ends with the SSE error event and is
never sent again. A 4xx is the target's answer and is relayed. The request body is kept, so the
next target gets it again, with its own filters and model name applied.

:class:`Breakers` keeps one circuit breaker per (selector, target), on the injected clock:

* **closed**: the target is tried. ``settings.failures`` failures in a row open it;
* **open**: the target is skipped for ``settings.cooldown`` seconds;
* **half-open**: the cool-down is over. The next request probes the target (one probe at a time;
  other requests still skip it). A probe that succeeds closes the breaker, one that fails opens
  it for another cool-down.

A failure is what makes a request fail over, plus a 5xx or a broken stream that the client got
(from the last target left to try, or mid-stream); any other answer is a success. A request that
ends otherwise (the client left, a 429) says nothing about the target.

:func:`run` is the loop; the web layer gives it one ``attempt(target, more)`` per target, and
:class:`FailoverForwarder` is the forwarder an attempt relays through: it names the target in the
``X-Llamaswap-Target`` header and turns a 5xx into :class:`TargetFailed` while ``more`` targets
may still be tried. :class:`BreakerCollector` exports the breakers to ``/metrics``.
"""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Optional

import attr
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamaswap.errors import (
    InsufficientMemory, LlamaSwapError, PeerUnreachable, UpstreamStartFailed, UpstreamUnreachable)
from llamaswap.peers import find_peer
from llamaswap.proxy import UpstreamTimeout, copy_response_headers

if TYPE_CHECKING:
    from llamaswap.config import Config, SelectorConfig

__all__ = [
    "AllTargetsFailed", "Attempt", "BreakerCollector", "BreakerState", "Breakers", "FailoverForwarder",
    "TARGET_HEADER", "TargetFailed", "run",
]

#: the response header naming the target that answered a failover selector's request
TARGET_HEADER = b"X-Llamaswap-Target"
#: at most this much of a dropped 5xx body is quoted in the log and in the error
_QUOTED = 512
#: a dropped 5xx body is read (so its connection may be reused) up to this size, then cut
_DRAINED = 64 * 1024


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


#: ``llamaswap_selector_breaker_state``'s values
STATE_VALUES = {BreakerState.CLOSED: 0, BreakerState.OPEN: 1, BreakerState.HALF_OPEN: 2}


class AllTargetsFailed(LlamaSwapError):
    """No target of a failover selector could be tried (every breaker open), or the last one
    tried failed in a way that left nothing to relay."""

    status, kind, code = 503, "server_error", "all_targets_failed"


class TargetFailed(Exception):
    """A target answered ``status`` before its first body byte; the answer was dropped."""

    def __init__(self, target: str, status: int, body: bytes) -> None:
        text = body.decode("utf-8", "replace").strip()
        super().__init__(f"target '{target}' answered {status}" + (f": {text}" if text else ""))
        self.target, self.status = target, status


#: what makes a request fail over (raised before the client got anything)
FAILOVER_ERRORS = (TargetFailed, UpstreamStartFailed, InsufficientMemory, UpstreamUnreachable, UpstreamTimeout,
                   PeerUnreachable)


def _reason(e: BaseException) -> str:
    return e.message if isinstance(e, LlamaSwapError) else str(e)


# -- the breakers ---------------------------------------------------------------------------------


@attr.s(slots=True, eq=False)
class _Breaker:
    """One target's breaker. ``opened_at`` is None while closed; ``generation`` counts the
    openings, so that a probe's late verdict never applies to a later opening."""

    failures: int = attr.ib(default=0)
    opened_at: Optional[float] = attr.ib(default=None)
    probing: bool = attr.ib(default=False)
    generation: int = attr.ib(default=0)
    last_error: str = attr.ib(default="")
    failed_total: int = attr.ib(default=0)
    #: what the target named when the breaker was last touched: a reload that changes it resets
    #: the breaker
    target_config: Any = attr.ib(default=None)


@attr.s(slots=True, eq=False)
class Attempt:
    """The right to try one target once; settle it with exactly one of ``succeeded``,
    ``failed`` or ``released``.

    :ivar probe: this attempt is the half-open breaker's one probe.
    """

    breakers: "Breakers" = attr.ib(repr=False)
    selector: "SelectorConfig" = attr.ib(repr=False)
    target: str = attr.ib()
    probe: bool = attr.ib(default=False)
    generation: int = attr.ib(default=0)
    settled: bool = attr.ib(default=False)

    def succeeded(self) -> None:
        if not self._settle():
            self.breakers._succeeded(self)

    def failed(self, reason: str) -> None:
        if not self._settle():
            self.breakers._failed(self, reason)

    def released(self) -> None:
        """No verdict (the client left, the request was refused before reaching the target)."""
        if not self._settle():
            self.breakers._released(self)

    def _settle(self) -> bool:
        was, self.settled = self.settled, True
        return was


class Breakers:
    """The circuit breakers of every failover selector's targets (see the module docstring).

    :param clock: ``IReactorTime``: the cool-downs run on it.
    :param config: ``() -> Config``: the current config (a reload that changes what a target
        names, or removes it, starts its breaker afresh).
    :param log: where openings, probes and recoveries are logged.
    """

    def __init__(self, clock: Any, config: Callable[[], "Config"], log: Optional[Logger] = None) -> None:
        self._clock = clock
        self._config = config
        self._log = log or Logger(namespace="llamaswap.failover")
        self._breakers: dict[tuple[str, str], _Breaker] = {}

    # -- reading --------------------------------------------------------------------------------

    def _target_config(self, target: str) -> Any:
        config = self._config()
        model_id = config.resolve(target)
        if model_id is not None:
            return config.models.get(model_id)
        try:
            peer = find_peer(config, target)
        except LlamaSwapError:
            return None
        return peer.peer if peer is not None else None

    def _get(self, selector: "SelectorConfig", target: str) -> _Breaker:
        key = (selector.id, target)
        breaker = self._breakers.get(key)
        current = self._target_config(target)
        if breaker is None or (breaker.target_config is not None and breaker.target_config != current):
            breaker = self._breakers[key] = _Breaker(target_config=current)
        return breaker

    def _state(self, selector: "SelectorConfig", breaker: _Breaker) -> BreakerState:
        if breaker.opened_at is None:
            return BreakerState.CLOSED
        if self._clock.seconds() < breaker.opened_at + selector.cooldown:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def state(self, selector: "SelectorConfig", target: str) -> BreakerState:
        return self._state(selector, self._get(selector, target))

    def could_admit(self, selector: "SelectorConfig", target: str) -> bool:
        """Whether :meth:`admit` would let a request try ``target`` now."""
        breaker = self._get(selector, target)
        state = self._state(selector, breaker)
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not breaker.probing)

    def admit(self, selector: "SelectorConfig", target: str) -> Optional[Attempt]:
        """An :class:`Attempt` at ``target``, or None when its breaker says to skip it."""
        breaker = self._get(selector, target)
        state = self._state(selector, breaker)
        if state is BreakerState.CLOSED:
            return Attempt(self, selector, target, False, breaker.generation)
        if state is BreakerState.OPEN or breaker.probing:
            return None
        breaker.probing = True
        self._log.info("selector {selector}: probing target {target} after its cool-down",
                       selector=selector.id, target=target)
        return Attempt(self, selector, target, True, breaker.generation)

    def retry_in(self, selector: "SelectorConfig", target: str) -> Optional[float]:
        """Seconds until an open breaker half-opens; None when it is not open."""
        breaker = self._get(selector, target)
        if self._state(selector, breaker) is not BreakerState.OPEN:
            return None
        return max(0.0, breaker.opened_at + selector.cooldown - self._clock.seconds())

    def failover_selectors(self) -> list["SelectorConfig"]:
        """The failover selectors of the current config; the breakers of any other (a selector
        or target a reload removed) are forgotten."""
        selectors = [s for s in self._config().selectors.values() if s.strategy == "failover"]
        kept = {(s.id, t) for s in selectors for t in s.targets}
        for key in [k for k in self._breakers if k not in kept]:
            del self._breakers[key]
        return selectors

    def snapshot(self) -> list[dict]:
        """``/running``'s ``selectors``: each failover selector and its targets' breakers."""
        out = []
        for selector in self.failover_selectors():
            targets = []
            for target in selector.targets:
                breaker = self._get(selector, target)
                state = self._state(selector, breaker)
                entry: dict = {"target": target, "breaker": state.value, "failures": breaker.failures}
                if state is BreakerState.OPEN:
                    entry["retry_in"] = round(self.retry_in(selector, target), 3)
                if state is BreakerState.HALF_OPEN:
                    entry["probing"] = breaker.probing
                if breaker.last_error:
                    entry["last_error"] = breaker.last_error
                targets.append(entry)
            out.append({"selector": selector.id, "strategy": selector.strategy,
                        "failures": selector.failures, "cooldown": selector.cooldown, "targets": targets})
        return out

    # -- verdicts -------------------------------------------------------------------------------

    def _succeeded(self, attempt: Attempt) -> None:
        breaker = self._get(attempt.selector, attempt.target)
        breaker.probing = False  # closed: no probe is needed any more
        if breaker.opened_at is not None:
            self._log.info("selector {selector}: target {target} answers again; its breaker is closed",
                           selector=attempt.selector.id, target=attempt.target)
        breaker.failures, breaker.opened_at = 0, None

    def _failed(self, attempt: Attempt, reason: str) -> None:
        selector = attempt.selector
        breaker = self._get(selector, attempt.target)
        breaker.failures += 1
        breaker.failed_total += 1
        breaker.last_error = reason
        if attempt.probe and attempt.generation == breaker.generation:
            breaker.probing = False
            if breaker.opened_at is not None:
                self._open(selector, attempt.target, breaker, "its probe failed")
                return
        if breaker.opened_at is None and breaker.failures >= selector.failures:
            self._open(selector, attempt.target, breaker, f"it failed {breaker.failures} times in a row")

    def _open(self, selector: "SelectorConfig", target: str, breaker: _Breaker, why: str) -> None:
        breaker.opened_at = self._clock.seconds()
        breaker.generation += 1  # a probe of an earlier opening no longer speaks for this one
        breaker.probing = False
        self._log.warn("selector {selector}: skipping target {target} for {cooldown:g} s: {why} "
                       "(last error: {error})", selector=selector.id, target=target,
                       cooldown=selector.cooldown, why=why, error=breaker.last_error)

    def _released(self, attempt: Attempt) -> None:
        breaker = self._get(attempt.selector, attempt.target)
        if attempt.probe and attempt.generation == breaker.generation:
            breaker.probing = False


class BreakerCollector:
    """The breakers on ``/metrics``: ``llamaswap_selector_breaker_state{selector,target}`` (0
    closed, 1 open, 2 half-open) and ``llamaswap_selector_target_failures_total{selector,target}``,
    read when scraped."""

    def __init__(self, breakers: Breakers) -> None:
        self._breakers = breakers

    def _families(self) -> tuple[Any, Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # loaded at the first scrape
        return (GaugeMetricFamily("llamaswap_selector_breaker_state",
                                  "Circuit breaker of a failover selector's target: 0 closed, 1 open, 2 half-open.",
                                  labels=["selector", "target"]),
                CounterMetricFamily("llamaswap_selector_target_failures",
                                    "Failures of a failover selector's target (starts, 5xx, dropped connections, "
                                    "broken streams).", labels=["selector", "target"]))

    def describe(self) -> Iterable:
        return self._families()

    def collect(self) -> Iterable:
        state, failures = self._families()
        breakers = self._breakers
        for selector in breakers.failover_selectors():
            for target in selector.targets:
                breaker = breakers._get(selector, target)
                state.add_metric([selector.id, target], STATE_VALUES[breakers._state(selector, breaker)])
                failures.add_metric([selector.id, target], breaker.failed_total)
        return [state, failures]


# -- one request -----------------------------------------------------------------------------------


async def run(breakers: Breakers, selector: "SelectorConfig",
              attempt: Callable[[str, bool], Awaitable[Any]], log: Logger) -> None:
    """Serve one request for a failover ``selector``: its targets in order, as the breakers allow.

    :param attempt: ``(target, more) -> verdict``: serve the request with ``target``; ``more``
        says whether another target could still be tried after it (the attempt then raises
        instead of relaying a 5xx). It raises one of ``FAILOVER_ERRORS`` when the request may
        go on to the next target; otherwise its verdict is True (the target answered), a
        reason (the client got the target's 5xx, or a stream it broke) or None (nothing learnt).
    :raises AllTargetsFailed: when every breaker is open, or the last failure left nothing to
        relay; the last target's own error when it failed before answering.
    """
    targets = list(selector.targets)
    last: Optional[BaseException] = None
    for i, target in enumerate(targets):
        ticket = breakers.admit(selector, target)
        if ticket is None:
            continue
        more = any(breakers.could_admit(selector, t) for t in targets[i + 1:])
        try:
            verdict = await attempt(target, more)
        except FAILOVER_ERRORS as e:
            ticket.failed(_reason(e))
            last = e
            if not more and not isinstance(e, TargetFailed):
                raise
            log.warn("selector {selector}: target {target} failed ({reason}); trying the next target",
                     selector=selector.id, target=target, reason=_reason(e))
            continue
        except BaseException:
            ticket.released()
            raise
        if verdict is True:
            ticket.succeeded()
        elif isinstance(verdict, str):
            ticket.failed(verdict)
        else:
            ticket.released()
        return
    if last is None:
        waits = ", ".join(f"{t} for {breakers.retry_in(selector, t) or 0:.0f} s" for t in targets)
        raise AllTargetsFailed(f"selector '{selector.id}': every target is skipped after failing repeatedly "
                               f"({waits})")
    raise AllTargetsFailed(f"selector '{selector.id}': every target failed; the last: {_reason(last)}")


class _Drain(Protocol):
    """Reads a dropped answer's body, keeping its start, and cuts it after ``_DRAINED`` bytes."""

    def __init__(self, done: Deferred) -> None:
        self.done, self.data, self.size = done, b"", 0

    def dataReceived(self, data: bytes) -> None:
        if len(self.data) < _QUOTED:
            self.data += data[:_QUOTED - len(self.data)]
        self.size += len(data)
        if self.size > _DRAINED and self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure) -> None:
        if not self.done.called:
            self.done.callback(self.data)


class FailoverForwarder:
    """The forwarder one attempt at ``target`` relays through (it stands in for the web
    context's ``Forwarder``, whose other methods it passes on).

    Its ``forward`` drops a 5xx answer while ``more`` targets may be tried (the body is read
    and discarded) and raises :class:`TargetFailed`; any other answer is relayed as usual, with
    ``X-Llamaswap-Target: <target>``.

    :ivar status: the status relayed to the client, once there is one.
    :ivar outcome: the relay's ``RelayOutcome``, once the body ended.
    """

    def __init__(self, inner: Any, target: str, more: bool) -> None:
        self._inner, self.target, self.more = inner, target, more
        self.status: Optional[int] = None
        self.outcome: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def forward(self, request: Any, *, http: Any, url: bytes, headers: Any, body: Callable[[], Any],
                model_id: str, still_ready: Callable[[], bool], on_headers: Optional[Callable] = None,
                on_data: Optional[Callable] = None, unreachable: Optional[Callable] = None) -> Deferred:
        return ensureDeferred(self._forward(request, http, url, headers, body, model_id, still_ready,
                                            on_headers, on_data, unreachable))

    async def _forward(self, request: Any, http: Any, url: bytes, headers: Any, body: Callable[[], Any],
                       model_id: str, still_ready: Callable[[], bool], on_headers: Optional[Callable],
                       on_data: Optional[Callable], unreachable: Optional[Callable]) -> Any:
        inner = self._inner
        response = await inner.send(request, http=http, url=url, headers=headers, body=body,
                                    model_id=model_id, still_ready=still_ready, unreachable=unreachable)
        if response.code >= 500 and self.more:
            raise TargetFailed(self.target, response.code, await self._drop(response))
        sse = copy_response_headers(response, request)
        request.responseHeaders.setRawHeaders(TARGET_HEADER, [self.target.encode("utf-8")])
        self.status = response.code
        if on_headers is not None:
            on_headers(response)
        self.outcome = await inner.relay(request, response, model_id=model_id, sse=sse, on_data=on_data)
        return self.outcome

    @staticmethod
    def _drop(response: Any) -> Deferred:
        done: Deferred = Deferred(lambda _: drain.transport is not None and drain.transport.stopProducing())
        drain = _Drain(done)
        response.deliverBody(drain)
        return done

    def verdict(self, request: Any) -> Any:
        """What the attempt taught about the target once its response ended, as :func:`run`
        takes it: True (it answered), a reason (it answered 5xx, or broke its stream) or None
        (nothing: no answer relayed, or the client left)."""
        if self.status is None:
            return None
        if self.status >= 500:
            return f"target '{self.target}' answered {self.status}"
        if self.outcome is not None and not self.outcome.completed:
            # a client that left ends the relay early too: that is no fault of the target
            return None if request.client_gone else f"target '{self.target}' broke its stream: {self.outcome.error}"
        return True
