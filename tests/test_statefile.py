"""The children state file (PROC-14, CLI-5): atomic writes, in-use check, leftover cleanup."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from types import SimpleNamespace

from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from llamaswap import statefile
from llamaswap.process import process_start_time
from llamaswap.statefile import (
    ChildRegistry, StateFileInUse, check_not_in_use, cleanup_leftovers, default_state_file, read_state)
from tests.fakes import capture_logger

TERM, KILL = signal.SIGTERM, signal.SIGKILL


class TempDirCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="llamaswap-state-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "children.json")
        self.events: list = []
        self.log = capture_logger(self.events)

    def write(self, data) -> None:
        with open(self.path, "w") as f:
            f.write(data if isinstance(data, str) else json.dumps(data))

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] is LogLevel.warn]


class DefaultPathTests(SynchronousTestCase):
    def test_beside_pidfile(self):
        """CLI-5: <pidfile>.children.json, made absolute."""
        self.assertEqual(default_state_file("run/llamaswap.pid"),
                         os.path.abspath("run/llamaswap.pid") + ".children.json")

    def test_xdg_runtime_dir(self):
        self.patch(os, "environ", {"XDG_RUNTIME_DIR": "/run/user/1000"})
        self.assertEqual(default_state_file(None), "/run/user/1000/llamaswap/children.json")

    def test_tmp_fallback(self):
        self.patch(os, "environ", {})
        self.assertEqual(default_state_file(""), f"/tmp/llamaswap-{os.getuid()}/children.json")


def proc_stub(model_id: str, pid: int, start_time="123") -> SimpleNamespace:
    return SimpleNamespace(id=model_id, pid=pid, start_time=start_time,
                           model=SimpleNamespace(argv=("llama-server", "--port", "1")))


class RegistryTests(TempDirCase):
    def test_spawn_and_reap_recorded(self):
        """PROC-14: every spawn and reap rewrites the file with the documented shape."""
        registry = ChildRegistry(os.path.join(self.dir, "sub", "children.json"), self.log)
        registry.spawned(proc_stub("a", 4242))
        data = read_state(registry.path)
        self.assertEqual(data["daemon_pid"], os.getpid())
        self.assertEqual(data["daemon_start_time"], process_start_time(os.getpid()))
        self.assertEqual(data["children"], [{"model": "a", "pid": 4242, "pgid": 4242, "start_time": "123",
                                             "argv": ["llama-server", "--port", "1"]}])
        registry.spawned(proc_stub("b", 4343))
        registry.reaped(proc_stub("a", 4242))
        self.assertEqual([c["model"] for c in read_state(registry.path)["children"]], ["b"])

    def test_write_is_atomic(self):
        """PROC-14: written to a temporary file, then renamed over the target."""
        registry = ChildRegistry(self.path, self.log)
        self.write("previous content")
        renames = []
        real_replace = os.replace

        def replace(src, dst):
            with open(src) as f:
                renames.append((src, dst, json.load(f)))  # complete before the rename
            with open(dst) as f:
                self.assertEqual(f.read(), "previous content")  # target untouched until then
            real_replace(src, dst)

        self.patch(os, "replace", replace)
        registry.spawned(proc_stub("a", 1))
        (src, dst, content), = renames
        self.assertNotEqual(src, dst)
        self.assertEqual(os.path.dirname(src), os.path.dirname(dst))
        self.assertEqual(dst, self.path)
        self.assertEqual(content["children"][0]["model"], "a")
        self.assertEqual(os.listdir(self.dir), ["children.json"])  # no temporary file left

    def test_remove(self):
        """CLI-9 (5): the file is removed at shutdown; a missing file is fine."""
        registry = ChildRegistry(self.path, self.log)
        registry.write()
        registry.remove()
        self.assertFalse(os.path.exists(self.path))
        registry.remove()

    def test_pidfile_recorded(self):
        """The twistd pidfile is recorded, so a refused second daemon can be told about it."""
        ChildRegistry(self.path, self.log, pidfile="/run/x/twistd.pid").write()
        self.assertEqual(read_state(self.path)["pidfile"], "/run/x/twistd.pid")
        ChildRegistry(self.path, self.log).write()
        self.assertNotIn("pidfile", read_state(self.path))

    def test_start_time_follows_the_pid(self):
        """twistd builds the service before it daemonizes: after the fork the daemon records
        its own pid and start time, not the launcher's."""
        registry = ChildRegistry(self.path, self.log)
        launcher = os.getpid()
        self.assertEqual(registry.daemon_start_time, process_start_time(launcher))
        daemon = os.getppid()   # stands in for the forked daemon
        self.patch(os, "getpid", lambda: daemon)
        registry.write()
        data = read_state(self.path)
        self.assertEqual((data["daemon_pid"], data["daemon_start_time"]), (daemon, process_start_time(daemon)))

    def test_unwritable_logs_error(self):
        """A state file that cannot be written is logged, not raised."""
        blocker = os.path.join(self.dir, "file")
        self.write("x")
        os.rename(self.path, blocker)
        registry = ChildRegistry(os.path.join(blocker, "children.json"), self.log)
        registry.write()
        self.assertTrue(any(e["log_level"] is LogLevel.error for e in self.events))


class InUseTests(TempDirCase):
    def test_missing_or_corrupt_file_is_free(self):
        check_not_in_use(self.path)
        self.write("{not json")
        check_not_in_use(self.path)

    def test_live_daemon_with_same_start_time_is_in_use(self):
        """PROC-14: same pid and start time alive -> 'state file <path> is in use by pid <n>'."""
        pid = os.getppid()
        self.write({"daemon_pid": pid, "daemon_start_time": process_start_time(pid), "children": []})
        e = self.assertRaises(StateFileInUse, check_not_in_use, self.path)
        self.assertEqual(str(e), f"state file {self.path} is in use by pid {pid}")
        self.assertEqual((e.path, e.pid, e.pidfile), (self.path, pid, None))

    def test_in_use_names_the_other_pidfile(self):
        pid = os.getppid()
        self.write({"daemon_pid": pid, "daemon_start_time": process_start_time(pid), "children": [],
                    "pidfile": "/srv/a/twistd.pid"})
        e = self.assertRaises(StateFileInUse, check_not_in_use, self.path)
        self.assertEqual(e.pidfile, "/srv/a/twistd.pid")

    def test_reused_pid_is_free(self):
        """PROC-14: same pid but another start time: the pid was reused."""
        pid = os.getppid()
        self.write({"daemon_pid": pid, "daemon_start_time": "not-the-start-time", "children": []})
        check_not_in_use(self.path)

    def test_unknown_start_time_counts_as_in_use(self):
        """Without /proc no start time can be read: a live recorded daemon is assumed to be ours,
        whatever start time the file holds (an earlier version wrote ps's lstart there)."""
        self.patch(statefile, "process_start_time", lambda pid: None)
        pid = os.getppid()
        for recorded in (None, "Mon Jan  5 10:00:00 2026"):
            self.write({"daemon_pid": pid, "daemon_start_time": recorded, "children": []})
            self.assertRaises(StateFileInUse, check_not_in_use, self.path)

    def test_dead_daemon_is_free(self):
        child = subprocess.Popen(["true"])
        child.wait()
        self.write({"daemon_pid": child.pid, "daemon_start_time": "1", "children": []})
        check_not_in_use(self.path)

    def test_own_pid_is_free(self):
        self.write({"daemon_pid": os.getpid(), "daemon_start_time": process_start_time(os.getpid())})
        check_not_in_use(self.path)


class CleanupTests(TempDirCase):
    """cleanup_leftovers with the OS faked: groups, start times, signals, time."""

    def setUp(self) -> None:
        super().setUp()
        self.alive: dict[int, bool] = {}
        self.start_times: dict[int, str] = {}
        self.dies_on_term: set[int] = set()
        self.kills: list = []
        self.now = 1000.0
        self.patch(statefile, "group_alive", lambda pgid: self.alive.get(pgid, False))
        self.patch(statefile, "process_start_time", lambda pid: self.start_times.get(pid))

    def kill(self, pgid, sig):
        self.kills.append((pgid, sig))
        if not self.alive.get(pgid):
            raise ProcessLookupError(3, "No such process")
        if sig == KILL or pgid in self.dies_on_term:
            self.alive[pgid] = False

    def sleep(self, seconds):
        self.now += seconds

    def run_cleanup(self, children):
        self.write({"daemon_pid": 999999, "daemon_start_time": "1", "children": children})
        return cleanup_leftovers(self.path, self.log, kill=self.kill, sleep=self.sleep,
                                 monotonic=lambda: self.now)

    def test_group_dies_on_term(self):
        """PROC-14: recorded groups get SIGTERM; one that exits gets no SIGKILL."""
        self.alive[500] = True
        self.start_times[500] = "77"
        self.dies_on_term.add(500)
        killed = self.run_cleanup([{"model": "a", "pid": 500, "pgid": 500, "start_time": "77"}])
        self.assertEqual(killed, [500])
        self.assertEqual(self.kills, [(500, TERM)])
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("500", self.warnings()[0])

    def test_stubborn_group_killed_after_5s(self):
        """PROC-14: SIGKILL after 5 s; the wait is bounded."""
        self.alive[500] = True
        self.start_times[500] = "77"
        self.run_cleanup([{"model": "a", "pid": 500, "pgid": 500, "start_time": "77"}])
        self.assertEqual(self.kills, [(500, TERM), (500, KILL)])
        self.assertGreaterEqual(self.now - 1000.0, 5.0)
        self.assertLess(self.now - 1000.0, 5.5)

    def test_reused_pid_skipped(self):
        """PROC-14: pid = pgid alive with another start time: skipped, logged at WARN."""
        self.alive[600] = True
        self.start_times[600] = "other"
        killed = self.run_cleanup([{"model": "b", "pid": 600, "pgid": 600, "start_time": "88"}])
        self.assertEqual((killed, self.kills), ([], []))
        warning, = self.warnings()
        self.assertIn("600", warning)
        self.assertEqual(self.now, 1000.0)

    def test_unreadable_start_time_still_killed(self):
        """PROC-14: when the start time cannot be read, the group is killed anyway."""
        self.alive[700] = True  # leader gone, a grandchild left in the group
        self.dies_on_term.add(700)
        killed = self.run_cleanup([{"model": "c", "pid": 700, "pgid": 700, "start_time": "99"}])
        self.assertEqual(killed, [700])
        self.assertEqual(self.kills, [(700, TERM)])

    def test_dead_groups_and_bad_entries_ignored(self):
        """Gone groups, pgid <= 1 and malformed entries are never signalled."""
        killed = self.run_cleanup([{"model": "d", "pid": 800, "pgid": 800, "start_time": "1"},
                                   {"model": "e", "pgid": 1}, {"model": "f", "pgid": 0},
                                   {"model": "g", "pgid": "12"}, "junk"])
        self.assertEqual((killed, self.kills), ([], []))

    def test_several_groups_terminated_together(self):
        """All groups get SIGTERM first; only survivors get SIGKILL after the shared grace."""
        for pgid in (1500, 1600):
            self.alive[pgid] = True
            self.start_times[pgid] = "s"
        self.dies_on_term.add(1500)
        self.run_cleanup([{"model": "a", "pgid": 1500, "start_time": "s"},
                          {"model": "b", "pgid": 1600, "start_time": "s"}])
        self.assertEqual(self.kills, [(1500, TERM), (1600, TERM), (1600, KILL)])
        self.assertLess(self.now - 1000.0, 5.5)

    def test_no_file(self):
        self.assertEqual(cleanup_leftovers(self.path, self.log, kill=self.kill, sleep=self.sleep), [])
        self.write("[]")
        self.assertEqual(cleanup_leftovers(self.path, self.log, kill=self.kill, sleep=self.sleep), [])
