"""What happens to models, as typed events, and the one way to observe them.

:class:`~llamaswap.router.ModelRouter` publishes every change of its models through its
``observers`` (an :class:`Observers`). An observer is anything that provides
:class:`IModelObserver`: a callable taking one event, like twisted.logger's
``ILogObserver``. Bound methods are the usual observers::

    router.observers.add(metrics.observe)       # /metrics
    router.observers.add(hub.observe)           # /api/events and the UI feed
    router.observers.remove(metrics.observe)

Each event is a small frozen attrs class that carries everything its observers need, so an
observer never calls back into the router for state (no ``router.counts`` or
``router.process`` lookups). Observers branch on the event's class (``isinstance`` or
``match``) and ignore the classes they do not know. States are llama-swap's strings
(``stopped``, ``starting``, ``ready``, ``stopping``, ``shutdown``).

======================================  ===========================================================
Event                                   Published when
======================================  ===========================================================
``StateChanged(model, old, new)``       the model's current child changed state.
``QueueChanged(model, inflight,         a request was admitted, granted, released, cancelled or
waiting, left)``                        failed while waiting; ``left`` holds the admission numbers
                                        of the requests that stopped waiting (loads excluded).
``Stopping(model, reason, cause)``      the router stops the model: ``swap``, ``ttl``, ``unload``,
                                        ``reload``, ``shutdown``; ``exited`` when it crashed. For
                                        ``swap``, ``cause`` says why it was evicted: ``group``,
                                        ``profile``, ``matrix`` or ``memory``.
``Starting(model, evicted)``            the router starts the model; ``evicted`` when the start
                                        evicted at least one other model (a swap).
``Started(model, seconds)``             that start reached ``ready`` after ``seconds``.
``StartFailed(model, reason,            that start failed by itself (spawn failure, exit during
seconds)``                              the start, health check timeout), not because the router
                                        asked for a stop; ``reason`` is the error message, with
                                        the child's last output.
``Reloaded(added, changed, removed,     a reload was applied; ``models`` is the new config's
models)``                               ``{id: ModelConfig}``.
``Removed(model)``                      a model removed by a reload is gone.
``Replaced(model, state)``              a model changed by a reload got its new child, now in
                                        ``state``.
``MemoryChanged(budget, used, needs)``  with ``memory.budget`` set: a need, or the memory the
                                        running models need, changed (once at startup, and once
                                        with ``budget`` None when a reload removes the budget).
======================================  ===========================================================

Events are delivered synchronously, in the order they happen, to the observers in the
order they were added. An observer that raises is logged; the others still get the event.
Publishing costs one truth test when nobody observes (``if router.observers:``), so events
on the per-request path (``QueueChanged``) are built only when someone listens.

This module imports nothing else from llamaswap.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

import attr
from twisted.logger import Logger
from zope.interface import Interface

__all__ = [
    "IModelObserver", "MemoryChanged", "ModelEvent", "Observers", "QueueChanged", "Reloaded", "Removed", "Replaced",
    "StartFailed", "Started", "Starting", "StateChanged", "Stopping",
]


@attr.frozen
class StateChanged:
    """The model's current child went from state ``old`` to state ``new``."""

    model: str
    old: str
    new: str


@attr.frozen
class QueueChanged:
    """The model's request counts changed.

    :ivar inflight: granted requests not yet released.
    :ivar waiting: admitted requests not yet granted (loads are not requests).
    :ivar left: admission numbers (``ModelRouter.place``) of the requests that stopped
        waiting since the last event: granted, cancelled or failed.
    """

    model: str
    inflight: int
    waiting: int
    left: tuple[int, ...] = ()


@attr.frozen
class Stopping:
    """The router stops the model, for ``reason``; ``exited``: the child crashed.

    :ivar cause: for ``reason`` ``swap``, why this model was evicted: ``group``, ``profile``,
        ``matrix`` or ``memory`` (``scheduler.Eviction.reason``); empty otherwise.
    """

    model: str
    reason: str
    cause: str = ""


@attr.frozen
class Starting:
    """The router starts the model; ``evicted`` when that evicted another model."""

    model: str
    evicted: bool


@attr.frozen
class Started:
    """A start reached ``ready``, ``seconds`` after it began."""

    model: str
    seconds: float


@attr.frozen
class StartFailed:
    """A start failed by itself ``seconds`` after it began (a stop asked for is no failure)."""

    model: str
    reason: str
    seconds: float


@attr.frozen
class Reloaded:
    """A reload was applied; ``models`` is the new config's ``{id: ModelConfig}``."""

    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]
    models: Mapping[str, Any] = attr.field(eq=False, repr=False)


@attr.frozen
class Removed:
    """A model removed by a reload has stopped and is forgotten."""

    model: str


@attr.frozen
class Replaced:
    """A model changed by a reload has its new child, in ``state``."""

    model: str
    state: str


@attr.frozen
class MemoryChanged:
    """Memory accounting under ``memory.budget`` changed.

    :ivar budget: ``memory.budget`` in bytes; None once a reload removed it.
    :ivar used: the needs of the models starting, ready or stopping, summed.
    :ivar needs: ``((model, bytes, source), ...)`` for every model, sorted by id; ``source`` is
        ``declared``, ``measured``, ``estimated`` or ``unknown``.
    """

    budget: Optional[int]
    used: int
    needs: tuple[tuple[str, int, str], ...] = ()


ModelEvent = (StateChanged | QueueChanged | Stopping | Starting | Started | StartFailed | Reloaded
              | Removed | Replaced | MemoryChanged)


class IModelObserver(Interface):
    """Something that wants to know what happens to models."""

    def __call__(event: ModelEvent) -> None:
        """Take one event, synchronously, in order.

        Use only the event's own data; never call back into the router for state. Ignore
        event classes you do not know. Exceptions are logged and do not stop delivery to
        the other observers.
        """


class Observers:
    """The observers of one publisher, and delivery to them.

    :param log: where an observer's exception is reported.
    """

    def __init__(self, log: Optional[Logger] = None) -> None:
        self.log = log or Logger(namespace="llamaswap.observe")
        # replaced, never mutated: safe to publish
        self._observers: tuple[IModelObserver, ...] = ()
        self._queue_observers: tuple[IModelObserver, ...] = ()  # those that get QueueChanged

    def add(self, observer: IModelObserver, queue: bool = True) -> None:
        """Deliver every later event to ``observer`` too, after the earlier observers.

        :param queue: whether it gets ``QueueChanged`` (two or three per request: an observer
            with no use for them is better left out of the request path).
        """
        self._observers += (observer,)
        if queue:
            self._queue_observers += (observer,)

    def remove(self, observer: IModelObserver) -> None:
        """Stop delivering to ``observer``; an unknown one is ignored. Safe during delivery."""
        self._observers = tuple(o for o in self._observers if o != observer)
        self._queue_observers = tuple(o for o in self._queue_observers if o != observer)

    def __bool__(self) -> bool:
        return bool(self._observers)

    def __len__(self) -> int:
        return len(self._observers)

    def __iter__(self) -> Iterator[IModelObserver]:
        return iter(self._observers)

    def publish(self, event: ModelEvent) -> None:
        """Give ``event`` to every observer (``QueueChanged`` only to those added for it); log
        and go on when one raises."""
        for observer in self._queue_observers if type(event) is QueueChanged else self._observers:
            try:
                observer(event)
            except Exception:
                self.log.failure("model observer {observer!r} failed on {event!r}",
                                 observer=observer, event=event)
