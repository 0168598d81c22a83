"""Host samples for ``/api/performance`` (``llamaswap.performance``): reading a fake ``/proc``,
sampling on a ``Clock``, the hour-long ring, ``nvidia-smi`` lines, and reloads."""
from __future__ import annotations

import os
import tempfile
from datetime import timezone

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.performance import (
    NvidiaSmi, PerformanceMonitor, SysReader, make_performance_monitor, parse_nvidia_smi_line)
from llamaswap.proxylog import rfc3339nano
from tests.fakes import FakeProcessReactor, capture_logger

MEMINFO = """MemTotal:       16384000 kB
MemFree:         4096000 kB
MemAvailable:    8192000 kB
Buffers:          512000 kB
Cached:          2048000 kB
SwapCached:            0 kB
SReclaimable:     256000 kB
SwapTotal:       2048000 kB
SwapFree:        1024000 kB
"""
NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:  999999     100    0    0    0     0          0         0   999999     100    0    0    0     0       0          0
  eth0: 1234567    2000    0    0    0     0          0         0   7654321    1500    0    0    0     0       0          0
"""


def stat(*cores) -> str:
    """A /proc/stat with the given (user, nice, system, idle, iowait, irq, softirq, steal, guest) per core."""
    total = [sum(c[i] for c in cores) for i in range(9)]
    lines = ["cpu  " + " ".join(map(str, total)) + " 0"]
    lines += [f"cpu{i} " + " ".join(map(str, c)) + " 0" for i, c in enumerate(cores)]
    return "\n".join(lines + ["intr 1 2 3", "ctxt 99"]) + "\n"


class FakeProc:
    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="llamaswap-proc-")
        os.mkdir(os.path.join(self.root, "net"))
        self.write("meminfo", MEMINFO)
        self.write("loadavg", "0.50 0.25 0.10 2/345 6789\n")
        self.write("net/dev", NET_DEV)
        self.cpu(((100, 0, 100, 800, 0, 0, 0, 0, 0), (50, 0, 50, 900, 0, 0, 0, 0, 0)))

    def write(self, name: str, text: str) -> None:
        with open(os.path.join(self.root, name), "w") as f:
            f.write(text)

    def cpu(self, cores) -> None:
        self.write("stat", stat(*cores))


class SysReaderTests(SynchronousTestCase):
    def setUp(self):
        self.proc = FakeProc()
        self.reader = SysReader(self.proc.root)

    def test_sample_fields(self):
        """Memory as gopsutil counts it, swap, load averages, and every interface but lo."""
        self.reader.baseline()
        s = self.reader.read(1000.0)
        self.assertEqual(list(s), ["timestamp", "cpu_util_per_core", "mem_total_mb", "mem_used_mb", "mem_free_mb",
                                   "swap_total_mb", "swap_used_mb", "load_avg_1", "load_avg_5", "load_avg_15",
                                   "net_io"])
        # used = total - free - buffers - (cached + SReclaimable), in MiB
        self.assertEqual((s["mem_total_mb"], s["mem_free_mb"], s["mem_used_mb"]),
                         (16000, 4000, (16384000 - 4096000 - 512000 - 2048000 - 256000) // 1024))
        self.assertEqual((s["swap_total_mb"], s["swap_used_mb"]), (2000, 1000))
        self.assertEqual((s["load_avg_1"], s["load_avg_5"], s["load_avg_15"]), (0.5, 0.25, 0.1))
        self.assertEqual(s["net_io"], [{"name": "eth0", "bytes_recv": 1234567, "bytes_sent": 7654321}])

    def test_cpu_per_core_over_the_interval(self):
        """CPU use per core is busy / total time since the previous read; iowait counts as idle."""
        self.reader.baseline()
        self.proc.cpu(((150, 0, 150, 900, 0, 0, 0, 0, 0),      # +100 busy of +200: 50 %
                       (50, 0, 50, 1000, 100, 0, 0, 0, 0)))    # +100 iowait, no busy: 0 %
        self.assertEqual(self.reader.read(1.0)["cpu_util_per_core"], [50.0, 0.0])
        self.proc.cpu(((150, 0, 150, 900, 0, 0, 0, 0, 0), (80, 0, 50, 1000, 100, 0, 0, 0, 30)))
        # core 0 idle: 0 %; core 1: +30 user, guest +30 is already inside user: 100 %
        self.assertEqual(self.reader.read(2.0)["cpu_util_per_core"], [0.0, 100.0])

    def test_unreadable_proc_raises(self):
        """A missing /proc file is an OSError (the monitor logs it); a missing loadavg is zeros."""
        os.remove(os.path.join(self.proc.root, "loadavg"))
        self.assertEqual(self.reader.read(0.0)["load_avg_1"], 0.0)
        os.remove(os.path.join(self.proc.root, "meminfo"))
        self.assertRaises(OSError, self.reader.read, 0.0)

    def test_real_proc(self):
        """This machine's /proc reads, with one value per core."""
        if not os.path.exists("/proc/stat"):
            self.skipTest("no /proc")
        reader = SysReader()
        reader.baseline()
        sample = reader.read(0.0)
        self.assertEqual(len(sample["cpu_util_per_core"]), os.cpu_count())
        self.assertGreater(sample["mem_total_mb"], 0)


class MonitorTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_767_225_600)
        self.proc = FakeProc()
        self.events: list = []

    def monitor(self, every=5.0, which=lambda name: None, reactor=None) -> PerformanceMonitor:
        m = PerformanceMonitor(reactor or self.clock, every, capture_logger(self.events),
                               reader=SysReader(self.proc.root), which=which)
        m.startService()
        self.addCleanup(self._stop, m)
        return m

    def _stop(self, m: PerformanceMonitor) -> None:
        if m.running:
            m.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_samples_every_interval(self):
        """The first sample comes one interval after the start, then one per interval."""
        m = self.monitor(every=5)
        self.assertEqual(m.current(), (None, None))  # Go's nil slices: null
        self.clock.advance(4.9)
        self.assertIsNone(m.current()[0])
        self.clock.advance(0.1)
        self.clock.advance(5)
        sys_stats, gpu_stats = m.current()
        self.assertEqual([s["timestamp"] for s in sys_stats],
                         [rfc3339nano(1_767_225_605), rfc3339nano(1_767_225_610)])
        self.assertIsNone(gpu_stats)

    def test_keeps_an_hour(self):
        """The ring holds an hour of samples: 3600 / every."""
        m = self.monitor(every=60)
        self.clock.pump([60] * 75)
        sys_stats, _ = m.current()
        self.assertEqual(len(sys_stats), 60)
        self.assertEqual(sys_stats[0]["timestamp"], rfc3339nano(1_767_225_600 + 16 * 60))

    def test_after_filters_strictly(self):
        """?after keeps samples strictly newer; an empty answer is [] then, not null."""
        m = self.monitor(every=5)
        self.clock.pump([5, 5, 5])
        sys_stats, gpu_stats = m.current(after=1_767_225_605)
        self.assertEqual(len(sys_stats), 2)
        self.assertEqual(m.current(after=1_767_225_700), ([], []))
        self.assertEqual(gpu_stats, [])

    def test_read_failure_logged_and_skipped(self):
        """A failed read logs an error and takes no sample; sampling goes on."""
        m = self.monitor(every=5)
        os.remove(os.path.join(self.proc.root, "meminfo"))
        self.clock.advance(5)
        self.assertIsNone(m.current()[0])
        self.assertTrue(any("failed to read sys stats" in e["log_format"] for e in self.events))
        self.proc.write("meminfo", MEMINFO)
        self.clock.advance(5)
        self.assertEqual(len(m.current()[0]), 1)

    def test_no_gpu_tool(self):
        """Without nvidia-smi nothing is spawned, and it is said once."""
        reactor = FakeProcessReactor()
        m = PerformanceMonitor(reactor, 5, capture_logger(self.events), reader=SysReader(self.proc.root),
                               which=lambda name: None)
        m.startService()
        self.assertEqual(reactor.spawned, [])
        self.assertIn("GPU monitoring not available", self.events[-1]["log_format"])
        m.stopService()

    def test_nvidia_smi(self):
        """With nvidia-smi: one --loop child; each line it prints is a GPU sample; stop kills it."""
        reactor = FakeProcessReactor()
        reactor.advance(1_767_225_600)
        m = PerformanceMonitor(reactor, 15, capture_logger(self.events), reader=SysReader(self.proc.root),
                               which=lambda name: "/usr/bin/nvidia-smi")
        m.startService()
        (child,) = reactor.spawned
        self.assertEqual(child.args[0], "/usr/bin/nvidia-smi")
        self.assertEqual(child.args[-2:], ["--loop", "15"])
        self.assertIn("--format=csv,noheader,nounits", child.args)
        child.output(b"0, NVIDIA GeForce RTX 3090, GPU-abc, 45, 30, 1200, 24")
        self.assertIsNone(m.current()[1])  # half a line so far
        child.output(b"576, 40, 120.5\n1, Tesla P40, GPU-def, 50, 0, 0, 24576, [N/A], 9.5\n")
        gpus = m.current()[1]
        self.assertEqual([(g["id"], g["name"], g["mem_total_mb"]) for g in gpus],
                         [(0, "NVIDIA GeForce RTX 3090", 24576), (1, "Tesla P40", 24576)])
        self.assertAlmostEqual(gpus[0]["mem_util_pct"], 1200 / 24576 * 100)
        self.assertEqual(gpus[1]["fan_speed_pct"], 0.0)
        m.stopService()
        self.assertEqual(child.signals, ["KILL"])

    def test_reconfigure(self):
        """A changed interval restarts sampling with an empty ring; disabled stops it."""
        m = self.monitor(every=5)
        self.clock.pump([5, 5])
        m.reconfigure(False, 5)
        self.assertEqual(len(m.current()[0]), 2)  # unchanged: kept
        m.reconfigure(False, 10)
        self.assertIsNone(m.current()[0])
        self.clock.advance(5)
        self.assertIsNone(m.current()[0])
        self.clock.advance(5)
        self.assertEqual(len(m.current()[0]), 1)
        m.reconfigure(True, 10)
        self.clock.advance(60)
        self.assertIsNone(m.current()[0])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_disabled_means_no_monitor(self):
        """performance.disabled: no monitor, and the log says so."""
        self.assertIsNone(make_performance_monitor(self.clock, True, 5, capture_logger(self.events)))
        self.assertEqual(self.events[-1]["log_format"], "performance monitoring is disabled")
        self.assertIsInstance(make_performance_monitor(self.clock, False, 5, capture_logger([])), PerformanceMonitor)


class NvidiaLineTests(SynchronousTestCase):
    def test_parse(self):
        """llama-swap's field order; memory use in percent; too few fields is no sample."""
        g = parse_nvidia_smi_line("3, A100, GPU-x, 61, 97, 40000, 80000, 55, 300.25", 10.0)
        self.assertEqual(g, {"timestamp": 10.0, "id": 3, "name": "A100", "uuid": "GPU-x", "temp_c": 61,
                             "vram_temp_c": 0, "gpu_util_pct": 97.0, "mem_util_pct": 50.0, "mem_used_mb": 40000,
                             "mem_total_mb": 80000, "fan_speed_pct": 55.0, "power_draw_w": 300.25})
        self.assertIsNone(parse_nvidia_smi_line("0, A100", 0.0))

    def test_protocol_ignores_junk(self):
        seen: list = []
        proto = NvidiaSmi(Clock(), seen.append)
        proto.outReceived(b"\nnot,enough\n")
        self.assertEqual(seen, [])


class TimestampTests(SynchronousTestCase):
    def test_go_json_time(self):
        """Go's JSON time: RFC 3339 with the fraction's zeros trimmed, Z for UTC."""
        self.assertEqual(rfc3339nano(1_767_225_600, timezone.utc), "2026-01-01T00:00:00Z")
        self.assertEqual(rfc3339nano(1_767_225_600.5, timezone.utc), "2026-01-01T00:00:00.5Z")
