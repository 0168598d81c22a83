"""The router under a memory budget, on a fake clock with fake processes (docs/memory.rst).

The pure decisions are tests/test_scheduler_memory.py; these check the wiring: the needs,
load times, demand and last use the router describes, the 503 for a model that can never fit,
the eviction log lines and ``Stopping`` causes, measurement into the ``NeedBook``, an
out-of-memory start raising the need, and the memory events and metrics.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import GroupConfig, ModelConfig
from llamaswap.errors import InsufficientMemory, UpstreamStartFailed, to_openai_error
from llamaswap.footprint import NeedBook
from llamaswap.metrics import Metrics
from llamaswap.observe import MemoryChanged, StateChanged, Stopping
from llamaswap.process import State
from llamaswap.memory import MEASURE_INTERVAL
from tests.factories import make_model
from tests.test_router_sched import STEP, Sim as SchedSim

GiB = 2**30
MiB = 2**20


class Sim(SchedSim):
    """tests/test_router_sched.py's ``Sim`` with a memory budget, its metrics, and a fake
    ``measure`` answering ``rss[model]`` for a model's process group."""

    def __init__(self, models: list[ModelConfig], budget: Optional[int] = 12 * GiB, load: float = 2.0,
                 needs: Optional[NeedBook] = None, **config_kw: Any) -> None:
        self.rss: dict[str, int] = {}
        self.measured: list[tuple[float, str]] = []
        self.oom: dict[str, bytes] = {}  # model -> output printed before it exits during its start
        self.needs = needs if needs is not None else NeedBook(None)
        super().__init__(models, load=load, memory_budget=budget, **config_kw)
        self.metrics = Metrics(self.config.models)
        self.router.observers.add(self.metrics.observe)
        self.router.observers.add(self._check)
        self.router.startService()

    def router_options(self) -> dict[str, Any]:
        return {"needs": self.needs, "measure": self._measure}

    def _measure(self, pgid: int) -> Deferred:
        model_id = self.reactor.by_pid(pgid).args[-1]
        self.measured.append((self.reactor.seconds(), model_id))
        return succeed(self.rss.get(model_id, 0))

    def _check(self, event: Any) -> None:
        """Recorded, not raised: a model stopped while requests are in flight, or a start that
        takes the running needs above the budget."""
        if isinstance(event, Stopping) and event.reason == "swap":
            if self.router.counts(event.model)[0]:
                self.violations.append(f"{event.model} evicted with requests in flight")
        if isinstance(event, StateChanged) and event.new == "starting" and self.config.memory_budget:
            if self.router.memory_used() > self.config.memory_budget:
                self.violations.append(f"over budget when {event.model} started")
            if event.model in self.oom:
                self.reactor.callLater(0.5, self._oom, event.model)

    def _oom(self, model_id: str) -> None:
        proc = [p for p in self.reactor.spawned if p.args[-1] == model_id][-1]
        proc.output(self.oom[model_id])
        proc.exit(1)

    def running(self) -> list[str]:
        return sorted(p.id for p in self.router.processes() if p.state in (State.STARTING, State.READY))

    def stops(self) -> list[tuple[str, str, str]]:
        return [(e.model, e.reason, e.cause) for e in self.emitted if isinstance(e, Stopping)]

    def log_lines(self, needle: str) -> list[str]:
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.events if needle in formatEvent(e)]

    def metric(self, name: str, **labels: str) -> Optional[float]:
        return self.metrics.registry.get_sample_value(name, labels)


def mm(model_id: str, gib: Optional[float] = 4, **kw: Any) -> ModelConfig:
    kw.setdefault("unload_timeout", 5)
    kw.setdefault("concurrency_limit", 1000)
    kw.setdefault("health_check_timeout", 600)
    return make_model(id=model_id, memory=None if gib is None else int(gib * GiB), **kw)


class PackingTests(SynchronousTestCase):
    def test_three_models_share_the_budget_a_fourth_evicts_one(self):
        """Three 4 GiB models run together in 12 GiB; a fourth evicts the least recently used one,
        logged with its reason and cost; Stopping carries cause memory; metrics follow."""
        sim = Sim([mm("a"), mm("b"), mm("c"), mm("d")])
        for i, x in enumerate("abc"):
            sim.request(x, i * 5.0)
        sim.run(20)
        self.assertEqual(sim.spawns(), ["a", "b", "c"])
        self.assertEqual(sim.running(), ["a", "b", "c"])
        self.assertEqual(sim.stops(), [])
        self.assertEqual(sim.router.memory_used(), 12 * GiB)
        self.assertEqual(sim.metric("llamaswap_memory_budget_bytes"), 12 * GiB)
        self.assertEqual(sim.metric("llamaswap_memory_used_bytes"), 12 * GiB)
        self.assertEqual(sim.metric("llamaswap_model_memory_bytes", model="a", source="declared"), 4 * GiB)
        d = sim.request("d", 30)
        sim.run(40)
        self.assertIsNone(d.error)
        self.assertEqual(sim.stops(), [("a", "swap", "memory")])
        self.assertEqual(sim.running(), ["b", "c", "d"])
        [line] = sim.log_lines("evicting")
        self.assertRegex(line, r"^evicting 'a' \(idle \d+ s, reload ~2\.0 s × [0-9.]+/min\) "
                               r"to fit 'd' \(needs 4\.0 GiB, declared\)$")
        self.assertEqual(sim.metric("llamaswap_evictions_total", model="a", reason="memory"), 1)
        self.assertEqual(sim.metric("llamaswap_evictions_total", model="a", reason="group"), 0)
        self.assertEqual(sim.metric("llamaswap_model_stops_total", model="a", reason="swap"), 1)
        assert_near(self, sim.router.load_time("a"), 2.0, STEP)
        self.assertEqual(sim.violations, [])

    def test_no_budget_is_one_at_a_time_and_publishes_no_memory(self):
        """Without a budget the default group still swaps; no MemoryChanged, no memory gauges."""
        sim = Sim([mm("a"), mm("b")], budget=None)
        sim.request("a", 0)
        sim.request("b", 5)
        sim.run(12)
        self.assertEqual(sim.stops(), [("a", "swap", "group")])
        self.assertFalse([e for e in sim.emitted if isinstance(e, MemoryChanged)])
        self.assertIsNone(sim.metric("llamaswap_memory_budget_bytes"))
        self.assertEqual(sim.metric("llamaswap_evictions_total", model="a", reason="group"), 1)
        self.assertEqual(sim.measured, [])
        self.assertEqual(sim.log_lines("evicting"), [])

    def test_reload_cost_keeps_the_busy_model_lru_evicts_it(self):
        """'hot' is asked for all the time but was last used before 'cold': reload cost evicts
        'cold', lru evicts 'hot'."""
        for policy, evicted in (("cost", "cold"), ("lru", "hot")):
            sim = Sim([mm("hot"), mm("cold"), mm("new", 8)], memory_policy=policy)
            for i in range(30):
                sim.request("hot", i * 1.0, duration=0.5)
            sim.request("cold", 35, duration=0.5)
            new = sim.request("new", 45)
            sim.run(60)
            self.assertIsNone(new.error, policy)
            self.assertEqual(sim.stops(), [(evicted, "swap", "memory")], policy)
            self.assertEqual(sim.violations, [], policy)

    def test_model_in_flight_is_never_evicted_and_drains_after_max_wait(self):
        """The only model that can make room is busy: it keeps serving until maxWait, then drains;
        the swap happens when its last request ends."""
        sim = Sim([mm("a", 8), mm("b", 8)], max_wait=10)
        first = sim.request("a", 0, duration=30)  # in flight until 32
        sim.request("b", 5)
        early = sim.request("a", 8, duration=2)  # before maxWait: batched onto a
        late = sim.request("a", 20, duration=1)  # after maxWait: a drains, this one waits
        sim.run(60)
        self.assertEqual(sim.violations, [])
        self.assertLess(early.granted, 10)
        b = sim.requests[1]
        assert_near(self, b.granted, first.done + 2.0, 3 * STEP)
        self.assertGreater(late.granted, b.granted)
        self.assertEqual(sim.stops()[0], ("a", "swap", "memory"))

    def test_need_above_the_budget_is_refused_at_once_nothing_evicted(self):
        """A measured need above the whole budget: 503 insufficient_memory at once, naming the need,
        its source and the budget; the running model keeps running, nothing is spawned."""
        big = mm("big", None)
        book = NeedBook(None, {big.cmd: 20 * GiB})
        sim = Sim([mm("a"), big], needs=book)
        sim.request("a", 0, duration=100)
        req = sim.request("big", 5)
        load = sim.router.load("big")
        sim.run(6)
        assert_near(self, req.failed_at, 5.0, STEP)
        self.assertIsInstance(req.error, InsufficientMemory)
        self.assertEqual(req.error.message, "model 'big' needs 20.0 GiB (measured) but memory.budget is 12.0 GiB")
        status, _, body = to_openai_error(req.error)
        self.assertEqual((status, json.loads(body)["error"]["code"]), (503, "insufficient_memory"))
        self.failureResultOf(load, InsufficientMemory)
        self.assertEqual(sim.spawns(), ["a"])
        self.assertEqual(sim.stops(), [])
        self.assertEqual(sim.router.counts("big"), (0, 0))

    def test_estimated_need_from_the_model_file(self):
        """No memory key, nothing measured: the estimate from the -m file plus memory.overhead;
        the load time before any measured load is 1 s + size / 2 GB/s."""
        path = temp_path(self)
        write_sparse_gguf(path, 3 * GiB)
        model = mm("e", None, argv=(os.sys.executable, "-c", "pass", "--model", path))
        sim = Sim([model], memory_overhead=512 * MiB)
        need, source = sim.router.memory_need("e")
        self.assertEqual(source, "estimated")
        self.assertGreaterEqual(need, 3 * GiB + 512 * MiB)
        self.assertLess(need, 3 * GiB + 600 * MiB)
        self.assertIsNone(sim.router.load_time("e"))
        self.assertAlmostEqual(sim.router.memory.expected_load_time(sim.router._slots["e"]), 1 + 3 * GiB / 2e9)

    def test_python_launcher_module_is_not_the_model(self):
        """``python -m launcher --model FILE``: the interpreter's -m names a module; FILE is the model."""
        path = temp_path(self)
        write_sparse_gguf(path, GiB)
        model = mm("e", None, argv=(os.sys.executable, "-m", "some.launcher", "--model", path))
        sim = Sim([model], memory_overhead=0)
        need, source = sim.router.memory_need("e")
        self.assertEqual(source, "estimated")
        self.assertLess(abs(need - GiB), MiB)

    def test_unknown_need_is_the_whole_budget(self):
        """Nothing known: the model counts as needing the whole budget and runs alone."""
        sim = Sim([mm("a"), mm("u", None)])
        self.assertEqual(sim.router.memory_need("u"), (12 * GiB, "unknown"))
        sim.request("a", 0)
        sim.request("u", 5)
        sim.run(12)
        self.assertEqual(sim.running(), ["u"])
        self.assertEqual(sim.stops(), [("a", "swap", "memory")])


class NoLoopTests(SynchronousTestCase):
    def test_no_evict_reload_loop(self):
        """Two models that fit together serve interleaved traffic with one load each; a third
        evicts one once; once the traffic ends nothing more is started or stopped."""
        sim = Sim([mm("a", 6), mm("b", 6), mm("c", 6)])
        for i in range(120):
            sim.request("ab"[i % 2], i * 0.5, duration=0.3)
        sim.run(30)
        self.assertEqual(sim.spawns(), ["a", "b"])
        sim.request("c", 61)
        sim.run(70)
        spawns, stops = len(sim.spawns()), len(sim.stops())
        self.assertLessEqual(spawns, 4)
        self.assertLessEqual(stops, 2)
        sim.run(700)
        self.assertEqual((len(sim.spawns()), len(sim.stops())), (spawns, stops))
        self.assertTrue(all(r.done is not None for r in sim.requests))
        self.assertEqual(sim.violations, [])


class GroupTests(SynchronousTestCase):
    def test_groups_apply_first_then_memory_persistent_never_evicted(self):
        """A swap group still runs one member at a time though there is room (cause group); a
        persistent group's model is never evicted for memory."""
        groups = {"pair": GroupConfig("pair", swap=True, exclusive=False, members=("x", "y")),
                  "keep": GroupConfig("keep", swap=False, exclusive=False, persistent=True, members=("e",))}
        sim = Sim([mm("a"), mm("b", 8), mm("e"), mm("x"), mm("y")], budget=16 * GiB, groups=groups)
        for i, x in enumerate("eax"):
            sim.request(x, i * 5.0)
        sim.run(20)
        self.assertEqual(sim.running(), ["a", "e", "x"])
        sim.request("y", 20)
        sim.run(25)
        self.assertEqual(sim.stops(), [("x", "swap", "group")])
        self.assertEqual(sim.running(), ["a", "e", "y"])
        sim.request("b", 30)  # 8 GiB: e + a + y = 12 GiB, one of a, y goes, never e
        sim.run(40)
        [(evicted, _, cause)] = sim.stops()[1:]
        self.assertIn(evicted, ("a", "y"))
        self.assertEqual(cause, "memory")
        self.assertIn("e", sim.running())
        self.assertEqual(sim.metric("llamaswap_evictions_total", model="x", reason="group"), 1)
        self.assertEqual(sim.violations, [])


class MeasurementTests(SynchronousTestCase):
    def test_measured_on_ready_then_every_interval_into_the_needbook(self):
        """Measured when ready and every 15 s; the largest is kept and saved; it replaces the
        unknown need; measuring stops with the model."""
        path = temp_path(self)
        book = NeedBook.load(path)
        model = mm("a", None)
        sim = Sim([model], needs=book)
        sim.rss["a"] = 3 * GiB
        sim.request("a", 0)
        sim.run(3)
        [(t, _)] = sim.measured
        assert_near(self, t, 2.0, 2 * STEP)
        self.assertEqual(book.get(model.cmd), 3 * GiB)
        with open(path) as f:
            self.assertEqual(json.load(f)["needs"], {model.cmd: 3 * GiB})
        self.assertEqual(sim.router.memory_need("a"), (3 * GiB, "measured"))
        sim.rss["a"] = 5 * GiB + 1
        sim.run(2 + MEASURE_INTERVAL + 1)
        self.assertEqual(book.get(model.cmd), 5 * GiB + MiB)  # rounded up to a MiB
        sim.rss["a"] = GiB  # smaller: the largest stays
        sim.run(2 + 2 * MEASURE_INTERVAL + 1)
        self.assertEqual(book.get(model.cmd), 5 * GiB + MiB)
        self.assertEqual(NeedBook.load(path).get(model.cmd), 5 * GiB + MiB)
        self.assertEqual(sim.metric("llamaswap_model_memory_bytes", model="a", source="measured"), 5 * GiB + MiB)
        self.assertIsNone(sim.metric("llamaswap_model_memory_bytes", model="a", source="unknown"))
        sim.router.unload()
        sim.run(40)
        count = len(sim.measured)
        sim.run(200)
        self.assertEqual(len(sim.measured), count)
        self.assertEqual(sim.metric("llamaswap_evictions_total", model="a", reason="unload"), 1)

    def test_out_of_memory_start_raises_the_need(self):
        """A start failing with out-of-memory lines raises the measured need to at least the failed
        allocation (and by 25% at least; by 25% when no amount is printed)."""
        model = mm("a", None)
        book = NeedBook(None, {model.cmd: 4 * GiB})
        sim = Sim([model], needs=book)
        sim.oom["a"] = (b"ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9000.00 MiB on device 0: "
                        b"cudaMalloc failed: out of memory\n")
        req = sim.request("a", 0)
        sim.run(3)
        self.assertIsInstance(req.error, UpstreamStartFailed)
        self.assertEqual(sim.router.memory_need("a"), (9000 * MiB, "measured"))
        self.assertTrue(sim.log_lines("out of memory while starting"))
        sim.oom["a"] = b"llama_model_load: error loading model: unable to allocate backend buffer\n"
        sim.request("a", 5)
        sim.run(8)
        self.assertEqual(sim.router.memory_need("a")[0], -(-int(9000 * MiB * 1.25) // MiB) * MiB)
        sim.oom["a"] = b"llama_model_load: error loading model: something else\n"
        before = sim.router.memory_need("a")
        sim.request("a", 10)
        sim.run(13)
        self.assertEqual(sim.router.memory_need("a"), before)

    def test_out_of_memory_beyond_the_budget_refuses_the_next_request(self):
        """Once the raised need exceeds the budget, the next request is refused at once."""
        model = mm("a", None)
        sim = Sim([model], needs=NeedBook(None, {model.cmd: 10 * GiB}))
        sim.oom["a"] = b"out of memory\n"
        sim.request("a", 0)
        sim.run(2)
        self.assertEqual(sim.router.memory_need("a"), (int(12.5 * GiB), "measured"))
        again = sim.request("a", 3)
        sim.run(4)
        self.assertIsInstance(again.error, InsufficientMemory)
        self.assertEqual(sim.spawns(), ["a"])


class EventTests(SynchronousTestCase):
    def test_memory_changed_events(self):
        """MemoryChanged at start and when the use changes, with every model's need."""
        sim = Sim([mm("a"), mm("b", 2)])
        first = [e for e in sim.emitted if isinstance(e, MemoryChanged)]
        self.assertEqual(first, [MemoryChanged(12 * GiB, 0, (("a", 4 * GiB, "declared"),
                                                             ("b", 2 * GiB, "declared")))])
        sim.request("a", 0)
        sim.run(3)
        last = [e for e in sim.emitted if isinstance(e, MemoryChanged)][-1]
        self.assertEqual(last.used, 4 * GiB)


def temp_path(case: SynchronousTestCase) -> str:
    """A path in a fresh directory removed after the test."""
    directory = tempfile.mkdtemp(prefix="llamaswap-memory-")
    case.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, "file")


def assert_near(case: SynchronousTestCase, got: float, expected: float, tolerance: float) -> None:
    case.assertLessEqual(abs(got - expected), tolerance, f"{got} is not within {tolerance} of {expected}")


def write_sparse_gguf(path: str, size: int) -> None:
    """A valid GGUF header in a sparse file of ``size`` bytes (the estimate sums file sizes)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_head_count(1)
    w.add_context_length(16)
    w.add_embedding_length(8)
    w.add_tensor("t", np.zeros(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.truncate(path, size)
