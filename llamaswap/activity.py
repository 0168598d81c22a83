"""Request activity: one entry per finished model request, as llama-swap's activity log keeps it.

Every ``RequestRecord`` the web layer emits becomes an ``ActivityEntry``
(:mod:`llamaswap.activitystore`: id, time, model, path, status, token counts and speeds,
duration). :class:`ActivityLog` keeps them in one of two places:

* no ``store.path``: a ring of the newest ``metricsMaxInMemory`` entries (``MemoryActivity``);
* ``store.path``: an SQLite file (``SQLiteActivityStore``, llama-swap's schema), so the
  activity survives a restart. The request path never touches the disk: the listener only
  appends to a list, a flush every second hands the batch to one dedicated thread, and every
  read goes to that same thread after the pending batch, so it sees every finished request.

``GET /api/metrics/activity`` and ``GET /api/metrics/stats`` (``llamaswap.web.activity``) answer
from whichever is in use, with the same results.

A store that cannot be opened at startup (not a database, a directory that does not exist,
a schema from a newer llamaswap) is a startup error naming the path, as in llama-swap (which
exits with "failed to create store"); at a reload the old store stays in use and a warning says why.
"""
from __future__ import annotations

import http
import math
from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from llamaswap.activitystore import (
    SCHEMA_VERSION, ActivityEntry, ActivityQuery, MemoryActivity, SQLiteActivityStore, StoreError, histogram)

__all__ = [
    "ActivityEntry", "ActivityLog", "ActivityQuery", "FLUSH_EVERY", "MemoryActivity", "SCHEMA_VERSION",
    "SQLiteActivityStore", "StoreError", "entry_from_record", "histogram",
]

#: seconds between two flushes of finished requests to the store.
FLUSH_EVERY = 1.0


# -- entries of requests ---------------------------------------------------------------------------

def _status_text(status: int) -> str:
    """Go's fallback error text for a failed response: ``404 Not Found``, or ``HTTP 499``."""
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def entry_from_record(record: Any, now: float) -> Optional[ActivityEntry]:
    """The activity entry of a finished ``RequestRecord``; None for a request that failed before
    a model was chosen (llama-swap records only requests that reached a model).

    :param now: when the request ended (the entry's time, whole seconds kept).
    """
    if not record.model or getattr(record, "method", "POST") not in ("POST", ""):
        return None  # llama-swap records the POSTs that reached a model, nothing else
    status = record.status or 0
    usage = record.usage
    tokens: dict = {}
    if usage:  # -1: reported usage, but not this figure (llama-swap's buildMetrics)
        def known(key: str, missing: Any) -> Any:
            value = usage.get(key)
            return missing if value is None else value
        tokens = dict(input_tokens=int(known("input", 0)), output_tokens=int(known("output", 0)),
                      cache_tokens=int(known("cached", -1)), draft_tokens=-1, draft_acc_tokens=-1,
                      prompt_per_second=float(known("prompt_per_second", -1)),
                      tokens_per_second=float(known("tokens_per_second", -1)))
    error = record.stream_error or ("" if status == 200 else _status_text(status))
    return ActivityEntry(
        id=record.id, ts=int(math.floor(now)), model=record.model,
        # the record names the route; a record that knows the request's own path or the
        # response's content type says so
        req_path=getattr(record, "path", None) or record.endpoint,
        resp_content_type=getattr(record, "content_type", None) or "",
        resp_status_code=status, duration_ms=int(round((record.duration or 0.0) * 1000)),
        error_msg=error, metadata=getattr(record, "metadata", None) or None, **tokens)


# -- the log ---------------------------------------------------------------------------------------

class ActivityLog(Service):
    """Keeps the activity of finished requests, in memory or in the store; answers queries.

    :param reactor: time (the flush) and, unless ``run_in_thread`` is given, the thread pool's
        way back to the reactor.
    :param log: where store failures are reported.
    :param store_path: ``store.path``; "" keeps activity in memory only.
    :param max_in_memory: ``metricsMaxInMemory``: the in-memory ring's size (the store keeps
        everything, as in llama-swap).
    :param run_in_thread: ``(f, *args) -> Deferred``: run a blocking store call off the reactor
        thread, one at a time, in order. The default is one dedicated thread.
    :param has_capture: ``id -> bool``: whether a capture of that request is kept.
    :param flush_every: seconds between two writes of pending entries.
    """

    name = "activity"

    def __init__(self, reactor: Any, log: Logger, store_path: str = "", max_in_memory: int = 1000,
                 run_in_thread: Optional[Callable[..., Deferred]] = None,
                 has_capture: Optional[Callable[[int], bool]] = None, flush_every: float = FLUSH_EVERY) -> None:
        self._reactor = reactor
        self._log = log
        self._path = store_path.strip()
        self._memory = MemoryActivity(max_in_memory)
        self._run = run_in_thread
        self._pool: Optional[ThreadPool] = None
        self._has_capture = has_capture or (lambda _id: False)
        self._store: Optional[SQLiteActivityStore] = None   # touched on the store thread only
        self._pending: list = []
        self._next_id = 1
        self._checked = ""
        self._flush_every = flush_every
        self._store_used = False   # a store was opened once: stopping must close it
        self._loop = LoopingCall(self.flush)
        self._loop.clock = reactor

    @property
    def store_path(self) -> str:
        """The store in use ("" when activity is kept in memory)."""
        return self._path

    # -- startup and ids ----------------------------------------------------------------------------

    def open(self) -> None:
        """Check the store before the daemon serves (``LlamaSwapService.bind``), and seed the
        request ids above the ids it holds. The file is closed again: the store thread opens it
        once the daemon runs (an SQLite connection must not cross twistd's fork).

        :raises StoreError: naming the path and the reason.
        """
        if self._path and self._checked != self._path:
            self._seed(self._path)

    def _seed(self, path: str) -> None:
        store = SQLiteActivityStore.open(path)
        try:
            self._next_id = max(self._next_id, store.max_id() + 1)
        finally:
            store.close()
        self._checked = path

    def next_id(self) -> int:
        """The next request's activity id (``WebContext.request_ids``)."""
        value = self._next_id
        self._next_id += 1
        return value

    def startService(self) -> None:
        super().startService()
        if self._path:
            self.open()
            self._use_store(self._path)

    def _use_store(self, path: str) -> None:
        if self._run is None:  # the store's own thread, started with the first store
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="llamaswap-activity")
            self._pool.start()
            self._run = lambda f, *args: deferToThreadPool(self._reactor, self._pool, f, *args)
        self._store_used = True
        if not self._loop.running:  # in memory only, nothing is ever pending: no timer then
            self._loop.start(self._flush_every, now=False)
        d = self._run(self._thread_open, path)
        d.addErrback(self._open_failed, path)

    def _thread_open(self, path: str) -> None:
        self._store = SQLiteActivityStore.open(path)

    def _open_failed(self, failure: Failure, path: str) -> None:
        if self._path != path:
            return
        self._log.error("{error}; activity is kept in memory only", error=failure.getErrorMessage())
        for entry in self._pending:
            self._memory.add(entry)
        self._pending, self._path = [], ""

    def stopService(self) -> Optional[Deferred]:
        """Write what is pending, close the store, end the thread; fires once all is done."""
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if not self._store_used or self._run is None:
            return None  # activity was only ever in memory: nothing to write or close
        self.flush()
        self._store_used = False
        d = self._run(self._thread_close)
        d.addErrback(lambda f: self._log.failure("closing the activity store failed", f))
        if self._pool is not None:
            pool, self._pool, self._run = self._pool, None, None
            d.addBoth(lambda _: pool.stop())
        return d

    def _thread_close(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            store.close()

    # -- recording ----------------------------------------------------------------------------------

    def request_finished(self, record: Any) -> None:
        """``WebContext.request_listeners``: keep a finished request; no I/O here, ever."""
        entry = entry_from_record(record, self._reactor.seconds())
        if entry is None:
            return
        if self._path:
            self._pending.append(entry)
        else:
            self._memory.add(entry)

    def flush(self) -> Deferred:
        """Hand the pending entries to the store thread; fires once they are written (or the
        failure logged). The ``LoopingCall`` calls it every ``flush_every`` seconds."""
        if not self._pending or self._run is None:
            return succeed(None)
        batch, self._pending = self._pending, []
        d = self._run(self._thread_insert, batch)
        d.addErrback(self._insert_failed, len(batch))
        return d

    def _thread_insert(self, batch: list) -> None:
        if self._store is None:
            raise RuntimeError("the activity store is not open")
        self._store.insert(batch)

    def _insert_failed(self, failure: Failure, count: int) -> None:
        self._log.warn("failed to persist {count} activity entries: {error}", count=count,
                       error=failure.getErrorMessage())

    # -- queries ------------------------------------------------------------------------------------

    def list(self, query: ActivityQuery) -> Deferred:
        """llama-swap's activity page for ``query``, entries as JSON."""
        if self._path and self._run is not None:
            self.flush()
            d = self._run(self._thread_call, "list", query)
        else:
            d = succeed(self._memory.list(query))
        return d.addCallback(self._entries_as_json)

    def stats(self, model: str = "") -> Deferred:
        """llama-swap's activity stats, of one model or all."""
        if self._path and self._run is not None:
            self.flush()
            return self._run(self._thread_call, "stats", model)
        return succeed(self._memory.stats(model))

    def _thread_call(self, method: str, *args: Any) -> Any:
        if self._store is None:
            raise RuntimeError("the activity store is not open")
        return getattr(self._store, method)(*args)

    def _entries_as_json(self, page: dict) -> dict:
        page["data"] = [e.as_json(self._has_capture(e.id)) for e in page["data"]]
        return page

    # -- reload -------------------------------------------------------------------------------------

    def reconfigure(self, store_path: str, max_in_memory: int) -> None:
        """Apply a reloaded config: the ring's size, and a changed ``store.path``.

        A new store is checked at once; when it cannot be used, a warning says why and the
        current one stays (llama-swap keeps its running server then).
        """
        self._memory.resize(max_in_memory)
        path = store_path.strip()
        if path == self._path:
            return
        if path:
            try:
                self._seed(path)
            except StoreError as e:
                self._log.warn("{error}; activity stays in {current}", error=str(e),
                               current=f"'{self._path}'" if self._path else "memory")
                return
        if self._path and self._run is not None:
            self.flush()
            self._run(self._thread_close).addErrback(
                lambda f: self._log.failure("closing the activity store failed", f))
        self._path = path
        if path and self.running:
            self._use_store(path)
