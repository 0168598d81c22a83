"""Pure scheduling decisions (SCHED-2..SCHED-5, CFG-52, SCHED-4): snapshot in, decision out."""
from llamaswap.scheduler import (
    Decision, GroupRule, ModelView, Snapshot, Swap, Waiter, decide, evict_set)

DEFAULT = GroupRule("(default)")


def default_groups(model_id):
    return DEFAULT


def evict_default(target, profile, running):
    return evict_set(target, None, running, default_groups)


def snap(models, now=0.0, max_wait=30.0, policy="swap-aware", swapping=()):
    return Snapshot({m.id: m for m in models}, now, max_wait, policy, frozenset(swapping))


def w(seq, t=0.0, profile=None):
    return Waiter(seq, t, profile)


class TestEvictSet:
    def test_default_group_evicts_everything_else(self):
        """With no groups, every running model is evicted: one model at a time."""
        assert evict_set("b", None, {"a", "c"}, default_groups) == {"a", "c"}

    def test_swap_false_group_keeps_members_together(self):
        """Members of a swap:false group coexist."""
        g = GroupRule("g", swap=False, exclusive=True)
        assert evict_set("b", None, {"a"}, lambda m: g) == frozenset()

    def test_exclusive_group_evicts_other_groups_but_not_persistent(self):
        """CFG-52: exclusive evicts other groups unless they are persistent."""
        groups = {"a": GroupRule("chat"), "b": GroupRule("chat"), "e": GroupRule("helpers", False, False, True),
                  "x": GroupRule("other", True, True, False)}
        assert evict_set("a", None, {"b", "e", "x"}, groups.__getitem__) == {"b", "x"}

    def test_non_exclusive_group_never_evicts_other_groups(self):
        """Exclusivity is one-way: a non-exclusive group's start leaves other groups alone."""
        groups = {"e": GroupRule("helpers", False, False, False), "a": GroupRule("chat")}
        assert evict_set("e", None, {"a"}, groups.__getitem__) == frozenset()

    def test_profile_evicts_non_members_except_persistent(self):
        """SCHED-4: a P:M request evicts running models outside P, persistent groups excepted."""
        groups = {"a": DEFAULT, "b": DEFAULT, "c": DEFAULT, "p": GroupRule("keep", persistent=True)}
        assert evict_set("a", ["a", "b"], {"b", "c", "p"}, groups.__getitem__) == {"c"}


class TestDecide:
    def test_cold_start_begins_swap(self):
        """A request for a stopped model with nothing running starts it."""
        d = decide(snap([ModelView("a", "stopped", 0, (w(0),))]), evict_default)
        assert d.swaps == (Swap("a", frozenset()),)
        assert d.grants == ()

    def test_ready_model_grants_all_waiters(self):
        """SCHED-2: when a model is ready, all of its waiters are granted together."""
        d = decide(snap([ModelView("a", "ready", 0, (w(0), w(1)))]), evict_default)
        assert d.grants == (("a", 2),)

    def test_starting_model_waiters_join(self):
        """Requests for a starting model join that start: no second swap."""
        d = decide(snap([ModelView("a", "starting", 0, (w(0),))]), evict_default)
        assert d == Decision((), (), frozenset(), None)

    def test_stopping_model_waits_for_stop(self):
        """PROC-12: a request for a stopping model waits; the start follows the stop."""
        d = decide(snap([ModelView("a", "stopping", 0, (w(0),))]), evict_default)
        assert d.swaps == ()

    def test_idle_loaded_model_swapped_at_once(self):
        """SCHED-7(c): A ready and idle, B arrives: B's swap begins at once."""
        d = decide(snap([ModelView("a", "ready"), ModelView("b", "stopped", 0, (w(0),))]), evict_default)
        assert d.swaps == (Swap("b", frozenset({"a"})),)

    def test_busy_model_batches_until_max_wait(self):
        """SCHED-5: before maxWait, new requests for the busy model are still granted."""
        models = [ModelView("a", "ready", 1, (w(5, 10.0),)), ModelView("b", "stopped", 0, (w(1, 0.0),))]
        d = decide(snap(models, now=10.0), evict_default)
        assert d.swaps == ()
        assert d.grants == (("a", 1),)
        assert d.draining == frozenset()
        assert d.wake_at == 30.0

    def test_busy_model_drains_after_max_wait(self):
        """SCHED-5: from maxWait on, the models in E drain: their new requests wait."""
        models = [ModelView("a", "ready", 1, (w(5, 29.0),)), ModelView("b", "stopped", 0, (w(1, 0.0),))]
        d = decide(snap(models, now=30.0), evict_default)
        assert d.draining == {"a"}
        assert d.grants == ()
        assert d.swaps == ()

    def test_drained_model_swaps_when_idle(self):
        """Once the drained model is idle, the head's swap begins, the queued A waits after B."""
        models = [ModelView("a", "ready", 0, (w(5, 29.0),)), ModelView("b", "stopped", 0, (w(1, 0.0),))]
        d = decide(snap(models, now=31.0), evict_default)
        assert d.swaps == (Swap("b", frozenset({"a"})),)

    def test_max_wait_zero_is_strict(self):
        """maxWait 0: models in E drain as soon as the head is blocked by them."""
        models = [ModelView("a", "ready", 1, (w(2, 0.0),)), ModelView("b", "stopped", 0, (w(1, 0.0),))]
        d = decide(snap(models, max_wait=0.0), evict_default)
        assert d.draining == {"a"}
        assert d.grants == ()

    def test_fifo_policy_grants_only_older_than_other_waiters(self):
        """policy fifo: a ready model's waiter is not granted past an older waiter of another model."""
        models = [ModelView("a", "ready", 0, (w(0), w(3))), ModelView("b", "stopped", 0, (w(1),))]
        d = decide(snap(models, policy="fifo"), evict_default)
        # a is idle, so b's swap may begin at once; a's waiters are not granted past b's
        assert d.grants == (("a", 1),)

    def test_starting_model_with_waiters_is_never_evicted(self):
        """SCHED-4: a starting model that others wait for blocks the conflicting swap."""
        models = [ModelView("a", "starting", 0, (w(0),)), ModelView("b", "stopped", 0, (w(1),))]
        assert decide(snap(models), evict_default).swaps == ()

    def test_swap_in_progress_blocks_overlapping_swaps(self):
        """SCHED-3(b): no model may take part in two swaps at once."""
        models = [ModelView("a", "stopping"), ModelView("b", "stopped", 0, (w(1),)), ModelView("c", "stopped")]
        assert decide(snap(models, swapping={"a", "c"}), evict_default).swaps == ()

    def test_disjoint_swaps_run_in_parallel(self):
        """Other candidates may swap at the same time when nothing is shared."""
        g = {"a": GroupRule("g1", True, False), "b": GroupRule("g2", True, False)}

        def evict(target, profile, running):
            return evict_set(target, None, running, g.__getitem__)

        models = [ModelView("a", "stopped", 0, (w(0),)), ModelView("b", "stopped", 0, (w(1),))]
        assert set(decide(snap(models), evict).swaps) == {Swap("a", frozenset()), Swap("b", frozenset())}

    def test_second_candidate_may_not_take_heads_models(self):
        """A later candidate never claims what the head is waiting for."""
        models = [ModelView("a", "ready", 1), ModelView("b", "stopped", 0, (w(0),)),
                  ModelView("c", "stopped", 0, (w(1),))]
        d = decide(snap(models), evict_default)
        assert d.swaps == ()


def simulate(arrivals, policy, max_wait=30.0, load=2.0, service=1.0):
    """Drive ``decide`` with an event loop of our own: returns (loads, finish times).

    ``arrivals`` is a list of (time, model). Every request takes ``service`` seconds once
    granted; a model takes ``load`` seconds to start and stopping is instant.
    """
    import heapq

    state = {m: "stopped" for _, m in arrivals}
    inflight = {m: 0 for m in state}
    waiting = {m: [] for m in state}
    events = []
    seq = 0
    for t, m in arrivals:
        heapq.heappush(events, (t, seq, "arrive", m))
        seq += 1
    loads, done = [], []
    now = 0.0
    swapping = set()
    n = 0
    while events:
        now, _, kind, m = heapq.heappop(events)
        if kind == "arrive":
            waiting[m].append(Waiter(n, now))
            n += 1
        elif kind == "ready":
            state[m] = "ready"
            swapping.discard(m)
        elif kind == "finish":
            inflight[m] -= 1
            done.append((now, m))
        views = {x: ModelView(x, state[x], inflight[x], tuple(waiting[x])) for x in state}
        d = decide(Snapshot(views, now, max_wait, policy, frozenset(swapping)), evict_default)
        for x, k in d.grants:
            for _ in range(k):
                waiting[x].pop(0)
                inflight[x] += 1
                heapq.heappush(events, (now + service, seq, "finish", x))
                seq += 1
        for s in d.swaps:
            for x in s.evict:
                state[x] = "stopped"
            state[s.target] = "starting"
            swapping.add(s.target)
            loads.append(s.target)
            heapq.heappush(events, (now + load, seq, "ready", s.target))
            seq += 1
        if d.wake_at is not None:
            heapq.heappush(events, (d.wake_at, seq, "tick", ""))
            seq += 1
    return loads, done


def test_worked_example_a_batches_into_three_loads():
    """SCHED-7(a): A B C A B C at t=0 give three loads, not six."""
    arrivals = [(0.0, m) for m in "ABCABC"]
    loads, done = simulate(arrivals, "swap-aware")
    assert loads == ["A", "B", "C"]
    assert len(done) == 6


def test_fifo_policy_swaps_per_request():
    """Under fifo the same traffic swaps for every request (llama-swap-like)."""
    loads, done = simulate([(0.0, m) for m in "ABCABC"], "fifo")
    assert loads == list("ABCABC")
    assert len(done) == 6


def test_no_starvation_under_steady_load():
    """SCHED-7(b): a steady stream of A cannot hold off one B past maxWait + in-flight time."""
    arrivals = [(0.0, "A")] + [(0.5 * i, "A") for i in range(1, 200)] + [(1.0, "B")]
    loads, done = simulate(arrivals, "swap-aware", max_wait=30.0)
    b_finish = [t for t, m in done if m == "B"][0]
    assert b_finish <= 1.0 + 30.0 + 1.0 + 2.0 + 1.0
    assert loads[:2] == ["A", "B"]


class TestPriority:
    """routing.scheduler.settings.fifo.priority combined with maxWait."""

    @staticmethod
    def prio_snap(now, priority, policy="swap-aware"):
        # a is loaded and busy; b (older, priority 1) and c (newer, priority 10) both need it gone
        models = [ModelView("a", "ready", 1), ModelView("b", "stopped", 0, (w(0, 0.0),)),
                  ModelView("c", "stopped", 0, (w(1, 5.0),))]
        return Snapshot({m.id: m for m in models}, now, 30.0, policy, frozenset(), priority=priority)

    def test_higher_priority_waiter_becomes_the_head(self):
        """Without priorities b (older) is the head and gets a drains at 30 s; with c at 10,
        c is the head, so a drains at c's admission + maxWait (35 s)."""
        d = decide(self.prio_snap(10.0, {}), evict_default)
        assert d.wake_at == 30.0
        d = decide(self.prio_snap(10.0, {"b": 1, "c": 10}), evict_default)
        assert d.wake_at == 35.0

    def test_max_wait_still_bounds_a_low_priority_wait(self):
        """Once b has waited maxWait it goes before c whatever the priorities."""
        d = decide(self.prio_snap(31.0, {"b": 1, "c": 10}), evict_default)
        assert d.draining == {"a"}
        idle = Snapshot({"a": ModelView("a", "ready", 0), "b": ModelView("b", "stopped", 0, (w(0, 0.0),)),
                         "c": ModelView("c", "stopped", 0, (w(1, 5.0),))}, 31.0, 30.0, "swap-aware",
                        frozenset(), priority={"b": 1, "c": 10})
        assert [s.target for s in decide(idle, evict_default).swaps] == ["b"]
        fresh = attr_evolve_now(idle, 20.0)
        assert [s.target for s in decide(fresh, evict_default).swaps] == ["c"]

    def test_fifo_policy_orders_by_priority_too(self):
        idle = Snapshot({"a": ModelView("a", "ready", 0), "b": ModelView("b", "stopped", 0, (w(0, 0.0),)),
                         "c": ModelView("c", "stopped", 0, (w(1, 5.0),))}, 10.0, 30.0, "fifo",
                        frozenset(), priority={"c": 10})
        assert [s.target for s in decide(idle, evict_default).swaps] == ["c"]


def attr_evolve_now(s, now):
    import attr
    return attr.evolve(s, now=now)
