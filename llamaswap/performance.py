"""Host performance samples for ``GET /api/performance``, as llama-swap's ``perf`` monitor takes them.

Every ``performance.every`` seconds (5 by default) :class:`PerformanceMonitor` reads the host's
CPU use per core, memory, swap, load averages and network counters from ``/proc`` and keeps
the last hour of samples. When ``nvidia-smi`` is on the ``PATH`` it also runs
``nvidia-smi --query-gpu=… --loop <every>`` and keeps one GPU sample per line it prints, as
llama-swap does; without it there are no GPU samples (llama-swap then answers
``"gpu_stats": null``). llama-swap's other GPU sources (LACT's socket, ``rocm-smi``, macOS and
Windows probes) are not read.

With ``performance.disabled`` there is no monitor at all, and the endpoint answers 503
``{"enabled": false}``, as llama-swap does.

Reading ``/proc`` is a few small reads from memory, so the samples are taken on the reactor
thread; ``nvidia-smi`` is a child process whose output arrives like any other.
"""
from __future__ import annotations

import os
import shutil
from collections import deque
from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from llamaswap.proxylog import rfc3339nano

__all__ = ["NvidiaSmi", "PerformanceMonitor", "SysReader", "make_performance_monitor",
           "parse_nvidia_smi_line"]

_MB = 1024 * 1024
_NVIDIA_QUERY = ("--query-gpu=index,name,uuid,temperature.gpu,utilization.gpu,memory.used,memory.total,"
                 "fan.speed,power.draw")


# -- /proc -----------------------------------------------------------------------------------------

def _cpu_times(text: str) -> list:
    """(busy, total) jiffies of each ``cpuN`` line of ``/proc/stat``, in core order.

    As gopsutil counts them: guest time is already part of user time, so it is left out of
    the total; busy is the total less idle and iowait.
    """
    cores = []
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        fields = [float(v) for v in rest.split()]
        fields += [0.0] * (10 - len(fields))
        user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
        total = user + nice + system + idle + iowait + irq + softirq + steal
        cores.append((total - idle - iowait, total))
    return cores


def _percent(before: tuple, after: tuple) -> float:
    """gopsutil's ``calculateBusy``: 0 when nothing was busy, 100 when no time passed."""
    busy = after[0] - before[0]
    total = after[1] - before[1]
    if busy <= 0:
        return 0.0
    if total <= 0:
        return 100.0
    return min(100.0, max(0.0, busy / total * 100))


def _meminfo(text: str) -> dict:
    """``/proc/meminfo`` in bytes."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts:
            out[key.strip()] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def _net_dev(text: str) -> list:
    """``/proc/net/dev`` as llama-swap's ``net_io``: every interface but ``lo``."""
    out = []
    for line in text.splitlines()[2:]:
        name, _, counters = line.partition(":")
        fields = counters.split()
        if not name.strip() or name.strip() == "lo" or len(fields) < 9:
            continue
        out.append({"name": name.strip(), "bytes_recv": int(fields[0]), "bytes_sent": int(fields[8])})
    return out


class SysReader:
    """Reads one llama-swap ``SysStat`` from a ``/proc`` tree.

    CPU use is per core, over the time since the previous read (the first read after
    :meth:`baseline`); memory "used" is gopsutil's: total less free, buffers and page cache
    (``Cached`` plus ``SReclaimable``).

    :param proc: the ``/proc`` directory (a test's fake tree).
    """

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = proc
        self._cpu: list = []

    def _read(self, name: str) -> str:
        with open(os.path.join(self._proc, name), encoding="ascii", errors="replace") as f:
            return f.read()

    def baseline(self) -> None:
        """Remember the CPU counters now, so the first sample covers one interval."""
        self._cpu = _cpu_times(self._read("stat"))

    def read(self, now: float) -> dict:
        """One sample taken at ``now``; raises ``OSError`` when ``/proc`` cannot be read."""
        cpu = _cpu_times(self._read("stat"))
        previous = self._cpu if len(self._cpu) == len(cpu) else [(0.0, 0.0)] * len(cpu)
        self._cpu = cpu
        mem = _meminfo(self._read("meminfo"))
        total, free = mem.get("MemTotal", 0), mem.get("MemFree", 0)
        cached = mem.get("Cached", 0) + mem.get("SReclaimable", 0)
        used = total - free - mem.get("Buffers", 0) - cached
        swap_total = mem.get("SwapTotal", 0)
        try:
            load = [float(v) for v in self._read("loadavg").split()[:3]]
        except (OSError, ValueError):
            load = [0.0, 0.0, 0.0]
        try:
            net = _net_dev(self._read("net/dev"))
        except OSError:
            net = []
        return {"timestamp": now,
                "cpu_util_per_core": [_percent(b, a) for b, a in zip(previous, cpu)],
                "mem_total_mb": total // _MB, "mem_used_mb": used // _MB, "mem_free_mb": free // _MB,
                "swap_total_mb": swap_total // _MB,
                "swap_used_mb": (swap_total - mem.get("SwapFree", 0)) // _MB,
                "load_avg_1": load[0], "load_avg_5": load[1], "load_avg_15": load[2], "net_io": net}


# -- nvidia-smi ------------------------------------------------------------------------------------

def parse_nvidia_smi_line(line: str, now: float) -> Optional[dict]:
    """One CSV line of the query as llama-swap's ``GpuStat``; None when it has too few fields.

    Unparsable numbers count as 0 (``[N/A]`` fan speeds, for instance), as in llama-swap.
    """
    fields = [f.strip() for f in line.split(",")]
    if len(fields) < 9:
        return None

    def number(text: str, kind: Callable = float) -> Any:
        try:
            return kind(text)
        except ValueError:
            return kind(0)

    used, total = number(fields[5], int), number(fields[6], int)
    return {"timestamp": now, "id": number(fields[0], int), "name": fields[1], "uuid": fields[2],
            "temp_c": number(fields[3], int), "vram_temp_c": 0, "gpu_util_pct": number(fields[4]),
            "mem_util_pct": used / total * 100 if total > 0 else 0.0, "mem_used_mb": used,
            "mem_total_mb": total, "fan_speed_pct": number(fields[7]), "power_draw_w": number(fields[8])}


class NvidiaSmi(ProcessProtocol):
    """``nvidia-smi --loop``'s output, one GPU sample per line, handed to ``on_sample``."""

    def __init__(self, clock: Any, on_sample: Callable[[dict], None]) -> None:
        self._clock = clock
        self._on_sample = on_sample
        self._buffer = b""
        self.ended = False

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            sample = parse_nvidia_smi_line(line.decode("utf-8", "replace"), self._clock.seconds())
            if sample is not None:
                self._on_sample(sample)

    def processEnded(self, reason: Any) -> None:
        self.ended = True


# -- the monitor -----------------------------------------------------------------------------------

class PerformanceMonitor(Service):
    """The last hour of host (and GPU) samples, taken every ``every`` seconds.

    :param reactor: time, and ``spawnProcess`` for ``nvidia-smi``.
    :param every: ``performance.every``, seconds.
    :param log: where failures to read are reported.
    :param reader: the :class:`SysReader`.
    :param which: ``shutil.which``; finds ``nvidia-smi``.
    """

    name = "performance"

    def __init__(self, reactor: Any, every: float, log: Logger, reader: Optional[SysReader] = None,
                 which: Callable[[str], Optional[str]] = shutil.which) -> None:
        self._reactor = reactor
        self._log = log
        self._reader = reader or SysReader()
        self._which = which
        self.every = every
        self.disabled = False
        self._sys: deque = deque(maxlen=self._capacity(every))
        self._gpu: deque = deque(maxlen=self._capacity(every))
        self._loop: Optional[LoopingCall] = None
        self._smi: Optional[Any] = None

    @staticmethod
    def _capacity(every: float) -> int:
        """llama-swap keeps an hour: ``hour / every`` samples, at least one."""
        return max(1, int(3600 // max(every, 0.1)))

    def startService(self) -> None:
        super().startService()
        self._start()

    def stopService(self) -> None:
        super().stopService()
        self._stop()

    def _start(self) -> None:
        try:
            self._reader.baseline()
        except OSError as e:
            self._log.error("failed to read sys stats: {error}", error=str(e))
        self._loop = LoopingCall(self.sample)
        self._loop.clock = self._reactor
        self._loop.start(self.every, now=False)  # like Go's ticker: the first sample after one interval
        self._start_gpu()

    def _stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._smi is not None:
            transport, self._smi = self._smi, None
            try:
                transport.signalProcess("KILL")
            except Exception:  # already gone
                pass

    def _start_gpu(self) -> None:
        exe = self._which("nvidia-smi")
        if exe is None:
            self._log.info("GPU monitoring not available: no GPU monitoring tool available")
            return
        protocol = NvidiaSmi(self._reactor, lambda sample: self._gpu.append([sample]))
        argv = [exe, _NVIDIA_QUERY, "--format=csv,noheader,nounits", "--loop", str(max(1, int(self.every)))]
        try:
            self._smi = self._reactor.spawnProcess(protocol, exe, argv, env=None)
        except OSError as e:
            self._log.info("GPU monitoring not available: {error}", error=str(e))
            return
        self._log.info("using nvidia-smi for GPU monitoring")

    def sample(self) -> None:
        """Take one host sample (the ``LoopingCall``); a failed read is logged and skipped."""
        try:
            self._sys.append(self._reader.read(self._reactor.seconds()))
        except (OSError, ValueError) as e:
            self._log.error("failed to read sys stats: {error}", error=str(e))

    def current(self, after: Optional[float] = None) -> tuple:
        """``(sys_stats, gpu_stats)`` as llama-swap's API writes them, oldest first.

        Without ``after``, an empty list is ``None`` (Go's nil slice, ``null``); with it, only
        samples strictly newer are kept, and an empty result is ``[]``.
        """
        sys_stats = [dict(s, timestamp=rfc3339nano(s["timestamp"])) for s in self._sys
                     if after is None or s["timestamp"] > after]
        gpu_stats = [dict(g, timestamp=rfc3339nano(g["timestamp"])) for snapshot in self._gpu for g in snapshot
                     if after is None or g["timestamp"] > after]
        if after is None:
            return sys_stats or None, gpu_stats or None
        return sys_stats, gpu_stats

    def reconfigure(self, disabled: bool, every: float) -> None:
        """llama-swap's ``UpdateConfig``: a change restarts sampling with empty buffers (none
        when now disabled)."""
        if every == self.every and disabled == self.disabled:
            return
        self._stop()
        self.every, self.disabled = every, disabled
        self._sys = deque(maxlen=self._capacity(every))
        self._gpu = deque(maxlen=self._capacity(every))
        if not disabled and self.running:
            self._start()


def make_performance_monitor(reactor: Any, disabled: bool, every: float, log: Logger
                             ) -> Optional[PerformanceMonitor]:
    """The monitor, or None (logged) when ``performance.disabled``: llama-swap then has none
    until it restarts, whatever a reload says."""
    if disabled:
        log.info("performance monitoring is disabled")
        return None
    return PerformanceMonitor(reactor, every, log)
