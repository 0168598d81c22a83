"""Process-level tuning of the daemon (llamaswap.runtime)."""
from __future__ import annotations

import gc
import platform
import sys

from twisted.trial.unittest import SynchronousTestCase

from llamaswap import runtime


class SettleTests(SynchronousTestCase):
    def setUp(self) -> None:
        threshold = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *threshold)
        self.addCleanup(gc.unfreeze)

    def test_freezes_startup_objects_and_raises_the_first_threshold(self):
        kept = [object() for _ in range(10)] + [[] for _ in range(10)]
        second, third = gc.get_threshold()[1:]
        runtime.settle()
        self.assertGreater(gc.get_freeze_count(), len(kept) // 2)
        self.assertEqual(gc.get_threshold(), (runtime.GC_THRESHOLD, second, third))

    def test_cycles_are_still_collected(self):
        runtime.settle()
        cycle: list = []
        cycle.append(cycle)
        del cycle
        self.assertGreaterEqual(gc.collect(), 1)

    def test_trim_heap_where_glibc_has_it(self):
        glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
        self.assertEqual(runtime.trim_heap(), glibc)
