"""Paced work: starting requests and their bookkeeping yield to the streams already flowing.

The reactor relays a streamed chunk in well under a tenth of a millisecond, but starting a
request (parsing it, choosing and admitting its model, opening the upstream request) or
closing one (releasing the model, parsing usage, the access line, metrics, captures, the
activity row) costs a few tenths. When two hundred clients start, or finish, in the same
instant, doing all of that back to back holds every chunk that arrives meanwhile: each
stream already running stalls for the whole burst (tens of milliseconds).

A :class:`Pacer` bounds that: work given to :meth:`Pacer.run` runs at once while the
current reactor turn has used less than ``budget`` seconds on such work; past it, the work
waits in order for the next turn, after the reactor has relayed whatever arrived. A request
alone in its turn (the usual case) runs exactly as before; a burst is spread over turns a
budget wide, with the streams' chunks relayed between them.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

from twisted.logger import Logger

__all__ = ["BUDGET", "Pacer"]

#: seconds of paced work per reactor turn before the rest waits for the next turn
BUDGET = 0.001

_log = Logger(namespace="llamaswap.pacing")


class Pacer:
    """Runs work now, or in a later reactor turn once this one's budget is spent.

    :param reactor: ``IReactorTime``: marks the end of a turn (a ``callLater(0)``, which runs
        before the reactor polls again).
    :param budget: seconds of paced work per turn.
    :param timer: where the budget is measured (the work's real time, not the reactor's
        clock).
    """

    def __init__(self, reactor: Any, budget: float = BUDGET,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        self._reactor = reactor
        self._budget = budget
        self._timer = timer
        self._waiting: deque[tuple[Callable[..., Any], tuple]] = deque()
        self._turn_began: Any = None  # when this turn's first paced work began; None: a new turn
        self._next_turn: Any = None   # the DelayedCall that ends this turn

    @property
    def waiting(self) -> int:
        """How many pieces of work wait for a later turn."""
        return len(self._waiting)

    def run(self, work: Callable[..., Any], *args: Any) -> None:
        """Call ``work(*args)`` now, or after the work already waiting (same order)."""
        if self._waiting:
            self._waiting.append((work, args))
            return
        now = self._timer()
        if self._turn_began is None:
            self._turn_began = now
            self._end_turn_later()
        elif now - self._turn_began >= self._budget:
            self._waiting.append((work, args))
            return
        work(*args)

    def _end_turn_later(self) -> None:
        if self._next_turn is None:
            self._next_turn = self._reactor.callLater(0, self._new_turn)

    def _new_turn(self) -> None:
        """A turn ended (the reactor polled, relaying what arrived): run what waits, up to a
        budget, before the reactor polls again."""
        self._next_turn = None
        self._turn_began = None
        if not self._waiting:
            return
        began = self._timer()
        self._turn_began = began
        self._end_turn_later()
        waiting = self._waiting
        while waiting:
            work, args = waiting.popleft()
            try:
                work(*args)
            except Exception:
                _log.failure("paced work failed")
            if self._timer() - began >= self._budget:
                break
