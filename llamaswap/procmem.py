"""What a process group holds (``memory.budget``; docs/memory.rst): host RSS from /proc plus the GPU
memory of its pids from ``nvidia-smi`` (:func:`measure_group`). ``llamaswap.footprint`` re-exports these
names; the router measures ready models with :func:`measure_group`.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import attrs
from twisted.internet import defer, error, protocol

MiB = 1 << 20


def group_pids(pgid: int, proc: str = "/proc") -> tuple[int, ...]:
    """The pids whose ``<proc>/<pid>/stat`` names process group ``pgid`` (one pass over ``proc``)."""
    try:
        names = os.listdir(proc)
    except OSError:
        return ()
    out = []
    for name in filter(str.isdigit, names):
        try:
            with open(os.path.join(proc, name, "stat"), "rb") as f:
                stat = f.read()
            if int(stat[stat.rindex(b")") + 2:].split()[2]) == pgid:
                out.append(int(name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or unreadable
    return tuple(sorted(out))


def process_rss(pid: int, proc: str = "/proc", page_size: Optional[int] = None) -> Optional[int]:
    """Resident bytes of ``pid``: ``VmRSS`` of its status, else statm's resident pages; None if gone."""
    try:
        with open(os.path.join(proc, str(pid), "status"), "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(os.path.join(proc, str(pid), "statm"), "rb") as f:
            return int(f.read().split()[1]) * (page_size or os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return None


def group_rss(pgid: int, proc: str = "/proc", page_size: Optional[int] = None) -> int:
    """The summed RSS of process group ``pgid`` (pages shared by members count once a member)."""
    return sum(process_rss(pid, proc, page_size) or 0 for pid in group_pids(pgid, proc))


def parse_nvidia_smi_apps(text: str) -> dict[int, int]:
    """``{pid: bytes}`` from ``nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits``
    (MiB; a pid on several GPUs is summed; ``[N/A]`` and other odd lines are skipped)."""
    out: dict[int, int] = {}
    for line in text.splitlines():
        parts = line.split(",")
        try:
            pid, mib = int(parts[0]), float(parts[1])
        except (ValueError, IndexError):
            continue
        out[pid] = out.get(pid, 0) + int(mib * MiB)
    return out


NVIDIA_SMI_ARGS = ("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")


class _Collect(protocol.ProcessProtocol):
    def __init__(self, done: defer.Deferred) -> None:
        self.done, self.out = done, []

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def processEnded(self, reason: Any) -> None:
        self.done.callback(b"".join(self.out) if getattr(reason.value, "exitCode", None) == 0 else None)


def query_gpu_memory(reactor: Any = None, *, path: Optional[str] = None, timeout: float = 10.0) -> defer.Deferred:
    """Fire with ``{pid: GPU bytes}`` from the ``nvidia-smi`` on ``path`` (default ``$PATH``), or with
    None when there is none, it fails, or it outlives ``timeout`` seconds (it is killed then)."""
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    path = os.environ.get("PATH", os.defpath) if path is None else path
    exe = shutil.which("nvidia-smi", path=path)
    if exe is None:
        return defer.succeed(None)
    done: defer.Deferred = defer.Deferred()
    try:
        transport = reactor.spawnProcess(_Collect(done), exe, (exe, *NVIDIA_SMI_ARGS), env={**os.environ, "PATH": path})
        transport.closeStdin()
    except OSError:
        return defer.succeed(None)

    def kill() -> None:
        try:
            transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass
    timer = reactor.callLater(timeout, kill)

    def parse(out: Optional[bytes]) -> Optional[dict[int, int]]:
        if timer.active():
            timer.cancel()
        return None if out is None else parse_nvidia_smi_apps(out.decode("utf-8", "replace"))
    return done.addCallback(parse)


@attrs.frozen
class GroupMemory:
    """What a process group holds: host RSS plus the GPU memory of its pids."""
    rss: int
    gpu: int
    pids: tuple[int, ...]
    gpu_known: bool  #: False when nvidia-smi is absent, failed, or was not asked

    @property
    def total(self) -> int:
        return self.rss + self.gpu


def measure_group(pgid: int, reactor: Any = None, *, proc: str = "/proc", page_size: Optional[int] = None,
                  gpu: bool = True, path: Optional[str] = None, timeout: float = 10.0) -> defer.Deferred:
    """Fire with the :class:`GroupMemory` of group ``pgid``: /proc now, nvidia-smi asynchronously."""
    pids = group_pids(pgid, proc)
    rss = sum(process_rss(pid, proc, page_size) or 0 for pid in pids)
    if not gpu:
        return defer.succeed(GroupMemory(rss, 0, pids, False))
    return query_gpu_memory(reactor, path=path, timeout=timeout).addCallback(lambda by_pid: GroupMemory(
        rss, sum(v for p, v in (by_pid or {}).items() if p in pids), pids, by_pid is not None))

