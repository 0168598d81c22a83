"""Swap-aware scheduling through the real ``ModelRouter`` on a fake clock (PROC-11/12, issue 5).

Unlike tests/test_scheduler.py (the pure ``decide``), these drive the router with real
``UpstreamProcess`` objects on a ``FakeProcessReactor``: children exit on the next turn
after a signal (unless told to ignore SIGTERM), a model becomes healthy ``load`` seconds
after its spawn, and every request holds its lease for a given time. Everything runs on
one Clock, so a run is deterministic (SCHED-12) and long scenarios take milliseconds.
"""
from __future__ import annotations

import random
import signal
from typing import Any, Callable, Optional

from twisted.internet.defer import CancelledError
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.errors import ConcurrencyLimit
from llamaswap.observe import StateChanged
from llamaswap.process import State, UpstreamProcess
from llamaswap.router import ModelRouter
from llamaswap.config import GroupConfig, ModelConfig
from tests.factories import make_config, make_model
from tests.fakes import FakeLogs, FakePool, FakeProcessReactor, capture_logger

TERM, KILL = signal.SIGTERM, signal.SIGKILL
STEP = 0.05


class SimReactor(FakeProcessReactor):
    """Children exit on the next turn after SIGTERM/SIGKILL, except models in ``ignore_term``."""

    def __init__(self) -> None:
        super().__init__()
        self.auto_exit = True
        self.ignore_term: set[str] = set()

    def killpg(self, pgid: int, sig: int) -> None:
        proc = self.by_pid(pgid)
        if sig == TERM and proc is not None and proc.args[-1] in self.ignore_term:
            self.kills.append((pgid, sig))
            return
        super().killpg(pgid, sig)


class Req:
    """One simulated client request."""

    def __init__(self, sim: "Sim", model_id: str, at: float, duration: float,
                 profile: Optional[str] = None) -> None:
        self.sim, self.model_id, self.at, self.duration, self.profile = sim, model_id, at, duration, profile
        self.granted: Optional[float] = None
        self.done: Optional[float] = None
        self.failed_at: Optional[float] = None
        self.error: Any = None
        self.d = None
        self.lease = None

    def admit(self) -> None:
        self.d = self.sim.router.acquire(self.model_id, self.profile)
        self.d.addCallbacks(self._granted, self._failed)

    def _granted(self, lease: Any) -> None:
        self.lease = lease
        self.granted = self.sim.reactor.seconds()
        if lease.proc.state is not State.READY:
            self.sim.violations.append(f"{self.model_id} granted while {lease.proc.state}")
        self.sim.grants.append((self.granted, self.model_id))
        self.sim.reactor.callLater(self.duration, self._release)

    def _release(self) -> None:
        self.done = self.sim.reactor.seconds()
        self.lease.release()

    def _failed(self, failure: Any) -> None:
        self.failed_at = self.sim.reactor.seconds()
        self.error = failure.value

    @property
    def wait(self) -> float:
        assert self.granted is not None
        return self.granted - self.at


class Sim:
    """A router, its fake children and a clock; requests are scheduled, then ``run``."""

    def __init__(self, models: list[ModelConfig], load: float | dict = 2.0, **config_kw: Any) -> None:
        self.reactor = SimReactor()
        self.config = make_config(models, **config_kw)
        self.events: list = []
        self.emitted: list = []
        self.grants: list = []
        self.requests: list[Req] = []
        self.violations: list[str] = []
        loads = load if isinstance(load, dict) else {m.id: load for m in models}

        def make_process(model: ModelConfig, on_transition: Callable) -> UpstreamProcess:
            def check(http: Any, url: bytes):
                return deferLater(self.reactor, loads[model.id], lambda: 200)

            return UpstreamProcess(
                model=model, reactor=self.reactor, clock=self.reactor, logs=FakeLogs(),
                on_transition=on_transition,
                http_factory=lambda r: (object(), FakePool()), check=check,
                kill=self.reactor.killpg, group_alive=self.reactor.group_alive,
                log=capture_logger(self.events))

        self.router = ModelRouter(self.config, make_process, self.reactor, log=capture_logger(self.events),
                                  **self.router_options())
        self.router.observers.add(self.emitted.append)
        self.router.observers.add(self._check_invariants)

    def router_options(self) -> dict[str, Any]:
        """More keyword arguments for ``ModelRouter`` (a subclass's hook)."""
        return {}

    def _check_invariants(self, event: Any) -> None:
        """Recorded, not raised: the router logs and swallows exceptions from observers."""
        if not isinstance(event, StateChanged):
            return
        running = [p.id for p in self.router.processes() if p.state in (State.STARTING, State.READY)]
        for group in self.config.groups.values():
            if group.swap:
                inside = [x for x in running if x in group.members]
                if len(inside) > 1:
                    self.violations.append(f"swap group {group.id} runs {inside}")

    def request(self, model_id: str, at: float, duration: float = 1.0, profile: Optional[str] = None) -> Req:
        req = Req(self, model_id, at, duration, profile)
        self.requests.append(req)
        self.reactor.callLater(max(0.0, at - self.reactor.seconds()), req.admit)
        return req

    def run(self, until: float) -> None:
        while self.reactor.seconds() < until:
            self.reactor.advance(STEP)
        for _ in range(5):
            self.reactor.advance(0)

    def spawns(self) -> list[str]:
        return [p.args[-1] for p in self.reactor.spawned]

    def state(self, model_id: str) -> str:
        return self.router.process(model_id).state.value

    def spawn_times(self, model_id: str) -> list[float]:
        return [t for t, e in self.transitions if e == (model_id, "starting")]

    @property
    def transitions(self) -> list:
        return self._transitions

    def track(self) -> "Sim":
        self._transitions: list = []
        self.router.observers.add(
            lambda event: isinstance(event, StateChanged) and self._transitions.append(
                (self.reactor.seconds(), (event.model, event.new))))
        return self


def m(model_id: str, **kw: Any) -> ModelConfig:
    kw.setdefault("unload_timeout", 5)
    kw.setdefault("concurrency_limit", 1000)
    kw.setdefault("health_check_timeout", 600)
    return make_model(id=model_id, **kw)


# -- fairness and batching (SCHED-5, SCHED-7) ------------------------------------------------------------

class FairnessTests(SynchronousTestCase):
    def test_steady_stream_cannot_starve_another_model(self):
        """SCHED-7(b): A keeps batching until B has waited maxWait; then B loads within in-flight + load."""
        sim = Sim([m("a"), m("b")], load=2.0, max_wait=30)
        sim.request("a", 0, duration=1.0)
        a_reqs = [sim.request("a", 0.5 * i, duration=1.0) for i in range(1, 120)]
        b = sim.request("b", 1.0, duration=1.0)
        sim.run(120)
        self.assertIsNone(b.error)
        self.assertLessEqual(b.wait, 30 + 1.0 + 2.0 + STEP * 4)
        self.assertGreaterEqual(b.wait, 30 - STEP)          # batching went on until maxWait
        before = [r for r in a_reqs if 2.0 + STEP < r.at < 1.0 + 30 - STEP]   # A ready at 2
        self.assertTrue(all(r.wait <= STEP * 2 for r in before), "A requests before maxWait were held")
        after = [r for r in a_reqs if b.at + 30 + STEP < r.at < b.granted]
        self.assertTrue(after and all(r.granted > b.granted for r in after),
                        "A requests after maxWait must queue behind B")
        self.assertEqual(sim.spawns(), ["a", "b", "a"])
        self.assertTrue(all(r.done is not None for r in sim.requests))

    def test_random_traffic_wait_bound(self):
        """No request waits longer than maxWait + one (in-flight + load) per model ahead of it;
        under both policies every request is served."""
        for policy in ("swap-aware", "fifo"):
            for seed in range(4):
                rng = random.Random(seed)
                max_wait, load, longest = 8.0, 2.0, 3.0
                models = ["a", "b", "c"]
                sim = Sim([m(x) for x in models], load=load, max_wait=max_wait, policy=policy)
                t = 0.0
                while t < 150:
                    t += rng.expovariate(2.0)
                    sim.request(rng.choice(models), round(t, 2), duration=rng.uniform(0.1, longest))
                sim.run(t + 100)
                while not all(r.done or r.error for r in sim.requests) and sim.reactor.seconds() < 5000:
                    sim.run(sim.reactor.seconds() + 50)
                bound = max_wait + len(models) * (longest + load) + 1
                for r in sim.requests:
                    self.assertIsNone(r.error, (policy, seed))
                    self.assertIsNotNone(r.done, (policy, seed, r.model_id, r.at))
                    if policy != "fifo":      # fifo swaps per request: its queue grows under this load
                        self.assertLessEqual(r.wait, bound, (policy, seed, r.model_id, r.at))

    def test_batching_abcabc_three_loads_fifo_six(self):
        """SCHED-7(a): A B C A B C at t=0 -> three loads; the fifo policy swaps for every request."""
        for policy, expected in (("swap-aware", list("abc")), ("fifo", list("abcabc"))):
            sim = Sim([m("a"), m("b"), m("c")], load=2.0, policy=policy)
            reqs = [sim.request(x, 0.0, duration=1.0) for x in "abcabc"]
            sim.run(60)
            self.assertEqual(sim.spawns(), expected, policy)
            self.assertTrue(all(r.done is not None and r.error is None for r in reqs))
            self.assertEqual([x for _, x in sim.grants], list("aabbcc") if policy != "fifo" else list("abcabc"))

    def test_batching_beats_fifo_on_interleaved_traffic(self):
        """Interleaved A/B traffic: swap-aware needs far fewer loads than fifo, and finishes sooner."""
        results = {}
        for policy in ("swap-aware", "fifo"):
            sim = Sim([m("a"), m("b")], load=2.0, policy=policy, max_wait=10)
            for i in range(40):
                sim.request("ab"[i % 2], 0.25 * i, duration=0.5)
            sim.run(400)
            self.assertTrue(all(r.done is not None for r in sim.requests))
            results[policy] = (len(sim.spawns()), max(r.done for r in sim.requests))
        self.assertLessEqual(results["swap-aware"][0] * 4, results["fifo"][0], results)
        self.assertLess(results["swap-aware"][1], results["fifo"][1], results)

    def test_idle_loaded_model_swaps_at_once(self):
        """SCHED-7(c): A ready and idle, B arrives: B's swap begins at once (no waiting for maxWait)."""
        sim = Sim([m("a"), m("b")], load=1.0, max_wait=30)
        sim.request("a", 0, duration=0.5)
        b = sim.request("b", 5, duration=0.5)
        sim.run(20)
        self.assertLessEqual(b.wait, 1.0 + STEP * 3)


# -- groups and profiles ------------------------------------------------------------------------------

class PriorityTests(SynchronousTestCase):
    def test_persistent_group_survives_swaps_of_others(self):
        """CFG-52: models in a persistent group keep running (busy or idle) while others swap."""
        helpers = GroupConfig("helpers", swap=False, exclusive=False, persistent=True, members=("e",))
        sim = Sim([m("a"), m("b"), m("e")], load=1.0, groups={"helpers": helpers}).track()
        e = [sim.request("e", t, duration=2.0) for t in range(0, 30, 3)]
        for i in range(10):
            sim.request("ab"[i % 2], 1 + 3 * i, duration=1.0)
        sim.run(60)
        self.assertEqual(sim.spawns().count("e"), 1)
        self.assertTrue(all(r.done is not None for r in sim.requests))
        self.assertTrue(all(r.wait <= 1.0 + STEP * 3 for r in e[1:]), "a persistent model was disturbed")
        self.assertEqual(sim.state("e"), "ready")

    def test_swap_false_group_coexists_exclusive_default_evicts_it(self):
        """A swap:false group runs its members together; a default-group start evicts them (exclusive)."""
        pair = GroupConfig("pair", swap=False, exclusive=True, members=("x", "y"))
        sim = Sim([m("x"), m("y"), m("z")], load=1.0, groups={"pair": pair})
        sim.request("x", 0)
        sim.request("y", 0.1)
        sim.run(3)
        self.assertEqual((sim.state("x"), sim.state("y")), ("ready", "ready"))
        sim.request("z", 4)
        sim.run(8)
        self.assertEqual((sim.state("x"), sim.state("y"), sim.state("z")), ("stopped", "stopped", "ready"))
        sim.request("x", 9)
        sim.run(12)
        self.assertEqual((sim.state("x"), sim.state("z")), ("ready", "stopped"))

    def test_profile_request_keeps_members_and_persistent(self):
        """SCHED-4: P:M evicts non-members except persistent groups; members stay loaded together."""
        keep = GroupConfig("keep", swap=False, exclusive=False, persistent=True, members=("p",))
        sim = Sim([m("a"), m("b"), m("c"), m("p")], load=1.0, profiles={"P": ("a", "b")},
                  groups={"keep": keep})
        sim.request("p", 0)
        sim.request("c", 0.1)
        sim.run(4)
        self.assertEqual((sim.state("c"), sim.state("p")), ("ready", "ready"))
        sim.request("a", 5, profile="P")
        sim.run(8)
        sim.request("b", 9, profile="P")
        sim.run(12)
        self.assertEqual({x: sim.state(x) for x in "abcp"},
                         {"a": "ready", "b": "ready", "c": "stopped", "p": "ready"})
        # a plain (non-profile) request for a member follows the group rule: it evicts the other member
        sim.request("a", 13)
        sim.run(16)
        self.assertEqual({x: sim.state(x) for x in "abcp"},
                         {"a": "ready", "b": "ready", "c": "stopped", "p": "ready"})   # ready: no eviction
        sim.request("c", 17)
        sim.run(20)
        self.assertEqual({x: sim.state(x) for x in "abcp"},
                         {"a": "stopped", "b": "stopped", "c": "ready", "p": "ready"})
        self.assertTrue(all(r.done is not None for r in sim.requests))

    def test_oldest_head_served_first_across_groups(self):
        """SCHED-3: with A busy, the candidate whose request is oldest is loaded next."""
        sim = Sim([m("a"), m("b"), m("c")], load=1.0, max_wait=5)
        sim.request("a", 0, duration=10)
        c = sim.request("c", 1)
        b = sim.request("b", 2)
        sim.run(40)
        self.assertLess(c.granted, b.granted)
        self.assertEqual(sim.spawns(), ["a", "c", "b"])


# -- TTL races (PROC-11/12, llama-swap #946) ----------------------------------------------------------

class TTLRaceTests(SynchronousTestCase):
    def test_request_at_every_moment_around_ttl_expiry(self):
        """A request arriving just before, at, or during the TTL stop is served; nothing hangs."""
        for offset in (-STEP, -0.001, 0.0, 0.001, STEP, 1.0, 4.9, 5.0, 5.1):
            for ignore in (False, True):
                sim = Sim([m("a", ttl=5, unload_timeout=5)], load=1.0)
                if ignore:
                    sim.reactor.ignore_term.add("a")
                first = sim.request("a", 0, duration=1.0)
                late = sim.request("a", 0 + 1.0 + 1.0 + 5 + offset, duration=1.0)  # ready at 1, done at 2
                sim.run(40)
                self.assertIsNone(late.error, (offset, ignore))
                self.assertIsNotNone(late.done, (offset, ignore))
                self.assertIsNotNone(first.done)
                # the model idles under TTL afterwards and unloads again
                self.assertEqual(sim.state("a"), "stopped", (offset, ignore))

    def test_other_model_requested_during_ttl_stop_waits_for_it(self):
        """A TTL stop in its grace period (child ignores SIGTERM) and a request for B: B starts once A is
        gone (never two exclusive models at once), and is served; no deadlock."""
        sim = Sim([m("a", ttl=2, unload_timeout=5), m("b")], load=1.0).track()
        sim.reactor.ignore_term.add("a")
        sim.request("a", 0, duration=1.0)         # ready at 1, idle from 2, TTL stop at 4
        b = sim.request("b", 4.5)
        again = sim.request("a", 4.6)
        sim.run(40)
        a_stopped = [t for t, e in sim.transitions if e == ("a", "stopped")][0]
        b_started = [t for t, e in sim.transitions if e == ("b", "starting")][0]
        self.assertGreaterEqual(a_stopped, 4 + 5 - STEP)        # SIGKILL after the grace period
        self.assertGreaterEqual(b_started, a_stopped)
        self.assertIsNotNone(b.done)
        self.assertIsNotNone(again.done)
        self.assertIn(KILL, sim.reactor.signals_to(sim.reactor.spawned[0].pid))

    def test_ttl_never_fires_for_busy_or_waited_for_model(self):
        """PROC-11: a model with in-flight or waiting requests is never unloaded by its TTL."""
        sim = Sim([m("a", ttl=1), m("b")], load=1.0, max_wait=100)
        long = sim.request("a", 0, duration=20)
        b = sim.request("b", 2)                 # waits: a busy, maxWait far away
        sim.run(15)
        self.assertEqual(sim.state("a"), "ready")
        sim.run(40)
        self.assertIsNotNone(long.done)
        self.assertIsNotNone(b.done)
        self.assertLessEqual(b.granted, 21 + 1 + STEP * 3)
        self.assertEqual(sim.spawns(), ["a", "b"])

    def test_unload_races_request_no_deadlock(self):
        """EP-6 unload while a request for the same model arrives in the same tick: it starts again."""
        sim = Sim([m("a"), m("b")], load=1.0)
        sim.request("a", 0)
        sim.run(3)
        d = sim.router.unload(["a"])
        r = sim.request("a", 3)
        rb = sim.request("b", 3)
        sim.run(20)
        self.assertTrue(d.called)
        self.assertIsNotNone(r.done)
        self.assertIsNotNone(rb.done)


# -- queued clients that leave (SCHED-8) ------------------------------------------------------------

class DisconnectTests(SynchronousTestCase):
    def test_queued_disconnect_frees_slot_others_unaffected(self):
        """A waiter that leaves frees its admission slot; the other waiters keep their place and order."""
        sim = Sim([m("a"), m("b", concurrency_limit=2)], load=1.0, max_wait=100)
        sim.request("a", 0, duration=10)
        b1 = sim.request("b", 2)
        b2 = sim.request("b", 3)
        sim.run(4)
        self.failureResultOf(sim.router.acquire("b"), ConcurrencyLimit)
        b1.d.cancel()
        self.assertIsInstance(b1.error, CancelledError)
        self.assertEqual(sim.router.counts("b"), (0, 1))
        b3 = sim.request("b", 5)
        sim.run(30)
        self.assertIsNotNone(b2.done)
        self.assertIsNotNone(b3.done)
        self.assertLess(b2.granted, 11 + 1 + STEP * 3)
        self.assertEqual(sim.spawns(), ["a", "b"])

    def test_last_waiter_leaves_before_swap_begins_nothing_evicted(self):
        """The head's only waiter leaves while A is busy (even after maxWait, A draining): no eviction,
        and A takes new work again at once."""
        sim = Sim([m("a"), m("b")], load=1.0, max_wait=2)
        sim.request("a", 0, duration=10)
        b = sim.request("b", 1)
        sim.run(5)
        self.assertTrue(sim.router.is_draining("a"))
        b.d.cancel()
        self.assertFalse(sim.router.is_draining("a"))
        a2 = sim.request("a", 6)
        sim.run(30)
        self.assertLessEqual(a2.wait, STEP)
        self.assertEqual(sim.spawns(), ["a"])
        self.assertEqual(sim.state("a"), "ready")

    def test_head_leaves_next_candidate_becomes_head(self):
        """When the head leaves, the next candidate's swap goes ahead."""
        sim = Sim([m("a"), m("b"), m("c")], load=1.0, max_wait=2)
        sim.request("a", 0, duration=6)
        b = sim.request("b", 1)
        c = sim.request("c", 1.5)
        sim.run(4)
        b.d.cancel()
        sim.run(30)
        self.assertIsNotNone(c.done)
        self.assertEqual(sim.spawns(), ["a", "c"])

    def test_disconnect_after_swap_begun_start_completes(self):
        """SCHED-8: once the swap has begun, the start runs to completion although its waiter left."""
        sim = Sim([m("a"), m("b")], load=3.0)
        sim.reactor.ignore_term.add("a")
        sim.request("a", 0, duration=1)
        b = sim.request("b", 5)
        sim.run(6)                    # A stopping (ignores TERM, grace 5 s): swap begun
        self.assertEqual(sim.state("a"), "stopping")
        b.d.cancel()
        sim.run(20)
        self.assertEqual((sim.state("a"), sim.state("b")), ("stopped", "ready"))
        c = sim.request("b", 21)
        sim.run(22)
        self.assertLessEqual(c.wait, STEP)


# -- crashes that unblock several candidates at once ----------------------------------------------------

class CrashUnblocksTests(SynchronousTestCase):
    def test_crash_of_busy_model_starts_one_candidate_at_a_time(self):
        """A busy A holds off B and C (before maxWait); A crashes: only B (the oldest) starts, then C."""
        sim = Sim([m("a"), m("b"), m("c")], load=1.0, max_wait=100).track()
        sim.request("a", 0, duration=30)
        b = sim.request("b", 2)
        c = sim.request("c", 3)
        sim.run(5)
        sim.reactor.spawned[0].exit(code=1)
        sim.run(40)
        starts = [(t, x) for t, (x, s) in sim.transitions if s == "starting"]
        self.assertEqual([x for _, x in starts], ["a", "b", "c"])
        b_stopped = [t for t, e in sim.transitions if e == ("b", "stopped")][0]
        self.assertGreaterEqual(starts[2][0], b_stopped)
        self.assertLess(b.granted, c.granted)
        self.assertIsNotNone(c.done)

    def test_decide_plans_one_start_per_exclusive_group(self):
        """Pure decide: two stopped candidates and nothing running: one swap, the other waits."""
        from llamaswap.scheduler import ModelView, Snapshot, Waiter, decide, evict_set
        from tests.test_scheduler import default_groups

        models = {"b": ModelView("b", "stopped", 0, (Waiter(1, 0.0),)),
                  "c": ModelView("c", "stopped", 0, (Waiter(2, 0.0),))}
        d = decide(Snapshot(models, 1.0), lambda t, p, r: evict_set(t, None, r, default_groups))
        self.assertEqual([s.target for s in d.swaps], ["b"])


# -- random operation sequences ---------------------------------------------------------------------

class RandomOperationsTests(SynchronousTestCase):
    """Requests, cancels, unloads, crashes and TTLs in random order (seeded, so reproducible).

    Invariants: never two models of the exclusive default group alive at once (starting, ready
    or stopping), a grant only onto a ready model, and once traffic stops every request has
    ended (served, or failed with an error) and nothing is left waiting or in flight.
    """

    def run_ops(self, seed: int, policy: str) -> None:
        rng = random.Random(seed)
        models = [m(x, ttl=rng.choice([0, 0, 2, 5]), unload_timeout=rng.choice([1, 3]),
                    concurrency_limit=rng.choice([2, 5, 1000])) for x in "abce"]
        helpers = GroupConfig("helpers", swap=False, exclusive=False, persistent=True, members=("e",))
        sim = Sim(models, load={x: rng.uniform(0.2, 2.0) for x in "abce"}, max_wait=rng.choice([0, 1, 5]),
                  policy=policy, groups={"helpers": helpers}, profiles={"P": ("a", "e")})
        if rng.random() < 0.5:
            sim.reactor.ignore_term.add(rng.choice("abce"))
        loads: list = []

        overlaps: list = []

        def alive_check(event: Any) -> None:   # (the router swallows observer errors)
            if isinstance(event, StateChanged):
                alive = [p.id for p in sim.router.processes() if p.id != "e"
                         and p.state in (State.STARTING, State.READY, State.STOPPING)]
                if len(alive) > 1:
                    overlaps.append((sim.reactor.seconds(), alive))

        sim.router.observers.add(alive_check)
        rejected = 0
        for _ in range(120):
            op = rng.random()
            now = sim.reactor.seconds()
            if op < 0.55:
                target = rng.choice("abcee")
                profile = "P" if target in "ae" and rng.random() < 0.3 else None
                sim.request(target, now, duration=rng.uniform(0.05, 3.0), profile=profile)
                sim.run(now)  # admit now
                if isinstance(sim.requests[-1].error, ConcurrencyLimit):
                    rejected += 1
            elif op < 0.65:
                waiting = [r for r in sim.requests if r.d is not None and not r.d.called]
                if waiting:
                    rng.choice(waiting).d.cancel()
            elif op < 0.70:
                sim.router.unload([rng.choice("abce")])
            elif op < 0.72:
                loads.append(sim.router.load(rng.choice("abce")))
                loads[-1].addErrback(lambda f: None)
            elif op < 0.78:
                live = [p for p in sim.reactor.spawned if p.leader_alive]
                if live:
                    rng.choice(live).exit(code=1)        # the child crashes
            sim.run(now + rng.uniform(0, 2.0))
        sim.run(sim.reactor.seconds() + 600)
        self.assertEqual(overlaps, [], f"seed {seed}: exclusive models alive together")
        self.assertFalse(sim.violations, (seed, sim.violations))
        for r in sim.requests:
            self.assertTrue(r.d is not None and r.d.called, (seed, r.model_id, r.at))
            self.assertTrue(r.done is not None or r.error is not None, (seed, r.model_id, r.at))
        self.assertTrue(all(d.called for d in loads), seed)
        for x in "abce":
            self.assertEqual(sim.router.counts(x), (0, 0), (seed, x))
            self.assertIn(sim.state(x), ("stopped", "ready"), (seed, x))
        served = sum(1 for r in sim.requests if r.done is not None)
        self.assertGreater(served, 0, seed)
        if seed % 2:                             # CLI-9 from whatever state was reached
            late = [sim.request(rng.choice("abce"), sim.reactor.seconds() + 0.01 * i) for i in range(3)]
            sim.run(sim.reactor.seconds() + 0.5)
            d = sim.router.stopService()
            sim.run(sim.reactor.seconds() + 30)
            self.assertTrue(d.called, seed)
            self.assertEqual({sim.state(x) for x in "abce"}, {"shutdown"}, seed)
            self.assertTrue(all(r.done is not None or r.error is not None for r in late), seed)

    def test_random_operations_swap_aware(self):
        for seed in range(40):
            self.run_ops(seed, "swap-aware")

    def test_random_operations_fifo(self):
        for seed in range(10):
            self.run_ops(seed, "fifo")
