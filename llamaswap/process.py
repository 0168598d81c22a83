"""Supervision of one upstream child process (PROC-*).

``UpstreamProcess`` is an explicit state machine::

    stopped -> starting -> ready -> stopping -> stopped
                  |  \\________________/^        |
                  +-> stopped (spawn failure / exit during start)
    stopped | stopping -> shutdown (terminal, daemon shutdown only)

It knows nothing about groups, queues or HTTP requests: the router decides *when* to
start and stop; this class decides *how* (process groups, health checks, TERM -> KILL).

The module is longer than most (about 600 lines) on purpose: it is one state machine, and
every transition, timer and exit path reads best next to the others.
"""
from __future__ import annotations

import enum
import os
import shutil
import signal
import sys
from typing import TYPE_CHECKING, Any, Callable, Optional

import attr
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamaswap import ports as _ports
from llamaswap.errors import UpstreamStartFailed

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorProcess, IReactorTime

    from llamaswap.config import ModelConfig

#: PROC-4: each health check attempt times out after this long (connect included).
HEALTH_ATTEMPT_TIMEOUT = 2.0
#: PROC-4: the pause between the end of one attempt and the start of the next.
HEALTH_INTERVAL = 0.1
#: How often a stopping model looks for members left in its process group.
GROUP_POLL_INTERVAL = 0.05
#: After SIGKILL, the longest we wait for the group to empty before giving up (zombies
#: of an init that does not reap would otherwise hold the stop forever).
GROUP_KILL_WAIT = 5.0
#: PROC-7: the start failure message carries at most this much of the attempt's output.
TAIL_LINES, TAIL_BYTES = 10, 2048


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    SHUTDOWN = "shutdown"


_ALLOWED = {
    State.STOPPED: {State.STARTING, State.SHUTDOWN},
    State.STARTING: {State.READY, State.STOPPING, State.STOPPED},
    State.READY: {State.STOPPING, State.STOPPED},
    State.STOPPING: {State.STOPPED, State.SHUTDOWN},
    State.SHUTDOWN: set(),
}


def group_alive(pgid: int) -> bool:
    """True while process group ``pgid`` has a member that is not a zombie."""
    if sys.platform.startswith("linux"):
        return _linux_group_alive(pgid)
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _linux_group_alive(pgid: int) -> bool:
    # kill(-pgid, 0) succeeds on zombies too; /proc tells zombies apart.
    try:
        entries = os.listdir("/proc")
    except OSError:
        return False
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2 and fields[0] != b"Z" and int(fields[2]) == pgid:
            return True
    return False


def process_start_time(pid: int, proc: str = "/proc") -> Optional[str]:
    """The OS start time of ``pid`` (PROC-14), or None when it cannot be read.

    It is ``starttime``, field 22 of ``/proc/<pid>/stat``: clock ticks after boot, kept as
    the raw decimal string. It only has to tell two processes with the same pid apart, and
    the raw string is what state files of earlier runs hold, so they still compare equal.

    Without ``/proc`` (macOS) this returns None rather than run ``ps -o lstart=``: it is
    called on the reactor thread at every spawn, and a blocking child there would stall every
    request. An asynchronous ``getProcessOutput`` would not help: the state file is checked
    before the reactor runs, where only a blocking read is possible. With None recorded, the
    next start cannot detect pid reuse: a live recorded daemon counts as in use, and a live
    recorded process group is killed as a leftover (``statefile``).
    """
    try:
        with open(os.path.join(proc, str(pid), "stat"), "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces and ")": skip past the last ")".
    fields = stat[stat.rfind(b")") + 2:].split()
    return fields[19].decode("ascii") if len(fields) > 19 else None


def _session_prefix() -> list[str]:
    """argv prefix that puts the child in its own session/process group (PROC-2).

    On Linux also a parent-death signal, so a SIGKILLed daemon's children do not
    outlive it (PROC-14 stays the backstop for descendants that escape).
    """
    setsid = shutil.which("setsid")
    if setsid is None:  # macOS has no setsid(1)
        return [sys.executable, "-c",
                "import os,sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])"]
    prefix = [setsid]
    setpriv = shutil.which("setpriv")
    if setpriv is not None and sys.platform.startswith("linux"):
        prefix += [setpriv, "--pdeathsig", "TERM", "--"]
    return prefix


def _describe_exit(reason: Failure) -> str:
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        try:
            return f"killed by signal {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exited with code {getattr(value, 'exitCode', None)}"


def _tail(output: bytes) -> str:
    """PROC-7: the last 10 lines (2 KiB at most) of one attempt's output."""
    lines = output.decode("utf-8", "replace").rstrip("\n").splitlines()[-TAIL_LINES:]
    text = "\n".join(line.rstrip("\r") for line in lines)
    if len(text.encode("utf-8")) > TAIL_BYTES:
        text = text.encode("utf-8")[-TAIL_BYTES:].decode("utf-8", "ignore")
    return text


class _UpstreamProtocol(ProcessProtocol):
    """Passes the child's output bytes, unchanged, to its owner."""

    def __init__(self, owner: "UpstreamProcess", generation: int) -> None:
        self._owner = owner
        self._generation = generation

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self._owner._output(data, stream=fd)

    def processExited(self, reason: Failure) -> None:
        self._owner._leader_exited(self._generation, reason)

    def processEnded(self, reason: Failure) -> None:
        self._owner._pipes_closed(self._generation, reason)


class _StopCommandProtocol(ProcessProtocol):
    def __init__(self, owner: "UpstreamProcess") -> None:
        self._owner = owner
        self.ended: Deferred = Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self._owner._output(data, tail=False, stream=f"cmdStop{fd}")

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value)  # the exception, not the Failure: this is a result


@attr.s(eq=False)
class UpstreamProcess:
    """One model's child: spawn, health check, stop with TERM -> KILL.

    :param model: the model's ``ModelConfig``; its ``health_check_timeout`` bounds the start
        (PROC-6).
    :param reactor: an ``IReactorProcess`` (and ``IReactorTCP`` for health checks).
    :param clock: the ``IReactorTime`` for timeouts and polling.
    :param logs: the ``LogBroadcaster``; child output goes there byte-for-byte.
    :param on_transition: called ``(proc, old, new)`` after every state change.
    :param on_spawn / on_reap: called ``(proc)`` for the state file (PROC-14).
    :param http_factory: required, keyword-only: ``(reactor) -> (treq-like client, pool)``
        (``proxy.make_http_client`` in the service); a fresh pool per child lifetime so no
        connection is reused across children (PROXY-10).
    :param check: ``(client, url) -> Deferred[int status]``; the health probe.
    :param ports: port ownership checks (``llamaswap.ports.SystemPorts``: ``holder(port)``,
        ``owner(port, pgid)``, ``leader_exited(pid)``); None turns them off.
    """

    model: ModelConfig = attr.ib()
    reactor: IReactorProcess = attr.ib()
    clock: IReactorTime = attr.ib()
    logs: Any = attr.ib()
    on_transition: Callable = attr.ib(default=lambda proc, old, new: None)
    on_spawn: Callable = attr.ib(default=lambda proc: None)
    on_reap: Callable = attr.ib(default=lambda proc: None)
    # Required, keyword-only: injected by the service, so this module never imports the forwarder.
    http_factory: Callable = attr.ib(kw_only=True)
    check: Optional[Callable] = attr.ib(default=None)
    kill: Callable = attr.ib(default=os.killpg)
    group_alive: Callable = attr.ib(default=group_alive)
    ports: Any = attr.ib(default=None)
    #: ``llamaswap.kvcache.KvCache`` (or None): ``prepare(model)`` before a spawn,
    #: ``after_ready(proc)`` between a passed health check and ``ready``, ``before_stop(proc)``
    #: between a planned stop of a ready child and its SIGTERM; each phase returns None (nothing
    #: to do) or a Deferred that never fails and ends within its own bounds.
    lifecycle: Any = attr.ib(default=None)
    log: Logger = attr.ib(factory=lambda: Logger(namespace="llamaswap.process"))

    state: State = attr.ib(default=State.STOPPED, init=False)
    pid: Optional[int] = attr.ib(default=None, init=False)
    start_time: Optional[str] = attr.ib(default=None, init=False)
    ready_since: Optional[float] = attr.ib(default=None, init=False)
    last_error: Optional[str] = attr.ib(default=None, init=False)
    http: Any = attr.ib(default=None, init=False)
    _pool: Any = attr.ib(default=None, init=False)
    _transport: Any = attr.ib(default=None, init=False)
    _generation: int = attr.ib(default=0, init=False)
    _attempt_output: bytearray = attr.ib(factory=bytearray, init=False)
    _start_waiters: list = attr.ib(factory=list, init=False)
    _stop_waiters: list = attr.ib(factory=list, init=False)
    _timers: dict = attr.ib(factory=dict, init=False)
    _health_d: Optional[Deferred] = attr.ib(default=None, init=False)
    _exit_reason: Optional[Failure] = attr.ib(default=None, init=False)
    _leader_gone: bool = attr.ib(default=False, init=False)
    _pipes_done: bool = attr.ib(default=False, init=False)
    _spawned_at: float = attr.ib(default=0.0, init=False)
    _stop_cmd: Any = attr.ib(default=None, init=False)
    _watch: Optional[_ports.Watch] = attr.ib(default=None, init=False)
    _phase: Optional[Deferred] = attr.ib(default=None, init=False)  # a lifecycle phase under way

    @property
    def id(self) -> str:
        return self.model.id

    # -- public API -------------------------------------------------------------------------

    def start(self) -> Deferred:
        """Start the child (or join the start under way); fire once it is ``ready``.

        Errbacks with ``UpstreamStartFailed`` when the spawn fails, the child exits during
        the start or the health check times out. Each caller gets its own Deferred:
        cancelling it drops only that caller, the start goes on (SCHED-8).
        """
        if self.state is State.READY:
            return succeed(None)
        if self.state is State.STOPPED:
            self._spawn()
            if self.state is State.STOPPED:  # the spawn itself failed (PROC-3)
                return fail(UpstreamStartFailed(self.last_error or f"failed to start model '{self.id}'"))
        if self.state is State.READY:  # checkEndpoint: none
            return succeed(None)
        if self.state is not State.STARTING:
            raise RuntimeError(f"cannot start model '{self.id}' while {self.state.value}")
        if self._leader_gone:  # it already failed; the state follows once the group is gone
            return fail(UpstreamStartFailed(self.last_error or f"failed to start model '{self.id}'"))
        d: Deferred = Deferred(self._start_waiters.remove)
        self._start_waiters.append(d)
        return d

    def stop(self) -> Deferred:
        """Stop the child (PROC-9); fire once the leader is reaped and its group is empty.

        A stop on a stopped model completes at once; concurrent stops share one stop.
        A stop during ``starting`` aborts the start (PROC-13).
        """
        if self.state in (State.STOPPED, State.SHUTDOWN):
            return succeed(None)
        d: Deferred = Deferred()
        self._stop_waiters.append(d)
        if self.state in (State.STARTING, State.READY):
            self._begin_stop()
        return d

    def probe_health(self) -> Deferred:
        """One health check of the ready child (``healthInterval``, ``llamaswap.keepalive``):
        fires with the status code, or None when it was refused, timed out or failed."""
        if self.state is not State.READY or self.model.check_endpoint is None or self.http is None:
            return succeed(None)
        return self._probe()

    @property
    def exit_description(self) -> Optional[str]:
        """How the last child ended (``exited with code 1``, ``killed by signal SIGKILL``);
        None until it has, and again once the next one is spawned."""
        return _describe_exit(self._exit_reason) if self._exit_reason is not None else None

    def shutdown(self) -> Deferred:
        """Stop, then enter the terminal ``shutdown`` state (CLI-9)."""
        d = self.stop()

        def _final(_: object) -> None:
            if self.state is State.STOPPED:
                self._transition(State.SHUTDOWN)

        d.addCallback(_final)
        return d

    # -- spawning ---------------------------------------------------------------------------

    def _spawn(self) -> None:
        self._generation += 1
        self._attempt_output = bytearray()
        self._exit_reason = None
        self._leader_gone = False
        self._health_d = None  # a probe of the previous attempt may still be in flight
        self._pipes_done = False
        self.last_error = None
        self._transition(State.STARTING)
        self._spawned_at = self.clock.seconds()
        env = {**os.environ, **self.model.env_dict()}
        try:
            if self.lifecycle is not None:
                self.lifecycle.prepare(self.model)  # keepCache: the --slot-save-path directory
            argv = self._resolve_argv(self.model.argv, env)
            conflict = self._port_conflict()
            if conflict is None:
                self._transport = self._spawn_argv(_UpstreamProtocol(self, self._generation), argv, env)
        except OSError as e:
            conflict = f"failed to start model '{self.id}': {e.strerror or e}"
        if conflict is not None:
            self._fail_start(conflict)
            self._transition(State.STOPPED)
            return
        self.pid = self._transport.pid
        self.start_time = process_start_time(self.pid) if self.pid else None
        self.on_spawn(self)
        self.http, self._pool = self.http_factory(self.reactor)
        if self.model.check_endpoint is None:
            self._became_ready()
            return
        self._timers["deadline"] = self.clock.callLater(self.model.health_check_timeout, self._health_timed_out)
        self._check_health()

    def _port_conflict(self) -> Optional[str]:
        """The failure message when the model's port is held already; no probe ever goes to
        a process that was there before our child."""
        self._watch = _ports.watch_for(self.model) if self.ports is not None else None
        if self._watch is None:
            return None
        holder = self.ports.holder(self._watch.port)
        if holder is None:
            return None
        return _ports.conflict_message(self.id, self._watch.port, holder)

    def _resolve_argv(self, argv: tuple[str, ...], env: dict[str, str]) -> list[str]:
        """CMD-5: look argv[0] up in the child's PATH; raise OSError like exec would."""
        exe = argv[0]
        if "/" in exe:
            if not os.path.exists(exe):
                raise FileNotFoundError(2, f"No such file or directory: '{exe}'")
            if not os.access(exe, os.X_OK) or os.path.isdir(exe):
                raise PermissionError(13, f"Permission denied: '{exe}'")
            return list(argv)
        found = shutil.which(exe, path=env.get("PATH", os.defpath))
        if found is None:
            # Console scripts installed beside this interpreter (llamaswap-llama-server) are
            # found even when twistd was started by its full path from an inactive venv.
            found = shutil.which(exe, path=os.path.dirname(sys.executable))
        if found is None:
            raise FileNotFoundError(2, f"executable '{exe}' not found in PATH")
        return [found, *argv[1:]]

    def _spawn_argv(self, proto: ProcessProtocol, argv: list[str], env: dict[str, str]):
        prefix = _session_prefix()
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            return self.reactor.spawnProcess(
                proto, prefix[0], [*prefix, *argv], env=env,
                childFDs={0: devnull, 1: "r", 2: "r"})
        finally:
            os.close(devnull)

    # -- health checking (PROC-4) -------------------------------------------------------------

    def _health_url(self) -> bytes:
        base = self.model.proxy.rstrip("/")
        return (base + self.model.check_endpoint).encode("utf-8")

    def _check_health(self) -> None:
        self._cancel_timer("next_check")
        if self.state is not State.STARTING or self._health_d is not None or self._leader_gone:
            return
        generation = self._generation
        d = self._probe()
        self._health_d = d

        def _done(status: Optional[int]) -> None:
            if self._health_d is d:
                self._health_d = None
            if generation != self._generation or self.state is not State.STARTING or self._leader_gone:
                return
            if status == 200 and self._answer_is_ours():
                self._became_ready()
            elif self.state is State.STARTING:
                self._timers["next_check"] = self.clock.callLater(HEALTH_INTERVAL, self._check_health)

        d.addCallback(_done)

    def _answer_is_ours(self) -> bool:
        """A 200 counts only while our leader lives and, where /proc tells, only when the
        listener belongs to its process group; a foreign listener fails the start."""
        if self.ports is None or self.pid is None:
            return True
        if self.ports.leader_exited(self.pid):
            return False  # the reactor reports the exit soon; that fails the start
        if self._watch is None or not self._watch.verify_owner:
            return True
        verdict, holder = self.ports.owner(self._watch.port, self.pid)
        if verdict is _ports.Ownership.FOREIGN:
            self._begin_stop(_ports.conflict_message(self.id, self._watch.port,
                                                     holder or _ports.Holder()))
            return False
        return True

    def _probe(self) -> Deferred:
        """One attempt: the status code, or None for refused/timeout/any error."""
        if self.check is not None:
            d = self.check(self.http, self._health_url())
        else:
            d = self.http.get(self._health_url(), timeout=HEALTH_ATTEMPT_TIMEOUT, reactor=self.clock)

            def _drain(response):
                code = response.code
                return response.content().addBoth(lambda _: code)

            d.addCallback(_drain)
        d.addErrback(lambda f: None)
        return d

    def _health_timed_out(self) -> None:
        self._timers.pop("deadline", None)
        if self.state is not State.STARTING:
            return
        self._begin_stop(f"failed to start model '{self.id}': health check did not pass within "
                         f"{int(self.model.health_check_timeout)}s")

    def _became_ready(self) -> None:
        self._cancel_timer("deadline")
        self._cancel_timer("next_check")
        phase = self.lifecycle.after_ready(self) if self.lifecycle is not None else None
        if phase is not None:
            # keepCache restore and hooks.afterReady: still ``starting``, so the requests that
            # queued wait for them, and their time counts in the load time.
            self._run_phase(phase, State.STARTING, self._now_ready)
            return
        self._now_ready()

    def _run_phase(self, phase: Deferred, state: State, then: Callable[[], None]) -> None:
        """Call ``then`` once the lifecycle ``phase`` ends, if this child is still in ``state``
        (a stop, an exit or a new spawn meanwhile cancels the phase instead)."""
        generation = self._generation
        self._phase = phase

        def ended(_: object) -> None:
            if self._phase is phase:
                self._phase = None
            if generation == self._generation and self.state is state and not self._leader_gone:
                then()

        phase.addBoth(ended)

    def _cancel_phase(self) -> None:
        phase, self._phase = self._phase, None
        if phase is not None and not phase.called:
            phase.cancel()

    def _now_ready(self) -> None:
        self.ready_since = self.clock.seconds()
        self._transition(State.READY)
        waiters, self._start_waiters = self._start_waiters, []
        for d in waiters:
            d.callback(None)

    # -- output -------------------------------------------------------------------------------

    def _output(self, data: bytes, tail: bool = True, stream: object = 1) -> None:
        self.logs.write(self.id, data, stream)
        if tail:
            self._attempt_output += data
            if len(self._attempt_output) > 4 * TAIL_BYTES:
                del self._attempt_output[: -2 * TAIL_BYTES]
        if self.state is State.STARTING and self._health_d is None and "next_check" in self._timers:
            # [B] Output while starting (llama-server prints "listening on" when it is ready):
            # check at once instead of waiting for the next 100 ms tick.
            self._check_health()

    # -- stopping (PROC-9) --------------------------------------------------------------------

    def _begin_stop(self, failure: Optional[str] = None) -> None:
        """Enter ``stopping`` and send the stop; a start under way fails (PROC-6/PROC-13).

        The state changes *before* start waiters are failed: their errbacks run
        synchronously and may ask for another stop, which must then join this one.
        """
        was_starting = self.state is State.STARTING
        was_ready = self.state is State.READY
        self._transition(State.STOPPING)
        self._cancel_timer("deadline")
        self._cancel_timer("next_check")
        self._cancel_phase()  # a restore under way is abandoned with the start
        if self._leader_gone:
            self._kill_group(signal.SIGKILL)  # processEnded completes the stop
        else:
            # A planned stop of a ready child: keepCache save and hooks.beforeStop first (bounded).
            phase = self.lifecycle.before_stop(self) if was_ready and self.lifecycle is not None else None
            if phase is not None:
                self._run_phase(phase, State.STOPPING, self._send_stop)
            else:
                self._send_stop()
        if was_starting:
            self._fail_start(failure or f"start of model '{self.id}' was aborted")

    def _send_stop(self) -> None:
        """``cmdStop`` or SIGTERM, and SIGKILL after ``unloadTimeout``."""
        self._timers["murder"] = self.clock.callLater(self.model.unload_timeout, self._grace_over)
        if self.model.cmd_stop_argv:
            self._run_stop_command()
        else:
            self._kill_group(signal.SIGTERM)

    def _run_stop_command(self) -> None:
        argv = [a.replace("${PID}", str(self.pid)) for a in self.model.cmd_stop_argv]
        env = {**os.environ, **self.model.env_dict()}
        proto = _StopCommandProtocol(self)
        try:
            self._stop_cmd = self._spawn_argv(proto, self._resolve_argv(tuple(argv), env), env)
        except OSError as e:
            self.log.warn("{model}: cmdStop could not be run ({error}); sending SIGTERM",
                          model=self.id, error=str(e))
            self._kill_group(signal.SIGTERM)
            return

        def _ended(outcome: BaseException) -> None:
            self._stop_cmd = None
            if isinstance(outcome, ierror.ProcessDone):
                return
            if self.state is State.STOPPING and not self._leader_gone:
                self.log.warn("{model}: cmdStop failed ({why}); sending SIGTERM",
                              model=self.id, why=_describe_exit(Failure(outcome)))
                self._kill_group(signal.SIGTERM)

        proto.ended.addCallback(_ended)

    def _grace_over(self) -> None:
        self._timers.pop("murder", None)
        self._kill_group(signal.SIGKILL)
        if self._stop_cmd is not None and self._stop_cmd.pid:
            try:
                self.kill(self._stop_cmd.pid, signal.SIGKILL)
            except OSError:
                pass

    def _kill_group(self, sig: int) -> None:
        if self.pid is None:
            return
        try:
            self.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    # -- exit handling ----------------------------------------------------------------------

    def _leader_exited(self, generation: int, reason: Failure) -> None:
        if generation != self._generation or self._leader_gone:
            return
        self._leader_gone = True
        self._exit_reason = reason
        self._cancel_timer("deadline")
        self._cancel_timer("next_check")
        self._cancel_phase()  # a crash has nothing to save; a restore cannot go on
        # PROC-5/9/10: whatever is left of the group dies with its leader; this also
        # closes pipes a grandchild inherited, so processEnded can follow. The state
        # becomes ``stopped`` once the group is empty (_reaped).
        self._kill_group(signal.SIGKILL)
        if self.state is State.STARTING:
            self._fail_start(f"failed to start model '{self.id}': {_describe_exit(reason)}")
        elif self.state is State.READY:
            self.log.warn("{model} exited unexpectedly ({why})", model=self.id,
                          why=_describe_exit(reason).replace("exited with ", ""))

    def _pipes_closed(self, generation: int, reason: Failure) -> None:
        if generation != self._generation or self._pipes_done:
            return
        self._pipes_done = True
        self.logs.flush_line(self.id)  # the child's last line may lack its newline
        self._leader_exited(generation, reason)
        self._await_empty_group()

    def _await_empty_group(self) -> None:
        deadline = self.clock.seconds() + GROUP_KILL_WAIT

        def poll() -> None:
            self._timers.pop("group", None)
            if self.pid is not None and self.group_alive(self.pid):
                self._kill_group(signal.SIGKILL)
                if self.clock.seconds() < deadline:
                    self._timers["group"] = self.clock.callLater(GROUP_POLL_INTERVAL, poll)
                    return
                self.log.warn("{model}: process group {pgid} still has members after SIGKILL",
                              model=self.id, pgid=self.pid)
            self._reaped()

        self._cancel_timer("group")
        poll()

    def _reaped(self) -> None:
        for name in list(self._timers):
            self._cancel_timer(name)
        self._cancel_phase()
        if self._pool is not None:
            self._pool.closeCachedConnections()
        self.on_reap(self)
        self.pid = None
        self.start_time = None
        self.ready_since = None
        self._transport = None
        self.http, self._pool = None, None
        late, self._start_waiters = self._start_waiters, []
        for d in late:
            d.errback(UpstreamStartFailed(self.last_error or f"failed to start model '{self.id}'"))
        if self.state is not State.STOPPED:
            self._transition(State.STOPPED)  # listeners may start the next child right here
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)

    # -- helpers ------------------------------------------------------------------------------

    def _fail_start(self, message: str) -> None:
        tail = _tail(bytes(self._attempt_output))
        if tail:
            message += "; last output:\n" + tail
        self.last_error = message
        self.log.error("{message}", message=message, model=self.id)
        self._cancel_timer("deadline")
        self._cancel_timer("next_check")
        waiters, self._start_waiters = self._start_waiters, []
        for d in waiters:
            d.errback(UpstreamStartFailed(message))

    def _transition(self, new: State) -> None:
        old = self.state
        if new not in _ALLOWED[old]:
            raise RuntimeError(f"{self.id}: illegal transition {old.value} -> {new.value}")
        self.state = new
        self.log.info("{model}: {old} -> {new}", model=self.id, old=old.value, new=new.value)
        self.on_transition(self, old, new)

    def _cancel_timer(self, name: str) -> None:
        call = self._timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()
