"""Pure scheduling under a memory budget: packing, reload-cost eviction, refusal, no loops.

Snapshot in, decision out: no clock, no Twisted. Sizes are in GiB for readability.
"""
import math

import pytest

from llamaswap.scheduler import (
    EXACT_SEARCH_LIMIT, GROUP, MATRIX, MEMORY, Eviction, GroupRule, ModelView, Snapshot, Swap, Waiter,
    decayed_rate, decide, eviction_line, evict_set, format_size, refusal_message)

GiB = 2**30
DEFAULT = GroupRule("(default)")


def gib(x):
    return int(x * GiB)


def model(mid, state="ready", inflight=0, waiting=(), need=4, load=2.0, demand=0.0, used=0.0,
          persistent=False, source="declared"):
    return ModelView(mid, state, inflight, tuple(waiting), need=None if need is None else gib(need),
                     need_source=source, load_time=load, demand=demand, last_used=used,
                     persistent=persistent)


def w(seq, t=0.0, profile=None):
    return Waiter(seq, t, profile)


def snap(models, budget=16, now=100.0, max_wait=30.0, memory_policy="cost", swapping=()):
    return Snapshot({m.id: m for m in models}, now, max_wait, "swap-aware", frozenset(swapping),
                    None if budget is None else gib(budget), memory_policy)


def evictor(groups=None, budget=True):
    """The router's evict_for: group rules, with the (default) group relaxed under a budget."""
    groups = groups or {}

    def group_of(mid):
        return groups.get(mid, DEFAULT)

    def evict_for(target, profile, running):
        return evict_set(target, None, running, group_of, memory_budget=gib(16) if budget else None)
    return evict_for


def only_swap(d):
    assert len(d.swaps) == 1, d
    return d.swaps[0]


class TestPacking:
    def test_three_fit_a_fourth_evicts_one(self):
        """Three 4 GiB models share a 12 GiB budget; the fourth evicts exactly one of them."""
        d = decide(snap([model("a"), model("b"), model("c", "stopped", waiting=[w(0)])], budget=12),
                   evictor())
        assert d.swaps == (Swap("c", frozenset()),)
        d = decide(snap([model("a", used=10.0), model("b", used=20.0), model("c", used=30.0),
                         model("d", "stopped", waiting=[w(0)])], budget=12), evictor())
        swap = only_swap(d)
        assert swap.evict == {"a"}  # all cost nothing: the least recently used goes
        assert [(e.model, e.reason) for e in swap.evictions] == [("a", MEMORY)]

    def test_default_group_no_longer_swaps_under_a_budget(self):
        """With a budget the (default) group neither swaps nor is exclusive; without, it still swaps."""
        models = [model("a"), model("b", "stopped", waiting=[w(0)])]
        assert decide(snap(models), evictor()).swaps == (Swap("b", frozenset()),)
        without = decide(snap(models, budget=None), evictor(budget=False))
        assert without.swaps == (Swap("b", frozenset({"a"})),)
        assert evict_set("b", None, {"a"}, lambda m: DEFAULT, memory_budget=gib(8)) == frozenset()
        assert evict_set("b", None, {"a"}, lambda m: DEFAULT) == {"a"}

    def test_starting_targets_count_so_two_candidates_do_not_overcommit(self):
        """Two 8 GiB candidates and a 12 GiB budget: one swap per pass, the other waits its turn."""
        models = [model("b", "stopped", waiting=[w(0)], need=8),
                  model("c", "stopped", waiting=[w(1)], need=8)]
        d = decide(snap(models, budget=12), evictor())
        assert d.swaps == (Swap("b", frozenset()),)
        # the next pass, b starting (a swap in progress): c still waits, nothing is evicted
        models[0] = model("b", "starting", need=8)
        assert decide(snap(models, budget=12, swapping={"b"}), evictor()).swaps == ()

    def test_no_budget_ignores_memory_fields(self):
        """Without a budget, needs are not looked at: a huge model starts, the default group swaps."""
        models = [model("a"), model("big", "stopped", waiting=[w(0)], need=500)]
        d = decide(snap(models, budget=None), evictor(budget=False))
        assert d.swaps == (Swap("big", frozenset({"a"})),)
        assert d.refused == ()


class TestReloadCost:
    def models(self):
        # 'hot' was used longer ago but is asked for often; 'cold' was used recently, once.
        return [model("hot", used=10.0, load=5.0, demand=6.0),
                model("cold", used=50.0, load=5.0, demand=0.1),
                model("new", "stopped", waiting=[w(0)], need=8)]

    def test_cost_keeps_the_frequently_used_model_lru_does_not(self):
        """Same snapshot: reload cost evicts 'cold'; plain LRU evicts 'hot'."""
        by_cost = only_swap(decide(snap(self.models(), budget=12), evictor()))
        by_lru = only_swap(decide(snap(self.models(), budget=12, memory_policy="lru"), evictor()))
        assert by_cost.evict == {"cold"}
        assert by_lru.evict == {"hot"}

    def test_cheapest_set_may_be_two_models(self):
        """Two cheap small models go rather than one expensive large one."""
        models = [model("x", need=8, load=10.0, demand=1.0), model("y", load=1.0, demand=1.0),
                  model("z", load=1.0, demand=1.0), model("t", "stopped", waiting=[w(0)], need=8)]
        assert only_swap(decide(snap(models, budget=16), evictor())).evict == {"y", "z"}

    def test_equal_cost_goes_to_least_recently_used_and_fewest(self):
        """Ties on cost: the set whose latest use is oldest, then the smaller set."""
        models = [model("a", used=5.0), model("b", used=1.0, need=8), model("c", used=3.0),
                  model("t", "stopped", waiting=[w(0)], need=8)]
        # {b} (latest use 1) beats {a, c} (latest use 5) and any set holding b and more
        assert only_swap(decide(snap(models, budget=16), evictor())).evict == {"b"}

    def test_many_candidates_fall_back_to_greedy_and_fit(self):
        """Beyond the exact-search limit, a greedy cost-per-byte order still makes room."""
        n = EXACT_SEARCH_LIMIT + 4
        models = [model(f"m{i:02}", need=1, load=1.0, demand=float(i)) for i in range(n)]
        models.append(model("t", "stopped", waiting=[w(0)], need=3))
        swap = only_swap(decide(snap(models, budget=n), evictor()))
        assert swap.evict == {"m00", "m01", "m02"}


class TestBusyModels:
    def test_cheaper_busy_model_is_waited_for_rather_than_evicting_an_expensive_idle_one(self):
        """The cost policy waits for a cheap busy model to drain instead of evicting an idle
        model that will be asked for again soon; lru evicts the idle one at once."""
        models = [model("busy", inflight=1, demand=0.0), model("idle", load=9.0, demand=9.0),
                  model("t", "stopped", waiting=[w(0)])]
        d = decide(snap(models, budget=8), evictor())
        assert d.swaps == () and "idle" not in d.draining
        models[0] = model("busy", demand=0.0)  # its request ended
        assert only_swap(decide(snap(models, budget=8), evictor())).evict == {"busy"}
        models[0] = model("busy", inflight=1, demand=0.0)
        assert only_swap(decide(snap(models, budget=8, memory_policy="lru"), evictor())).evict == {"idle"}

    def test_cheaper_starting_model_is_waited_for_then_evicted(self):
        """A cold model still starting is cheap to evict once it has served: the target waits
        for that start rather than evicting the hot model."""
        models = [model("cold", "starting", demand=0.1, load=3.0, waiting=[w(1)]),
                  model("hot", load=1.0, demand=9.0),
                  model("t", "stopped", waiting=[w(2)])]
        d = decide(snap(models, budget=8), evictor())
        assert d.swaps == ()
        models[0] = model("cold", demand=0.1, load=3.0)  # ready, served, idle
        assert only_swap(decide(snap(models, budget=8), evictor())).evict == {"cold"}

    def test_model_in_flight_is_never_evicted_and_drains_after_max_wait(self):
        """The only model that can make room is busy: batching until maxWait, then it drains."""
        models = [model("a", inflight=1, waiting=[w(5, 10.0)], need=10),
                  model("b", "stopped", waiting=[w(1, 0.0)], need=8)]
        d = decide(snap(models, now=10.0), evictor())
        assert d.swaps == () and d.draining == frozenset()
        assert d.grants == (("a", 1),)
        assert d.wake_at == 30.0
        d = decide(snap(models, now=30.0), evictor())
        assert d.swaps == () and d.draining == {"a"} and d.grants == ()
        models[0] = model("a", waiting=[w(5, 10.0)], need=10)  # its request ended
        d = decide(snap(models, now=31.0), evictor())
        assert only_swap(d).evict == {"a"}


class TestRefusal:
    def test_need_above_the_whole_budget_is_refused_at_once(self):
        """Refused with a message; nothing evicted or drained; other work goes on."""
        models = [model("embed", waiting=[w(2)]), model("qwen-32b", "stopped", waiting=[w(0)], need=21.4,
                                                         source="estimated"),
                  model("small", "stopped", waiting=[w(1)])]
        d = decide(snap(models, budget=16), evictor())
        assert d.refused == (
            ("qwen-32b", "model 'qwen-32b' needs 21.4 GiB (estimated) but memory.budget is 16.0 GiB"),)
        assert d.swaps == (Swap("small", frozenset()),)
        assert d.grants == (("embed", 1),)
        assert d.draining == frozenset()

    def test_refused_model_never_evicts_even_after_max_wait(self):
        models = [model("a", inflight=1), model("big", "stopped", waiting=[w(0, 0.0)], need=40)]
        d = decide(snap(models, now=1000.0), evictor())
        assert [mid for mid, _ in d.refused] == ["big"]
        assert d.swaps == () and d.draining == frozenset() and d.wake_at is None

    def test_refusal_message(self):
        assert refusal_message("m", gib(0.5), "", gib(16)) == \
            "model 'm' needs 512.0 MiB but memory.budget is 16.0 GiB"


def run_passes(models, budget, groups=None, times=range(0, 100, 5), finish=None, arrive=None):
    """Drive ``decide`` for several passes; apply swaps at once (a start takes one pass).

    ``finish``: {time: model} whose in-flight requests end then; ``arrive``: {time: model} gaining
    a waiter. Returns ({model: times evicted}, [targets started], final models).
    """
    models = {m.id: m for m in models}
    evicted, started, seq = {}, [], 100
    for now in times:
        for mid, m in list(models.items()):
            if m.state == "starting":
                models[mid] = attr_evolve(m, state="ready", last_used=float(now))
        if finish and now in finish:
            models[finish[now]] = attr_evolve(models[finish[now]], inflight=0, last_used=float(now))
        if arrive and now in arrive:
            m = models[arrive[now]]
            models[m.id] = attr_evolve(m, waiting=m.waiting + (w(seq, float(now)),))
            seq += 1
        d = decide(snap(models.values(), budget=budget, now=float(now)), evictor(groups))
        for mid, n in d.grants:
            m = models[mid]
            # requests are short: served within the pass
            models[mid] = attr_evolve(m, waiting=m.waiting[n:], last_used=float(now))
        for s in d.swaps:
            for x in s.evict:
                evicted[x] = evicted.get(x, 0) + 1
                models[x] = attr_evolve(models[x], state="stopped")
            models[s.target] = attr_evolve(models[s.target], state="starting")
            started.append(s.target)
    return evicted, started, models


def attr_evolve(m, **kw):
    import attr
    return attr.evolve(m, **kw)


class TestNoLoop:
    def test_never_fits_beside_persistent_model_waits_without_evicting(self):
        """Persistent 10 GiB + target 8 GiB > 16 GiB: the target waits; the idle model keeps serving."""
        models = [model("p", need=10, persistent=True), model("x", need=4),
                  model("t", "stopped", waiting=[w(0, 0.0)], need=8)]
        evicted, started, final = run_passes(models, 16, arrive={10: "x", 40: "x", 70: "x"})
        assert evicted == {} and started == []
        assert final["t"].waiting and final["x"].state == "ready"

    def test_waits_for_busy_model_then_evicts_once(self):
        """Needs both a busy and an idle model gone: nothing evicted early (the idle one keeps serving
        until maxWait), one swap when the busy one ends."""
        models = [model("a", inflight=1, need=8), model("b", need=4),
                  model("t", "stopped", waiting=[w(0, 0.0)], need=14)]
        evicted, started, final = run_passes(models, 16, finish={50: "a"}, arrive={10: "b", 20: "b"})
        assert started.count("t") == 1
        assert evicted == {"a": 1, "b": 1}
        assert final["t"].state == "ready"
        assert final["b"].last_used == 20.0  # served at 10 and 20, while t waited

    def test_evictions_happen_once_over_many_passes(self):
        """A fitting target evicts once, then nothing more happens pass after pass."""
        models = [model("a", used=1.0), model("b", used=2.0), model("t", "stopped", waiting=[w(0)], need=8)]
        evicted, started, _ = run_passes(models, 12)
        assert evicted == {"a": 1} and started == ["t"]


class TestGroupsWithBudget:
    def test_explicit_exclusive_group_evicts_first(self):
        """An exclusive group's start evicts the default group's models by the group rule, room or not."""
        groups = {"big": GroupRule("solo", swap=True, exclusive=True)}
        models = [model("a"), model("b"), model("big", "stopped", waiting=[w(0)])]
        swap = only_swap(decide(snap(models, budget=64), evictor(groups)))
        assert swap.evict == {"a", "b"}
        assert {e.reason for e in swap.evictions} == {GROUP}

    def test_group_rule_then_memory(self):
        """The swap group evicts its other member; memory then adds the cheapest idle model."""
        chat = GroupRule("chat", swap=True, exclusive=False)
        groups = {"c1": chat, "c2": chat}
        models = [model("c1", need=6), model("x", demand=1.0, load=1.0), model("y", demand=5.0, load=1.0),
                  model("c2", "stopped", waiting=[w(0)], need=10)]
        swap = only_swap(decide(snap(models, budget=16), evictor(groups)))
        assert swap.evict == {"c1", "x"}
        assert {(e.model, e.reason) for e in swap.evictions} == {("c1", GROUP), ("x", MEMORY)}

    def test_persistent_group_members_never_evicted_for_memory(self):
        """The persistent model is oldest and cheapest, yet the other one goes.

        If only the persistent model could make room, the target waits: nothing drains."""
        keep = GroupRule("keep", swap=False, exclusive=False, persistent=True)
        groups = {"p": keep}
        models = [model("p", used=0.0, persistent=True), model("x", used=50.0, demand=3.0, load=3.0),
                  model("t", "stopped", waiting=[w(0)])]
        assert only_swap(decide(snap(models, budget=8), evictor(groups))).evict == {"x"}
        models[0] = model("p", need=8, persistent=True)
        models[1] = model("x", inflight=1, need=2)
        models[2] = model("t", "stopped", waiting=[w(0)], need=8)
        d = decide(snap(models, budget=12, now=1000.0), evictor(groups))
        assert d.swaps == () and d.draining == frozenset()


class TestMatrixHook:
    class Solver:
        def __init__(self, result):
            self.result = frozenset(result)

        def solve(self, target, running):
            return self.result

    def test_solver_set_replaces_group_rules(self):
        models = [model("a"), model("b"), model("t", "stopped", waiting=[w(0)])]
        swap = only_swap(decide(snap(models, budget=None), evictor(budget=False), self.Solver({"a"})))
        assert swap.evict == {"a"} and swap.evictions[0].reason == MATRIX

    def test_budget_vetoes_a_set_that_does_not_fit(self):
        """A solver set leaving too little room is skipped: the target waits, nothing is evicted."""
        models = [model("a"), model("b"), model("t", "stopped", waiting=[w(0)])]
        assert decide(snap(models, budget=6), evictor(), self.Solver({"a"})).swaps == ()
        d = decide(snap(models, budget=6), evictor(), self.Solver({"a", "b"}))
        assert only_swap(d).evict == {"a", "b"}


class TestMessages:
    def test_eviction_line(self):
        models = [model("embed", used=58.0, load=1.8, demand=0.1, need=8),
                  model("qwen-32b", "stopped", waiting=[w(0)], need=21.4, source="measured")]
        swap = only_swap(decide(snap(models, budget=24, now=100.0), evictor()))
        assert eviction_line(swap, swap.evictions[0], 100.0) == (
            "evicting 'embed' (idle 42 s, reload ~1.8 s × 0.1/min) "
            "to fit 'qwen-32b' (needs 21.4 GiB, measured)")

    def test_group_eviction_line_and_unknown_use(self):
        swap = Swap("t", frozenset({"a"}), (Eviction("a", GROUP, None, 2.0, 12.0),))
        assert eviction_line(swap, swap.evictions[0], 5.0) == \
            "evicting 'a' (idle ?, reload ~2.0 s × 12/min) for 't' (group rules)"

    def test_format_size(self):
        assert (format_size(gib(1.5)), format_size(2**20), format_size(None)) == ("1.5 GiB", "1.0 MiB", "?")


class TestDecayedRate:
    def test_halves_every_half_life(self):
        assert decayed_rate(8.0, 0.0, 600.0, 300.0) == pytest.approx(2.0)

    def test_hit_adds_and_clock_going_back_does_not_grow_it(self):
        assert decayed_rate(0.0, 0.0, 0.0, 60.0, hits=1) == pytest.approx(math.log(2))
        assert decayed_rate(3.0, 10.0, 5.0, 60.0) == 3.0

    def test_steady_stream_settles_at_its_rate(self):
        """One request every 6 s (10/min): the rate, averaged over an interval, settles at 10."""
        rate, last = 0.0, 0.0
        for i in range(1, 2000):
            rate = decayed_rate(rate, last, 6.0 * i, 120.0, hits=1)
            last = 6.0 * i
        just_after, just_before = rate, decayed_rate(rate, last, last + 6.0, 120.0)
        assert just_before < 10.0 < just_after
        assert (just_after + just_before) / 2 == pytest.approx(10.0, rel=0.01)

    def test_half_life_must_be_positive(self):
        with pytest.raises(ValueError):
            decayed_rate(1.0, 0.0, 1.0, 0.0)
