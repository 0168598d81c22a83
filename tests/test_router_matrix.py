"""The router in ``routing.router.use: matrix`` mode, on a fake clock with fake processes.

The solver itself is tests/test_matrix.py (llama-swap's own cases); these check that the router
asks it which models to stop, logs and counts those stops as ``matrix`` evictions, and that a
memory budget vetoes a set that would not fit (docs/memory.rst, docs/matrix.rst).
"""
from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.matrix import parse_matrix
from tests.test_router_memory import GiB, Sim, mm


def matrix_sim(models: list, raw: dict, budget: Any = None) -> Sim:
    matrix, errors = parse_matrix(raw, "routing.router.settings.matrix", [m.id for m in models])
    assert not errors, errors
    return Sim(models, budget=budget, matrix=matrix, router_use="matrix")


class MatrixRoutingTests(SynchronousTestCase):
    def test_models_in_one_set_run_together_a_model_alone_evicts_them(self):
        sim = matrix_sim([mm("a", None), mm("b", None), mm("c", None)],
                         {"sets": {"ab": "a & b", "solo": "c"}})
        sim.request("a", 0)
        sim.request("b", 5)
        sim.run(10)
        self.assertEqual(sim.running(), ["a", "b"])
        self.assertEqual(sim.stops(), [])
        c = sim.request("c", 12)
        sim.run(25)
        self.assertIsNone(c.error)
        self.assertEqual(sim.running(), ["c"])
        self.assertEqual(sorted(sim.stops()), [("a", "swap", "matrix"), ("b", "swap", "matrix")])
        self.assertEqual(sim.metric("llamaswap_evictions_total", model="a", reason="matrix"), 1)

    def test_the_cheapest_set_wins_by_evict_costs(self):
        """t may run with a (evicting b) or with b (evicting a); a costs 10 to evict, b the
        default 1, so b goes."""
        sim = matrix_sim([mm("a", None), mm("b", None), mm("t", None)],
                         {"evict_costs": {"a": 10}, "sets": {"ab": "a & b", "x": "t & a", "y": "t & b"}})
        sim.request("a", 0)
        sim.request("b", 3)
        sim.run(8)
        self.assertEqual(sim.running(), ["a", "b"])
        t = sim.request("t", 10)
        sim.run(20)
        self.assertIsNone(t.error)
        self.assertEqual(sim.stops(), [("b", "swap", "matrix")])
        self.assertEqual(sim.running(), ["a", "t"])

    def test_a_budget_vetoes_a_set_that_does_not_fit(self):
        """The matrix allows t beside a, but 4 + 6 GiB exceed the 8 GiB budget: t waits and
        nothing is stopped for it."""
        sim = matrix_sim([mm("a", 4), mm("t", 6)], {"sets": {"x": "t & a"}}, budget=8 * GiB)
        sim.request("a", 0, duration=1.0)
        sim.run(5)
        t = sim.request("t", 6)
        sim.run(30)
        self.assertEqual(sim.stops(), [])
        self.assertEqual(sim.running(), ["a"])
        self.assertIsNone(t.granted)
        self.assertEqual(sim.violations, [])


class PriorityRoutingTests(SynchronousTestCase):
    """routing.scheduler.settings.fifo.priority through the router: among requests waiting for a
    swap, the higher priority goes first; maxWait still bounds the others' wait."""

    def test_higher_priority_model_is_loaded_first(self):
        sim = Sim([mm("a", None), mm("b", None), mm("c", None)], budget=None,
                  scheduler_priority={"c": 10}, max_wait=30.0)
        sim.request("a", 0, duration=10.0)
        b = sim.request("b", 3)
        c = sim.request("c", 4)
        sim.run(40)
        self.assertIsNotNone(b.granted)
        self.assertLess(c.granted, b.granted)
        self.assertEqual(sim.spawns(), ["a", "c", "b"])

    def test_without_priorities_the_older_request_goes_first(self):
        sim = Sim([mm("a", None), mm("b", None), mm("c", None)], budget=None, max_wait=30.0)
        sim.request("a", 0, duration=10.0)
        sim.request("b", 3)
        sim.request("c", 4)
        sim.run(40)
        self.assertEqual(sim.spawns(), ["a", "b", "c"])
