"""Requests -> models: resolution, admission, queueing, swaps, TTL (PROC-11).

``ModelRouter`` owns one ``UpstreamProcess`` per model and the queue of waiting
requests. Every decision comes from the pure ``scheduler.decide`` (the plain ones of most
requests from ``scheduler.plain_decision``, without building a snapshot); this class only
applies it: grants leases, begins swaps (stop the evicted models in parallel, then start
the target), arms TTL timers, and fails waiters with the right error.

What happens to the models is published as typed events (``llamaswap.observe``) to
``router.observers``; observers never call back into the router for state.

Before any of that, ``resolve`` applies the active profile's pins and the selectors
(``llamaswap.selectors``; docs/profiles-and-selectors.rst): a selector picks its target from the
slots' states and loads at the moment the request is admitted.

Memory (``memory.budget``; docs/memory.rst): the router's ``MemoryAccounting``
(``llamaswap.memory``) describes each model's need, expected load time and decayed demand to the
scheduler, measures ready models and raises a need after an out-of-memory start; the router fails
the waiters of a model that can never fit with 503 ``insufficient_memory``. Without a budget none
of this runs.

Size (~540 lines): admission, swaps, TTL, reload and shutdown all change the one slot table inside
one re-entrant ``schedule()``; the values live in ``llamaswap.admission``, the memory in
``llamaswap.memory``, and the rest is kept together so that each transition reads in one place.
"""
from __future__ import annotations

import itertools
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterator, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamaswap import procmem, scheduler
from llamaswap.admission import Lease, Place, Resolved, Slot as _Slot, Ticket
from llamaswap.errors import (
    ConcurrencyLimit, InsufficientMemory, LlamaSwapError, ModelNotFound, ModelUnloaded, ShuttingDown,
    UpstreamStartFailed)
from llamaswap.footprint import NeedBook
from llamaswap.memory import MemoryAccounting
from llamaswap.observe import (
    ModelEvent, Observers, QueueChanged, Reloaded, Removed, Replaced, StartFailed, Started, Starting,
    StateChanged, Stopping)
from llamaswap.process import State, UpstreamProcess
from llamaswap.failover import Breakers
from llamaswap.selectors import TargetView, UnknownProfile, choose, pin_of

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from llamaswap.config import Config, ModelConfig

__all__ = ["Lease", "ModelRouter", "Place", "Resolved"]


class ModelRouter(Service):
    """Resolve, admit, queue and grant requests; swap models; unload after ttl.

    :param config: the ``Config``.
    :param make_process: ``(model_config, on_transition) -> UpstreamProcess``; the router
        passes its own ``on_transition`` hook for each.
    :param clock: ``IReactorTime`` for admission times, maxWait and TTL timers.
    :param needs: the ``footprint.NeedBook`` of measured needs, keyed by a model's expanded
        ``cmd`` (default: an empty one kept in memory only).
    :param measure: ``(pgid) -> Deferred`` firing with the memory a process group holds (an
        object with ``.total`` bytes, or an int); default ``procmem.measure_group`` on
        ``clock`` (which must then be a reactor able to spawn nvidia-smi).
    :ivar observers: the ``llamaswap.observe.Observers`` that get every model event.
    :ivar memory: the ``llamaswap.memory.MemoryAccounting`` of the models.
    """

    def __init__(self, config: Config,
                 make_process: Callable[[ModelConfig, Callable], UpstreamProcess],
                 clock: IReactorTime, log: Optional[Logger] = None, needs: Optional[NeedBook] = None,
                 measure: Optional[Callable[[int], Deferred]] = None) -> None:
        self.config = config
        self._make_process = make_process
        self.clock = clock
        self.log = log or Logger(namespace="llamaswap.router")
        self._seq = itertools.count()
        self._slots: dict[str, _Slot] = {}
        self._swapping: set[str] = set()
        self._draining: frozenset = frozenset()
        self._wake_call = None
        self._shutting_down = False
        self._deciding = False
        self._again = False
        self._active_profile: Optional[str] = None
        #: models the keep-alive supervisor (``llamaswap.keepalive``) gave up on: id -> why;
        #: shown as ``failed`` until the next start
        self.failed: dict[str, str] = {}
        #: the circuit breakers of the failover selectors' targets (``llamaswap.failover``)
        self.failover = Breakers(clock, lambda: self.config, self.log)
        self.observers = Observers(self.log)
        self.memory = MemoryAccounting(
            lambda: self.config, clock, needs if needs is not None else NeedBook(None),
            measure or (lambda pgid: procmem.measure_group(pgid, clock)), self.observers, self._slots,
            self.schedule, self.log)
        for model in config.models.values():
            self._add(model)

    # -- model table ----------------------------------------------------------------------------

    def _add(self, model: ModelConfig) -> None:
        self._slots[model.id] = _Slot(self._make_process(model, self._on_transition))

    def process(self, model_id: str) -> UpstreamProcess:
        return self._slots[model_id].proc

    def processes(self) -> list[UpstreamProcess]:
        return [s.proc for s in self._slots.values()]

    def counts(self, model_id: str) -> tuple[int, int]:
        """(in flight, waiting) for ``model_id``."""
        slot = self._slots[model_id]
        return slot.inflight, sum(1 for t in slot.waiting if t.counted)

    def is_draining(self, model_id: str) -> bool:
        return model_id in self._draining

    def place(self, d: Deferred) -> Optional[Place]:
        """RT-12: where the waiting request ``d`` (from ``acquire``) stands among every
        waiting request, all models, in admission order; None once it is no longer waiting.
        Loads (EP-7, preload) are not requests and do not count.

        The position only goes down afterwards, by one for each earlier admission listed in
        a ``QueueChanged.left``, so a caller asks once and then follows the events."""
        mine = None
        for slot in self._slots.values():
            for ticket in slot.waiting:
                if ticket.d is d:
                    mine = ticket
        if mine is None:
            return None
        ahead = sum(1 for slot in self._slots.values() for t in slot.waiting
                    if t.counted and t.seq < mine.seq)
        return Place(mine.seq, 1 + ahead)

    # -- resolution (RT-2, RT-4) --------------------------------------------------------------

    def resolve(self, name: str, selectors: bool = True) -> Resolved:
        """Map a requested name to a model id; raise ``ModelNotFound``.

        The active profile's pin and a selector's choice apply first (:meth:`rewrite`);
        ``Resolved.name`` is the name they lead to (``setParamsByID`` reads it). With
        ``selectors`` false a selector id is not resolved (``/upstream`` refuses them).
        """
        concrete = self.rewrite(name, selectors)
        model_id = self.config.resolve(concrete)
        if model_id is not None:
            return Resolved(model_id, None, concrete)
        if ":" in concrete:
            profile, member = concrete.split(":", 1)
            members = self.config.profiles.get(profile)
            if members is not None:
                member_id = self.config.resolve(member)
                if member_id is None or member_id not in members:
                    raise ModelNotFound(f"model '{member}' is not a member of profile '{profile}'")
                return Resolved(member_id, profile, member)
        if concrete != name:
            raise ModelNotFound(f"model '{name}' stands for '{concrete}', which is not a local model")
        raise ModelNotFound.named(name, self.config)

    # -- profile pins and selectors (llamaswap.selectors) ---------------------------------------

    @property
    def active_profile(self) -> Optional[str]:
        """The active pin profile (``profiles.<name>: {pins}``), or None; none after startup and
        after every reload."""
        return self._active_profile

    def set_active_profile(self, name: Optional[str]) -> bool:
        """Activate the pin profile ``name``; None or ``""`` deactivates. Returns whether the
        active profile changed.

        :raises UnknownProfile: when no profile has that name (the active one stays).
        """
        name = name or None
        if name is not None and name not in self.config.pin_profiles:
            raise UnknownProfile.named(name, self.config)
        if name == self._active_profile:
            return False
        self._active_profile = name
        self.log.info("active profile changed to {profile}",
                      profile=repr(name) if name is not None else "none")
        return True

    def rewrite_pin(self, name: str) -> Optional[str]:
        """``name`` with the active profile's pin applied (None: the pin disables it)."""
        pinned, target = pin_of(self.config, self._active_profile, name)
        return target if pinned else name

    def rewrite(self, name: str, selectors: bool = True) -> str:
        """The name a request for ``name`` stands for right now: the active profile's pin of
        ``name`` applied, then, unless ``selectors`` is false, the choice of the selector it
        names. Pure apart from reading the models' states and loads: asking twice in one turn
        gives the same answer.

        :raises ModelNotFound: when the active profile pins ``name`` to nothing.
        :raises NoSelectorTarget: when a spillover selector has no target to offer.
        """
        pinned, target = pin_of(self.config, self._active_profile, name)
        if pinned:
            if target is None:
                raise ModelNotFound(f"model '{name}' is disabled by the active profile "
                                    f"'{self._active_profile}'")
            name = target
        selector = self.config.selectors.get(name) if selectors else None
        if selector is None:
            return name
        chosen = choose(selector, [self._target_view(t) for t in selector.targets])
        self.log.debug("selector {selector}: {target}", selector=name, target=chosen)
        return chosen

    def target_state(self, name: str) -> Optional[str]:
        """The process state of the local model ``name`` (an id or alias) names, else None."""
        model_id = self.config.resolve(name)
        slot = self._slots.get(model_id) if model_id is not None else None
        if slot is None or slot.removed:
            return None
        return slot.proc.state.value

    def _target_view(self, name: str) -> TargetView:
        state = self.target_state(name)
        if state is None:
            return TargetView(name)
        inflight, waiting = self.counts(self.config.resolve(name))
        return TargetView(name, state, inflight + waiting)

    # -- admission and grants -------------------------------------------------------------------

    def acquire(self, model_id: str, profile: Optional[str] = None, priority: int = 0) -> Deferred:
        """Admit a request for ``model_id``; fire with a ``Lease`` once it may be forwarded.

        Raises ``ConcurrencyLimit`` (429) at once when the model's limit is reached
        (SCHED-1). Cancelling the Deferred while it waits frees its slot (SCHED-8).
        ``priority`` (the request's API key's) orders it among the waiting requests.
        """
        if self._shutting_down:
            return fail(ShuttingDown())
        slot = self._slots.get(model_id)
        if slot is None or slot.removed:
            return fail(ModelNotFound.named(model_id))
        inflight, waiting = self.counts(model_id)
        limit = slot.proc.model.concurrency_limit
        if inflight + waiting >= limit:
            return fail(ConcurrencyLimit(f"too many requests for model '{model_id}' (limit {limit})"))
        self.memory.requested(slot)
        if not slot.waiting and slot.proc.state is State.READY and not slot.replacing \
                and not self._deciding and not any(s.waiting for s in self._slots.values()):
            return succeed(self._grant_at_once(slot))
        return self._enqueue(model_id, profile, counted=True, priority=priority)

    def _grant_at_once(self, slot: _Slot) -> Lease:
        """A request to a ready model while nothing waits anywhere: the scheduling pass would
        grant it at once (``scheduler.plain_decision``), so grant it without a ticket or a pass.
        Counts, lease and TTL end as ``_enqueue`` then ``_grant`` leave them; observers see one
        ``QueueChanged`` (the grant) instead of two (admitted, then granted in the same turn)."""
        self._cancel_ttl(slot)
        seq = next(self._seq)
        slot.inflight += 1
        lease = Lease(self._release, slot.proc, True, self.clock.seconds())
        self._queue_changed(slot, (seq,))
        return lease

    def load(self, model_id: str) -> Deferred:
        """EP-7 / preload: start ``model_id`` through the scheduler; fire once it is ready."""
        if self._shutting_down:
            return fail(ShuttingDown())
        if model_id not in self._slots or self._slots[model_id].removed:
            return fail(ModelNotFound.named(model_id))
        d = self._enqueue(model_id, None, counted=False)
        d.addCallback(lambda lease: lease.release())
        return d

    def _enqueue(self, model_id: str, profile: Optional[str], counted: bool, priority: int = 0) -> Deferred:
        slot = self._slots[model_id]
        ticket = Ticket(model_id, next(self._seq), self.clock.seconds(), profile, counted, priority=priority)
        ticket.d = Deferred(lambda d: self._cancel(ticket))
        slot.waiting.append(ticket)
        self._cancel_ttl(slot)
        self._queue_changed(slot)
        self.schedule()
        return ticket.d

    def _cancel(self, ticket: Ticket) -> None:
        """SCHED-8: a waiting client left; free its slot; a swap not yet begun is abandoned."""
        slot = self._slots.get(ticket.model_id)
        if slot is not None and ticket in slot.waiting:
            slot.waiting.remove(ticket)
            self._queue_changed(slot, (ticket.seq,) if ticket.counted else ())
            self._maybe_arm_ttl(slot)
            self.schedule()

    def _grant(self, model_id: str, n: int) -> None:
        slot = self._slots[model_id]
        now = self.clock.seconds()
        left = []
        for _ in range(n):
            ticket = slot.waiting.popleft()
            if ticket.counted:
                slot.inflight += 1
                left.append(ticket.seq)
            lease = Lease(self._release, slot.proc, ticket.counted, now)
            ticket.d.callback(lease)
        self._queue_changed(slot, tuple(left))

    def _release(self, lease: Lease) -> None:
        slot = self._slots.get(lease.model_id)
        if slot is None or slot.proc is not lease.proc:
            return
        if lease.counted:
            slot.inflight -= 1
        slot.last_used = self.clock.seconds()
        self._queue_changed(slot)
        if slot.replacing:
            self._retire(slot)
        else:
            self._maybe_arm_ttl(slot)
        self.schedule()

    # -- the scheduling pass ------------------------------------------------------------------

    def schedule(self) -> None:
        """Run ``scheduler.decide`` and apply it; re-entrant calls collapse into one more pass."""
        if self._deciding:
            self._again = True
            return
        self._deciding = True
        try:
            self._again = True
            while self._again:
                self._again = False
                decision = scheduler.plain_decision(self._waiting())
                if decision is None:
                    decision = scheduler.decide(self._snapshot(), self._evict_for, self._solver())
                self._apply(decision)
        finally:
            self._deciding = False

    def _waiting(self) -> Iterator[tuple[str, str, int]]:
        """(id, state as the scheduler sees it, waiters) of the models with waiters."""
        for model_id, slot in self._slots.items():
            if slot.waiting:
                yield model_id, "stopping" if slot.replacing else slot.proc.state.value, len(slot.waiting)

    def _snapshot(self) -> scheduler.Snapshot:
        budget, now = self.config.memory_budget, self.clock.seconds()
        views = {
            model_id: scheduler.ModelView(
                # a model being replaced by reload takes no new work: to the scheduler it
                # is stopping, so its waiters wait for the new child (RLD-3)
                model_id, "stopping" if slot.replacing else slot.proc.state.value, slot.inflight,
                tuple(scheduler.Waiter(t.seq, t.admitted, t.profile, t.priority) for t in slot.waiting),
                **(self.memory.view(model_id, slot, now) if budget is not None else {}))
            for model_id, slot in self._slots.items()}
        memory = (budget, self.config.memory_policy) if budget is not None else ()
        return scheduler.Snapshot(views, now, self.config.max_wait, self.config.policy,
                                  frozenset(self._swapping), *memory,
                                  priority=self.config.scheduler_priority)

    def _solver(self) -> Optional[scheduler.EvictSolver]:
        """The swap matrix when ``routing.router.use`` is ``matrix``, else None (group rules)."""
        if self.config.router_use == "matrix":
            return self.config.matrix
        return None

    def _evict_for(self, target: str, profile: Optional[str], running: frozenset) -> frozenset:
        members = self.config.profiles.get(profile) if profile else None

        def group_of(model_id: str) -> scheduler.GroupRule:
            g = self.config.group_of(model_id)
            return scheduler.GroupRule(g.id, g.swap, g.exclusive, g.persistent)

        return scheduler.evict_set(target, members, running, group_of,
                                   memory_budget=self.config.memory_budget)

    # -- memory (llamaswap.memory) -------------------------------------------------------------------

    def memory_need(self, model_id: str) -> tuple[Optional[int], str]:
        """``MemoryAccounting.need``: ``(bytes, source)`` of ``model_id``'s need."""
        return self.memory.need(model_id)

    def load_time(self, model_id: str) -> Optional[float]:
        """``MemoryAccounting.load_time``: the average measured load of ``model_id``, or None."""
        return self.memory.load_time(model_id)

    def memory_used(self) -> int:
        """``MemoryAccounting.used``: the needs of the models holding memory, summed."""
        return self.memory.used()

    def _apply(self, decision: scheduler.Decision) -> None:
        if decision.draining != self._draining:
            for model_id in decision.draining - self._draining:
                self.log.debug("{model}: draining for a waiting swap", model=model_id)
            self._draining = decision.draining
        for model_id, n in decision.grants:
            self._grant(model_id, n)
        for model_id, message in decision.refused:
            slot = self._slots.get(model_id)
            if slot is not None and slot.waiting:
                self.log.warn("{model}: refused: {why}", model=model_id, why=message)
                self._fail_waiters(slot, InsufficientMemory(message))
        for swap in decision.swaps:
            self._begin_swap(swap)
        self._set_wake(decision.wake_at)

    def _set_wake(self, when: Optional[float]) -> None:
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        self._wake_call = None
        if when is not None:
            delay = max(0.0, when - self.clock.seconds())
            self._wake_call = self.clock.callLater(delay, self.schedule)

    # -- swaps --------------------------------------------------------------------------------

    def _begin_swap(self, swap: scheduler.Swap) -> None:
        involved = set(swap.evict) | {swap.target}
        self._swapping |= involved
        if swap.evict:
            self.log.info("swapping: stopping {evicted} to start {model}",
                          evicted=", ".join(sorted(swap.evict)), model=swap.target)
        causes = {e.model: e.reason for e in swap.evictions}
        if self.config.memory_budget is not None:
            now = self.clock.seconds()
            for eviction in swap.evictions:
                self.log.info("{line}", line=scheduler.eviction_line(swap, eviction, now))
        stops = [self._stop(self._slots[x], "swap", causes.get(x, scheduler.GROUP)) for x in sorted(swap.evict)]
        d = DeferredList(stops, consumeErrors=True)
        d.addCallback(lambda _: self._start(swap, bool(swap.evict)))
        d.addErrback(lambda f: self.log.failure("swap to {model} failed", f, model=swap.target))

    def _start(self, swap: scheduler.Swap, evicted: bool) -> None:
        slot = self._slots.get(swap.target)
        if slot is None or self._shutting_down or slot.proc.state is not State.STOPPED:
            self._end_swap(swap)
            return
        slot.start_began, slot.stop_asked = self.clock.seconds(), False
        self.failed.pop(swap.target, None)  # a request or a load starts a failed model again
        self._publish(Starting(swap.target, evicted))
        d = slot.proc.start()
        d.addCallbacks(lambda _: self._started(swap, slot), lambda f: self._start_failed(swap, slot, f))

    def _started(self, swap: scheduler.Swap, slot: _Slot) -> None:
        seconds = self.clock.seconds() - slot.start_began
        slot.memory.loads.append(seconds)
        if self.observers:
            self.observers.publish(Started(swap.target, seconds))
        self._end_swap(swap)

    def _start_failed(self, swap: scheduler.Swap, started: _Slot, failure: Failure) -> None:
        """SCHED-9: every request waiting on that start gets the same 502.

        A start the router aborted itself (a swap, unload, reload or shutdown stopping the
        model) is no ``StartFailed``: only a start that failed by itself is (PROC-6/7)."""
        error = failure.value if isinstance(failure.value, LlamaSwapError) else \
            UpstreamStartFailed(str(failure.value))
        if not started.stop_asked:
            self.memory.out_of_memory(started, error.message)
            if self.observers:
                self.observers.publish(StartFailed(swap.target, error.message,
                                                   self.clock.seconds() - started.start_began))
        slot = self._slots.get(swap.target)
        if slot is not None and not slot.replacing:
            self._fail_waiters(slot, error)
        self._end_swap(swap)

    def _end_swap(self, swap: scheduler.Swap) -> None:
        self._swapping -= set(swap.evict) | {swap.target}
        self.schedule()

    def _fail_waiters(self, slot: _Slot, error: LlamaSwapError) -> None:
        waiters, slot.waiting = list(slot.waiting), deque()
        for ticket in waiters:
            ticket.d.errback(Failure(type(error)(error.message)))
        if waiters:
            self._queue_changed(slot, tuple(t.seq for t in waiters if t.counted))

    # -- state changes --------------------------------------------------------------------------

    def _on_transition(self, proc: UpstreamProcess, old: State, new: State) -> None:
        slot = self._slots.get(proc.id)
        if slot is None or slot.proc is not proc:
            return  # a child no longer current (a removed model's, re-added meanwhile)
        self._publish(StateChanged(proc.id, old.value, new.value))
        if new is State.READY:
            slot.last_used = self.clock.seconds()
            self._maybe_arm_ttl(slot)
            self.memory.start_measuring(slot)
        else:
            self.memory.stop_measuring(slot)
            if new is not State.STARTING:
                self._cancel_ttl(slot)
        if old is State.READY and new is State.STOPPED:
            self._publish(Stopping(proc.id, "exited"))
        if self.config.memory_budget is not None:
            self.memory.changed()
        self.schedule()

    # -- TTL (PROC-11) --------------------------------------------------------------------------

    def _maybe_arm_ttl(self, slot: _Slot) -> None:
        self._cancel_ttl(slot)
        ttl = slot.proc.model.ttl
        if ttl > 0 and slot.proc.state is State.READY and slot.inflight == 0 and not slot.waiting:
            slot.ttl_call = self.clock.callLater(ttl, self._ttl_expired, slot)

    def _cancel_ttl(self, slot: _Slot) -> None:
        if slot.ttl_call is not None and slot.ttl_call.active():
            slot.ttl_call.cancel()
        slot.ttl_call = None

    def _ttl_expired(self, slot: _Slot) -> None:
        slot.ttl_call = None
        proc = slot.proc
        if proc.state is not State.READY or slot.inflight or slot.waiting or proc.id in self._swapping \
                or slot.replacing:
            return
        self.log.info("{model}: unloading after {ttl}s idle", model=proc.id, ttl=proc.model.ttl)
        self._stop(slot, "ttl")

    # -- reload (RLD-3) ------------------------------------------------------------------------------

    def reconfigure(self, config: Config) -> dict:
        """Apply a new, valid config; return ``{"added", "removed", "changed", "unchanged"}``.

        Unchanged models keep their child (same pid, logs, TTL clock, in-flight requests);
        changed ones drain and are replaced once idle, and restarted if they were starting
        or ready; removed ones stop once idle and their waiters get 404; added ones start
        stopped. Everything else takes effect for new requests at once. No pin profile is
        active afterwards.
        """
        old = self.config
        added = sorted(config.models.keys() - old.models.keys())
        removed = sorted(old.models.keys() - config.models.keys())
        common = sorted(old.models.keys() & config.models.keys())
        changed = [m for m in common
                   if old.models[m].process_key() != config.models[m].process_key()]
        unchanged = [m for m in common if m not in changed]
        self.config = config
        if self._active_profile is not None:
            self.log.info("active profile {profile} deactivated by the reload", profile=repr(self._active_profile))
            self._active_profile = None
        for model_id in added:
            self._add(config.models[model_id])
        for model_id in unchanged:
            self._slots[model_id].proc.model = config.models[model_id]
        for model_id in removed:
            slot = self._slots[model_id]
            slot.removed = True
            self._fail_waiters(slot, ModelNotFound(f"model '{model_id}' was removed by a config reload"))
            self._retire(slot)
        for model_id in changed:
            slot = self._slots[model_id]
            slot.restart = slot.restart or slot.proc.state in (State.STARTING, State.READY)
            slot.pending = config.models[model_id]
            self._retire(slot)
        self._publish(Reloaded(tuple(added), tuple(changed), tuple(removed), config.models))
        for slot in self._slots.values():
            if slot.proc.state is State.READY and slot.memory.measure_call is None:
                self.memory.start_measuring(slot)  # a budget set by this reload
        self.memory.changed()
        self.schedule()
        return {"added": added, "removed": removed, "changed": changed, "unchanged": unchanged}

    def _retire(self, slot: _Slot) -> None:
        """Stop a changed/removed model's child once its in-flight requests are done."""
        if slot.retiring or slot.inflight > 0:
            return
        slot.retiring = True
        self._cancel_ttl(slot)
        running = slot.proc.state in (State.STARTING, State.READY)
        d = self._stop(slot, "reload" if running else None)
        d.addCallback(lambda _: self._retired(slot))
        d.addErrback(lambda f: self.log.failure("reload of {model} failed", f, model=slot.proc.id))

    def _retired(self, slot: _Slot) -> None:
        slot.retiring = False
        model_id = slot.proc.id
        if slot.removed:
            if self._slots.get(model_id) is slot:  # not re-added by a later reload meanwhile
                del self._slots[model_id]
                self.memory.forget(model_id)
                self._publish(Removed(model_id))
                self.memory.changed()
            self.schedule()
            return
        if slot.pending is None:
            return
        model, slot.pending = slot.pending, None
        slot.proc = self._make_process(model, self._on_transition)
        if slot.restart and not self._shutting_down:
            slot.restart = False
            self.load(model_id).addErrback(
                lambda f: self.log.error("restart of {model} after reload failed: {why}",
                                         model=model_id, why=str(f.value)))
        self._publish(Replaced(model_id, slot.proc.state.value))
        if self.config.memory_budget is not None:
            self.memory.changed()
        self.schedule()

    # -- unload and shutdown ----------------------------------------------------------------------

    def evicts_to_start(self, model_id: str) -> frozenset:
        """The running models a start of ``model_id`` would stop now, by the group rules or the
        swap matrix (the keep-alive supervisor restarts a model only if this is empty)."""
        running = frozenset(s.proc.id for s in self._slots.values()
                            if s.proc.state in (State.STARTING, State.READY, State.STOPPING)) - {model_id}
        solver = self._solver()
        if solver is not None:
            return frozenset(solver.solve(model_id, running)) - {model_id}
        return frozenset(self._evict_for(model_id, None, running)) - {model_id}

    def stop_model(self, model_id: str, reason: str) -> Deferred:
        """Stop one model's child for ``reason`` (``unhealthy``: failed health checks), as a
        stop the router asked for; fire once it is gone."""
        slot = self._slots.get(model_id)
        if slot is None or slot.proc.state not in (State.STARTING, State.READY):
            return succeed(None)
        self._cancel_ttl(slot)
        d = self._stop(slot, reason)
        d.addCallback(lambda _: self.schedule())
        return d

    def unload(self, model_ids: Optional[list[str]] = None) -> Deferred:
        """EP-6: stop the models (busy ones too) in parallel; waiters get 503 model_unloaded.

        Fires once every affected child is gone.
        """
        ids = list(self._slots) if model_ids is None else model_ids
        stops = []
        for model_id in ids:
            slot = self._slots[model_id]
            self._fail_waiters(slot, ModelUnloaded(f"model '{model_id}' was unloaded"))
            running = slot.proc.state in (State.STARTING, State.READY, State.STOPPING)
            stops.append(self._stop(slot, "unload" if running else None))
        d = DeferredList(stops, consumeErrors=True)
        d.addCallback(lambda _: self.schedule())
        return d

    def startService(self) -> None:
        """Once every observer is in place: the first ``MemoryChanged`` (with a budget)."""
        Service.startService(self)
        self.memory.changed()

    def stopService(self) -> Deferred:
        """CLI-9: waiters get 503 shutting_down; every child stops in parallel; fire when all are gone."""
        Service.stopService(self)
        self._shutting_down = True
        self._set_wake(None)
        for slot in self._slots.values():
            self._cancel_ttl(slot)
            self.memory.stop_measuring(slot)
            self._fail_waiters(slot, ShuttingDown())
            if slot.proc.state in (State.STARTING, State.READY, State.STOPPING):
                self._publish(Stopping(slot.proc.id, "shutdown"))
            slot.stop_asked = True
        d = DeferredList([s.proc.shutdown() for s in self._slots.values()], consumeErrors=True)
        d.addCallback(lambda _: None)
        return d

    def _stop(self, slot: _Slot, reason: Optional[str], cause: str = "") -> Deferred:
        """Stop ``slot``'s child, publishing ``Stopping(reason, cause)`` first unless ``reason`` is
        None; a start under way is then aborted, which is no ``StartFailed``."""
        slot.stop_asked = True
        if reason is not None:
            self._publish(Stopping(slot.proc.id, reason, cause))
        return slot.proc.stop()

    # -- events (llamaswap.observe) -----------------------------------------------------------

    def _publish(self, event: ModelEvent) -> None:
        if self.observers:
            self.observers.publish(event)

    def _queue_changed(self, slot: _Slot, left: tuple[int, ...] = ()) -> None:
        """On the per-request path: build the event only when someone observes."""
        if self.observers:
            inflight, waiting = slot.inflight, sum(1 for t in slot.waiting if t.counted)
            self.observers.publish(QueueChanged(slot.proc.id, inflight, waiting, left))
