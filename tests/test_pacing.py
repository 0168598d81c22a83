"""llamaswap.pacing: a burst of request starts and ends yields to the streams already running.

The pacer's turns end with a ``callLater(0)`` on its own Clock and its budget is measured on a
fake timer, so every test says exactly when a turn ends and how much of its budget is spent.
"""
from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseDone

from llamaswap.pacing import Pacer
from tests.factories import make_model
from tests.fakes import drop_clients
from tests.test_resources import HTTPCase


class TurnClock(Clock):
    """A Clock whose :meth:`turn` is one reactor turn: it runs the calls due when it begins;
    calls made meanwhile wait for the next (``Clock.advance`` would run them too)."""

    def turn(self) -> None:
        due = [call for call in self.calls if call.getTime() <= self.seconds()]
        for call in due:
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


class FakeTimer:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class PacerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = TurnClock()
        self.timer = FakeTimer()
        self.pacer = Pacer(self.clock, budget=0.001, timer=self.timer)
        self.ran: list = []

    def work(self, name: str, cost: float = 0.0) -> None:
        self.ran.append(name)
        self.timer.now += cost

    def test_work_alone_in_its_turn_runs_at_once(self):
        self.pacer.run(self.work, "a")
        self.assertEqual(self.ran, ["a"])
        self.assertEqual(self.pacer.waiting, 0)
        self.clock.turn()  # the turn ends; nothing waited
        self.pacer.run(self.work, "b")
        self.assertEqual(self.ran, ["a", "b"])

    def test_work_past_the_budget_waits_for_the_next_turn_in_order(self):
        for name in "abcde":
            self.pacer.run(self.work, name, 0.0004)
        # a, b and c fit in the first turn's millisecond (0, 0.4, 0.8 ms when they began)
        self.assertEqual(self.ran, ["a", "b", "c"])
        self.assertEqual(self.pacer.waiting, 2)
        for name in "fgh":  # behind the work already waiting, whatever the budget
            self.pacer.run(self.work, name, 0.0004)
        self.assertEqual(self.pacer.waiting, 5)
        self.clock.turn()  # the next turn: a budget's worth of what waits (d, e, f)
        self.assertEqual(self.ran, list("abcdef"))
        self.assertEqual(self.pacer.waiting, 2)
        self.clock.turn()
        self.assertEqual(self.ran, list("abcdefgh"))
        self.assertEqual(self.pacer.waiting, 0)
        self.clock.turn()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_at_least_one_waiting_piece_runs_each_turn(self):
        self.pacer.run(self.work, "big", 0.005)
        self.pacer.run(self.work, "x", 0.005)
        self.pacer.run(self.work, "y", 0.005)
        self.assertEqual(self.ran, ["big"])
        self.clock.turn()
        self.assertEqual(self.ran, ["big", "x"])
        self.clock.turn()
        self.assertEqual(self.ran, ["big", "x", "y"])

    def test_a_turn_with_waiting_work_takes_new_work_after_it(self):
        self.pacer.run(self.work, "a", 0.002)
        self.pacer.run(self.work, "b", 0.0001)
        self.clock.turn()  # b runs, with most of the turn's budget left
        self.assertEqual(self.ran, ["a", "b"])
        self.pacer.run(self.work, "c")  # the same turn still has budget: at once
        self.assertEqual(self.ran, ["a", "b", "c"])

    def test_a_failure_is_logged_and_the_rest_runs(self):
        def boom() -> None:
            raise RuntimeError("boom")

        self.pacer.run(self.work, "a", 0.002)
        self.pacer.run(boom)
        self.pacer.run(self.work, "b")
        self.clock.turn()
        self.assertEqual(self.ran, ["a", "b"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_a_failure_at_once_reaches_the_caller(self):
        def boom() -> None:
            raise RuntimeError("boom")

        self.assertRaises(RuntimeError, self.pacer.run, boom)


class PacedSiteTests(HTTPCase):
    """The site starts requests, and ends proxied ones, through its pacer."""

    def setUp(self) -> None:
        self.build([make_model(id="a")])
        self.records: list = []
        self.rewire(request_listeners=[self.records.append])
        self.turns = TurnClock()
        self.timer = FakeTimer()
        self.site.pacer = Pacer(self.turns, budget=0.001, timer=self.timer)

    def spend_budget(self) -> None:
        """The work run so far in this turn took the whole budget."""
        self.turns.turn()
        self.site.pacer.run(lambda: None)
        self.timer.now += 1.0

    def test_a_request_in_a_burst_waits_for_the_next_turn(self):
        response, data = self.call(b"GET", "/v1/models")
        self.assertEqual(response.code, 200)
        self.spend_budget()
        d = self.request(b"POST", "/v1/chat/completions", b'{"model":"a"}')
        self.assertNoResult(d)
        self.assertEqual(self.site.pacer.waiting, 1)
        self.assertEqual(self.upstream.requests, [])
        self.reactor.advance(2)  # two seconds pass before its turn comes
        self.turns.turn()
        self.flush()
        response = self.successResultOf(d)
        self.assertEqual((response.code, self.collect(response).data), (200, b'{"ok":true}'))
        self.turns.turn()
        [record] = self.records
        self.assertGreaterEqual(record.duration, 2.0)  # its wait counts in its time

    def test_a_client_that_left_while_waiting_starts_nothing(self):
        self.spend_budget()
        d = self.request(b"POST", "/v1/chat/completions", b'{"model":"a"}')
        self.assertNoResult(d)
        drop_clients(self.agent)
        self.turns.turn()
        self.flush()
        self.failureResultOf(d)
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.router.counts("a"), (0, 0))
        self.assertIn('"POST /v1/chat/completions HTTP/1.1" 499 ', self.access_lines()[-1])

    def test_a_stream_ends_at_once_and_its_bookkeeping_waits_for_its_turn(self):
        d, up = self.open_stream()
        collect = self.collect(self.successResultOf(d))
        self.spend_budget()
        up.write(b"data: [DONE]\n\n")
        up.finish()
        self.flush()
        # the client has its whole response: the end was sent before any bookkeeping
        self.successResultOf(collect.done)
        self.assertTrue(collect.reason.check(ResponseDone), collect.reason)
        self.assertEqual(collect.data, b"data: 1\n\ndata: [DONE]\n\n")
        # the model's release and the request's record wait for the next turn
        self.assertEqual(self.records, [])
        self.assertEqual(self.router.counts("a"), (1, 0))
        self.turns.turn()
        self.flush()
        self.assertEqual(self.router.counts("a"), (0, 0))
        [record] = self.records
        self.assertEqual(record.status, 200)


def test_the_daemon_paces_its_site(tmp_path):
    """The service's site starts requests and ends proxied ones through a pacer on its reactor."""
    from llamaswap.config import load_config
    from llamaswap.service import LlamaSwapService
    from tests.fakes import FakeProcessReactor
    from tests.test_plugin import FAKE_CMD

    path = tmp_path / "config.yaml"
    path.write_text(f"models:\n  a:\n    cmd: {FAKE_CMD}\n")
    reactor = FakeProcessReactor()
    service = LlamaSwapService(load_config(str(path)), reactor, "tcp:0", str(tmp_path / "state.json"),
                               install_signals=False, config_path=str(path))
    pacer = service.site.pacer
    assert isinstance(pacer, Pacer)
    before = len(reactor.getDelayedCalls())
    pacer.run(lambda: None)
    assert len(reactor.getDelayedCalls()) == before + 1  # the turn's end, on the daemon's reactor
