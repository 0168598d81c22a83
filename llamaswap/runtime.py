"""Process-level tuning for the daemon, applied once it owns the process and has started.

The daemon is a long-lived single process whose request path allocates many short-lived
container objects (Deferreds, header lists, records). Two things CPython does by default cost
it measurably (see bench/profile-notes.rst):

* the cyclic collector's first generation runs every 700 net container allocations: about
  every third request, so ~4 % of the data path's CPU went to collections that free little
  (almost everything is freed by reference counting);
* every full collection walks the objects made at startup (imports, config, the resource tree),
  which never become garbage.

:func:`settle` freezes what startup made (``gc.freeze``: the collector stops walking it) and raises
the first generation's threshold; reference counting still frees everything at once, and cycles
are still collected, only less often. It then hands back to the C allocator the heap that startup
freed (imports and config parsing leave much of it unused), so the daemon's idle RSS is what it
uses. Nothing here changes behaviour.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc

__all__ = ["GC_THRESHOLD", "settle", "trim_heap"]

#: the first generation's threshold for the daemon (CPython's default is 700)
GC_THRESHOLD = 10_000


def settle() -> None:
    """Freeze the startup objects, raise the collector's first threshold, trim the heap."""
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, second, third)
    trim_heap()


def trim_heap() -> bool:
    """Return the C heap's free memory to the system (glibc's ``malloc_trim``); False where
    there is no such call (other C libraries), which is harmless."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
