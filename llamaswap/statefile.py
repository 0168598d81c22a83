"""The children state file: no orphans across daemon crashes (PROC-14, CLI-5).

Every spawn and reap rewrites ``{"daemon_pid", "daemon_start_time", "children": [...]}``
atomically (temporary file + rename). At the next start, the groups recorded by a dead
daemon are killed, unless their pid now belongs to another process (pid reuse).
"""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Callable, Optional

from twisted.logger import Logger

from llamaswap.process import group_alive, process_start_time

#: PROC-14: SIGTERM, then SIGKILL after this long.
CLEANUP_GRACE = 5.0


class StateFileInUse(Exception):
    """The daemon recorded in a state file is alive; ``str`` is PROC-14's message."""

    def __init__(self, path: str, pid: int, pidfile: Optional[str] = None) -> None:
        super().__init__(f"state file {path} is in use by pid {pid}")
        self.path = path
        self.pid = pid
        self.pidfile = pidfile  # the other daemon's twistd pidfile, when it recorded one


def default_state_file(pidfile: Optional[str]) -> str:
    """CLI-5: beside the pidfile, else in $XDG_RUNTIME_DIR, else /tmp/llamaswap-<uid>."""
    if pidfile:
        return os.path.abspath(pidfile) + ".children.json"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = os.path.join(runtime, "llamaswap") if runtime else f"/tmp/llamaswap-{os.getuid()}"
    return os.path.join(base, "children.json")


def read_state(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_not_in_use(path: str) -> None:
    """Raise ``StateFileInUse`` when the daemon recorded in ``path`` is still alive."""
    data = read_state(path)
    if not data:
        return
    pid = data.get("daemon_pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass
    recorded, current = data.get("daemon_start_time"), process_start_time(pid)
    if recorded is not None and current is not None and current != recorded:
        return  # the pid was reused by another process
    # Either start time unknown (no /proc, e.g. macOS): the pid is alive, so assume it is the daemon.
    pidfile = data.get("pidfile")
    raise StateFileInUse(path, pid, pidfile if isinstance(pidfile, str) else None)


def cleanup_leftovers(path: str, log: Logger, kill: Callable = os.killpg,
                      sleep: Callable[[float], None] = time.sleep,
                      monotonic: Callable[[], float] = time.monotonic) -> list[int]:
    """Kill the process groups a previous (crashed) daemon left behind; blocks <= ~5 s.

    Runs before the listener binds (CLI-7). Returns the killed pgids.
    """
    data = read_state(path)
    if not data:
        return []
    targets = []
    for child in data.get("children") or []:
        if not isinstance(child, dict):
            continue
        pgid, recorded = child.get("pgid"), child.get("start_time")
        if not isinstance(pgid, int) or pgid <= 1:
            continue
        current = process_start_time(pgid)
        if current is not None and recorded is not None and current != recorded:
            log.warn("leftover child group {pgid} of model {model} skipped: pid reused",
                     pgid=pgid, model=child.get("model"))
            continue
        if not group_alive(pgid):
            continue
        log.warn("killing leftover process group {pgid} of model {model} from a previous run",
                 pgid=pgid, model=child.get("model"))
        _signal(kill, pgid, signal.SIGTERM)
        targets.append(pgid)
    deadline = monotonic() + CLEANUP_GRACE
    while targets and monotonic() < deadline and any(group_alive(p) for p in targets):
        sleep(0.05)
    for pgid in targets:
        if group_alive(pgid):
            _signal(kill, pgid, signal.SIGKILL)
    return targets


def _signal(kill: Callable, pgid: int, sig: int) -> None:
    try:
        kill(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class ChildRegistry:
    """Keeps the state file in step with the children that exist.

    :param pidfile: twistd's pidfile, recorded so that a second daemon refused because of
        this file can be told which pidfile the running one uses.
    """

    def __init__(self, path: str, log: Logger, pidfile: Optional[str] = None) -> None:
        self.path = path
        self.log = log
        self.pidfile = pidfile
        self.children: dict[str, dict] = {}
        self._start_time: tuple[int, Optional[str]] = (-1, None)

    @property
    def daemon_start_time(self) -> Optional[str]:
        """Our own start time, read again after a fork: twistd builds the service in the
        launching process and daemonizes afterwards, so the pid changes in between."""
        pid = os.getpid()
        if self._start_time[0] != pid:
            self._start_time = (pid, process_start_time(pid))
        return self._start_time[1]

    def spawned(self, proc: Any) -> None:
        self.children[proc.id] = {"model": proc.id, "pid": proc.pid, "pgid": proc.pid,
                                  "start_time": proc.start_time, "argv": list(proc.model.argv)}
        self.write()

    def reaped(self, proc: Any) -> None:
        if self.children.pop(proc.id, None) is not None:
            self.write()

    def write(self) -> None:
        data = {"daemon_pid": os.getpid(), "daemon_start_time": self.daemon_start_time,
                "children": list(self.children.values())}
        if self.pidfile:
            data["pidfile"] = self.pidfile
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
        except OSError as e:
            self.log.error("cannot write state file {path}: {error}", path=self.path, error=str(e))

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self.log.warn("cannot remove state file {path}: {error}", path=self.path, error=str(e))
