"""UpstreamProcess: spawn, health check, start failures, stop (PROC-1..PROC-10, PROC-13).

Everything runs on a ``FakeProcessReactor``: no real process, signal or sleep.
"""
from __future__ import annotations

import os
import shutil
import signal
import stat
import tempfile

from twisted.internet.defer import CancelledError, succeed
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from llamaswap.errors import UpstreamStartFailed
from llamaswap.ports import Holder, Ownership
from llamaswap.process import (
    HEALTH_INTERVAL, State, UpstreamProcess, _session_prefix, process_start_time)
from tests.factories import make_model
from tests.fakes import (
    EXE, FakeLogs, FakePool, FakeProcessReactor, HealthChecks, capture_logger,
    exit_failure)

TERM, KILL = signal.SIGTERM, signal.SIGKILL


class ProcessCase(SynchronousTestCase):
    """Builds an ``UpstreamProcess`` on fakes; checks that no timer is left behind."""

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.checks = HealthChecks()
        self.logs = FakeLogs()
        self.events: list = []
        self.transitions: list = []
        self.spawns: list = []
        self.reaps: list = []
        self.pools: list = []
        self.http = object()

    def make(self, ports=None, **model_kw) -> UpstreamProcess:
        model_kw.setdefault("id", "m")
        model_kw.setdefault("health_check_timeout", 15)
        self.model = make_model(**model_kw)

        def http_factory(reactor):
            pool = FakePool()
            self.pools.append(pool)
            return self.http, pool

        self.proc = UpstreamProcess(
            model=self.model, reactor=self.reactor, clock=self.reactor, logs=self.logs,
            on_transition=lambda p, old, new: self.transitions.append((old.value, new.value)),
            on_spawn=lambda p: self.spawns.append(p.pid), on_reap=lambda p: self.reaps.append(p.pid),
            http_factory=http_factory, check=self.checks, kill=self.reactor.killpg,
            group_alive=self.reactor.group_alive, ports=ports, log=capture_logger(self.events))
        return self.proc

    @property
    def child(self):
        return self.reactor.spawned[-1]

    def start_ready(self, **model_kw) -> UpstreamProcess:
        proc = self.make(**model_kw)
        d = proc.start()
        self.checks.answer(200)
        self.successResultOf(d)
        self.assertIs(proc.state, State.READY)
        return proc

    def tmpdir(self) -> str:
        path = tempfile.mkdtemp(prefix="llamaswap-test-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def assertNoTimers(self) -> None:
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def assertStarted(self, d, proc: UpstreamProcess, checks: int | None = None) -> None:
        """The start ``d`` has fired with ``proc`` ready, after ``checks`` health probes (when
        given), and no timer is left."""
        self.successResultOf(d)
        self.assertIs(proc.state, State.READY)
        if checks is not None:
            self.assertEqual(self.checks.count, checks)
        self.assertNoTimers()

    def assertStartFailed(self, d, message: str | None = None) -> UpstreamStartFailed:
        """The start ``d`` has failed with UpstreamStartFailed (saying ``message``, when given)."""
        error = self.failureResultOf(d, UpstreamStartFailed).value
        if message is not None:
            self.assertEqual(error.message, message)
        return error

    def assertStopped(self, proc: UpstreamProcess) -> None:
        """``proc`` is stopped and no timer is left."""
        self.assertIs(proc.state, State.STOPPED)
        self.assertNoTimers()

    def messages(self, level=None) -> list[str]:
        return [formatEvent(e) for e in self.events if level is None or e["log_level"] is level]


class SpawnTests(ProcessCase):
    def test_argv_has_session_prefix(self):
        """PROC-2: the child runs through setsid (its own session and process group)."""
        proc = self.make(argv=(EXE, "-c", "serve"))
        proc.start()
        prefix = _session_prefix()
        self.assertEqual(self.child.executable, prefix[0])
        self.assertEqual(self.child.args, [*prefix, EXE, "-c", "serve"])
        self.assertTrue(os.path.basename(prefix[0]) == "setsid" or "os.setsid()" in " ".join(prefix))

    def test_argv0_looked_up_in_child_path(self):
        """CMD-5: argv[0] without '/' is found in the PATH of the child's environment."""
        tmp = self.tmpdir()
        exe = os.path.join(tmp, "my-server")
        with open(exe, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(exe, stat.S_IRWXU)
        proc = self.make(argv=("my-server", "--port", "1"), env=(("PATH", tmp),))
        proc.start()
        self.assertEqual(self.child.args[-3:], [exe, "--port", "1"])

    def test_env_merges_model_env_over_os_environ(self):
        """PROC-2/CFG-34: the child's environment is the daemon's plus the model's env."""
        self.patch(os, "environ", {**os.environ, "KEEP": "daemon", "OVERRIDE": "daemon"})
        proc = self.make(env=(("OVERRIDE", "model"), ("EXTRA", "1")))
        proc.start()
        env = self.child.env
        self.assertEqual(env["KEEP"], "daemon")
        self.assertEqual(env["OVERRIDE"], "model")
        self.assertEqual(env["EXTRA"], "1")
        self.assertEqual(env["PATH"], os.environ["PATH"])

    def test_stdin_is_devnull_and_outputs_are_pipes(self):
        """PROC-2: childFDs = {0: /dev/null, 1: 'r', 2: 'r'}."""
        self.make().start()
        fds = self.child.childFDs
        self.assertEqual(set(fds), {0, 1, 2})
        self.assertEqual((fds[1], fds[2]), ("r", "r"))
        self.assertIsInstance(fds[0], int)
        self.assertEqual(self.child.fd_targets[0], os.devnull)

    def test_output_goes_to_model_log_unchanged(self):
        """LOG-3: both stdout and stderr go to the model's log byte-for-byte."""
        self.make().start()
        self.child.output(b"out \xff\r\n", fd=1)
        self.child.output(b"err", fd=2)
        self.assertEqual(self.logs.data("m"), b"out \xff\r\nerr")

    def test_spawn_reported_and_pid_known(self):
        """on_spawn sees the pid (PROC-14 state file); the state is starting."""
        proc = self.make()
        proc.start()
        self.assertEqual(self.spawns, [self.child.pid])
        self.assertEqual(proc.pid, self.child.pid)
        self.assertEqual(self.transitions, [("stopped", "starting")])


class HealthCheckTests(ProcessCase):
    def test_first_check_without_delay(self):
        """PROC-4: the first probe is sent at once, at <proxy><checkEndpoint>."""
        proc = self.make(proxy="http://127.0.0.1:5800/base/", check_endpoint="/health")
        proc.start()
        self.assertEqual(self.checks.count, 1)
        http, url, _ = self.checks.calls[0]
        self.assertIs(http, self.http)
        self.assertEqual(url, b"http://127.0.0.1:5800/base/health")

    def test_next_check_100ms_after_previous_ends(self):
        """PROC-4: a failed attempt is followed by the next one 100 ms after it ended."""
        self.make().start()
        self.reactor.advance(1.0)  # the first attempt takes 1 s
        self.assertEqual(self.checks.count, 1)
        self.checks.answer(503)
        self.reactor.advance(0.05)
        self.assertEqual(self.checks.count, 1)
        self.reactor.advance(0.05)
        self.assertEqual(self.checks.count, 2)
        self.assertEqual(HEALTH_INTERVAL, 0.1)

    def test_ready_only_on_exactly_200(self):
        """PROC-4: 201, 204, 503 or a refused connection mean 'not yet'; 200 means ready."""
        proc = self.make()
        d = proc.start()
        for status in (503, 201, 204):
            self.checks.answer(status)
            self.assertIs(proc.state, State.STARTING)
            self.reactor.advance(0.1)
        self.checks.refuse()
        self.assertIs(proc.state, State.STARTING)
        self.reactor.advance(0.1)
        self.assertNoResult(d)
        self.checks.answer(200)
        self.assertStarted(d, proc, checks=5)

    def test_ready_since_and_transitions(self):
        """PROC-1: stopped -> starting -> ready, ready_since is the time of readiness."""
        proc = self.make()
        proc.start()
        self.reactor.advance(3)
        self.checks.answer(200)
        self.assertEqual(proc.ready_since, 3)
        self.assertEqual(self.transitions, [("stopped", "starting"), ("starting", "ready")])
        self.assertIn("m: stopped -> starting", self.messages(LogLevel.info))

    def test_output_while_starting_triggers_immediate_check(self):
        """[B] Output while waiting for the next tick probes at once."""
        self.make().start()
        self.checks.answer(503)
        self.assertEqual(self.checks.count, 1)
        self.child.output(b"main: server is listening on http://127.0.0.1:5800\n")
        self.assertEqual(self.checks.count, 2)
        self.checks.answer(200)
        self.assertIs(self.proc.state, State.READY)
        self.assertNoTimers()

    def test_output_during_probe_does_not_start_a_second_probe(self):
        """Only one probe is in flight at a time."""
        self.make().start()
        self.child.output(b"loading\n")
        self.assertEqual(len(self.checks.pending()), 1)

    def test_check_endpoint_none_ready_at_spawn(self):
        """PROC-4: with checkEndpoint none the model is ready as soon as the spawn succeeds."""
        proc = self.make(check_endpoint=None)
        self.assertStarted(proc.start(), proc, checks=0)

    def test_start_when_ready_succeeds_at_once(self):
        """A start on a ready model fires at once and spawns nothing."""
        proc = self.start_ready()
        self.successResultOf(proc.start())
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_default_probe_uses_http_client(self):
        """Without check=, the probe is a GET through the child's own HTTP client."""
        from tests.fakes import upstream_client

        statuses = [503, 200]
        seen = []

        class Health(Resource):
            isLeaf = True

            def render_GET(self, request):
                seen.append(request.path)
                request.setResponseCode(statuses.pop(0))
                return b"{}"

        client, agent = upstream_client(Health())
        model = make_model(id="m")
        proc = UpstreamProcess(
            model=model, reactor=self.reactor, clock=self.reactor, logs=self.logs,
            http_factory=lambda r: (client, FakePool()), kill=self.reactor.killpg,
            group_alive=self.reactor.group_alive, log=capture_logger(self.events))
        d = proc.start()
        agent.flush()
        self.assertEqual(seen, [b"/health"])
        self.assertIs(proc.state, State.STARTING)
        self.reactor.advance(0.1)
        agent.flush()
        self.assertEqual(seen, [b"/health", b"/health"])
        self.assertStarted(d, proc)


class StartFailureTests(ProcessCase):
    def test_health_timeout_fails_start_with_tail_then_stops(self):
        """PROC-6/7/9: timeout message + last output; group gets TERM, then KILL after the grace."""
        proc = self.make(health_check_timeout=15, unload_timeout=7)
        d = proc.start()
        self.child.output(b"line 1\nline 2\n")
        self.checks.answer(503)
        # answer every later probe with 503, at once
        self.checks.calls.clear()
        proc.check = lambda http, url: succeed(503)
        self.reactor.advance(14.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        f = self.failureResultOf(d, UpstreamStartFailed)
        self.assertEqual(
            f.value.message,
            "failed to start model 'm': health check did not pass within 15s; last output:\nline 1\nline 2")
        self.assertEqual(f.value.status, 502)
        self.assertEqual(f.value.code, "upstream_start_failed")
        self.assertIs(proc.state, State.STOPPING)
        pid = self.child.pid
        self.assertEqual(self.reactor.signals_to(pid), [TERM])
        self.reactor.advance(6.9)
        self.assertEqual(self.reactor.signals_to(pid), [TERM])
        self.reactor.advance(0.1)
        self.assertEqual(self.reactor.signals_to(pid), [TERM, KILL])
        self.child.exit(sig=KILL)
        self.assertIs(proc.state, State.STOPPED)
        self.assertEqual(proc.last_error, f.value.message)
        self.assertIn(f.value.message, self.messages(LogLevel.error))
        self.assertNoTimers()

    def test_exit_during_start_fails_at_once(self):
        """PROC-5: an exit while starting fails the start at once with the exit code."""
        proc = self.make()
        d = proc.start()
        self.child.output(b"error loading model\n")
        self.child.leader_exit(code=1)
        self.assertStartFailed(
            d, "failed to start model 'm': exited with code 1; last output:\nerror loading model")
        self.child.pipes_closed(code=1)
        self.assertStopped(proc)

    def test_killed_during_start_names_the_signal(self):
        """PROC-5: a signal death reads 'killed by signal SIGKILL'; no output, no suffix (PROC-7)."""
        proc = self.make()
        d = proc.start()
        self.child.exit(sig=KILL)
        self.assertStartFailed(d, "failed to start model 'm': killed by signal SIGKILL")
        self.assertStopped(proc)

    def test_exit_during_start_kills_rest_of_group(self):
        """PROC-5: members left in the group get SIGKILL; the stop completes once it is empty."""
        proc = self.make()
        d = proc.start()
        pid = self.child.pid
        self.reactor.lingering[pid] = 1
        self.child.exit(code=2)
        self.assertStartFailed(d)
        self.assertIn(KILL, self.reactor.signals_to(pid))
        self.assertStopped(proc)

    def test_tail_is_last_10_lines_of_this_attempt(self):
        """PROC-7: at most the last 10 lines, only from this attempt."""
        proc = self.make()
        d = proc.start()
        self.child.output(b"first attempt\n")
        self.child.exit(code=1)
        self.failureResultOf(d)
        d = proc.start()
        self.child.output(b"".join(b"line %d\n" % i for i in range(15)))
        self.child.exit(code=1)
        message = self.failureResultOf(d).value.message
        tail = message.split("; last output:\n", 1)[1]
        self.assertEqual(tail.split("\n"), [f"line {i}" for i in range(5, 15)])
        self.assertNotIn("first attempt", message)

    def test_tail_at_most_2kib(self):
        """PROC-7: the tail is 2 KiB at most."""
        proc = self.make()
        d = proc.start()
        self.child.output(b"x" * 5000 + b"\n")
        self.child.exit(code=1)
        tail = self.failureResultOf(d).value.message.split("; last output:\n", 1)[1]
        self.assertLessEqual(len(tail.encode()), 2048)
        self.assertTrue(tail)

    def test_missing_executable_fails_at_once_and_later_start_works(self):
        """PROC-3/PROC-8: spawn failure -> failed start, back to stopped; a later start is fresh."""
        tmp = self.tmpdir()
        exe = os.path.join(tmp, "llama-server")
        proc = self.make(argv=(exe, "--port", "1"))
        d = proc.start()
        f = self.failureResultOf(d, UpstreamStartFailed)
        self.assertTrue(f.value.message.startswith("failed to start model 'm': "), f.value.message)
        self.assertIn("No such file", f.value.message)
        self.assertIs(proc.state, State.STOPPED)
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual(self.transitions, [("stopped", "starting"), ("starting", "stopped")])
        self.assertNoTimers()
        with open(exe, "w") as fh:
            fh.write("#!/bin/sh\n")
        os.chmod(exe, stat.S_IRWXU)
        d = proc.start()
        self.assertIs(proc.state, State.STARTING)
        self.checks.answer(200)
        self.successResultOf(d)
        self.assertIsNone(proc.last_error)

    def test_spawn_oserror_fails_start(self):
        """PROC-3: spawnProcess raising OSError (fork path) is a failed start too."""
        proc = self.make()
        self.reactor.spawn_error = PermissionError(13, "Permission denied")
        self.assertStartFailed(proc.start(), "failed to start model 'm': Permission denied")
        self.assertStopped(proc)

    def test_failed_start_then_fresh_start(self):
        """PROC-8: after an exit during start, the next start spawns a new child."""
        proc = self.make()
        d = proc.start()
        self.checks.answer(503)
        self.child.exit(code=1)
        self.failureResultOf(d, UpstreamStartFailed)
        d = proc.start()
        self.assertEqual(len(self.reactor.spawned), 2)
        self.checks.answer(200)
        self.successResultOf(d)

    def test_every_waiter_gets_the_same_failure(self):
        """SCHED-9 at the process level: all start waiters fail with one message."""
        proc = self.make()
        a, b = proc.start(), proc.start()
        self.child.exit(code=3)
        fa = self.failureResultOf(a, UpstreamStartFailed)
        fb = self.failureResultOf(b, UpstreamStartFailed)
        self.assertEqual(fa.value.message, fb.value.message)


class StopTests(ProcessCase):
    def test_stop_terms_group_kills_after_grace(self):
        """PROC-9: SIGTERM to the group, SIGKILL when the grace period ends."""
        proc = self.start_ready(unload_timeout=4)
        pid = self.child.pid
        d = proc.stop()
        self.assertIs(proc.state, State.STOPPING)
        self.assertEqual(self.reactor.kills, [(pid, TERM)])
        self.reactor.advance(3.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertEqual(self.reactor.kills, [(pid, TERM), (pid, KILL)])
        self.assertNoResult(d)
        self.child.exit(sig=KILL)
        self.successResultOf(d)
        self.assertIs(proc.state, State.STOPPED)
        self.assertIsNone(proc.pid)
        self.assertEqual(self.reaps, [pid])
        self.assertEqual(self.pools[0].closed, 1)
        self.assertNoTimers()

    def test_stop_after_term_exit_has_no_kill_timer_left(self):
        """A child that exits on SIGTERM: stop completes, the KILL timer is cancelled."""
        proc = self.start_ready()
        d = proc.stop()
        self.child.exit(code=0)
        self.successResultOf(d)
        self.assertNotIn(KILL, self.reactor.signals_to(self.child.pid)[:1])
        self.assertNoTimers()

    def test_stop_completes_only_when_group_empty(self):
        """PROC-9 (4): the leader exiting is not enough; the group must be empty."""
        proc = self.start_ready()
        pid = self.child.pid
        self.reactor.sticky.add(pid)  # a member that outlives even SIGKILL for a while
        d = proc.stop()
        self.child.exit(code=0)
        self.assertIn(KILL, self.reactor.signals_to(pid))  # leader gone: KILL the rest
        self.assertNoResult(d)
        self.assertIs(proc.state, State.STOPPING)
        self.reactor.advance(0.05)
        self.assertNoResult(d)
        self.reactor.sticky.discard(pid)
        self.reactor.advance(0.05)
        self.successResultOf(d)
        self.assertStopped(proc)

    def test_leader_exit_kills_lingering_members(self):
        """PROC-9 (3): once the leader exits, the rest of the group gets SIGKILL."""
        proc = self.start_ready()
        pid = self.child.pid
        self.reactor.lingering[pid] = 2
        d = proc.stop()
        self.child.exit(code=0)
        self.assertEqual(self.reactor.signals_to(pid)[:2], [TERM, KILL])
        self.successResultOf(d)
        self.assertNoTimers()

    def test_processEnded_without_processExited(self):
        """A processEnded alone still completes the stop."""
        proc = self.start_ready()
        d = proc.stop()
        self.child.pipes_closed(code=0)
        self.successResultOf(d)
        self.assertStopped(proc)

    def test_concurrent_stops_share_one(self):
        """PROC-9: concurrent stop requests share one stop (one SIGTERM)."""
        proc = self.start_ready()
        a, b = proc.stop(), proc.stop()
        self.assertEqual(self.reactor.signals_to(self.child.pid), [TERM])
        self.assertNoResult(a)
        self.assertNoResult(b)
        self.child.exit()
        self.successResultOf(a)
        self.successResultOf(b)
        self.assertNoTimers()

    def test_stop_when_stopped_completes_at_once(self):
        """PROC-9: a stop on a stopped model completes at once."""
        proc = self.make()
        self.successResultOf(proc.stop())
        self.assertEqual(self.reactor.kills, [])

    def test_cmd_stop_with_pid(self):
        """PROC-9 (1): cmdStop runs with ${PID} replaced, instead of SIGTERM."""
        proc = self.start_ready(cmd_stop_argv=(EXE, "-c", "stop", "--pid=${PID}", "${PID}"),
                                env=(("X", "1"),))
        leader = self.child
        d = proc.stop()
        self.assertEqual(len(self.reactor.spawned), 2)
        stopper = self.reactor.spawned[1]
        self.assertEqual(stopper.args[-4:], ["-c", "stop", f"--pid={leader.pid}", str(leader.pid)])
        self.assertEqual(stopper.env["X"], "1")
        self.assertEqual(self.reactor.signals_to(leader.pid), [])
        stopper.output(b"stopping\n")
        self.assertIn(b"stopping\n", self.logs.data("m"))
        stopper.exit(code=0)
        self.assertEqual(self.reactor.signals_to(leader.pid), [])
        leader.exit(code=0)
        self.successResultOf(d)
        self.assertNoTimers()

    def test_cmd_stop_failure_falls_back_to_term(self):
        """PROC-9 (1): cmdStop exiting non-zero logs a WARN and SIGTERMs the group."""
        proc = self.start_ready(cmd_stop_argv=(EXE, "-c", "stop"))
        leader = self.child
        d = proc.stop()
        self.reactor.spawned[1].exit(code=1)
        self.assertEqual(self.reactor.signals_to(leader.pid), [TERM])
        self.assertTrue(any("cmdStop failed" in m for m in self.messages(LogLevel.warn)))
        leader.exit()
        self.successResultOf(d)
        self.assertNoTimers()

    def test_cmd_stop_not_spawnable_falls_back_to_term(self):
        """PROC-9 (1): a cmdStop that cannot be spawned logs a WARN and SIGTERMs the group."""
        proc = self.start_ready(cmd_stop_argv=("/nonexistent/stopper", "${PID}"))
        leader = self.child
        d = proc.stop()
        self.assertEqual(self.reactor.signals_to(leader.pid), [TERM])
        self.assertTrue(any("cmdStop could not be run" in m for m in self.messages(LogLevel.warn)))
        leader.exit()
        self.successResultOf(d)
        self.assertNoTimers()

    def test_cmd_stop_still_running_at_grace_end_is_killed(self):
        """PROC-9 (3): cmdStop's process is SIGKILLed too when the grace period ends."""
        proc = self.start_ready(cmd_stop_argv=(EXE, "-c", "stop"), unload_timeout=2)
        leader = self.child
        d = proc.stop()
        stopper = self.reactor.spawned[1]
        self.reactor.advance(2)
        self.assertIn((leader.pid, KILL), self.reactor.kills)
        self.assertIn((stopper.pid, KILL), self.reactor.kills)
        stopper.exit(sig=KILL)
        leader.exit(sig=KILL)
        self.successResultOf(d)
        self.assertNoTimers()

    def test_stop_during_starting_aborts_start(self):
        """PROC-13: a stop during starting fails the start and stops the child."""
        proc = self.make()
        start = proc.start()
        stop = proc.stop()
        self.failureResultOf(start, UpstreamStartFailed)
        self.assertIs(proc.state, State.STOPPING)
        self.assertEqual(self.reactor.signals_to(self.child.pid), [TERM])
        self.checks.answer(200)  # a probe answering late changes nothing
        self.assertIs(proc.state, State.STOPPING)
        self.child.exit()
        self.successResultOf(stop)
        self.assertStopped(proc)

    def test_restart_after_stop_with_probe_still_pending(self):
        """PROC-4/PROC-8: a new start probes at once even if the last attempt's probe never answered."""
        proc = self.make()
        start = proc.start()
        stop = proc.stop()  # the first probe is still in flight (it times out after 2 s)
        self.failureResultOf(start, UpstreamStartFailed)
        self.child.exit()
        self.successResultOf(stop)
        before = self.checks.count
        d = proc.start()
        self.assertEqual(self.checks.count, before + 1,
                         "the new start must send its own first probe at once")
        # the old probe ends (e.g. its 2 s timeout); the new start must still become ready
        self.checks.calls[0][2].callback(None)
        for _, _, pending in self.checks.calls[1:]:
            if not pending.called:
                pending.callback(200)
        self.reactor.advance(0.1)
        for _, _, pending in self.checks.calls[1:]:
            if not pending.called:
                pending.callback(200)
        self.successResultOf(d)

    def test_restart_after_exit_with_probe_still_pending(self):
        """PROC-5/PROC-8: after an exit during start, a new start probes at once and can get ready."""
        proc = self.make()
        first = proc.start()
        self.child.exit(code=1)  # the child dies while its first probe is in flight
        self.failureResultOf(first, UpstreamStartFailed)
        d = proc.start()
        self.assertEqual(len(self.checks.pending()), 2,
                         "the new start must send its own first probe at once")
        self.checks.calls[0][2].callback(None)  # the old probe is refused at last
        self.reactor.advance(0.1)
        for pending in self.checks.pending():
            pending.callback(200)
        self.successResultOf(d)

    def test_cancelled_start_waiter_keeps_start(self):
        """SCHED-8: a caller giving up does not stop the start for the others."""
        proc = self.make()
        a, b = proc.start(), proc.start()
        self.assertEqual(len(self.reactor.spawned), 1)
        a.cancel()
        self.failureResultOf(a, CancelledError)
        self.assertNoResult(b)
        self.assertIs(proc.state, State.STARTING)
        self.checks.answer(200)
        self.successResultOf(b)

    def test_all_waiters_cancelled_start_still_completes(self):
        """SCHED-8: a start that has begun runs to completion whoever leaves."""
        proc = self.make()
        a = proc.start()
        a.cancel()
        self.failureResultOf(a, CancelledError)
        self.checks.answer(200)
        self.assertIs(proc.state, State.READY)

    def test_unexpected_exit_while_ready(self):
        """PROC-10: WARN, SIGKILL the rest of the group, go to stopped; no restart."""
        proc = self.start_ready()
        pid = self.child.pid
        self.reactor.lingering[pid] = 1
        self.child.exit(code=137)
        self.assertIn(KILL, self.reactor.signals_to(pid))
        self.assertIs(proc.state, State.STOPPED)
        self.assertIn("m exited unexpectedly (code 137)", self.messages(LogLevel.warn))
        self.assertEqual(len(self.reactor.spawned), 1)
        self.assertNoTimers()

    def test_shutdown_is_terminal(self):
        """PROC-1: shutdown stops the child and ends in the terminal shutdown state."""
        proc = self.start_ready()
        d = proc.shutdown()
        self.child.exit()
        self.successResultOf(d)
        self.assertIs(proc.state, State.SHUTDOWN)
        self.assertEqual(self.transitions[-2:], [("stopping", "stopped"), ("stopped", "shutdown")])
        self.assertNoTimers()

    def test_shutdown_when_stopped(self):
        """stopped -> shutdown directly."""
        proc = self.make()
        self.successResultOf(proc.shutdown())
        self.assertIs(proc.state, State.SHUTDOWN)

    def test_old_generation_events_ignored(self):
        """A late processEnded from a previous child does not touch the new one."""
        proc = self.make()
        d = proc.start()
        old = self.child
        self.checks.answer(503)
        old.exit(code=1)
        self.failureResultOf(d)
        d2 = proc.start()
        self.assertIsNot(self.child, old)
        old.proto.processExited(exit_failure(1))
        old.proto.processEnded(exit_failure(1))
        self.assertIs(proc.state, State.STARTING)
        self.checks.answer(200)
        self.successResultOf(d2)
        self.assertNoTimers()


class TransitionTests(ProcessCase):
    def test_exit_during_start_goes_starting_to_stopped(self):
        """PROC-1: exit during start is starting -> stopped (the group being empty)."""
        proc = self.make()
        d = proc.start()
        self.child.exit(code=1)
        self.failureResultOf(d, UpstreamStartFailed)
        self.assertEqual(self.transitions, [("stopped", "starting"), ("starting", "stopped")])

    def test_unexpected_exit_goes_ready_to_stopped(self):
        """PROC-1/PROC-10: an unexpected exit is ready -> stopped (the group being empty)."""
        self.start_ready()
        self.child.exit(code=1)
        self.assertEqual(self.transitions[2:], [("ready", "stopped")])

    def test_illegal_transitions_raise(self):
        """PROC-1: only the listed transitions are allowed."""
        proc = self.make()
        for new in (State.READY, State.STOPPING, State.STOPPED):
            self.assertRaises(RuntimeError, proc._transition, new)
        proc._transition(State.SHUTDOWN)
        for new in State:
            self.assertRaises(RuntimeError, proc._transition, new)

    def test_ready_cannot_go_back_to_starting(self):
        proc = self.start_ready()
        self.assertRaises(RuntimeError, proc._transition, State.STARTING)
        self.assertRaises(RuntimeError, proc._transition, State.SHUTDOWN)

    def test_start_after_shutdown_refused(self):
        """shutdown is terminal: no new start."""
        proc = self.make()
        self.successResultOf(proc.shutdown())
        try:
            d = proc.start()
        except RuntimeError:
            return
        self.failureResultOf(d)
        self.assertEqual(self.reactor.spawned, [])


class FakePorts:
    """A ``ports=`` injection: the test says who holds which port and whose leader exited."""

    def __init__(self) -> None:
        self.holders: dict = {}        # port -> Holder (absent: free)
        self.owners: dict = {}         # port -> (Ownership, Holder or None)
        self.exited: set = set()      # pids whose leader has exited (not yet reaped)
        self.calls: list = []

    def holder(self, port):
        self.calls.append(("holder", port))
        return self.holders.get(port)

    def owner(self, port, pgid):
        self.calls.append(("owner", port, pgid))
        return self.owners.get(port, (Ownership.OWN, None))

    def leader_exited(self, pid):
        self.calls.append(("leader_exited", pid))
        return pid in self.exited


class PortOwnershipTests(ProcessCase):
    """A model is ready only when its own child answers."""

    def setUp(self) -> None:
        super().setUp()
        self.ports = FakePorts()

    def executable(self, name: str) -> str:
        path = os.path.join(self.tmpdir(), name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(path, stat.S_IRWXU)
        return path

    def test_foreign_holder_fails_at_once_without_spawn_or_probe(self):
        """A port held before the start: 502-style failure naming port, pid and command; no probe."""
        self.ports.holders[5800] = Holder(1234, "llama-server --port 5800")
        proc = self.make(ports=self.ports, id="b", proxy="http://127.0.0.1:5800")
        f = self.failureResultOf(proc.start(), UpstreamStartFailed)
        self.assertEqual(f.value.message, "failed to start model 'b': port 5800 is already in use "
                                          "by pid 1234 (llama-server --port 5800)")
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual(self.checks.count, 0)
        self.assertIs(proc.state, State.STOPPED)
        self.assertEqual(self.transitions, [("stopped", "starting"), ("starting", "stopped")])
        self.assertNoTimers()
        del self.ports.holders[5800]   # freed: the next start is a normal one
        d = proc.start()
        self.checks.answer(200)
        self.successResultOf(d)

    def test_port_taken_after_allocation_fails_the_start(self):
        """A ${PORT} port that someone took after the config was loaded fails the same way."""
        self.ports.holders[5801] = Holder()
        proc = self.make(ports=self.ports, proxy="http://localhost:5801", port=5801)
        f = self.failureResultOf(proc.start(), UpstreamStartFailed)
        self.assertEqual(f.value.message, "failed to start model 'm': port 5801 is already in use")
        self.assertEqual(self.checks.count, 0)

    def test_port_checked_on_every_local_address_form(self):
        """0.0.0.0, [::1] and localhost proxies are local: their port is checked."""
        for proxy in ("http://0.0.0.0:5802", "http://[::1]:5802", "http://localhost:5802/base"):
            self.ports.holders[5802] = Holder()
            proc = self.make(ports=self.ports, proxy=proxy)
            self.failureResultOf(proc.start(), UpstreamStartFailed)

    def test_leader_exited_200_is_ignored(self):
        """A 200 while the leader has exited (not yet reaped) does not make the model ready."""
        proc = self.make(ports=self.ports)
        d = proc.start()
        self.ports.exited.add(self.child.pid)
        self.checks.answer(200)
        self.assertIs(proc.state, State.STARTING)
        self.assertNoResult(d)
        self.child.exit(code=1)
        self.assertStartFailed(d, "failed to start model 'm': exited with code 1")
        self.assertNotIn(("starting", "ready"), self.transitions)

    def test_200_after_exit_in_same_turn_is_ignored(self):
        """processExited first, then the probe's 200: the start has failed and stays failed."""
        proc = self.make(ports=self.ports)
        d = proc.start()
        self.child.leader_exit(code=1)
        self.checks.answer(200)
        self.assertStartFailed(d)
        self.assertIsNot(proc.state, State.READY)
        self.child.pipes_closed(code=1)
        self.assertStopped(proc)

    def test_listener_outside_group_fails_and_stops_child(self):
        """/proc shows another process listening: the start fails and our child is stopped."""
        self.ports.owners[5800] = (Ownership.FOREIGN, Holder(77, "python fake_llama_server.py"))
        proc = self.make(ports=self.ports, unload_timeout=3)
        d = proc.start()
        self.checks.answer(200)
        self.assertStartFailed(d, "failed to start model 'm': port 5800 is already in use "
                                  "by pid 77 (python fake_llama_server.py)")
        self.assertIn(("owner", 5800, self.child.pid), self.ports.calls)
        self.assertIs(proc.state, State.STOPPING)
        self.assertEqual(self.reactor.signals_to(self.child.pid), [TERM])
        self.child.exit(sig=TERM)
        self.assertStopped(proc)

    def test_listener_in_group_or_unknown_is_ready(self):
        """OWN, or UNKNOWN (no /proc), lets the 200 through."""
        for verdict in (Ownership.OWN, Ownership.UNKNOWN):
            self.ports.owners[5800] = (verdict, None)
            self.start_ready(ports=self.ports)

    def test_docker_fallback_checks_only_that_port_was_free(self):
        """docker/podman: the listener is dockerd's, so only the free-port check applies."""
        for runner in ("docker", "podman", "nerdctl"):
            self.ports = FakePorts()
            self.ports.owners[5800] = (Ownership.FOREIGN, Holder(1, "docker-proxy"))
            proc = self.make(ports=self.ports, argv=(self.executable(runner), "run", "-p", "5800:8080", "img"))
            d = proc.start()
            self.checks.answer(200)
            self.successResultOf(d)
            self.assertEqual([c[0] for c in self.ports.calls], ["holder", "leader_exited"])
            self.ports.holders[5800] = Holder()
            proc2 = self.make(ports=self.ports, argv=(self.executable(runner), "run"))
            self.failureResultOf(proc2.start(), UpstreamStartFailed)

    def test_cmd_stop_fallback(self):
        """Runner-style models (cmdStop) get the free-port check only."""
        self.ports.owners[5800] = (Ownership.FOREIGN, Holder(1, "runner"))
        proc = self.make(ports=self.ports, cmd_stop_argv=(EXE, "-c", "pass"))
        d = proc.start()
        self.checks.answer(200)
        self.successResultOf(d)
        self.assertNotIn("owner", [c[0] for c in self.ports.calls])

    def test_remote_proxy_checks_only_its_local_port(self):
        """A proxy to another host: no ownership check; its ${PORT} (if any) must be free here."""
        self.ports.owners[8080] = (Ownership.FOREIGN, None)
        proc = self.make(ports=self.ports, proxy="http://192.0.2.1:8080")
        d = proc.start()
        self.checks.answer(200)
        self.successResultOf(d)
        self.assertEqual([c[0] for c in self.ports.calls], ["leader_exited"])
        self.ports.holders[5805] = Holder()
        proc = self.make(ports=self.ports, proxy="http://192.0.2.1:5805", port=5805)
        self.failureResultOf(proc.start(), UpstreamStartFailed)

    def test_check_endpoint_none_gets_free_port_check(self):
        """With checkEndpoint none there is no answer to verify; the port must still be free."""
        self.ports.holders[5800] = Holder(9, "x")
        proc = self.make(ports=self.ports, check_endpoint=None)
        self.failureResultOf(proc.start(), UpstreamStartFailed)
        del self.ports.holders[5800]
        self.successResultOf(self.make(ports=self.ports, check_endpoint=None).start())



class StartTimeTests(SynchronousTestCase):
    """process_start_time reads /proc; it never runs a program."""

    def write_stat(self, pid: int, comm: bytes, fields: list[bytes]) -> str:
        root = tempfile.mkdtemp(prefix="llamaswap-proc-")
        self.addCleanup(shutil.rmtree, root, True)
        os.mkdir(os.path.join(root, str(pid)))
        with open(os.path.join(root, str(pid), "stat"), "wb") as f:
            f.write(b"%d (%s) " % (pid, comm) + b" ".join(fields) + b"\n")
        return root

    def test_field_22_after_an_awkward_command_name(self):
        """The raw starttime (field 22) is read past a command name with spaces and ')'."""
        fields = [b"S"] + [b"%d" % n for n in range(4, 22)] + [b"987654", b"0", b"0"]
        root = self.write_stat(42, b"llama ) server", fields)
        self.assertEqual(process_start_time(42, proc=root), "987654")

    def test_no_proc_gives_none(self):
        """Without /proc (macOS) or without the pid, the start time is unknown: None."""
        root = tempfile.mkdtemp(prefix="llamaswap-proc-")
        self.addCleanup(shutil.rmtree, root, True)
        self.assertIsNone(process_start_time(42, proc=root))
        self.assertIsNone(process_start_time(42, proc=os.path.join(root, "missing")))

    def test_short_stat_gives_none(self):
        """A truncated stat line is not a start time."""
        self.assertIsNone(process_start_time(7, proc=self.write_stat(7, b"x", [b"S", b"1"])))

    def test_own_start_time_is_stable(self):
        """For a live process the value is a decimal string that does not change."""
        if not os.path.isdir("/proc/self"):
            self.skipTest("no /proc")
        first = process_start_time(os.getpid())
        self.assertTrue(first.isdigit(), first)
        self.assertEqual(process_start_time(os.getpid()), first)
