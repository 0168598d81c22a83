"""What ``ModelRouter`` hands out and what it keeps per model.

``Resolved`` (a requested name's meaning), ``Ticket`` (an admitted request waiting), ``Lease`` (a
granted one), ``Place`` (where a waiting request stands) and ``Slot``, the router's record of one
model. The router (``llamaswap.router``) holds the logic; these are its plain values.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Callable, Optional

import attr
from twisted.internet.defer import Deferred

from llamaswap.memory import SlotMemory
from llamaswap.process import UpstreamProcess

if TYPE_CHECKING:
    from llamaswap.config import ModelConfig


@attr.s(eq=False)
class Ticket:
    """An admitted request (or a load) waiting for its model."""

    model_id: str = attr.ib()
    seq: int = attr.ib()
    admitted: float = attr.ib()
    profile: Optional[str] = attr.ib(default=None)
    counted: bool = attr.ib(default=True)  # loads (EP-7, preload) are not requests (SCHED-1)
    d: Deferred = attr.ib(default=None)
    priority: int = attr.ib(default=0)  # the request's API key priority (apiKeys[].priority)


@attr.s(eq=False)
class Lease:
    """A granted request: in flight on ``proc`` until ``release()``.

    :param on_release: ``(lease) -> None``, the router's bookkeeping, called once.
    """

    on_release: Callable[["Lease"], None] = attr.ib()
    proc: UpstreamProcess = attr.ib()
    counted: bool = attr.ib(default=True)
    granted: float = attr.ib(default=0.0)
    _released: bool = attr.ib(default=False)

    @property
    def model_id(self) -> str:
        return self.proc.id

    def release(self) -> None:
        """End of the response to the client: in-flight -1, TTL re-armed. Idempotent."""
        if not self._released:
            self._released = True
            self.on_release(self)


@attr.s(frozen=True)
class Resolved:
    """RT-2/RT-4: what a requested name means."""

    model_id: str = attr.ib()
    profile: Optional[str] = attr.ib(default=None)
    name: str = attr.ib(default="")  # the requested name after profile stripping


@attr.s(frozen=True)
class Place:
    """RT-12: where a waiting request stands.

    :ivar admission: its admission number, as in ``QueueChanged.left``; earlier admissions
        have smaller numbers.
    :ivar position: 1-based, among every waiting request of every model.
    """

    admission: int = attr.ib()
    position: int = attr.ib()


class Slot:
    """Router-side bookkeeping of one model."""

    def __init__(self, proc: UpstreamProcess) -> None:
        self.proc = proc
        self.waiting: deque[Ticket] = deque()
        self.inflight = 0
        self.ttl_call = None
        self.last_used: Optional[float] = None
        # RLD-3: a changed model waits for its in-flight requests, then its child is
        # replaced by one built from ``pending``; a removed model then disappears.
        self.pending: Optional[ModelConfig] = None
        self.removed = False
        self.restart = False
        self.retiring = False
        # the start under way: when it began, and whether the router has since asked for
        # a stop (then its failure is an abort, not a StartFailed)
        self.start_began = 0.0
        self.stop_asked = False
        self.memory = SlotMemory()

    @property
    def replacing(self) -> bool:
        return self.removed or self.pending is not None
