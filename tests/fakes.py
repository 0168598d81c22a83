"""Test doubles shared by the unit tests.

* ``FakeProcessReactor``: a ``MemoryReactorClock`` that can ``spawnProcess``; it also plays
  the OS for process groups (``killpg`` / ``group_alive``), so ``UpstreamProcess`` gets
  ``kill=reactor.killpg, group_alive=reactor.group_alive`` and no real signal is sent.
* ``FakeProcess``: the transport handed to the ``ProcessProtocol``; tests drive it with
  ``output``, ``leader_exit`` (``processExited``), ``pipes_closed`` (``processEnded``) and
  ``exit`` (both).
* ``HealthChecks``: a ``check=`` injection whose Deferreds the test fires.
* ``UpstreamStub``: an in-memory fake llama-server resource (for ``RequestTraversalAgent``).
* ``FakeStreamRequest``: the request a fan-out subscriber writes to.
"""
from __future__ import annotations

import itertools
import os
import signal
import sys
from typing import Any, Optional
from urllib.parse import quote

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

#: A real executable, so ``_resolve_argv`` accepts it; it is never run.
EXE = sys.executable


def exit_failure(code: Optional[int] = 0, sig: Optional[int] = None) -> Failure:
    """The Failure Twisted hands to processExited/processEnded."""
    if sig is None and code == 0:
        return Failure(ierror.ProcessDone(0))
    return Failure(ierror.ProcessTerminated(exitCode=None if sig else code, signal=sig))


class FakeProcess:
    """An ``IProcessTransport`` stand-in for one spawned child."""

    def __init__(self, reactor: "FakeProcessReactor", proto: Any, executable: str, args: list,
                 env: Optional[dict], path: Optional[str], childFDs: Optional[dict], pid: int,
                 fd_targets: dict) -> None:
        self.reactor = reactor
        self.proto = proto
        self.executable = executable
        self.args = args
        self.env = env
        self.path = path
        self.childFDs = childFDs
        self.fd_targets = fd_targets  # what each int childFD pointed to at spawn time
        self.pid = pid
        self.signals: list = []
        self.leader_alive = True
        self.ended = False
        self.stdin_closed = False

    # -- IProcessTransport -------------------------------------------------------------------

    def signalProcess(self, sig: Any) -> None:
        self.signals.append(sig)

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def closeStdout(self) -> None:
        pass

    def closeStderr(self) -> None:
        pass

    def closeChildFD(self, fd: int) -> None:
        pass

    def writeToChild(self, fd: int, data: bytes) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, seq: list) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def getPeer(self) -> Any:
        return None

    def getHost(self) -> Any:
        return None

    # -- driving it from tests ---------------------------------------------------------------

    def output(self, data: bytes, fd: int = 1) -> None:
        """The child wrote ``data`` on ``fd``."""
        self.proto.childDataReceived(fd, data)

    def leader_exit(self, code: Optional[int] = 0, sig: Optional[int] = None) -> None:
        """The leader was reaped (``processExited``); pipes may still be open."""
        assert self.leader_alive, "leader already exited"
        self.leader_alive = False
        self.proto.processExited(exit_failure(code, sig))

    def pipes_closed(self, code: Optional[int] = 0, sig: Optional[int] = None) -> None:
        """Every pipe closed after the leader exited (``processEnded``)."""
        assert not self.ended, "processEnded already delivered"
        self.leader_alive = False
        self.ended = True
        self.proto.processEnded(exit_failure(code, sig))

    def exit(self, code: Optional[int] = 0, sig: Optional[int] = None) -> None:
        """The leader exits and its pipes close (what a simple child does)."""
        if self.leader_alive:
            self.leader_exit(code, sig)
        if not self.ended:
            self.pipes_closed(code, sig)


class FakeProcessReactor(MemoryReactorClock):
    """``MemoryReactorClock`` + ``spawnProcess`` + a fake process-group table.

    :ivar spawned: every ``FakeProcess``, in spawn order.
    :ivar kills: every ``(pgid, signal)`` sent through ``killpg``.
    :ivar spawn_error: raised by the next ``spawnProcess`` when set (fork path failure).
    :ivar auto_exit: when True, SIGTERM/SIGKILL to a group makes its leader exit on the
        next ``advance(0)`` (code 0 after TERM, signal 9 after KILL).
    :ivar lingering: pgid -> number of members other than the leader (grandchildren);
        SIGKILL removes them.
    :ivar sticky: pgids whose members survive SIGKILL (zombies of a non-reaping init).
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[FakeProcess] = []
        self.kills: list[tuple[int, int]] = []
        self.spawn_error: Optional[BaseException] = None
        self.auto_exit = False
        self.lingering: dict[int, int] = {}
        self.sticky: set[int] = set()
        self._pids = itertools.count(3_900_001)

    def spawnProcess(self, processProtocol, executable, args=(), env=None, path=None, uid=None,
                     gid=None, usePTY=False, childFDs=None):
        if self.spawn_error is not None:
            error, self.spawn_error = self.spawn_error, None
            raise error
        fd_targets = {}
        for child_fd, value in (childFDs or {}).items():
            if isinstance(value, int):
                try:
                    fd_targets[child_fd] = os.readlink(f"/proc/self/fd/{value}")
                except OSError:
                    fd_targets[child_fd] = None
        proc = FakeProcess(self, processProtocol, executable, list(args), env, path, childFDs,
                           next(self._pids), fd_targets)
        self.spawned.append(proc)
        processProtocol.makeConnection(proc)
        return proc

    def by_pid(self, pid: int) -> Optional[FakeProcess]:
        for proc in self.spawned:
            if proc.pid == pid:
                return proc
        return None

    def signals_to(self, pid: int) -> list[int]:
        return [sig for pgid, sig in self.kills if pgid == pid]

    # -- kill / group_alive injections ----------------------------------------------------------

    def group_alive(self, pgid: int) -> bool:
        proc = self.by_pid(pgid)
        leader = proc is not None and proc.leader_alive
        return leader or self.lingering.get(pgid, 0) > 0 or pgid in self.sticky

    def killpg(self, pgid: int, sig: int) -> None:
        self.kills.append((pgid, sig))
        if not self.group_alive(pgid):
            raise ProcessLookupError(3, "No such process")
        if sig == signal.SIGKILL:
            self.lingering.pop(pgid, None)
        proc = self.by_pid(pgid)
        if self.auto_exit and proc is not None and proc.leader_alive and sig in (
                signal.SIGTERM, signal.SIGKILL):
            sig_arg = signal.SIGKILL if sig == signal.SIGKILL else None

            def _exit() -> None:
                if proc.leader_alive:
                    proc.exit(0, sig_arg)
                elif not proc.ended:
                    proc.pipes_closed(0, sig_arg)

            self.callLater(0, _exit)


class FakePool:
    """What ``UpstreamProcess`` needs of an ``HTTPConnectionPool``."""

    def __init__(self) -> None:
        self.closed = 0

    def closeCachedConnections(self) -> None:
        self.closed += 1


class FakeLogs:
    """Records ``LogBroadcaster.write`` calls."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, bytes]] = []
        self.flushed: list[str] = []  # flush_line calls (the child exited)

    def write(self, model_id: str, data: bytes, stream: object = 1) -> None:
        self.writes.append((model_id, data))

    def data(self, model_id: str) -> bytes:
        return b"".join(d for m, d in self.writes if m == model_id)

    def flush_line(self, model_id: str) -> None:
        self.flushed.append(model_id)


class HealthChecks:
    """A ``check=`` injection: each probe is a Deferred the test fires with a status."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, bytes, Deferred]] = []

    def __call__(self, http: Any, url: bytes) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((http, url, d))
        return d

    @property
    def count(self) -> int:
        return len(self.calls)

    def pending(self) -> list[Deferred]:
        return [d for _, _, d in self.calls if not d.called]

    def answer(self, status: int) -> None:
        """Fire the one pending probe with ``status``."""
        pending = self.pending()
        assert len(pending) == 1, f"expected one pending health check, found {len(pending)}"
        pending[0].callback(status)

    def refuse(self) -> None:
        pending = self.pending()
        assert len(pending) == 1, f"expected one pending health check, found {len(pending)}"
        pending[0].errback(ierror.ConnectionRefusedError("refused"))


def capture_logger(events: list) -> Logger:
    """A Logger whose events land in ``events``."""
    return Logger(observer=events.append)


# -- in-memory HTTP ----------------------------------------------------------------------------

class UpstreamStub(Resource):
    """A fake llama-server for ``RequestTraversalAgent``: records every request.

    By default it answers at once with ``self.reply`` = (status, headers, body). With
    ``hold = True`` it returns ``NOT_DONE_YET`` and the test writes/finishes the request.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list = []  # (request, body bytes)
        self.hold = False
        self.reply = (200, {b"content-type": b"application/json"}, b'{"ok":true}')

    def render(self, request: Any):
        request.content.seek(0)
        body = request.content.read()
        self.requests.append((request, body))
        request.notifyFinish().addErrback(lambda _: None)
        if self.hold:
            return NOT_DONE_YET
        status, headers, payload = self.reply
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        return payload


def upstream_client(resource: Resource) -> tuple[HTTPClient, RequestTraversalAgent]:
    """A treq client speaking to ``resource`` in memory, with llamaswap's body producers."""
    from llamaswap.proxy import _to_body_producer

    agent = RequestTraversalAgent(resource)
    return HTTPClient(agent, data_to_body_producer=_to_body_producer), agent


def flush_all(clock: Any, *agents: RequestTraversalAgent, rounds: int = 8) -> None:
    """Move bytes between every in-memory connection (each agent has its own memory reactor)."""
    for _ in range(rounds):
        if clock is not None:
            clock.advance(0)
        for agent in agents:
            agent.flush()


def drop_clients(agent: RequestTraversalAgent) -> None:
    """Simulate every client of ``agent`` disconnecting (private treq detail, kept here)."""
    for pump in list(agent._pumps):
        pump.clientIO.abortConnection()
    agent.flush()


def quote_path(text: str) -> str:
    return quote(text, safe="/")


class FakeTransport:
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class FakeChannel:
    def __init__(self) -> None:
        self.transport = FakeTransport()


class FakeStreamRequest:
    """What a fan-out subscriber (``llamaswap.fanout``: ``/logs/stream``, ``/api/events``) uses of a
    twisted.web request: the bytes written (``data``), the registered ``producer`` and whether it
    is ``streaming``, ``finished``, ``channel.transport.aborted``, and ``done``, the Deferred
    ``notifyFinish`` returns, which :meth:`finish` fires and :meth:`lose` fails, as twisted.web does."""

    def __init__(self) -> None:
        self.data = b""
        self.producer: Any = None
        self.streaming: Optional[bool] = None
        self.finished = False
        self.channel = FakeChannel()
        self.done: Deferred = Deferred()

    def write(self, data: bytes) -> None:
        self.data += data

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        self.producer = None

    def finish(self) -> None:
        self.finished = True
        self.done.callback(None)

    def notifyFinish(self) -> Deferred:
        return self.done

    def lose(self) -> None:
        """The client went away."""
        self.done.errback(Failure(ierror.ConnectionDone()))
