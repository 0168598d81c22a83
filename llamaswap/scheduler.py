"""Pure swap decisions (SCHED-*): no Twisted, no I/O, no clock of its own.

The router describes the world as a ``Snapshot`` (model states, in-flight counts,
waiting requests in admission order, swaps in progress, the time now) and gets back a
``Decision``: which waiting requests to grant, which swaps to begin, which models are
draining, and when to look again. The same snapshot always gives the same decision
(SCHED-12), which is what makes the policy testable with a fake clock.

Memory budget (``Snapshot.budget``, bytes; ``None`` turns all of this off): the implicit
``(default)`` group stops swapping (``evict_set(..., memory_budget=...)``), explicit groups
keep their rules and apply first, and when the target still does not fit, models outside
persistent groups are added to its evict set, idle ones first, choosing the set whose
expected reload cost (``load_time`` x ``demand``) is lowest (``memory_policy="lru"``: least
recently used first). A swap begins only when its target fits once its evict set is gone,
so nothing is evicted for a target that cannot start; a target whose need exceeds the whole
budget is refused at once (``Decision.refused``). See docs/memory.rst.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Optional, Protocol

import attr

#: States in which a model is part of the running set (starting or ready).
RUNNING = frozenset({"starting", "ready"})

#: The implicit group of models in no explicit group (the same id as ``config.DEFAULT_GROUP``).
DEFAULT_GROUP = "(default)"

#: Eviction reasons carried by ``Eviction.reason``.
GROUP, PROFILE, MEMORY, MATRIX = "group", "profile", "memory", "matrix"

#: Up to this many candidates, the cheapest set to evict for memory is found by exact search;
#: beyond it, greedily in order of reload cost per byte.
EXACT_SEARCH_LIMIT = 16


@attr.s(frozen=True, slots=True)
class Waiter:
    """One admitted request that has not been granted yet."""

    seq: int = attr.ib()  # admission order, unique and increasing
    admitted: float = attr.ib()  # admission time, seconds
    profile: Optional[str] = attr.ib(default=None)  # "P" of a "P:M" request
    priority: int = attr.ib(default=0)  # the request's API key priority (apiKeys[].priority)


@attr.s(frozen=True, slots=True)
class ModelView:
    id: str = attr.ib()
    state: str = attr.ib()  # stopped | starting | ready | stopping | shutdown
    inflight: int = attr.ib(default=0)
    waiting: tuple[Waiter, ...] = attr.ib(default=())
    # -- memory accounting (only read when Snapshot.budget is set) --
    need: Optional[int] = attr.ib(default=None)  # bytes it needs while running; None: unknown (0)
    need_source: str = attr.ib(default="")  # footprint.SOURCES: declared|measured|estimated|unknown
    load_time: float = attr.ib(default=0.0)  # seconds a start takes (moving average or estimate)
    demand: float = attr.ib(default=0.0)  # requests per minute, exponentially decayed (decayed_rate)
    last_used: Optional[float] = attr.ib(default=None)  # end of its last request, else when it got ready
    persistent: bool = attr.ib(default=False)  # in a persistent group: never evicted for memory


@attr.s(frozen=True, slots=True)
class Snapshot:
    models: Mapping[str, ModelView] = attr.ib()
    now: float = attr.ib()
    max_wait: float = attr.ib(default=30.0)
    policy: str = attr.ib(default="swap-aware")  # or "fifo"
    swapping: frozenset = attr.ib(default=frozenset())  # ids taking part in swaps in progress
    budget: Optional[int] = attr.ib(default=None)  # memory.budget in bytes; None: no accounting
    memory_policy: str = attr.ib(default="cost")  # "cost" (reload cost) or "lru"
    #: routing.scheduler.settings.fifo.priority: model id -> priority (absent: 0)
    priority: Mapping[str, int] = attr.ib(factory=dict)


@attr.s(frozen=True, slots=True)
class Eviction:
    """Why one model is evicted by a swap, and what reloading it is expected to cost (for logs)."""

    model: str = attr.ib()
    reason: str = attr.ib()  # GROUP | PROFILE | MEMORY | MATRIX
    last_used: Optional[float] = attr.ib(default=None)
    load_time: float = attr.ib(default=0.0)
    demand: float = attr.ib(default=0.0)
    need: Optional[int] = attr.ib(default=None)

    @property
    def cost(self) -> float:
        """Expected reload cost: seconds of loading per minute of its demand."""
        return self.load_time * self.demand


@attr.s(frozen=True, slots=True)
class Swap:
    target: str = attr.ib()
    evict: frozenset = attr.ib()
    # For logging only (not part of equality): one Eviction per evicted model, sorted by id,
    # and the target's need with its source.
    evictions: tuple = attr.ib(default=(), eq=False)
    need: Optional[int] = attr.ib(default=None, eq=False)
    need_source: str = attr.ib(default="", eq=False)


@attr.s(frozen=True, slots=True)
class Decision:
    grants: tuple = attr.ib(default=())  # ((model id, how many of its oldest waiters), ...)
    swaps: tuple = attr.ib(default=())  # (Swap, ...)
    draining: frozenset = attr.ib(default=frozenset())
    wake_at: Optional[float] = attr.ib(default=None)  # look again then, even if nothing happens
    # ((model id, message), ...): waiting models whose need exceeds the whole memory budget;
    # their waiters are to be failed (insufficient memory), nothing is evicted for them.
    refused: tuple = attr.ib(default=())


class EvictSolver(Protocol):
    """An external source of evict sets (the matrix), used instead of the group rules.

    ``solve(target, running)`` returns the running models that must stop before ``target``
    starts. When a memory budget is set too, the budget is checked on top of the solver's
    set: a set that leaves the resident needs plus the target's above the budget is skipped
    (the target waits, nothing is evicted; no memory evictions are added to a solver's set).
    A solver offering several sets in order of preference would have the first one that fits
    taken; today ``solve`` gives one set.
    """

    def solve(self, target: str, running: frozenset) -> frozenset: ...


@attr.s(frozen=True, slots=True)
class GroupRule:
    id: str = attr.ib()
    swap: bool = attr.ib(default=True)
    exclusive: bool = attr.ib(default=True)
    persistent: bool = attr.ib(default=False)


def evict_set(target: str, profile_members: Optional[Iterable[str]], running: Iterable[str],
              group_of: Callable[[str], GroupRule], memory_budget: Optional[int] = None) -> frozenset:
    """SCHED-4 / CFG-52: the running models that must stop before ``target`` starts.

    :param profile_members: the members of P for a ``P:M`` request, else None.
    :param group_of: model id -> its group (the implicit ``(default)`` group when in none).
    :param memory_budget: ``memory.budget`` when set: the ``(default)`` group then neither
        swaps nor is exclusive (its members share the budget; ``decide`` makes room).
    """
    if memory_budget is not None:
        group_of = _budget_groups(group_of)
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


def _budget_groups(group_of: Callable[[str], GroupRule]) -> Callable[[str], GroupRule]:
    def rule(model_id: str) -> GroupRule:
        g = group_of(model_id)
        return attr.evolve(g, swap=False, exclusive=False) if g.id == DEFAULT_GROUP else g
    return rule


def decide(snap: Snapshot, evict_for: Callable[[str, Optional[str], frozenset], frozenset],
           solver: Optional[EvictSolver] = None) -> Decision:
    """One scheduling pass (SCHED-2..SCHED-5).

    :param evict_for: ``(target, profile, running ids) -> evict set`` (see ``evict_set``;
        pass ``memory_budget`` to it when ``snap.budget`` is set).
    :param solver: when given, plain (non-profile) requests take their evict set from
        ``solver.solve`` instead of ``evict_for``; see ``EvictSolver`` for how it combines
        with a memory budget.

    Grants come first (to ready models that are not draining), then swaps are planned
    on the world *after* those grants, so a swap never evicts a model it just handed
    work to. With a memory budget, a waiting model whose need exceeds the whole budget
    is refused (``Decision.refused``) and takes no part in the planning.
    """
    fifo = snap.policy == "fifo"
    refused = _refusals(snap)
    models = snap.models
    if refused:
        out = {mid for mid, _ in refused}
        models = {mid: attr.evolve(m, waiting=()) if mid in out else m for mid, m in models.items()}
    _, draining, _ = _plan(models, snap, evict_for, solver)
    # Models draining for the head get no new work, except requests older than every
    # waiting candidate (they are first in line anyway).
    held = set(draining)
    oldest_candidate = min((m.waiting[0].seq for m in models.values()
                            if m.waiting and m.state != "ready"), default=None)
    grants = _grants(models, held, fifo, oldest_candidate)
    granted = dict(grants)
    after = {
        mid: attr.evolve(m, inflight=m.inflight + granted[mid], waiting=m.waiting[granted[mid]:])
        if mid in granted else m
        for mid, m in models.items()}
    swaps, more_draining, wake_at = _plan(after, snap, evict_for, solver)
    return Decision(tuple(grants), tuple(swaps), frozenset(draining | more_draining), wake_at,
                    tuple(refused))


#: ``decide``'s decision when nothing waits: nothing to grant, start or drain.
NOTHING = Decision()


def plain_decision(waiting: Iterable[tuple[str, str, int]]) -> Optional[Decision]:
    """``decide``'s decision in the two cases most passes meet, found without a ``Snapshot``:
    nothing waits anywhere (a release), or one model alone has waiters and it is ready (a request
    to a loaded model). None in every other case: ask ``decide``.

    In both cases no model is a candidate for a start, so nothing is planned, drained or refused
    and no wake-up is asked for, and the ready model's waiters are all granted (no candidate
    holds it, and under ``fifo`` no other model has an older waiter).

    :param waiting: ``(model id, state, number of waiters)`` of every model with waiters, the
        state as ``decide`` would see it (a model being replaced is ``stopping``).
    """
    found = None
    for item in waiting:
        if found is not None:
            return None
        found = item
    if found is None:
        return NOTHING
    model_id, state, n = found
    if state != "ready":
        return None
    return Decision(grants=((model_id, n),))


def _refusals(snap: Snapshot) -> list[tuple[str, str]]:
    """Waiting models that would have to start but need more than the whole budget."""
    if snap.budget is None:
        return []
    return [(m.id, refusal_message(m.id, m.need, m.need_source, snap.budget))
            for m in sorted(snap.models.values(), key=lambda m: m.id)
            if m.waiting and m.state in ("stopped", "stopping") and m.id not in snap.swapping
            and m.need is not None and m.need > snap.budget]


def _plan(models: Mapping[str, ModelView], snap: Snapshot, evict_for: Callable,
          solver: Optional[EvictSolver] = None) -> tuple:
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
        key=_candidate_order(snap))
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
        evict, evictions, fits = _evict_for(
            cand, first.profile, running, models, snap, evict_for, solver,
            claimed | (head_claim if index > 0 else frozenset()))
        involved = evict | {cand.id}
        # A target that cannot fit within the memory budget whatever is evicted (persistent or
        # starting models hold the room) waits: nothing is evicted or drained for it. Nor is
        # anything evicted while the cheapest room holds a model that is still starting: the
        # target waits for that start to end, then evicts it.
        blocked = not fits or bool(involved & claimed)
        blocked = blocked or any(x in models and models[x].state == "starting"
                                 for x in evict if _is_memory_pick(x, evictions))
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
            swaps.append(Swap(cand.id, evict, evictions, cand.need, cand.need_source))
            claimed |= involved
            # Its target is about to start: later candidates of this pass must see it as
            # running (as a swap in progress is), or two exclusive models could both start
            # when whatever blocked them goes away at once (a crash, an unload).
            running = running | {cand.id}
    return swaps, draining, wake_at


def _candidate_order(snap: Snapshot) -> Callable[[ModelView], tuple]:
    """The order in which models waiting for a start are considered; the first is the head.

    Oldest waiter first. With priorities (``routing.scheduler.settings.fifo.priority``) a
    higher-priority model goes before a lower one, except that a request that has waited
    ``scheduler.maxWait`` goes before every request that has not, oldest first: priority
    reorders the queue but never starves anyone beyond ``maxWait``. A waiter's own priority
    (its API key's, ``Waiter.priority``) counts before the model's.
    """
    if not snap.priority and not any(w.priority for m in snap.models.values() for w in m.waiting):
        return lambda m: m.waiting[0].seq
    priority, now, max_wait = snap.priority, snap.now, snap.max_wait

    def key(m: ModelView) -> tuple:
        first = m.waiting[0]
        if now - first.admitted >= max_wait:
            return (0, 0, 0, first.seq)
        # The request's own priority (its API key's) first, then the model's: a request of a
        # higher-priority key goes before older ones of lower keys, whatever model it wants.
        best = max(w.priority for w in m.waiting)
        seq = min(w.seq for w in m.waiting if w.priority == best)
        return (1, -best, -priority.get(m.id, 0), seq)

    return key


def _evict_for(cand: ModelView, profile: Optional[str], running: frozenset,
               models: Mapping[str, ModelView], snap: Snapshot, evict_for: Callable,
               solver: Optional[EvictSolver], avoid: frozenset) -> tuple:
    """(evict set, Eviction records, fits) for starting ``cand`` now.

    The group rules (or the solver) give the base set; with a budget, models are added to
    it until ``cand`` fits (``_memory_picks``). ``fits`` is False when no evict set can make
    room: the candidate then waits and its evict set only tells what it is waiting for.
    ``avoid``: models taken by other swaps, or by the head: chosen only when needed.
    """
    target = cand.id
    if solver is not None and profile is None:
        base, reason = frozenset(solver.solve(target, running)), MATRIX
    else:
        base, reason = frozenset(evict_for(target, profile, running)), (PROFILE if profile else GROUP)
    base = base - {target}
    added: frozenset = frozenset()
    fits = True
    if snap.budget is not None:
        resident = running - base - {target}
        over = sum(_need(models, x) for x in resident) + (cand.need or 0) - snap.budget
        if over > 0:
            if reason == MATRIX:
                fits = False  # the budget vetoes the solver's set; nothing is added to it
            else:
                picked = _memory_picks(resident, over, models, snap, avoid)
                fits = picked is not None
                added = picked or frozenset()
    evict = base | added
    evictions = tuple(_eviction(x, MEMORY if x in added else reason, models) for x in sorted(evict))
    return evict, evictions, fits


def _need(models: Mapping[str, ModelView], model_id: str) -> int:
    m = models.get(model_id)
    return (m.need or 0) if m is not None else 0


def _eviction(model_id: str, reason: str, models: Mapping[str, ModelView]) -> Eviction:
    m = models.get(model_id)
    if m is None:
        return Eviction(model_id, reason)
    return Eviction(model_id, reason, m.last_used, m.load_time, m.demand, m.need)


def _memory_picks(resident: frozenset, over: int, models: Mapping[str, ModelView], snap: Snapshot,
                  avoid: frozenset) -> Optional[frozenset]:
    """The resident models to evict so that ``over`` more bytes are free, or None if impossible.

    Candidates: resident models outside persistent groups that are not starting. Sets made
    only of idle models (no request in flight, not taken by another swap) are preferred;
    among those, policy ``cost`` takes the lowest total reload cost (``load_time`` x
    ``demand``; a model already stopping costs nothing), ties to the least recently used
    and then to fewer models; policy ``lru`` evicts least recently used first until it fits.
    A set holding busy models is returned too: the swap then waits for them (they drain).
    """
    cost_policy = snap.memory_policy != "lru"
    cands = []
    for x in sorted(resident):
        m = models.get(x)
        if m is None or m.persistent or not m.need:
            continue
        if m.state == "starting" and not cost_policy:
            continue
        # Busy, starting or claimed models block: picking one makes the target wait for it.
        blocking = m.inflight > 0 or x in avoid or m.state == "starting"
        cost = 0.0 if m.state == "stopping" else m.load_time * m.demand
        used = -math.inf if m.last_used is None else m.last_used
        cands.append((x, m.need, blocking, cost, used))
    if sum(c[1] for c in cands) < over:
        return None
    if snap.memory_policy == "lru":
        order = sorted(cands, key=lambda c: (c[2], c[4], c[0]))
        return _prefix(order, over)
    if len(cands) > EXACT_SEARCH_LIMIT:
        order = sorted(cands, key=lambda c: (c[2], c[3] / c[1], c[4], c[0]))
        return _prefix(order, over)
    return _cheapest(cands, over)


def _is_memory_pick(model_id: str, evictions: tuple) -> bool:
    return any(e.model == model_id and e.reason == MEMORY for e in evictions)


def _prefix(order: list, over: int) -> frozenset:
    picked, freed = [], 0
    for c in order:
        if freed >= over:
            break
        picked.append(c[0])
        freed += c[1]
    return frozenset(picked)


def _cheapest(cands: list, over: int) -> frozenset:
    """Exact search over the minimal sets freeing ``over`` bytes, best key first.

    Key: (total cost, models that block, most recent last use, size, ids). The expected
    reload cost comes first: waiting for a busy model to drain (bounded by maxWait) or for a
    starting one to finish is cheaper than evicting an idle model that will be asked for
    again soon. A superset of a sufficient set is never better, so the search stops growing
    a set once it suffices.
    """
    best: list = [None, None]  # key, ids
    n = len(cands)
    suffix = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        suffix[i] = suffix[i + 1] + cands[i][1]

    def visit(i: int, ids: tuple, freed: int, blocking: int, cost: float, recent: float) -> None:
        if freed >= over:
            key = (round(cost, 9), blocking, recent, len(ids), ids)  # rounded: ties are ties
            if best[0] is None or key < best[0]:
                best[0], best[1] = key, ids
            return
        if i == n or freed + suffix[i] < over:
            return
        if best[0] is not None and round(cost, 9) > best[0][0]:
            return
        x, need, blocks, c, used = cands[i]
        visit(i + 1, ids + (x,), freed + need, blocking + blocks, cost + c, max(recent, used))
        visit(i + 1, ids, freed, blocking, cost, recent)

    visit(0, (), 0, 0, 0.0, -math.inf)
    return frozenset(best[1])


# -- messages and demand --------------------------------------------------------------------------

def format_size(n: Optional[int]) -> str:
    """Bytes for people: ``21.4 GiB``, ``512.0 MiB``; ``?`` when unknown."""
    if n is None:
        return "?"
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB"


def _rate(x: float) -> str:
    if x >= 10:
        return f"{x:.0f}"
    if x >= 1:
        return f"{x:.1f}"
    return f"{x:.2g}"


def refusal_message(model_id: str, need: Optional[int], source: str, budget: int) -> str:
    """Why a model that needs more than the whole budget is refused."""
    how = f" ({source})" if source else ""
    return f"model '{model_id}' needs {format_size(need)}{how} but memory.budget is {format_size(budget)}"


def eviction_line(swap: Swap, eviction: Eviction, now: float) -> str:
    """One log line for one eviction of ``swap``, e.g.

    ``evicting 'embed' (idle 42 s, reload ~1.8 s × 0.1/min) to fit 'qwen-32b' (needs 21.4 GiB, measured)``
    """
    idle = "idle ?" if eviction.last_used is None else f"idle {max(0.0, now - eviction.last_used):.0f} s"
    head = (f"evicting '{eviction.model}' ({idle}, reload ~{eviction.load_time:.1f} s × "
            f"{_rate(eviction.demand)}/min)")
    if eviction.reason == MEMORY:
        how = f", {swap.need_source}" if swap.need_source else ""
        return f"{head} to fit '{swap.target}' (needs {format_size(swap.need)}{how})"
    why = {GROUP: "group rules", PROFILE: "profile", MATRIX: "matrix"}.get(eviction.reason, eviction.reason)
    return f"{head} for '{swap.target}' ({why})"


def decayed_rate(old_rate: float, last_update: float, now: float, half_life: float,
                 hits: int = 0) -> float:
    """An exponentially decayed request rate, in requests per minute.

    ``old_rate`` was the rate at ``last_update``; it halves every ``half_life`` seconds, and
    each of ``hits`` requests arriving at ``now`` adds ``ln 2 / half_life`` per second, so
    that a steady stream of k requests a minute settles at k. Call it with ``hits=1`` on
    each request (and keep ``now`` as the new ``last_update``), with ``hits=0`` to read it.
    """
    if half_life <= 0:
        raise ValueError("half_life must be positive")
    elapsed = max(0.0, now - last_update)
    return old_rate * 0.5 ** (elapsed / half_life) + hits * 60.0 * math.log(2) / half_life


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
