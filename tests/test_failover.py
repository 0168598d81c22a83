"""Failover selectors (``llamaswap.failover``): the breakers on a Clock, and requests in memory.

The HTTP tests run the real web tree, router and ``UpstreamProcess`` objects on a
``FakeProcessReactor``; each model's server is an ``UpstreamStub`` of its own, found by the
port of the model's ``proxy`` (one in-memory client serves them all, the PROXY-10 retry client
included). A model in ``reactor.broken`` fails to start (its spawn raises ``OSError``).
"""
from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.defer import ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llamaswap.config import GroupConfig, PeerConfig, ProfileConfig, SelectorConfig
from llamaswap.failover import (
    AllTargetsFailed, BreakerCollector, Breakers, BreakerState, TargetFailed, run)
from llamaswap.errors import UpstreamStartFailed, to_openai_error
from llamaswap.logs import LogBroadcaster
from llamaswap.process import UpstreamProcess
from llamaswap.proxy import Forwarder
from llamaswap.router import ModelRouter
from llamaswap.web.context import WebContext
from tests.factories import make_config, make_model
from tests.fakes import FakeLogs, FakePool, FakeProcessReactor, UpstreamStub, capture_logger, upstream_client
from tests.test_resources import STARTED, HTTPCase

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def failover(*targets: str, sid: str = "chat", failures: int = 3, cooldown: float = 60.0) -> SelectorConfig:
    return SelectorConfig(id=sid, strategy="failover", targets=tuple(targets), failures=failures,
                          cooldown=cooldown)


# -- the breakers alone ---------------------------------------------------------------------------


class BreakerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.selector = failover("a", "b", failures=2, cooldown=30)
        self.config = make_config([make_model("a"), make_model("b")], selectors={"chat": self.selector})
        self.events: list = []
        self.breakers = Breakers(self.clock, lambda: self.config, capture_logger(self.events))

    def fail(self, target: str = "a") -> None:
        self.breakers.admit(self.selector, target).failed("boom")

    def state(self, target: str = "a") -> BreakerState:
        return self.breakers.state(self.selector, target)

    def test_opens_after_failures_in_a_row(self):
        self.fail()
        self.assertEqual(self.state(), CLOSED)
        self.fail()
        self.assertEqual(self.state(), OPEN)
        self.assertIsNone(self.breakers.admit(self.selector, "a"))
        self.assertFalse(self.breakers.could_admit(self.selector, "a"))
        self.assertEqual(self.breakers.retry_in(self.selector, "a"), 30)
        self.assertEqual(self.state("b"), CLOSED)  # each target has its own breaker
        opened = [e for e in self.events if e.get("target") == "a" and "cooldown" in e]
        self.assertEqual(len(opened), 1)
        self.assertEqual(opened[0]["error"], "boom")

    def test_a_success_resets_the_count(self):
        self.fail()
        self.breakers.admit(self.selector, "a").succeeded()
        self.fail()
        self.assertEqual(self.state(), CLOSED)

    def test_released_attempts_count_for_nothing(self):
        self.fail()
        self.breakers.admit(self.selector, "a").released()
        self.fail()
        self.assertEqual(self.state(), OPEN)

    def test_half_open_after_the_cooldown_admits_exactly_one_probe(self):
        self.fail(), self.fail()
        self.clock.advance(29.9)
        self.assertEqual(self.state(), OPEN)
        self.clock.advance(0.1)
        self.assertEqual(self.state(), HALF_OPEN)
        probe = self.breakers.admit(self.selector, "a")
        self.assertTrue(probe.probe)
        self.assertIsNone(self.breakers.admit(self.selector, "a"))  # one probe at a time
        self.assertFalse(self.breakers.could_admit(self.selector, "a"))
        probe.succeeded()
        self.assertEqual(self.state(), CLOSED)
        self.assertFalse(self.breakers.admit(self.selector, "a").probe)

    def test_a_failed_probe_opens_for_another_cooldown(self):
        self.fail(), self.fail()
        self.clock.advance(30)
        self.breakers.admit(self.selector, "a").failed("still broken")
        self.assertEqual(self.state(), OPEN)
        self.clock.advance(29)
        self.assertEqual(self.state(), OPEN)
        self.clock.advance(1)
        self.assertEqual(self.state(), HALF_OPEN)

    def test_a_released_probe_lets_the_next_request_probe(self):
        self.fail(), self.fail()
        self.clock.advance(30)
        self.breakers.admit(self.selector, "a").released()
        self.assertEqual(self.state(), HALF_OPEN)
        self.assertTrue(self.breakers.admit(self.selector, "a").probe)

    def test_a_stale_probe_verdict_does_not_touch_a_later_opening(self):
        """A probe that ends after the breaker was closed (by a request admitted before it
        opened) and opened again does not free the new opening's probe."""
        early = self.breakers.admit(self.selector, "a")
        self.fail(), self.fail()
        self.clock.advance(30)
        first = self.breakers.admit(self.selector, "a")
        self.assertTrue(first.probe)
        early.succeeded()
        self.assertEqual(self.state(), CLOSED)
        self.fail(), self.fail()
        self.clock.advance(30)
        second = self.breakers.admit(self.selector, "a")
        self.assertTrue(second.probe)
        first.failed("late")
        self.assertEqual(self.state(), HALF_OPEN)  # a late failure does not re-open it
        self.assertIsNone(self.breakers.admit(self.selector, "a"))  # the second probe is in flight
        second.succeeded()
        self.assertEqual(self.state(), CLOSED)

    def test_settling_twice_counts_once(self):
        attempt = self.breakers.admit(self.selector, "a")
        attempt.failed("x")
        attempt.failed("x")
        self.assertEqual(self.breakers._breakers[("chat", "a")].failures, 1)

    def test_a_changed_target_starts_afresh(self):
        """A reload that changes what the target names resets its breaker."""
        self.fail(), self.fail()
        self.config = make_config([make_model("a", ttl=5), make_model("b")], selectors={"chat": self.selector})
        self.assertEqual(self.state(), CLOSED)

    def test_snapshot_and_metrics(self):
        self.fail(), self.fail()
        self.clock.advance(10)
        self.breakers.admit(self.selector, "b").failed("b broke")
        snapshot = self.breakers.snapshot()
        self.assertEqual(snapshot, [{
            "selector": "chat", "strategy": "failover", "failures": 2, "cooldown": 30,
            "targets": [
                {"target": "a", "breaker": "open", "failures": 2, "retry_in": 20, "last_error": "boom"},
                {"target": "b", "breaker": "closed", "failures": 1, "last_error": "b broke"}]}])
        registry = CollectorRegistry(auto_describe=True)
        registry.register(BreakerCollector(self.breakers))
        text = generate_latest(registry).decode()
        self.assertIn('llamaswap_selector_breaker_state{selector="chat",target="a"} 1.0', text)
        self.assertIn('llamaswap_selector_breaker_state{selector="chat",target="b"} 0.0', text)
        self.assertIn('llamaswap_selector_target_failures_total{selector="chat",target="a"} 2.0', text)
        self.clock.advance(20)
        text = generate_latest(registry).decode()
        self.assertIn('llamaswap_selector_breaker_state{selector="chat",target="a"} 2.0', text)

    def test_only_failover_selectors_are_shown(self):
        self.fail(), self.fail()
        self.config = make_config([make_model("a")], selectors={
            "warm": SelectorConfig(id="warm", strategy="warm", targets=("a",))})
        self.assertEqual(self.breakers.snapshot(), [])
        # the removed selector's breakers are forgotten: re-added, it starts closed
        self.config = make_config([make_model("a"), make_model("b")], selectors={"chat": self.selector})
        self.assertEqual(self.state(), CLOSED)


class RunTests(SynchronousTestCase):
    """``run`` with scripted attempts."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.selector = failover("a", "b", "c", failures=1, cooldown=10)
        self.config = make_config([make_model(x) for x in "abc"], selectors={"chat": self.selector})
        self.breakers = Breakers(self.clock, lambda: self.config)
        self.log = capture_logger([])

    def go(self, script: dict):
        calls = []

        async def attempt(target, more):
            calls.append((target, more))
            outcome = script[target]
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return ensureDeferred(run(self.breakers, self.selector, attempt, self.log)), calls

    def test_tries_in_order_until_one_answers(self):
        d, calls = self.go({"a": UpstreamStartFailed("no"), "b": TargetFailed("b", 500, b"x"), "c": True})
        self.successResultOf(d)
        self.assertEqual(calls, [("a", True), ("b", True), ("c", False)])
        self.assertEqual([self.breakers.state(self.selector, t) for t in "abc"], [OPEN, OPEN, CLOSED])

    def test_last_error_is_raised_as_is(self):
        d, calls = self.go({"a": UpstreamStartFailed("a"), "b": UpstreamStartFailed("b"),
                            "c": UpstreamStartFailed("c broke")})
        self.assertEqual(self.failureResultOf(d, UpstreamStartFailed).value.message, "c broke")
        # every breaker is open now: the next request tries nothing
        d, calls = self.go({})
        error = self.failureResultOf(d, AllTargetsFailed).value
        self.assertEqual(calls, [])
        status, _, body = to_openai_error(error)
        self.assertEqual((status, json.loads(body)["error"]["code"]), (503, "all_targets_failed"))
        self.assertIn("selector 'chat'", error.message)
        self.assertIn("a for 10 s", error.message)

    def test_other_errors_do_not_fail_over(self):
        d, calls = self.go({"a": ValueError("bug")})
        self.failureResultOf(d, ValueError)
        self.assertEqual(calls, [("a", True)])
        self.assertEqual(self.breakers._breakers[("chat", "a")].failures, 0)

    def test_a_relayed_failure_counts_against_the_target(self):
        d, _ = self.go({"a": "target 'a' answered 500"})
        self.successResultOf(d)
        self.assertEqual(self.breakers.state(self.selector, "a"), OPEN)


# -- requests in memory -----------------------------------------------------------------------------


class BrokenSpawnReactor(FakeProcessReactor):
    """Spawning a model named in ``broken`` fails (a failed start, PROC-3)."""

    def __init__(self) -> None:
        super().__init__()
        self.broken: set[str] = set()
        self.attempts: list[str] = []

    def spawnProcess(self, processProtocol, executable, args=(), *rest, **kw):
        model = list(args)[-1]
        self.attempts.append(model)
        if model in self.broken:
            raise OSError(f"cannot run {model}")
        return super().spawnProcess(processProtocol, executable, args, *rest, **kw)


class DroppingStub(UpstreamStub):
    """With ``drop`` set, closes the connection without answering (each time)."""

    drop = False

    def render(self, request):
        if not self.drop:
            return super().render(request)
        self.requests.append((request, request.content.read()))
        request.notifyFinish().addErrback(lambda _: None)
        request.channel.transport.abortConnection()
        return NOT_DONE_YET


class ByPort(Resource):
    """The model servers, found by the port of the request's Host."""

    isLeaf = True

    def __init__(self, stubs: dict) -> None:
        super().__init__()
        self.stubs = stubs

    def render(self, request):
        port = int(request.getHeader(b"host").rsplit(b":", 1)[1])
        return self.stubs[port].render(request)


CHAT = b'{"model":"chat","messages":[]}'


class FailoverCase(HTTPCase):
    def build_failover(self, models, selector: SelectorConfig, swap: bool = False, peers=None, **config_kw):
        self.reactor = BrokenSpawnReactor()
        self.reactor.auto_exit = True
        self.stubs: dict[str, DroppingStub] = {}
        by_port: dict[int, DroppingStub] = {}
        built = []
        for i, model in enumerate(models):
            port = 5801 + i
            built.append(make_model(model.pop("id"), proxy=f"http://127.0.0.1:{port}", **model))
            self.stubs[built[-1].id] = by_port[port] = DroppingStub()
        for i, peer_id in enumerate(peers or {}):
            port = 5901 + i
            self.stubs[peer_id] = by_port[port] = DroppingStub()
            peers[peer_id] = PeerConfig(peer_id, f"http://127.0.0.1:{port}", "", peers[peer_id])
        for i, stub in enumerate(self.stubs.values()):
            stub.reply = (200, {b"content-type": b"application/json"}, b'{"from":%d}' % i)
        self.up_client, self.up_agent = upstream_client(ByPort(by_port))
        self.events, self.access = [], []
        groups = {} if swap else {"all": GroupConfig("all", swap=False, exclusive=True,
                                                     members=tuple(m.id for m in built))}
        self.config = make_config(built, selectors={selector.id: selector}, groups=groups,
                                  peers=peers or {}, **config_kw)

        def make_process(model, on_transition):
            return UpstreamProcess(
                model=model, reactor=self.reactor, clock=self.reactor, logs=FakeLogs(),
                on_transition=on_transition, http_factory=lambda reactor: (self.up_client, FakePool()),
                check=lambda http, url: succeed(200),
                kill=self.reactor.killpg, group_alive=self.reactor.group_alive,
                log=capture_logger(self.events))

        self.router = ModelRouter(self.config, make_process, self.reactor, log=capture_logger(self.events))
        self.logs = LogBroadcaster()
        self.app = WebContext(self.router, self.logs, Forwarder(self.reactor, fresh_client=lambda: self.up_client),
                              self.reactor, log=capture_logger(self.events), started=STARTED,
                              peer_http=self.up_client)
        self.selector = selector
        self.rewire()

    def sent(self, target: str) -> list[dict]:
        """The JSON bodies ``target``'s server got."""
        return [json.loads(body) for _, body in self.stubs[target].requests]

    def chat(self, body: bytes = CHAT):
        return self.call(b"POST", "/v1/chat/completions", body)

    def target_of(self, response) -> bytes:
        return self.header(response, b"x-llamaswap-target")

    def breaker(self, target: str) -> BreakerState:
        return self.router.failover.state(self.selector, target)


class FailoverTests(FailoverCase):
    def setUp(self) -> None:
        self.build_failover([{"id": "big"}, {"id": "small", "use_model_name": "small-q4"}],
                            failover("big", "small", failures=3, cooldown=60))

    def test_a_failed_start_fails_over(self):
        self.reactor.broken.add("big")
        response, data = self.chat()
        self.assertEqual((response.code, data), (200, b'{"from":1}'))
        self.assertEqual(self.target_of(response), b"small")
        self.assertEqual(self.reactor.attempts, ["big", "small"])
        self.assertEqual(self.sent("big"), [])
        # the kept body goes to the next target with its own model name
        self.assertEqual(self.sent("small"), [{"model": "small-q4", "messages": []}])
        self.assertEqual(self.router.counts("big"), (0, 0))
        self.assertEqual(self.router.counts("small"), (0, 0))
        self.assertIn("cannot run big",
                      self.router.failover.snapshot()[0]["targets"][0]["last_error"])

    def test_a_5xx_before_the_first_byte_fails_over(self):
        records: list = []
        self.rewire(request_listeners=(records.append,))
        self.stubs["big"].reply = (500, {b"content-type": b"text/plain"}, b"out of memory")
        response, data = self.chat()
        self.assertEqual([(r.model, r.status) for r in records], [("small", 200)])  # one request
        self.assertEqual((response.code, data), (200, b'{"from":1}'))
        self.assertEqual(self.target_of(response), b"small")
        self.assertEqual(self.sent("big"), [{"model": "big", "messages": []}])
        self.assertEqual(self.sent("small"), [{"model": "small-q4", "messages": []}])
        self.assertEqual(self.router.failover.snapshot()[0]["targets"][0]["last_error"],
                         "target 'big' answered 500: out of memory")
        self.assertEqual(self.router.counts("big"), (0, 0))
        warned = [e for e in self.events if e.get("selector") == "chat" and "reason" in e]
        self.assertEqual(warned[0]["target"], "big")

    def test_a_dropped_connection_before_the_first_byte_fails_over(self):
        self.stubs["big"].drop = True
        response, data = self.chat()
        self.assertEqual((response.code, data), (200, b'{"from":1}'))
        self.assertEqual(self.target_of(response), b"small")
        self.assertGreaterEqual(len(self.stubs["big"].requests), 1)
        self.assertEqual(len(self.stubs["small"].requests), 1)

    def test_a_4xx_does_not_fail_over(self):
        self.stubs["big"].reply = (400, {b"content-type": b"application/json"}, b'{"error":"bad"}')
        response, data = self.chat()
        self.assertEqual((response.code, data), (400, b'{"error":"bad"}'))
        self.assertEqual(self.target_of(response), b"big")
        self.assertEqual(self.stubs["small"].requests, [])
        self.assertEqual(self.router.failover.snapshot()[0]["targets"][0]["failures"], 0)

    def test_a_mid_stream_failure_is_not_replayed(self):
        big = self.stubs["big"]
        big.hold = True
        d = self.request(b"POST", "/v1/chat/completions", b'{"model":"chat","stream":true}')
        up, _ = big.requests[0]
        up.setHeader(b"content-type", b"text/event-stream")
        up.write(b"data: 1\n\n")
        self.flush()
        response = self.successResultOf(d)
        self.assertEqual(self.target_of(response), b"big")
        collect = self.collect(response)
        up.channel.transport.abortConnection()
        self.flush()
        self.successResultOf(collect.done)
        self.assertTrue(collect.data.startswith(b"data: 1\n\ndata: "), collect.data)
        event = json.loads(collect.data[len(b"data: 1\n\ndata: "):])
        self.assertEqual(event["error"]["code"], "upstream_error")
        self.assertEqual(self.stubs["small"].requests, [])  # never sent again
        self.assertEqual(self.reactor.attempts, ["big"])
        # the broken stream counts against the target
        self.assertEqual(self.router.failover.snapshot()[0]["targets"][0]["failures"], 1)
        self.assertEqual(self.router.counts("big"), (0, 0))

    def test_the_last_targets_error_is_relayed(self):
        self.stubs["big"].reply = (500, {b"content-type": b"text/plain"}, b"big broke")
        self.stubs["small"].reply = (503, {b"content-type": b"text/plain"}, b"small broke")
        response, data = self.chat()
        self.assertEqual((response.code, data), (503, b"small broke"))
        self.assertEqual(self.target_of(response), b"small")
        self.assertEqual([t["failures"] for t in self.router.failover.snapshot()[0]["targets"]], [1, 1])

    def test_the_last_targets_failed_start_is_the_answer(self):
        self.reactor.broken.update({"big", "small"})
        response, data = self.chat()
        message = self.assertError(response, data, 502, "upstream_start_failed", "server_error")
        self.assertIn("cannot run small", message)
        self.assertIsNone(self.target_of(response))

    def test_the_breaker_opens_skips_half_opens_with_one_probe_and_closes(self):
        self.reactor.broken.add("big")
        for _ in range(3):
            self.assertEqual(self.target_of(self.chat()[0]), b"small")
        self.assertEqual(self.reactor.attempts.count("big"), 3)
        self.assertEqual(self.breaker("big"), OPEN)
        # open: skipped without trying
        self.assertEqual(self.target_of(self.chat()[0]), b"small")
        self.assertEqual(self.reactor.attempts.count("big"), 3)
        self.reactor.advance(59)
        self.assertEqual(self.target_of(self.chat()[0]), b"small")
        self.assertEqual(self.reactor.attempts.count("big"), 3)
        # half-open: one request probes; big works again but holds its answer
        self.reactor.advance(1)
        self.assertEqual(self.breaker("big"), HALF_OPEN)
        self.reactor.broken.clear()
        self.stubs["big"].hold = True
        probe = self.request(b"POST", "/v1/chat/completions", CHAT)
        self.assertEqual(len(self.stubs["big"].requests), 1)
        # meanwhile the others still skip it
        response, _ = self.chat()
        self.assertEqual(self.target_of(response), b"small")
        self.assertEqual(len(self.stubs["big"].requests), 1)
        self.assertEqual(self.router.failover.snapshot()[0]["targets"][0]["probing"], True)
        up, _ = self.stubs["big"].requests[0]
        up.setHeader(b"content-type", b"application/json")
        up.write(b'{"from":"big"}')
        up.finish()
        self.flush()
        response = self.successResultOf(probe)
        self.assertEqual(self.target_of(response), b"big")
        self.assertEqual(self.collect(response).data, b'{"from":"big"}')
        self.assertEqual(self.breaker("big"), CLOSED)
        self.stubs["big"].hold = False
        self.assertEqual(self.target_of(self.chat()[0]), b"big")

    def test_a_failed_probe_opens_again(self):
        self.reactor.broken.add("big")
        for _ in range(3):
            self.chat()
        self.reactor.advance(60)
        self.assertEqual(self.target_of(self.chat()[0]), b"small")
        self.assertEqual(self.reactor.attempts.count("big"), 4)
        self.assertEqual(self.breaker("big"), OPEN)
        self.reactor.advance(59)
        self.chat()
        self.assertEqual(self.reactor.attempts.count("big"), 4)

    def test_every_target_open_is_a_503_naming_the_selector(self):
        self.reactor.broken.update({"big", "small"})
        for _ in range(3):
            self.chat()
        self.assertEqual((self.breaker("big"), self.breaker("small")), (OPEN, OPEN))
        response, data = self.chat()
        message = self.assertError(response, data, 503, "all_targets_failed", "server_error")
        self.assertIn("selector 'chat'", message)
        self.assertEqual(self.reactor.attempts.count("big"), 3)

    def test_a_client_that_leaves_during_the_probe_frees_it(self):
        self.reactor.broken.add("big")
        for _ in range(3):
            self.chat()
        self.reactor.advance(60)
        self.reactor.broken.clear()
        self.stubs["big"].hold = True
        left = self.request(b"POST", "/v1/chat/completions", CHAT)
        self.assertEqual(len(self.stubs["big"].requests), 1)
        for pump in list(self.agent._pumps):
            pump.clientIO.abortConnection()
        self.flush()
        self.failureResultOf(left)
        self.assertEqual(self.breaker("big"), HALF_OPEN)
        self.assertFalse(self.router.failover.snapshot()[0]["targets"][0]["probing"])
        self.request(b"POST", "/v1/chat/completions", CHAT)
        self.assertEqual(len(self.stubs["big"].requests), 2)  # the next request probes

    def test_running_lists_the_breakers(self):
        self.reactor.broken.add("big")
        for _ in range(3):
            self.chat()
        _, body = self.call_json(b"GET", "/running")
        (entry,) = body["selectors"]
        self.assertEqual(entry["selector"], "chat")
        self.assertEqual([(t["target"], t["breaker"]) for t in entry["targets"]],
                         [("big", "open"), ("small", "closed")])
        self.assertEqual(entry["targets"][0]["retry_in"], 60)

    def test_a_query_model_is_rewritten_for_each_target(self):
        self.stubs["big"].reply = (503, {}, b"loading")
        response, _ = self.call(b"GET", "/props?model=chat&x=1")
        self.assertEqual((response.code, self.target_of(response)), (200, b"small"))
        self.assertEqual(self.stubs["big"].requests[0][0].uri, b"/props?model=big&x=1")
        self.assertEqual(self.stubs["small"].requests[0][0].uri, b"/props?model=small-q4&x=1")

    def test_in_flight_names_the_target_being_tried(self):
        self.reactor.broken.add("big")
        self.stubs["small"].hold = True
        self.request(b"POST", "/v1/chat/completions", CHAT)
        _, body = self.call_json(b"GET", "/api/inflight")
        self.assertEqual([r["model"] for r in body["requests"]], ["small"])

    def test_a_direct_request_for_a_target_is_no_failover(self):
        self.stubs["big"].reply = (500, {b"content-type": b"text/plain"}, b"big broke")
        response, data = self.call(b"POST", "/v1/chat/completions", b'{"model":"big"}')
        self.assertEqual((response.code, data), (500, b"big broke"))
        self.assertIsNone(self.target_of(response))
        self.assertEqual(self.stubs["small"].requests, [])


class SwapTests(FailoverCase):
    """Targets that cannot run together: the next target swaps the failed one out."""

    def setUp(self) -> None:
        self.build_failover([{"id": "big"}, {"id": "small"}], failover("big", "small"), swap=True)

    def test_a_5xx_swaps_to_the_next_target(self):
        self.stubs["big"].reply = (502, {b"content-type": b"text/plain"}, b"bad gateway")
        response, data = self.chat()
        self.assertEqual((response.code, data), (200, b'{"from":1}'))
        self.assertEqual(self.router.process("big").state.value, "stopped")
        self.assertEqual(self.router.process("small").state.value, "ready")


class ProfileAndPeerTests(FailoverCase):
    def test_a_pin_to_a_failover_selector(self):
        self.build_failover([{"id": "big"}, {"id": "small"}], failover("big", "small"),
                            pin_profiles={"night": ProfileConfig("night", pins={"gpt": "chat"})})
        self.router.set_active_profile("night")
        self.reactor.broken.add("big")
        response, _ = self.call(b"POST", "/v1/chat/completions", b'{"model":"gpt"}')
        self.assertEqual((response.code, self.target_of(response)), (200, b"small"))

    def test_a_peer_target_fails_over_too(self):
        """An unreachable peer (connection dropped) and a peer's 5xx both move on."""
        self.build_failover([{"id": "local"}], failover("p1/m1", "local"), peers={"p1": ("m1",)})
        self.stubs["p1"].drop = True
        response, data = self.chat()
        self.assertEqual((response.code, self.target_of(response)), (200, b"local"))
        self.assertEqual(self.sent("local"), [{"model": "local", "messages": []}])
        self.stubs["p1"].drop = False
        self.stubs["p1"].reply = (500, {}, b"peer broke")
        response, data = self.chat()
        self.assertEqual((response.code, self.target_of(response)), (200, b"local"))
        self.assertEqual(self.sent("p1")[-1], {"model": "m1", "messages": []})  # the peer's own name
        self.stubs["p1"].reply = (200, {b"content-type": b"application/json"}, b'{"from":"peer"}')
        response, data = self.chat()
        self.assertEqual((response.code, data, self.target_of(response)), (200, b'{"from":"peer"}', b"p1/m1"))
