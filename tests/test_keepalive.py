"""Keep-alive (``restart: on-failure``, ``maxRestarts``, backoff, ``healthInterval``) on a Clock.

Real ``UpstreamProcess`` objects and the real ``ModelRouter`` run on a ``FakeProcessReactor``
(children exit on the next turn after a signal); health checks are Deferreds the test fires;
child output goes to a real ``LogBroadcaster``, whose history gives a restart's output tail.
The end-to-end test (a preloaded child killed with SIGKILL) is in test_keepalive_e2e.py.
"""
from __future__ import annotations

import attr
import pytest
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import ConfigError, parse_config
from llamaswap.config.keepalive import KeepAlive as Policy
from llamaswap.keepalive import KeepAlive, output_tail
from llamaswap.logs import LogBroadcaster
from llamaswap.observe import Reloaded, StateChanged, Stopping
from llamaswap.process import State, UpstreamProcess
from llamaswap.router import ModelRouter
from tests.factories import make_config, make_model
from tests.fakes import FakePool, FakeProcessReactor, HealthChecks, capture_logger
from tests.test_resources import HTTPCase

ON_FAILURE = Policy(restart="on-failure", max_restarts=2, restart_delay=1.0, restart_max_delay=8.0)


def model(model_id: str, **policy) -> object:
    keepalive = attr.evolve(ON_FAILURE, **policy)
    return make_model(id=model_id, unload_timeout=5, health_check_timeout=60, keepalive=keepalive)


# -- the config --------------------------------------------------------------------------------------

P = "cmd: srv --port ${PORT}"


def test_keepalive_keys_are_read():
    c = parse_config(f"models:\n  a:\n    {P}\n    restart: on-failure\n    maxRestarts: 0\n    restartDelay: 0.5\n"
                     f"    restartMaxDelay: 30\n    healthInterval: 10\n    healthFailures: 4\n  b:\n    {P}\n")
    assert c.models["a"].keepalive == Policy("on-failure", 0, 0.5, 30.0, 10.0, 4)
    assert c.models["b"].keepalive == Policy()            # restart: no, no health polling
    assert Policy().restarts is False and c.models["a"].keepalive.restarts is True


def test_backoff_doubles_up_to_the_cap():
    policy = Policy("on-failure", restart_delay=1.5, restart_max_delay=10)
    assert [policy.delay(n) for n in range(1, 6)] == [1.5, 3.0, 6.0, 10.0, 10.0]


def test_keepalive_mistakes_are_reported():
    with pytest.raises(ConfigError) as info:
        parse_config(f"models:\n  a:\n    {P}\n    restart: always\n    maxRestarts: -1\n    restartDelay: 0\n"
                     f"    healthInterval: -2\n    healthFailures: 0\n"
                     f"  b:\n    {P}\n    checkEndpoint: none\n    healthInterval: 5\n    restartDelay: 9\n"
                     f"    restartMaxDelay: 3\n")
    assert info.value.errors == [
        "models.a.restart: must be 'no' or 'on-failure' (got 'always')",
        "models.a.maxRestarts: must be a non-negative integer (got -1)",
        "models.a.restartDelay: must be a positive number of seconds (got 0)",
        "models.a.healthInterval: must be a non-negative number of seconds (got -2)",
        "models.a.healthFailures: must be at least 1",
        "models.b.restartMaxDelay: must not be less than restartDelay (9)",
        "models.b.healthInterval: needs a checkEndpoint (this model's is 'none')",
    ]


def test_keepalive_keys_are_no_unknown_keys():
    c = parse_config(f"models:\n  a:\n    {P}\n    restart: 'no'\n    healthInterval: 0\n")
    assert c.warnings == ()


def test_output_tail():
    history = b"".join(b"line %d\n" % i for i in range(30)) + b"last without newline"
    assert output_tail(history) == "\n".join([f"line {i}" for i in range(21, 30)] + ["last without newline"])
    assert len(output_tail(b"x" * 5000 + b"\n").encode()) == 2048
    assert output_tail(b"") == ""


# -- the supervisor ------------------------------------------------------------------------------------

class KeepAliveCase(SynchronousTestCase):
    def build(self, models, **config_kw) -> None:
        self.reactor = FakeProcessReactor()
        self.reactor.auto_exit = True
        self.checks: dict[str, HealthChecks] = {}
        self.events: list = []
        self.emitted: list = []
        self.logs = LogBroadcaster()
        for mm in models:
            self.logs.add_source(mm.id)
        self.config = make_config(models, **config_kw)

        def make_process(model_config, on_transition):
            checks = self.checks.setdefault(model_config.id, HealthChecks())
            return UpstreamProcess(
                model=model_config, reactor=self.reactor, clock=self.reactor, logs=self.logs,
                on_transition=on_transition, http_factory=lambda r: (object(), FakePool()), check=checks,
                kill=self.reactor.killpg, group_alive=self.reactor.group_alive, log=capture_logger(self.events))

        self.router = ModelRouter(self.config, make_process, self.reactor, log=capture_logger(self.events))
        self.router.observers.add(self.emitted.append)
        self.keepalive = KeepAlive(self.router, self.reactor, self.logs, log=capture_logger(self.events))
        self.keepalive.startService()

    def tearDown(self) -> None:
        self.keepalive.stopService()
        d = self.router.stopService()
        self.settle()
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    # helpers

    def settle(self) -> None:
        for _ in range(6):
            self.reactor.advance(0)

    def spawns(self, model_id: str) -> int:
        return sum(1 for p in self.reactor.spawned if p.args[-1] == model_id)

    def child(self, model_id: str):
        return [p for p in self.reactor.spawned if p.args[-1] == model_id][-1]

    def state(self, model_id: str) -> State:
        return self.router.process(model_id).state

    def answer(self, model_id: str, status: int = 200) -> None:
        """Fire the newest pending health check of ``model_id`` (a failed start leaves its own)."""
        self.checks[model_id].pending()[-1].callback(status)

    def start(self, model_id: str) -> None:
        """Load ``model_id`` and let its health check pass."""
        self.router.load(model_id)
        self.answer(model_id)
        self.assertIs(self.state(model_id), State.READY)

    def crash(self, model_id: str, output: bytes = b"", code: int = 1) -> None:
        if output:
            self.child(model_id).output(output)
        self.child(model_id).exit(code)
        self.settle()

    def logged(self, start: str) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_format", "").startswith(start)]


class RestartTests(KeepAliveCase):
    def setUp(self) -> None:
        self.build([model("a")])

    def test_crash_is_restarted_after_backoff(self):
        """A ready model that dies by itself starts again after restartDelay, with no request."""
        self.start("a")
        self.crash("a", b"loading weights\nCUDA error: out of memory\n")
        self.assertIs(self.state("a"), State.STOPPED)
        self.assertIn(Stopping("a", "exited"), self.emitted)
        self.reactor.advance(0.999)
        self.assertEqual(self.spawns("a"), 1)
        self.reactor.advance(0.001)
        self.assertEqual(self.spawns("a"), 2)
        self.assertIs(self.state("a"), State.STARTING)
        self.answer("a", 200)
        self.assertIs(self.state("a"), State.READY)
        [line] = self.logged("{model}: restarting (")
        self.assertIn("a: restarting (restart 1 of 2) after: its server stopped unexpectedly "
                      "(exited with code 1); last output of the previous run:\n", line)
        self.assertTrue(line.endswith("loading weights\nCUDA error: out of memory"), line)
        [warning] = self.logged("{model}: {why}; restarting in")
        self.assertEqual(warning, "a: its server stopped unexpectedly (exited with code 1); restarting in 1s "
                                  "(restart 1 of 2)")

    def test_backoff_doubles_then_gives_up_at_the_limit(self):
        """Each failure in a row waits twice as long; after maxRestarts restarts the model is
        marked failed with the reason, and nothing restarts it any more."""
        self.start("a")
        self.crash("a")
        self.reactor.advance(1)
        self.answer("a", 200)
        self.crash("a")                                  # second failure in a row: waits 2 s
        self.reactor.advance(1.999)
        self.assertEqual(self.spawns("a"), 2)
        self.reactor.advance(0.001)
        self.assertEqual(self.spawns("a"), 3)
        self.crash("a", code=3)                          # the restart's own start fails: third failure
        self.assertIs(self.state("a"), State.STOPPED)
        self.assertEqual(self.router.failed["a"],
                         "failed to start model 'a': exited with code 3; gave up after 2 restarts in a row")
        self.assertEqual(self.emitted[-1], StateChanged("a", "stopped", "failed"))
        self.reactor.advance(1000)
        self.assertEqual(self.spawns("a"), 3)
        self.assertEqual(len(self.logged("{model}: marked failed")), 1)

    def test_a_start_of_a_failed_model_clears_it_and_counts_afresh(self):
        """A request or a load starts a failed model again; its next crash is restarted again."""
        self.test_backoff_doubles_then_gives_up_at_the_limit()
        self.start("a")
        self.assertNotIn("a", self.router.failed)
        self.crash("a")
        self.reactor.advance(1)
        self.assertEqual(self.spawns("a"), 5)
        self.answer("a", 200)

    def test_a_stable_run_starts_the_count_again(self):
        """A run that stays ready for restartMaxDelay seconds ends the row of failures."""
        self.start("a")
        self.crash("a")
        self.reactor.advance(1)
        self.answer("a", 200)
        self.reactor.advance(8)                          # ready for restartMaxDelay
        self.crash("a")
        self.assertEqual(self.keepalive.failures("a"), 1)
        self.reactor.advance(1)                          # the first delay again, not 2 s
        self.assertEqual(self.spawns("a"), 3)
        self.answer("a", 200)

    def test_a_failed_start_is_retried(self):
        """restart: on-failure also covers a start that fails by itself (a preload, say)."""
        self.router.load("a").addErrback(lambda f: None)
        self.child("a").output(b"error: bad model file\n")
        self.crash("a")
        self.reactor.advance(1)
        self.assertEqual(self.spawns("a"), 2)
        self.answer("a", 200)
        [line] = self.logged("{model}: restarting (")
        self.assertIn("after: failed to start model 'a': exited with code 1;", line)
        self.assertTrue(line.endswith("error: bad model file"), line)

    def test_a_start_by_someone_else_during_the_wait_replaces_the_restart(self):
        self.start("a")
        self.crash("a")
        self.start("a")                                  # a request came meanwhile
        self.reactor.advance(10)
        self.assertEqual(self.spawns("a"), 2)
        self.assertEqual(self.logged("{model}: restarting ("), [])

    def test_stops_asked_for_are_no_failures(self):
        """An unload, a TTL or a swap stops the model on purpose: never restarted."""
        self.start("a")
        d = self.router.unload(["a"])
        self.settle()
        self.successResultOf(d)
        self.reactor.advance(100)
        self.assertEqual(self.spawns("a"), 1)
        self.assertIs(self.state("a"), State.STOPPED)

    def test_shutdown_cancels_a_pending_restart(self):
        self.start("a")
        self.crash("a")
        self.keepalive.stopService()
        self.reactor.advance(100)
        self.assertEqual(self.spawns("a"), 1)

    def test_reload_forgets_a_changed_model(self):
        """A reload that changes the model clears its failed mark and pending restart."""
        self.start("a")
        self.crash("a")
        self.router.failed["a"] = "old"
        self.keepalive.observe(Reloaded((), ("a",), (), self.config.models))
        self.assertNotIn("a", self.router.failed)
        self.reactor.advance(100)
        self.assertEqual(self.spawns("a"), 1)


class RestartPolicyTests(KeepAliveCase):
    def test_restart_no_leaves_a_crashed_model_stopped(self):
        self.build([model("a", restart="no")])
        self.start("a")
        self.crash("a")
        self.reactor.advance(1000)
        self.assertEqual(self.spawns("a"), 1)
        self.assertEqual(self.router.failed, {})

    def test_no_limit(self):
        """maxRestarts: 0 keeps restarting, at restartMaxDelay at most."""
        self.build([model("a", max_restarts=0)])
        self.start("a")
        for n in range(6):
            self.crash("a")
            self.reactor.advance(8)
            self.answer("a", 200)
        self.assertEqual(self.spawns("a"), 7)
        self.assertEqual(self.router.failed, {})

    def test_restart_that_would_stop_another_model_is_skipped(self):
        """a (in the default swapping group with b) dies; b starts meanwhile; a is not restarted,
        since starting it would stop b."""
        self.build([model("a"), model("b", restart="no")])
        self.start("a")
        self.crash("a")
        self.start("b")
        self.reactor.advance(1)
        self.assertEqual(self.spawns("a"), 1)
        self.assertIs(self.state("b"), State.READY)
        [line] = self.logged("{model}: not restarted")
        self.assertEqual(line, "a: not restarted: starting it now would stop b")


class HealthTests(KeepAliveCase):
    def test_failed_health_checks_restart_the_model(self):
        """healthInterval polls the ready model; healthFailures failures in a row stop it
        (reason unhealthy), and restart: on-failure starts it again; a 200 resets the row."""
        self.build([model("a", health_interval=5.0, health_failures=2)])
        self.start("a")
        self.reactor.advance(5)
        self.answer("a", 500)
        self.reactor.advance(5)
        self.answer("a", 200)                     # resets the row
        self.reactor.advance(5)
        self.answer("a", 503)
        self.assertIs(self.state("a"), State.READY)
        self.reactor.advance(5)
        # no answer counts too
        self.checks["a"].pending()[-1].errback(ConnectionRefusedError("refused"))
        self.assertIn(Stopping("a", "unhealthy"), self.emitted)
        self.settle()
        self.assertIs(self.state("a"), State.STOPPED)
        self.reactor.advance(1)
        self.assertEqual(self.spawns("a"), 2)
        self.answer("a", 200)
        self.assertEqual(len(self.logged("{model}: health check failed (")), 3)
        [line] = self.logged("{model}: restarting (")
        self.assertIn("after: its health check failed 2 times in a row", line)

    def test_unhealthy_model_that_may_not_restart_is_marked_failed(self):
        self.build([model("a", restart="no", health_interval=2.0, health_failures=1)])
        self.start("a")
        self.reactor.advance(2)
        self.answer("a", 500)
        self.settle()
        self.assertIs(self.state("a"), State.STOPPED)
        self.assertEqual(self.router.failed, {"a": "its health check failed 1 time in a row"})
        self.reactor.advance(100)
        self.assertEqual(self.spawns("a"), 1)

    def test_no_polling_while_not_ready(self):
        self.build([model("a", health_interval=5.0)])
        self.start("a")
        d = self.router.unload(["a"])
        self.settle()
        self.successResultOf(d)
        self.reactor.advance(60)
        self.assertEqual(self.checks["a"].pending(), [])


class FailedDisplayTests(HTTPCase):
    def test_running_and_api_models_show_failed_with_the_reason(self):
        self.build([make_model(id="a"), make_model(id="b")])
        self.router.failed["a"] = "its server stopped unexpectedly (killed by signal SIGKILL); gave up"
        _, body = self.call_json(b"GET", "/running")
        [entry] = body["running"]
        self.assertEqual((entry["model"], entry["state"], entry["reason"], entry["pid"]),
                         ("a", "failed", self.router.failed["a"], None))
        _, models = self.call_json(b"GET", "/api/models")
        self.assertEqual([(e["id"], e["state"], e.get("reason")) for e in models],
                         [("a", "failed", self.router.failed["a"]), ("b", "stopped", None)])
        response, _ = self.call(b"POST", "/api/models/load/a")
        self.assertEqual(response.code, 200)             # a load starts it again
        self.assertEqual(self.router.failed, {})
        _, body = self.call_json(b"GET", "/running")
        self.assertEqual([(e["model"], e["state"]) for e in body["running"]], [("a", "ready")])
