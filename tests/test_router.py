"""ModelRouter: resolution, admission, queueing, swaps, TTL, unload, shutdown (RT-2/4, PROC-11/12).

Real ``UpstreamProcess`` objects run on a ``FakeProcessReactor`` whose children exit on
the next turn after SIGTERM (``auto_exit``); health checks are Deferreds the test fires.
"""
from __future__ import annotations

import signal

from twisted.internet.defer import CancelledError, succeed
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.errors import (
    ConcurrencyLimit, ModelNotFound, ModelUnloaded, ShuttingDown, UpstreamStartFailed,
    to_openai_error)
from llamaswap.process import UpstreamProcess
from llamaswap.config import GroupConfig, ModelConfig
from llamaswap.observe import (
    QueueChanged, Reloaded, Removed, Replaced, StartFailed, Started, Starting, StateChanged, Stopping)
from llamaswap.router import ModelRouter, Place, Resolved
from tests.fakes import (
    FakeLogs, FakePool, FakeProcessReactor, HealthChecks, capture_logger)

from tests.factories import make_config, make_model

TERM, KILL = signal.SIGTERM, signal.SIGKILL


def m(model_id: str, **kw) -> ModelConfig:
    kw.setdefault("unload_timeout", 5)
    kw.setdefault("health_check_timeout", 60)
    return make_model(id=model_id, **kw)


class RouterCase(SynchronousTestCase):
    def build(self, models, **config_kw) -> ModelRouter:
        self.reactor = FakeProcessReactor()
        self.reactor.auto_exit = True
        self.checks: dict[str, HealthChecks] = {}
        self.events: list = []
        self.emitted: list = []
        self.config = make_config(models, **config_kw)

        def make_process(model, on_transition):
            checks = self.checks.setdefault(model.id, HealthChecks())
            return UpstreamProcess(
                model=model, reactor=self.reactor, clock=self.reactor, logs=FakeLogs(),
                on_transition=on_transition,
                http_factory=lambda r: (object(), FakePool()), check=checks,
                kill=self.reactor.killpg, group_alive=self.reactor.group_alive,
                log=capture_logger(self.events))

        self.router = ModelRouter(self.config, make_process, self.reactor,
                                  log=capture_logger(self.events))
        self.router.observers.add(self.emitted.append)
        return self.router

    # -- helpers --------------------------------------------------------------------------------

    def state(self, model_id: str) -> str:
        return self.router.process(model_id).state.value

    def spawned_ids(self) -> list[str]:
        return [p.args[-1] for p in self.reactor.spawned]

    def child(self, model_id: str):
        return [p for p in self.reactor.spawned if p.args[-1] == model_id][-1]

    def terms(self, model_id: str) -> list:
        """The SIGTERMs sent to ``model_id``'s groups (SIGKILLs after the leader's exit are routine)."""
        return [sig for p in self.reactor.spawned if p.args[-1] == model_id
                for sig in self.reactor.signals_to(p.pid) if sig == TERM]

    def ready(self, model_id: str) -> None:
        self.checks[model_id].answer(200)

    def settle(self) -> None:
        for _ in range(5):
            self.reactor.advance(0)

    def serve(self, model_id: str):
        """Acquire a lease on ``model_id``, bringing it up if needed."""
        d = self.router.acquire(model_id)
        self.settle()
        if not d.called:
            self.ready(model_id)
        return self.successResultOf(d)

    def stops(self) -> list:
        return [(e.model, e.reason) for e in self.emitted if isinstance(e, Stopping)]

    def messages(self, level=None) -> list[str]:
        return [formatEvent(e) for e in self.events if level is None or e["log_level"] is level]

    def assertNoTimers(self) -> None:
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class ResolveTests(RouterCase):
    def setUp(self) -> None:
        self.build([m("a", aliases=("gpt-4o",)), m("b"), m("c"), m("P:a"), m("x:y")],
                   profiles={"P": ("a", "b"), "Q": ("a", "x:y")})

    def test_id_and_alias(self):
        """RT-2 (1)-(2): ids, then aliases; the requested name is kept."""
        self.assertEqual(self.router.resolve("a"), Resolved("a", None, "a"))
        self.assertEqual(self.router.resolve("gpt-4o"), Resolved("a", None, "gpt-4o"))

    def test_exact_match_only(self):
        """RT-3: case-sensitive, no trimming."""
        for name, close in (("A", "a"), (" a", "a"), ("a ", "a"), ("GPT-4o", "gpt-4o")):
            e = self.assertRaises(ModelNotFound, self.router.resolve, name)
            self.assertEqual(e.message, f"model '{name}' not found; did you mean '{close}'? "
                                        "(5 models are available: GET /v1/models lists them)")

    def test_profile_member(self):
        """RT-4: P:M resolves M (id or alias) and records the profile."""
        self.assertEqual(self.router.resolve("P:b"), Resolved("b", "P", "b"))
        self.assertEqual(self.router.resolve("P:gpt-4o"), Resolved("a", "P", "gpt-4o"))

    def test_profile_split_at_first_colon(self):
        """RT-2 (3): split at the first ':'; the member may itself contain ':'."""
        self.assertEqual(self.router.resolve("Q:x:y"), Resolved("x:y", "Q", "x:y"))

    def test_non_member(self):
        """RT-4: a model outside the profile gives 404 with the member message."""
        e = self.assertRaises(ModelNotFound, self.router.resolve, "P:c")
        self.assertEqual(e.message, "model 'c' is not a member of profile 'P'")
        self.assertEqual(to_openai_error(e)[0], 404)
        e = self.assertRaises(ModelNotFound, self.router.resolve, "P:nope")
        self.assertEqual(e.message, "model 'nope' is not a member of profile 'P'")

    def test_unknown_profile(self):
        """RT-2: an unknown P in P:M is just an unknown name."""
        e = self.assertRaises(ModelNotFound, self.router.resolve, "Z:a")
        self.assertEqual(e.message, "model 'Z:a' not found; did you mean 'P:a'? "
                                    "(5 models are available: GET /v1/models lists them)")
        self.assertEqual(e.code, "model_not_found")

    def test_id_containing_colon_wins(self):
        """RT-4/COMPAT-3: an id that contains ':' resolves as an id first (llama-swap #69)."""
        self.assertEqual(self.router.resolve("P:a"), Resolved("P:a", None, "P:a"))


class AdmissionTests(RouterCase):
    def test_concurrency_limit_429(self):
        """SCHED-1: waiting + in-flight >= limit -> 429 with the documented message."""
        self.build([m("a", concurrency_limit=2)])
        d1, d2 = self.router.acquire("a"), self.router.acquire("a")
        f = self.failureResultOf(self.router.acquire("a"), ConcurrencyLimit)
        self.assertEqual(f.value.message, "too many requests for model 'a' (limit 2)")
        status, headers, _ = to_openai_error(f.value)
        self.assertEqual(status, 429)
        self.assertEqual(headers[b"Retry-After"], b"1")
        self.assertEqual(self.router.counts("a"), (0, 2))
        self.ready("a")
        l1, l2 = self.successResultOf(d1), self.successResultOf(d2)
        self.assertEqual(self.router.counts("a"), (2, 0))
        self.failureResultOf(self.router.acquire("a"), ConcurrencyLimit)  # in flight counts too
        l1.release()
        l3 = self.successResultOf(self.router.acquire("a"))
        l2.release()
        l3.release()
        self.assertEqual(self.router.counts("a"), (0, 0))

    def test_loads_do_not_count(self):
        """SCHED-1: EP-7/preload loads are not requests."""
        self.build([m("a", concurrency_limit=1)])
        load = self.router.load("a")
        d = self.router.acquire("a")
        self.assertEqual(self.router.counts("a"), (0, 1))
        self.ready("a")
        self.successResultOf(load)
        self.successResultOf(d).release()

    def test_cancelled_waiter_frees_its_slot(self):
        """SCHED-8: a client that leaves while waiting frees its admission slot."""
        self.build([m("a", concurrency_limit=1)])
        d = self.router.acquire("a")
        self.failureResultOf(self.router.acquire("a"), ConcurrencyLimit)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.router.counts("a"), (0, 0))
        d2 = self.router.acquire("a")
        self.ready("a")  # the start that had begun runs to completion (SCHED-8)
        self.successResultOf(d2).release()

    def test_cancel_last_waiter_abandons_swap_not_begun(self):
        """SCHED-8: the last waiter of a swap that has not begun leaves: nothing is evicted."""
        self.build([m("a"), m("b")], max_wait=10)
        lease = self.serve("a")
        d = self.router.acquire("b")
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.reactor.advance(60)
        lease.release()
        self.settle()
        self.assertEqual(self.terms("a"), [])
        self.assertEqual(self.state("a"), "ready")
        self.assertEqual(self.spawned_ids(), ["a"])
        self.assertNoTimers()

    def test_release_is_idempotent(self):
        """Lease.release twice decrements in-flight once."""
        self.build([m("a")])
        lease = self.serve("a")
        other = self.successResultOf(self.router.acquire("a"))
        lease.release()
        lease.release()
        self.assertEqual(self.router.counts("a"), (1, 0))
        other.release()

    def test_all_waiters_granted_together_in_order(self):
        """SCHED-2/SCHED-11: one start serves every waiter, granted in admission order."""
        self.build([m("a")])
        order = []
        ds = [self.router.acquire("a") for _ in range(3)]
        for i, d in enumerate(ds):
            d.addCallback(lambda lease, i=i: (order.append(i), lease)[1])
        self.assertEqual(len(self.reactor.spawned), 1)
        self.ready("a")
        self.assertEqual(order, [0, 1, 2])
        for d in ds:
            self.successResultOf(d).release()


class SwapTests(RouterCase):
    def test_swap_stops_a_then_starts_b(self):
        """SCHED-3/SCHED-7(c): A idle and ready, B requested: A stops first, then B starts."""
        self.build([m("a"), m("b")])
        self.serve("a").release()
        d = self.router.acquire("b")
        self.assertEqual(self.terms("a"), [TERM])
        self.assertEqual(self.spawned_ids(), ["a"])  # B waits for A to be gone
        self.assertEqual(self.state("a"), "stopping")
        self.settle()
        self.assertEqual(self.state("a"), "stopped")
        self.assertEqual(self.spawned_ids(), ["a", "b"])
        self.ready("b")
        self.successResultOf(d).release()
        self.assertIn(("a", "swap"), self.stops())
        self.assertIn(Starting("b", True), self.emitted)
        self.assertNoTimers()

    def test_busy_model_never_evicted(self):
        """SCHED-6/SCHED-5: a busy A is not stopped; after maxWait it drains, then B swaps in."""
        self.build([m("a"), m("b")], max_wait=30)
        lease = self.serve("a")
        d_b = self.router.acquire("b")
        self.reactor.advance(29)
        self.assertEqual(self.terms("a"), [])
        batched = self.router.acquire("a")  # before maxWait: batches onto the loaded A
        self.successResultOf(batched).release()
        self.reactor.advance(1)
        self.assertTrue(self.router.is_draining("a"))
        late = self.router.acquire("a")  # A is draining: waits like any other request
        self.assertNoResult(late)
        self.reactor.advance(100)
        self.assertEqual(self.terms("a"), [])
        self.assertEqual(self.state("a"), "ready")
        lease.release()
        self.assertEqual(self.terms("a"), [TERM])
        self.assertNoResult(late)  # never granted onto the model being evicted
        self.settle()
        self.ready("b")
        lease_b = self.successResultOf(d_b)
        self.assertNoResult(late)
        lease_b.release()
        self.settle()
        self.ready("a")
        self.successResultOf(late).release()
        self.assertEqual(self.spawned_ids(), ["a", "b", "a"])

    def test_three_models_three_loads(self):
        """SCHED-7(a): A B C A B C arriving together -> three loads, not six."""
        self.build([m("a"), m("b"), m("c")])
        ds = [(x, self.router.acquire(x)) for x in "abcabc"]
        for model_id in "abc":
            self.settle()
            self.ready(model_id)
            for x, d in ds:
                if x == model_id:
                    self.successResultOf(d).release()
        self.settle()
        self.assertEqual(self.spawned_ids(), ["a", "b", "c"])

    def test_profile_request_keeps_other_members(self):
        """SCHED-4/CFG-54: P:M evicts non-members only; a plain request follows the group rule."""
        self.build([m("a"), m("b"), m("c")], profiles={"P": ("a", "b")})
        self.serve("a").release()
        resolved = self.router.resolve("P:b")
        d = self.router.acquire(resolved.model_id, resolved.profile)
        self.settle()
        self.assertEqual(self.terms("a"), [])
        self.ready("b")
        self.successResultOf(d).release()
        self.assertEqual((self.state("a"), self.state("b")), ("ready", "ready"))
        d = self.router.acquire("c")
        self.settle()
        self.assertEqual((self.state("a"), self.state("b")), ("stopped", "stopped"))
        self.ready("c")
        self.successResultOf(d).release()

    def test_persistent_group_not_evicted(self):
        """CFG-52: an exclusive start does not evict a persistent group."""
        helpers = GroupConfig("helpers", swap=False, exclusive=False, persistent=True, members=("e",))
        self.build([m("a"), m("e")], groups={"helpers": helpers})
        self.serve("e").release()
        self.serve("a").release()
        self.assertEqual(self.terms("e"), [])
        self.assertEqual((self.state("a"), self.state("e")), ("ready", "ready"))

    def test_start_failure_fails_every_waiter_with_same_502(self):
        """SCHED-9: every waiter of the failed start gets the same 502; others go on."""
        self.build([m("b"), m("c")])
        w1, w2 = self.router.acquire("b"), self.router.acquire("b")
        wc = self.router.acquire("c")
        self.child("b").output(b"error loading model\n")
        self.child("b").exit(code=1)
        f1 = self.failureResultOf(w1, UpstreamStartFailed)
        f2 = self.failureResultOf(w2, UpstreamStartFailed)
        self.assertEqual(f1.value.message, f2.value.message)
        self.assertEqual(f1.value.message,
                         "failed to start model 'b': exited with code 1; last output:\nerror loading model")
        status, _, body = to_openai_error(f1.value)
        self.assertEqual(status, 502)
        self.assertIn(b'"code":"upstream_start_failed"', body)
        self.assertEqual(self.state("b"), "stopped")
        self.settle()
        self.ready("c")  # the next head goes on
        self.successResultOf(wc).release()
        self.assertEqual(self.router.counts("b"), (0, 0))

    def test_health_timeout_then_next_head_starts(self):
        """PROC-6/SCHED-9: a health timeout fails b's waiters; the waiting c then swaps in."""
        self.build([m("b"), m("c")])
        wb = self.router.acquire("b")
        wc = self.router.acquire("c")
        self.checks["b"].answer(503)
        self.router.process("b").check = lambda http, url: succeed(503)
        self.reactor.advance(60)
        f = self.failureResultOf(wb, UpstreamStartFailed)
        self.assertIn("health check did not pass within 60s", f.value.message)
        self.settle()
        self.assertEqual(self.state("b"), "stopped")
        self.ready("c")
        self.successResultOf(wc).release()

    def test_failed_model_restarts_on_next_request(self):
        """PROC-8: no failed state: the next request starts it afresh."""
        self.build([m("b")])
        w = self.router.acquire("b")
        self.checks["b"].answer(503)
        self.child("b").exit(code=1)
        self.failureResultOf(w, UpstreamStartFailed)
        lease = self.serve("b")
        self.assertEqual(self.spawned_ids(), ["b", "b"])
        lease.release()

    def test_exit_while_ready_then_next_request_restarts(self):
        """PROC-10: an unexpected exit leaves the model stopped; the next request starts it."""
        self.build([m("a")])
        self.serve("a").release()
        self.child("a").exit(code=139)
        self.assertEqual(self.state("a"), "stopped")
        self.assertIn(("a", "exited"), self.stops())
        self.assertEqual(len(self.reactor.spawned), 1)
        self.serve("a").release()
        self.assertEqual(self.spawned_ids(), ["a", "a"])


class UnloadTests(RouterCase):
    def test_unload_fails_waiters_with_503(self):
        """SCHED-10/PROC-13: unload during a start aborts it; waiters get 503 model_unloaded."""
        self.build([m("a")])
        w = self.router.acquire("a")
        self.checks["a"].answer(503)  # no probe in flight (see test_process pending-probe tests)
        d = self.router.unload(["a"])
        f = self.failureResultOf(w, ModelUnloaded)
        self.assertEqual(to_openai_error(f.value)[0], 503)
        self.assertEqual(f.value.code, "model_unloaded")
        self.assertEqual(self.terms("a"), [TERM])
        self.assertNoResult(d)  # answered after the child is gone
        self.settle()
        self.successResultOf(d)
        self.assertEqual(self.state("a"), "stopped")
        self.assertIn(("a", "unload"), self.stops())
        self.serve("a").release()  # later requests start it again normally
        self.assertEqual(self.spawned_ids(), ["a", "a"])

    def test_unload_during_start_with_other_model_waiting(self):
        """SCHED-10: unloading a starting model lets the next head (c) swap in."""
        self.build([m("b"), m("c")])
        wb = self.router.acquire("b")
        wc = self.router.acquire("c")
        self.checks["b"].answer(503)
        d = self.router.unload(["b"])
        self.failureResultOf(wb, ModelUnloaded)
        self.settle()
        self.successResultOf(d)
        self.assertEqual(self.state("b"), "stopped")
        self.ready("c")
        self.successResultOf(wc).release()

    def test_unload_stops_busy_model(self):
        """EP-6: unload also stops busy models."""
        self.build([m("a"), m("b")])
        lease = self.serve("a")
        d = self.router.unload()
        self.assertEqual(self.terms("a"), [TERM])
        self.settle()
        self.successResultOf(d)
        self.assertEqual(self.state("a"), "stopped")
        lease.release()
        self.assertEqual(self.router.counts("a"), (0, 0))


class TTLTests(RouterCase):
    def test_unload_after_idle_ttl(self):
        """PROC-11: a ready idle model stops ttl seconds after its last request ended."""
        self.build([m("a", ttl=5)])
        self.serve("a").release()
        self.reactor.advance(4.9)
        self.assertEqual(self.terms("a"), [])
        self.reactor.advance(0.1)
        self.assertEqual(self.terms("a"), [TERM])
        self.assertIn("a: unloading after 5s idle", self.messages(LogLevel.info))
        self.settle()
        self.assertEqual(self.state("a"), "stopped")
        self.assertIn(("a", "ttl"), self.stops())
        self.assertNoTimers()

    def test_new_request_resets_ttl(self):
        """PROC-11: idle time runs from the end of the last request."""
        self.build([m("a", ttl=5)])
        self.serve("a").release()
        self.reactor.advance(4)
        self.serve("a").release()
        self.reactor.advance(4.9)
        self.assertEqual(self.terms("a"), [])
        self.reactor.advance(0.1)
        self.assertEqual(self.terms("a"), [TERM])
        self.settle()
        self.assertNoTimers()

    def test_never_unloaded_while_in_flight(self):
        """PROC-11/SCHED-6: a long request keeps the model; idle starts at its end."""
        self.build([m("a", ttl=5)])
        lease = self.serve("a")
        self.reactor.advance(100)
        self.assertEqual(self.terms("a"), [])
        lease.release()
        self.reactor.advance(5)
        self.assertEqual(self.terms("a"), [TERM])
        self.settle()
        self.assertNoTimers()

    def test_ttl_zero_never_unloads(self):
        """CFG-14: ttl 0 means never unload; no timer is armed."""
        self.build([m("a", ttl=0)])
        self.serve("a").release()
        self.assertNoTimers()

    def test_request_during_ttl_stop_restarts_after_stop(self):
        """PROC-12 (llama-swap #946): a request during a TTL stop starts the model after the stop."""
        self.build([m("a", ttl=5)])
        self.reactor.auto_exit = False
        self.serve("a").release()
        self.reactor.advance(5)
        self.assertEqual(self.state("a"), "stopping")
        d = self.router.acquire("a")
        self.settle()
        self.assertNoResult(d)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.child("a").exit(code=0)
        self.assertEqual(self.state("a"), "starting")
        self.assertEqual(len(self.reactor.spawned), 2)
        self.ready("a")
        self.successResultOf(d).release()


class ShutdownTests(RouterCase):
    def test_stop_service_fails_waiters_and_stops_all(self):
        """CLI-9: waiting requests get 503 shutting_down; every child stops; fires when all are gone."""
        self.build([m("a"), m("b"), m("c")])
        self.router.startService()
        lease = self.serve("a")
        w = self.router.acquire("b")
        d = self.router.stopService()
        f = self.failureResultOf(w, ShuttingDown)
        self.assertEqual((to_openai_error(f.value)[0], f.value.code), (503, "shutting_down"))
        self.assertEqual(self.terms("a"), [TERM])
        self.assertNoResult(d)
        self.settle()
        self.successResultOf(d)
        self.assertEqual({self.state(x) for x in "abc"}, {"shutdown"})
        self.failureResultOf(self.router.acquire("a"), ShuttingDown)
        self.failureResultOf(self.router.load("a"), ShuttingDown)
        lease.release()
        self.assertIn(("a", "shutdown"), self.stops())
        self.assertNoTimers()

    def test_stop_service_during_start(self):
        """PROC-13: shutdown during a start aborts it; its waiters get 503 shutting_down."""
        self.build([m("a")])
        w = self.router.acquire("a")
        d = self.router.stopService()
        self.failureResultOf(w, ShuttingDown)
        self.settle()
        self.successResultOf(d)
        self.assertEqual(self.state("a"), "shutdown")
        self.assertNoTimers()


class ObserverTests(RouterCase):
    """The typed events of ``router.observers`` carry their own data (llamaswap.observe)."""

    def of(self, kind: type) -> list:
        return [e for e in self.emitted if isinstance(e, kind)]

    def test_start_events_carry_the_load_time(self):
        """Starting, then the states, then Started with the seconds from the start to ready."""
        self.build([m("a")])
        d = self.router.acquire("a")
        self.reactor.advance(1.5)
        self.ready("a")
        self.successResultOf(d).release()
        self.assertEqual(self.of(Starting), [Starting("a", False)])
        self.assertEqual(self.of(Started), [Started("a", 1.5)])
        self.assertEqual([(e.old, e.new) for e in self.of(StateChanged)],
                         [("stopped", "starting"), ("starting", "ready")])
        self.assertEqual(self.of(StartFailed), [])

    def test_failed_start_is_published(self):
        """PROC-6: a health check timeout is a StartFailed with the reason and the time taken."""
        self.build([m("b")])
        w = self.router.acquire("b")
        self.checks["b"].answer(503)
        self.router.process("b").check = lambda http, url: succeed(503)
        self.reactor.advance(60)
        self.failureResultOf(w, UpstreamStartFailed)
        [failed] = self.of(StartFailed)
        self.assertEqual((failed.model, failed.seconds), ("b", 60))
        self.assertIn("health check did not pass within 60s", failed.reason)
        self.assertEqual(self.of(Started), [])

    def test_aborted_start_is_no_failure(self):
        """PROC-13: a start the router stops itself (unload, swap, shutdown) is no StartFailed."""
        self.build([m("a")])
        w = self.router.acquire("a")
        self.checks["a"].answer(503)
        self.router.unload(["a"])
        self.failureResultOf(w, ModelUnloaded)
        self.settle()
        self.assertEqual(self.of(StartFailed), [])
        self.assertEqual(self.stops(), [("a", "unload")])

    def test_queue_events_carry_counts_and_who_left(self):
        """QueueChanged has the counts; ``left`` lists the admissions that stopped waiting."""
        self.build([m("a")])
        w1, w2 = self.router.acquire("a"), self.router.acquire("a")
        first, second = self.router.place(w1), self.router.place(w2)
        self.assertEqual((first.position, second.position), (1, 2))
        self.assertIsInstance(first, Place)
        self.assertEqual(self.of(QueueChanged)[-1], QueueChanged("a", 0, 2))
        w2.cancel()
        self.failureResultOf(w2, CancelledError)
        self.assertEqual(self.of(QueueChanged)[-1], QueueChanged("a", 0, 1, (second.admission,)))
        self.ready("a")
        lease = self.successResultOf(w1)
        self.assertEqual(self.of(QueueChanged)[-1], QueueChanged("a", 1, 0, (first.admission,)))
        self.assertIsNone(self.router.place(w1))
        lease.release()
        self.assertEqual(self.of(QueueChanged)[-1], QueueChanged("a", 0, 0))

    def test_ready_model_with_nobody_waiting_is_granted_at_once(self):
        """The common request (a ready model, nothing waiting anywhere) is granted in the same
        call: one QueueChanged for the grant, the TTL timer paused while it is in flight."""
        self.build([m("a", ttl=30)])
        self.serve("a").release()
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)  # the TTL
        before = len(self.of(QueueChanged))
        d = self.router.acquire("a")
        lease = self.successResultOf(d)
        self.assertEqual(self.router.counts("a"), (1, 0))
        [granted] = self.of(QueueChanged)[before:]
        self.assertEqual((granted.inflight, granted.waiting, len(granted.left)), (1, 0, 1))
        self.assertEqual(self.reactor.getDelayedCalls(), [])  # no TTL while in flight
        self.reactor.advance(2)
        lease.release()
        self.assertEqual(self.of(QueueChanged)[-1], QueueChanged("a", 0, 0))
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)  # the TTL again

    def test_ready_model_waits_its_turn_while_another_model_waits(self):
        """With a swap waiting (maxWait), a request to the ready model goes through the full
        scheduling pass, exactly as before: it is still granted, and counted."""
        self.build([m("a"), m("b")], max_wait=10)
        first = self.serve("a")
        waiting_b = self.router.acquire("b")
        self.assertNoResult(waiting_b)
        before = len(self.of(QueueChanged))
        d = self.router.acquire("a")
        self.assertEqual(len([e for e in self.of(QueueChanged)[before:] if e.model == "a"]), 2)
        lease = self.successResultOf(d)
        self.assertEqual(self.router.counts("a"), (2, 0))
        waiting_b.cancel()
        self.failureResultOf(waiting_b, CancelledError)
        lease.release()
        first.release()
        self.assertEqual(self.router.counts("a"), (0, 0))

    def test_loads_are_not_requests(self):
        """A load (EP-7, preload) is neither counted nor listed in ``left``."""
        self.build([m("a")])
        self.router.load("a")
        self.assertEqual(self.of(QueueChanged)[-1], QueueChanged("a", 0, 0))
        self.ready("a")
        self.assertEqual([e.left for e in self.of(QueueChanged)], [(), (), ()])

    def test_failing_observer_is_logged_and_others_still_observe(self):
        """An observer that raises is logged; delivery goes on."""
        self.build([m("a")])

        def broken(event):
            raise RuntimeError("observer bug")

        later: list = []
        self.router.observers.remove(self.emitted.append)
        self.router.observers.add(broken)
        self.router.observers.add(later.append)
        self.router.acquire("a")
        self.assertTrue(later)
        self.assertTrue(any(e.get("log_failure") and e["log_failure"].check(RuntimeError)
                            for e in self.events))
        self.flushLoggedErrors(RuntimeError)

    def test_no_queue_event_built_without_observers(self):
        """The per-request path builds no QueueChanged when nobody observes."""
        import llamaswap.router as router_module

        def refuse(*args, **kw):
            raise AssertionError("QueueChanged built with no observer")

        self.build([m("a")])
        self.router.observers.remove(self.emitted.append)
        self.patch(router_module, "QueueChanged", refuse)
        d = self.router.acquire("a")
        self.ready("a")
        self.successResultOf(d).release()
        self.assertEqual(len(self.router.observers), 0)

    def test_reload_events(self):
        """Reloaded carries the lists and the new models; a changed model is Replaced, a removed one Removed."""
        self.build([m("a"), m("b"), m("d")])
        config = make_config([m("a"), m("b", proxy="http://127.0.0.1:5999"), m("c")])
        self.router.reconfigure(config)
        self.settle()
        [reloaded] = self.of(Reloaded)
        self.assertEqual((reloaded.added, reloaded.changed, reloaded.removed), (("c",), ("b",), ("d",)))
        self.assertIs(reloaded.models, config.models)
        self.assertEqual(self.of(Replaced), [Replaced("b", "stopped")])
        self.assertEqual(self.of(Removed), [Removed("d")])

    def test_removed_model_added_back_before_it_is_gone(self):
        """A model removed, then added back while its old child still stops, is not Removed."""
        self.build([m("a"), m("b")])
        self.serve("b").release()
        self.router.reconfigure(make_config([m("a")]))
        self.router.reconfigure(make_config([m("a"), m("b")]))
        self.settle()
        self.assertEqual(self.of(Removed), [])
        self.assertEqual(self.state("b"), "stopped")
