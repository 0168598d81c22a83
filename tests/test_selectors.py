"""Selectors: the pure strategy choice (``llamaswap.selectors.choose``) and the router that
resolves a selector id per request from its models' states and loads.

The router tests use real ``UpstreamProcess`` objects on a ``FakeProcessReactor`` (``RouterCase``
from test_router): health checks are Deferreds the test answers, time never passes by itself.
"""
from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import GroupConfig, SelectorConfig
from llamaswap.errors import ModelNotFound, to_openai_error
from llamaswap.router import Resolved
from llamaswap.selectors import NoSelectorTarget, TargetView, choose, selector_status
from tests.test_router import RouterCase, m


def sel(strategy: str, *targets: str, spillover: int = 1, sid: str = "s") -> SelectorConfig:
    return SelectorConfig(id=sid, strategy=strategy, targets=tuple(targets), spillover=spillover)


def views(*specs) -> list[TargetView]:
    """``("a", "ready", 2)`` -> TargetView("a", "ready", 2); ``("p/x",)`` -> a peer target."""
    return [TargetView(*spec) for spec in specs]


class ChooseTests(SynchronousTestCase):
    def test_pin_is_always_the_first_target(self):
        selector = sel("pin", "a", "b")
        self.assertEqual(choose(selector, views(("a", "stopped"), ("b", "ready"))), "a")
        self.assertEqual(choose(selector, views(("a", "ready", 9), ("b", "ready"))), "a")

    def test_warm_prefers_ready_then_starting_then_first(self):
        selector = sel("warm", "a", "b", "c")
        self.assertEqual(choose(selector, views(("a", "starting"), ("b", "stopped"), ("c", "ready"))), "c")
        self.assertEqual(choose(selector, views(("a", "stopped"), ("b", "starting"), ("c", "starting"))), "b")
        self.assertEqual(choose(selector, views(("a", "stopping"), ("b", "stopped"), ("c", "stopped"))), "a")

    def test_spillover_fills_the_first_target_then_starts_the_next(self):
        selector = sel("spillover", "a", "b", spillover=2)
        self.assertEqual(choose(selector, views(("a", "stopped"), ("b", "stopped"))), "a")
        self.assertEqual(choose(selector, views(("a", "starting", 1), ("b", "stopped"))), "a")
        self.assertEqual(choose(selector, views(("a", "ready", 2), ("b", "stopped"))), "b")

    def test_spillover_takes_the_least_busy_active_target(self):
        selector = sel("spillover", "a", "b", "c", spillover=2)
        self.assertEqual(choose(selector, views(("a", "ready", 1), ("b", "ready", 0), ("c", "stopped"))), "b")
        # equals: the earliest listed
        self.assertEqual(choose(selector, views(("a", "ready", 1), ("b", "ready", 1), ("c", "stopped"))), "a")

    def test_spillover_queues_on_the_least_busy_when_all_are_full(self):
        selector = sel("spillover", "a", "b", spillover=1)
        self.assertEqual(choose(selector, views(("a", "ready", 3), ("b", "ready", 2))), "b")
        self.assertEqual(choose(selector, views(("a", "ready", 2), ("b", "ready", 2))), "a")

    def test_spillover_skips_stopping_targets(self):
        selector = sel("spillover", "a", "b", spillover=1)
        self.assertEqual(choose(selector, views(("a", "stopping", 1), ("b", "stopped"))), "b")
        error = self.assertRaises(NoSelectorTarget, choose, selector, views(("a", "stopping"), ("b", "shutdown")))
        status, _, body = to_openai_error(error)
        self.assertEqual(status, 503)
        self.assertIn(b"selector_unavailable", body)
        self.assertIn("every one of a, b is stopping", error.message)

    def test_spillover_busy_stopped_target_is_active(self):
        """Requests waiting for a stopped target (a start under way) count as its load."""
        selector = sel("spillover", "a", "b", spillover=1)
        self.assertEqual(choose(selector, views(("a", "stopped", 1), ("b", "stopped"))), "b")

    def test_spillover_peer_targets_are_cold(self):
        selector = sel("spillover", "a", "peer/x", spillover=1)
        self.assertEqual(choose(selector, views(("a", "ready", 1), ("peer/x",))), "peer/x")
        self.assertEqual(choose(selector, views(("a", "ready", 0), ("peer/x",))), "a")

    def test_status(self):
        self.assertEqual(selector_status(sel("warm", "a", "b"), ["stopped", "ready"]), "loaded")
        self.assertEqual(selector_status(sel("warm", "a", "b"), ["stopped", "starting"]), "loaded")
        self.assertEqual(selector_status(sel("pin", "a", "b"), ["stopped", "ready"]), "unloaded")
        self.assertEqual(selector_status(sel("spillover", "a", "p/x"), ["stopped", None]), "unloaded")


class RouterSelectorTests(RouterCase):
    """The router resolves a selector id at admission, from its own view of the models."""

    def setUp(self) -> None:
        pair = GroupConfig("pair", swap=False, exclusive=True, members=("a", "b"))
        self.build([m("a", aliases=("alpha",)), m("b"), m("c")], groups={"pair": pair}, selectors={
            "pinned": sel("pin", "c", "a", sid="pinned"),
            "warm": sel("warm", "alpha", "b", sid="warm"),
            "spill": sel("spillover", "a", "b", spillover=2, sid="spill"),
        })

    def test_pin_resolves_to_its_first_target(self):
        self.assertEqual(self.router.resolve("pinned"), Resolved("c", None, "c"))
        self.serve("a")
        self.assertEqual(self.router.resolve("pinned"), Resolved("c", None, "c"))

    def test_warm_picks_the_ready_target(self):
        """Nothing runs: a cold start of the first target (an alias: its name is kept); once b
        is ready, b; once a is starting but b still ready, b; with only a ready, a."""
        self.assertEqual(self.router.resolve("warm"), Resolved("a", None, "alpha"))
        self.serve("b").release()
        self.assertEqual(self.router.resolve("warm"), Resolved("b", None, "b"))
        d = self.router.acquire("a")
        self.settle()
        self.assertEqual(self.state("a"), "starting")
        self.assertEqual(self.router.resolve("warm"), Resolved("b", None, "b"))
        self.ready("a")
        self.successResultOf(d).release()
        self.router.unload(["b"])
        self.settle()
        self.assertEqual((self.state("a"), self.state("b")), ("ready", "stopped"))
        self.assertEqual(self.router.resolve("warm"), Resolved("a", None, "alpha"))

    def test_warm_prefers_a_starting_target_to_a_cold_one(self):
        d = self.router.acquire("b")
        self.settle()
        self.assertEqual((self.state("a"), self.state("b")), ("stopped", "starting"))
        self.assertEqual(self.router.resolve("warm").model_id, "b")
        self.ready("b")
        self.successResultOf(d).release()

    def admit(self, name: str):
        """What the web layer does: resolve, then acquire in the same turn."""
        resolved = self.router.resolve(name)
        return resolved.model_id, self.router.acquire(resolved.model_id)

    def test_spillover_fills_then_spills(self):
        """spillover 2: two requests go to a, the third starts b (a and b coexist), the fourth
        goes to b, and with both full the least busy (a, listed first) takes the fifth."""
        chosen, leases = [], []
        for _ in range(2):
            model_id, d = self.admit("spill")
            chosen.append(model_id)
            leases.append(d)
        self.settle()
        self.ready("a")
        self.assertEqual(self.state("a"), "ready")
        for _ in range(3):
            model_id, d = self.admit("spill")
            chosen.append(model_id)
            leases.append(d)
            self.settle()
            if self.state("b") == "starting":
                self.ready("b")
        self.assertEqual(chosen, ["a", "a", "b", "b", "a"])
        self.assertEqual((self.state("a"), self.state("b")), ("ready", "ready"))
        self.assertEqual(self.router.counts("a"), (3, 0))
        self.assertEqual(self.router.counts("b"), (2, 0))
        # a request ends on b: b is the least busy again
        self.successResultOf(leases[2]).release()
        self.assertEqual(self.admit("spill")[0], "b")

    def test_spillover_counts_every_request_on_a_target(self):
        """Direct requests to a fill it for the selector too."""
        self.serve("a")
        self.serve("a")
        self.assertEqual(self.router.resolve("spill").model_id, "b")

    def test_selectors_off_leaves_the_id_unresolved(self):
        """``/upstream`` asks without selectors: a selector id is then no model."""
        error = self.assertRaises(ModelNotFound, self.router.resolve, "warm", selectors=False)
        self.assertIn("model 'warm' not found", error.message)
        self.assertEqual(self.router.rewrite("warm", selectors=False), "warm")
