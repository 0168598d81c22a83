"""Helpers for tests that run the real llama.cpp ``llama-server`` (issue 4).

* :data:`LLAMA_SERVER`: the binary :func:`llamaswap.demo.llama_server.find_binary` finds, or ``None``;
  :data:`requires_llama_server` skips a test (only) when there is none.
* :class:`LlamaServer`: one ``llama-server`` on ``--port 0``; the port is read from its
  ``listening on http://127.0.0.1:<port>`` line on stderr.
* :func:`tagged_processes` / :func:`kill_tagged`: every process whose environment carries a marker
  variable. Tests put a fresh marker in the daemon's environment; its children inherit it, so after
  the test no process with that marker may be left (and any that is, is killed);
  :class:`TaggedDaemons` does that for the daemons a fixture starts.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from llamaswap.demo.llama_server import LauncherError, find_binary
from tests.daemon import ChildServer, Daemon, pid_alive

try:
    LLAMA_SERVER = find_binary()
except LauncherError:
    LLAMA_SERVER = None

SKIP_MESSAGE = "no llama-server: install '.[llama]' or set LLAMASWAP_LLAMA_SERVER"
requires_llama_server = pytest.mark.skipif(LLAMA_SERVER is None, reason=SKIP_MESSAGE)

ANSWER_A = "Hello! I am tiny chat model A."
ANSWER_B = "Hi there, this is model B speaking."

MARKER_VAR = "LLAMASWAP_TEST_MARKER"


class LlamaServer(ChildServer):
    """``llama-server -m MODEL --host 127.0.0.1 --port 0 [args]`` as a child process; its listening
    line is printed once the model is loaded, so /health is 200 by then."""

    name = "llama-server"
    listen_timeout = 20.0

    def __init__(self, model: str | os.PathLike[str], *args: str, binary: str | None = None) -> None:
        assert LLAMA_SERVER or binary, SKIP_MESSAGE
        super().__init__([binary or LLAMA_SERVER, "-m", str(model), "--host", "127.0.0.1", "--port", "0", *args])

    def terminate(self, timeout: float = 10) -> int | None:
        """SIGTERM and wait; the exit code, or None if it is still running."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)


def new_marker() -> dict[str, str]:
    """A fresh ``{MARKER_VAR: value}`` to add to a daemon's environment."""
    return {MARKER_VAR: uuid.uuid4().hex}


def tagged_processes(marker: dict[str, str], exclude: set[int] = frozenset()) -> list[int]:
    """Pids of live (non-zombie) processes whose environment has the marker (Linux /proc only)."""
    (name, value), = marker.items()
    needle = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def kill_tagged(marker: dict[str, str]) -> list[int]:
    """SIGKILL every process carrying the marker; return their pids."""
    pids = tagged_processes(marker)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and tagged_processes(marker):
        time.sleep(0.05)
    return pids


class TaggedDaemons:
    """Daemons started with one fresh marker in their environment, for a test's fixture:
    :meth:`close` stops them all, then kills (and fails on) any process left with the marker."""

    def __init__(self) -> None:
        self.marker = new_marker()
        self.daemons: list[Daemon] = []

    def start(self, config: dict | str, workdir: str | os.PathLike[str]) -> Daemon:
        daemon = Daemon(config, workdir=workdir, env=self.marker)
        self.daemons.append(daemon)
        return daemon.start()

    def close(self) -> None:
        for daemon in self.daemons:
            try:
                daemon.stop()
            finally:
                daemon.kill()
        left = kill_tagged(self.marker)
        assert not left, f"processes left behind (killed now): {left}"
