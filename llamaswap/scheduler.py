"""Pure swap decisions (SCHED-*): no Twisted, no I/O, no clock of its own.

The router describes the world as a ``Snapshot`` (model states, in-flight counts,
waiting requests in admission order, swaps in progress, the time now) and gets back a
``Decision``: which waiting requests to grant, which swaps to begin, which models are
draining, and when to look again. The same snapshot always gives the same decision
(SCHED-12), which is what makes the policy testable with a fake clock.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

import attr

#: States in which a model is part of the running set (starting or ready).
RUNNING = frozenset({"starting", "ready"})


@attr.s(frozen=True, slots=True)
class Waiter:
    """One admitted request that has not been granted yet."""

    seq: int = attr.ib()  # admission order, unique and increasing
    admitted: float = attr.ib()  # admission time, seconds
    profile: Optional[str] = attr.ib(default=None)  # "P" of a "P:M" request


@attr.s(frozen=True, slots=True)
class ModelView:
    id: str = attr.ib()
    state: str = attr.ib()  # stopped | starting | ready | stopping | shutdown
    inflight: int = attr.ib(default=0)
    waiting: tuple[Waiter, ...] = attr.ib(default=())


@attr.s(frozen=True, slots=True)
class Snapshot:
    models: Mapping[str, ModelView] = attr.ib()
    now: float = attr.ib()
    max_wait: float = attr.ib(default=30.0)
    policy: str = attr.ib(default="swap-aware")  # or "fifo"
    swapping: frozenset = attr.ib(default=frozenset())  # ids taking part in swaps in progress


@attr.s(frozen=True, slots=True)
class Swap:
    target: str = attr.ib()
    evict: frozenset = attr.ib()


@attr.s(frozen=True, slots=True)
class Decision:
    grants: tuple = attr.ib(default=())  # ((model id, how many of its oldest waiters), ...)
    swaps: tuple = attr.ib(default=())  # (Swap, ...)
    draining: frozenset = attr.ib(default=frozenset())
    wake_at: Optional[float] = attr.ib(default=None)  # look again then, even if nothing happens


@attr.s(frozen=True, slots=True)
class GroupRule:
    id: str = attr.ib()
    swap: bool = attr.ib(default=True)
    exclusive: bool = attr.ib(default=True)
    persistent: bool = attr.ib(default=False)


def evict_set(target: str, profile_members: Optional[Iterable[str]], running: Iterable[str],
              group_of: Callable[[str], GroupRule]) -> frozenset:
    """SCHED-4 / CFG-52: the running models that must stop before ``target`` starts.

    :param profile_members: the members of P for a ``P:M`` request, else None.
    :param group_of: model id -> its group (the implicit ``(default)`` group when in none).
    """
    others = [x for x in running if x != target]
    if profile_members is not None:
        members = set(profile_members)
        return frozenset(x for x in others if x not in members and not group_of(x).persistent)
    g = group_of(target)
    evicted = set()
    for x in others:
        h = group_of(x)
        if (h.id == g.id and g.swap) or (h.id != g.id and g.exclusive and not h.persistent):
            evicted.add(x)
    return frozenset(evicted)


def decide(snap: Snapshot, evict_for: Callable[[str, Optional[str], frozenset], frozenset]) -> Decision:
    """One scheduling pass (SCHED-2..SCHED-5).

    :param evict_for: ``(target, profile, running ids) -> evict set`` (see ``evict_set``).

    Grants come first (to ready models that are not draining), then swaps are planned
    on the world *after* those grants, so a swap never evicts a model it just handed
    work to.
    """
    fifo = snap.policy == "fifo"
    _, draining, _ = _plan(snap.models, snap, evict_for)
    # Models draining for the head get no new work, except requests older than every
    # waiting candidate (they are first in line anyway).
    held = set(draining)
    oldest_candidate = min((m.waiting[0].seq for m in snap.models.values()
                            if m.waiting and m.state != "ready"), default=None)
    grants = _grants(snap.models, held, fifo, oldest_candidate)
    granted = dict(grants)
    after = {
        mid: attr.evolve(m, inflight=m.inflight + granted[mid], waiting=m.waiting[granted[mid]:])
        if mid in granted else m
        for mid, m in snap.models.items()}
    swaps, more_draining, wake_at = _plan(after, snap, evict_for)
    return Decision(tuple(grants), tuple(swaps), frozenset(draining | more_draining), wake_at)


def _plan(models: Mapping[str, ModelView], snap: Snapshot, evict_for: Callable) -> tuple:
    """SCHED-3/4/5: (swaps that may begin, draining models, wake-up time)."""
    max_wait = 0.0 if snap.policy == "fifo" else snap.max_wait
    # A swap in progress counts as running: its target is about to start, so another
    # candidate must treat it as something to evict (and therefore wait for it).
    # A model that is still stopping (TTL, unload, a child ignoring SIGTERM during its
    # grace period) counts too: a swap that must evict it waits for that stop to end
    # (its own stop joins the one under way), so two exclusive models never overlap.
    running = frozenset(m.id for m in models.values()
                        if m.state in RUNNING or m.state == "stopping") | snap.swapping
    candidates = sorted(
        (m for m in models.values() if m.waiting and m.state != "ready"),
        key=lambda m: m.waiting[0].seq)
    claimed = set(snap.swapping)
    head_claim: frozenset = frozenset()
    draining: set = set()
    swaps: list[Swap] = []
    wake_at: Optional[float] = None
    for index, cand in enumerate(candidates):
        first = cand.waiting[0]
        if cand.state != "stopped" or cand.id in snap.swapping:
            # starting: its waiters join the start under way; stopping: PROC-12, the
            # start follows the stop; shutdown: never.
            if index == 0:
                head_claim = frozenset({cand.id})
            continue
        evict = evict_for(cand.id, first.profile, running)
        involved = evict | {cand.id}
        blocked = bool(involved & claimed)
        # SCHED-4: a starting model that others wait for is never evicted.
        blocked = blocked or any(x in models and models[x].state == "starting" and models[x].waiting
                                 for x in evict)
        if index > 0 and involved & head_claim:
            blocked = True  # never take what the head is waiting for
        busy = [x for x in evict if x in models and models[x].inflight > 0]
        if index == 0 and evict and not blocked:
            if snap.now - first.admitted >= max_wait:
                draining |= evict  # SCHED-5: no more batching onto them, busy or not
            elif busy:
                wake_at = first.admitted + max_wait
        if busy:
            blocked = True
        if index == 0:
            head_claim = involved
        if not blocked:
            swaps.append(Swap(cand.id, evict))
            claimed |= involved
            # Its target is about to start: later candidates of this pass must see it as
            # running (as a swap in progress is), or two exclusive models could both start
            # when whatever blocked them goes away at once (a crash, an unload).
            running = running | {cand.id}
    return swaps, draining, wake_at


def _grants(models: Mapping[str, ModelView], held: set, fifo: bool,
            oldest_candidate: Optional[int]) -> list[tuple[str, int]]:
    """SCHED-2: the waiters of ready models, oldest first.

    A held model (draining, or about to be evicted) only gets waiters older than the
    oldest candidate; under ``fifo`` no waiter passes an older waiter of another model.
    """
    grants = []
    for m in models.values():
        if m.state != "ready" or not m.waiting:
            continue
        bound = None
        if m.id in held:
            bound = oldest_candidate
        if fifo:
            older_elsewhere = min(
                (o.waiting[0].seq for o in models.values() if o.id != m.id and o.waiting), default=None)
            if older_elsewhere is not None:
                bound = older_elsewhere if bound is None else min(bound, older_elsewhere)
        n = sum(1 for w in m.waiting if bound is None or w.seq < bound)
        if m.id in held and bound is None:
            n = 0
        if n:
            grants.append((m.id, n))
    return grants
