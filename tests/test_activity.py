"""The activity log: entries from request records, the in-memory ring and the SQLite store
(``llamaswap.activitystore``), and the batching that keeps the disk off the request path
(``llamaswap.activity``).

The store thread is a :class:`ManualThread` here: calls queue up until the test runs them,
so a test sees exactly what the listener, the flush and the reads hand over. One test uses the
real dedicated thread.
"""
from __future__ import annotations

import builtins
import os
import sqlite3
import tempfile
from unittest import mock

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llamaswap.activity import ActivityLog, entry_from_record
from llamaswap.activitystore import (
    SCHEMA_VERSION, ActivityEntry, ActivityQuery, MemoryActivity, SQLiteActivityStore, StoreError, histogram)
from llamaswap.listener import StartupError
from llamaswap.web.context import RequestRecord
from tests.fakes import capture_logger


class ManualThread:
    """Stands in for the store thread: calls wait in order until :meth:`run`."""

    def __init__(self) -> None:
        self.queue: list = []

    def __call__(self, f, *args) -> Deferred:
        d: Deferred = Deferred()
        self.queue.append((f, args, d))
        return d

    def names(self) -> list:
        return [f.__name__ for f, _, _ in self.queue]

    def run(self) -> None:
        while self.queue:
            f, args, d = self.queue.pop(0)
            try:
                result = f(*args)
            except Exception:
                d.errback()
            else:
                d.callback(result)


def record(id=1, model="qwen", status=200, usage=None, duration=0.25, endpoint="/v1/chat/completions",
           stream_error=None) -> RequestRecord:
    r = RequestRecord(endpoint=endpoint, started=100.0, id=id, model=model)
    r.status, r.duration, r.usage, r.stream_error = status, duration, usage, stream_error
    return r


USAGE = {"input": 12, "output": 30, "cached": 4, "prompt_per_second": 250.5, "tokens_per_second": 42.0}


def entry(i: int, **kw) -> ActivityEntry:
    values = dict(id=i, ts=1_700_000_000 + i * 7 % 5, model=f"m{i % 3}", req_path="/v1/chat/completions",
                  resp_status_code=200 if i % 4 else 502, input_tokens=i * 3, output_tokens=i % 5,
                  cache_tokens=-1 if i % 2 else i, prompt_per_second=float(i * 11 % 7),
                  tokens_per_second=float(i % 6), duration_ms=i * 10)
    values.update(kw)
    return ActivityEntry(**values)


def rows_in(path: str) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT COUNT(*) FROM activity").fetchone()[0]
    finally:
        db.close()


class EntryTests(SynchronousTestCase):
    def test_entry_from_record_with_usage(self):
        """Token counts, speeds and the duration come from the record; draft counts are -1."""
        e = entry_from_record(record(id=7, usage=USAGE), now=1234.9)
        self.assertEqual((e.id, e.ts, e.model, e.req_path, e.resp_status_code, e.duration_ms),
                         (7, 1234, "qwen", "/v1/chat/completions", 200, 250))
        self.assertEqual((e.input_tokens, e.output_tokens, e.cache_tokens, e.prompt_per_second,
                          e.tokens_per_second, e.draft_tokens, e.draft_acc_tokens), (12, 30, 4, 250.5, 42.0, -1, -1))
        self.assertEqual(e.error_msg, "")

    def test_unreported_figures_are_minus_one(self):
        """Usage without a figure gives -1 for cached and speeds, 0 for token counts."""
        e = entry_from_record(record(usage={"input": 5, "output": None}), now=0)
        self.assertEqual((e.input_tokens, e.output_tokens, e.cache_tokens, e.prompt_per_second,
                          e.tokens_per_second), (5, 0, -1, -1.0, -1.0))

    def test_no_usage_is_all_zero(self):
        """A response without usage is llama-swap's minimal entry: every token field 0."""
        e = entry_from_record(record(usage=None), now=0)
        self.assertEqual((e.input_tokens, e.cache_tokens, e.prompt_per_second, e.draft_tokens), (0, 0, 0.0, 0))

    def test_error_messages(self):
        """A failed status gets Go's status text; a broken stream says why; a 499 has no phrase."""
        self.assertEqual(entry_from_record(record(status=502), 0).error_msg, "502 Bad Gateway")
        self.assertEqual(entry_from_record(record(status=499), 0).error_msg, "HTTP 499")
        self.assertEqual(entry_from_record(record(stream_error="upstream closed"), 0).error_msg, "upstream closed")

    def test_request_without_model_is_not_recorded(self):
        """A request that failed before a model was chosen has no activity entry."""
        self.assertIsNone(entry_from_record(record(model=""), 0))

    def test_json_shape(self):
        """The JSON entry has llama-swap's fields; error_msg and metadata only when set."""
        e = entry_from_record(record(id=3, usage=USAGE), now=1767225600)
        out = e.as_json(has_capture=True)
        self.assertEqual(list(out), ["id", "timestamp", "model", "req_path", "resp_content_type",
                                     "resp_status_code", "tokens", "duration_ms", "has_capture"])
        self.assertEqual(list(out["tokens"]), ["cache_tokens", "draft_tokens", "draft_acc_tokens", "input_tokens",
                                               "output_tokens", "prompt_per_second", "tokens_per_second"])
        self.assertTrue(out["has_capture"])
        self.assertRegex(out["timestamp"], r"^2026-01-0[12]T\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)$")
        failed = ActivityEntry(id=1, ts=0, model="m", error_msg="boom", metadata={"selector": "s"}).as_json()
        self.assertEqual((failed["error_msg"], failed["metadata"]), ("boom", {"selector": "s"}))

    def test_row_round_trip(self):
        """An entry survives its row form, metadata included."""
        e = entry(5, metadata={"selector": "fast"})
        self.assertEqual(ActivityEntry.from_row(e.row()), e)


class HistogramTests(SynchronousTestCase):
    def test_empty_is_none(self):
        self.assertIsNone(histogram([]))

    def test_one_value(self):
        """Equal values: one bin, binSize 0, every percentile the value."""
        self.assertEqual(histogram([3.0, 3.0]), {"bins": [2], "min": 3.0, "max": 3.0, "binSize": 0,
                                                 "p50": 3.0, "p95": 3.0, "p99": 3.0})

    def test_bins_and_percentiles(self):
        """Sturges' rule bounded to 5..20 bins; percentiles interpolate between ranks."""
        h = histogram([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0])
        self.assertEqual(len(h["bins"]), 5)  # ceil(log2(11)) + 1 = 5
        self.assertEqual(sum(h["bins"]), 11)
        self.assertEqual(h["bins"][-1], 3)  # 9, 10 and 11: the max lands in the last bin
        self.assertAlmostEqual(h["binSize"], 2.0)
        self.assertEqual((h["p50"], h["p95"]), (6.0, 10.5))
        self.assertEqual(len(histogram([float(i) for i in range(5000)])["bins"]), 14)


class MemoryTests(SynchronousTestCase):
    def test_ring_keeps_newest(self):
        """metricsMaxInMemory bounds the ring; the oldest entries go first."""
        ring = MemoryActivity(3)
        for i in range(1, 6):
            ring.add(entry(i))
        self.assertEqual([e.id for e in ring.list(ActivityQuery())["data"]], [5, 4, 3])
        ring.resize(2)
        self.assertEqual([e.id for e in ring.list(ActivityQuery())["data"]], [5, 4])

    def test_paging(self):
        """page and limit slice the ordered rows; total and total_pages count every match."""
        ring = MemoryActivity(100)
        for i in range(1, 8):
            ring.add(entry(i))
        page = ring.list(ActivityQuery(limit=3, page=3))
        self.assertEqual(([e.id for e in page["data"]], page["total"], page["total_pages"]), ([1], 7, 3))
        self.assertEqual(ring.list(ActivityQuery(models=("nope",)))["total_pages"], 0)


class StoreTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="llamaswap-activity-")
        self.path = os.path.join(self.dir, "activity.db")

    def open(self) -> SQLiteActivityStore:
        store = SQLiteActivityStore.open(self.path)
        self.addCleanup(store.close)
        return store

    def test_round_trip(self):
        """Entries written are read back whole, newest first, after the file is reopened."""
        store = self.open()
        entries = [entry(i, metadata={"n": str(i)} if i == 2 else None) for i in range(1, 6)]
        store.insert(entries)
        store.close()
        again = self.open()
        self.assertEqual(again.list(ActivityQuery())["data"], entries[::-1])
        self.assertEqual(again.max_id(), 5)

    def test_schema_is_versioned(self):
        """A new file gets llama-swap's table and user_version 1, in WAL mode."""
        self.open()
        db = sqlite3.connect(self.path)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        self.assertIn("idx_activity_model_created_id", names)

    def test_llama_swap_file_is_adopted(self):
        """A file llama-swap wrote (its table, goose's bookkeeping, user_version 0) is read as is."""
        db = sqlite3.connect(self.path)
        db.executescript("""
            CREATE TABLE goose_db_version (id INTEGER PRIMARY KEY, version_id INTEGER, is_applied INTEGER);
            CREATE TABLE activity (id INTEGER PRIMARY KEY AUTOINCREMENT, ts_created INTEGER NOT NULL,
              model_id TEXT NOT NULL, req_path TEXT NOT NULL DEFAULT '', resp_content_type TEXT NOT NULL DEFAULT '',
              resp_status_code INTEGER NOT NULL DEFAULT 0, cache_tokens INTEGER NOT NULL DEFAULT 0,
              draft_tokens INTEGER NOT NULL DEFAULT 0, draft_acc_tokens INTEGER NOT NULL DEFAULT 0,
              input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
              prompt_per_second REAL NOT NULL DEFAULT 0, tokens_per_second REAL NOT NULL DEFAULT 0,
              duration_ms INTEGER NOT NULL DEFAULT 0, error_msg TEXT NOT NULL DEFAULT '',
              metadata_json TEXT NOT NULL DEFAULT '');
            INSERT INTO activity (ts_created, model_id, input_tokens) VALUES (1700000000, 'old', 9);
            DELETE FROM activity; INSERT INTO activity (ts_created, model_id, input_tokens) VALUES (1700000001, 'kept', 3);
        """)
        db.close()
        store = self.open()
        self.assertEqual([(e.id, e.model) for e in store.list(ActivityQuery())["data"]], [(2, "kept")])
        self.assertEqual(store.max_id(), 2)

    def test_max_id_counts_deleted_rows(self):
        """New ids start above every id the file ever held, not only the rows left."""
        store = self.open()
        store.insert([entry(1), entry(9)])
        store._db.execute("DELETE FROM activity WHERE id = 9")
        self.assertEqual(store.max_id(), 9)

    def test_taken_id_gets_a_new_one(self):
        """A row whose id is taken (another writer) is kept under a new id rather than lost."""
        store = self.open()
        store.insert([entry(1)])
        store.insert([entry(1, model="second")])
        self.assertEqual([(e.id, e.model) for e in store.list(ActivityQuery())["data"]], [(2, "second"), (1, "m1")])

    def test_not_a_database(self):
        """A file that is not SQLite: StoreError naming the path and the key, a StartupError."""
        with open(self.path, "wb") as f:
            f.write(b"this is not a database, just some text\n" * 200)
        with self.assertRaises(StoreError) as caught:
            SQLiteActivityStore.open(self.path)
        self.assertIsInstance(caught.exception, StartupError)
        self.assertIn(f"'{self.path}' (store.path)", str(caught.exception))
        self.assertIn("file is not a database", str(caught.exception))

    def test_unwritable_location(self):
        """A path whose directory is a file (cannot be created, even by root) is a StoreError."""
        blocker = os.path.join(self.dir, "a-file")
        open(blocker, "w").close()
        bad = os.path.join(blocker, "activity.db")
        with self.assertRaises(StoreError) as caught:
            SQLiteActivityStore.open(bad)
        self.assertIn(f"'{bad}'", str(caught.exception))
        self.assertIn("unable to open database file", str(caught.exception))

    def test_newer_schema_refused(self):
        """A file from a newer llamaswap (higher user_version) is refused, not rewritten."""
        self.open().close()
        db = sqlite3.connect(self.path)
        db.execute("PRAGMA user_version = 99")
        db.close()
        with self.assertRaises(StoreError) as caught:
            SQLiteActivityStore.open(self.path)
        self.assertIn("schema version 99", str(caught.exception))

    def test_foreign_activity_table_refused(self):
        """Another program's table named activity is not taken for ours, and is left untouched."""
        db = sqlite3.connect(self.path)
        db.execute("CREATE TABLE activity (who TEXT)")
        db.close()
        with self.assertRaises(StoreError) as caught:
            SQLiteActivityStore.open(self.path)
        self.assertIn("not an activity store", str(caught.exception))
        db = sqlite3.connect(self.path)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], 0)


class ParityTests(SynchronousTestCase):
    """The ring and the store answer every query alike (both follow llama-swap's SQL)."""

    def setUp(self):
        path = os.path.join(tempfile.mkdtemp(prefix="llamaswap-activity-"), "a.db")
        self.store = SQLiteActivityStore.open(path)
        self.addCleanup(self.store.close)
        self.ring = MemoryActivity(1000)
        entries = [entry(i) for i in range(1, 41)]
        self.store.insert(entries)
        for e in entries:
            self.ring.add(e)

    def test_queries_agree(self):
        queries = [ActivityQuery(), ActivityQuery(limit=7, page=2), ActivityQuery(models=("m1", "m2"), limit=50),
                   ActivityQuery(start=1_700_000_002, end=1_700_000_003, limit=100),
                   ActivityQuery(min_id=5, max_id=30, order="asc", limit=9, page=3)]
        queries += [ActivityQuery(sort=key, order=order, limit=13, page=2)
                    for key in ("time", "model", "prompt_speed", "cached", "duration", "resp_status_code")
                    for order in ("asc", "desc")]
        for q in queries:
            self.assertEqual(self.ring.list(q), self.store.list(q), q)
        self.assertEqual(self.store.list(queries[3])["total"], 16)

    def test_stats_agree(self):
        for model in ("", "m0", "m2", "none"):
            self.assertEqual(self.ring.stats(model), self.store.stats(model), model)
        stats = self.store.stats()
        self.assertEqual((stats["total_requests"], stats["total_input_tokens"]), (40, 3 * 820))
        self.assertEqual(stats["total_cache_tokens"], sum(range(2, 41, 2)))  # -1 entries not counted
        self.assertIsNone(self.store.stats("none")["gen_histogram"])


class ActivityLogTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_767_225_600)
        self.events: list = []
        self.thread = ManualThread()
        self.path = os.path.join(tempfile.mkdtemp(prefix="llamaswap-activity-"), "activity.db")

    def make(self, path=None, **kw) -> ActivityLog:
        log = ActivityLog(self.clock, capture_logger(self.events), store_path=self.path if path is None else path,
                          run_in_thread=self.thread, **kw)
        return log

    def started(self, **kw) -> ActivityLog:
        log = self.make(**kw)
        log.open()
        log.startService()
        self.thread.run()  # the store thread opens the file
        return log

    def stop(self, log: ActivityLog) -> None:
        d = log.stopService()
        self.thread.run()
        if d is not None:
            self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_memory_mode(self):
        """Without a store, entries go to the ring at once and reads need no thread."""
        log = self.make(path="", max_in_memory=2)
        log.startService()
        for i in (1, 2, 3):
            log.request_finished(record(id=i))
        log.request_finished(record(id=4, model=""))  # failed before a model: not kept
        page = self.successResultOf(log.list(ActivityQuery()))
        self.assertEqual([e["id"] for e in page["data"]], [3, 2])
        self.clock.advance(5)
        self.assertIsNone(log.stopService())  # nothing to write or close
        self.assertEqual(self.thread.queue, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_listener_does_no_io(self):
        """The request listener only appends: no file is opened, nothing reaches the store thread."""
        log = self.started()
        with mock.patch.object(builtins, "open", side_effect=AssertionError("open() on the request path")), \
                mock.patch.object(sqlite3, "connect", side_effect=AssertionError("connect() on the request path")):
            for i in range(1, 51):
                log.request_finished(record(id=i, usage=USAGE))
        self.assertEqual(self.thread.queue, [])
        self.assertEqual(rows_in(self.path), 0)
        self.stop(log)

    def test_flush_batches_every_second(self):
        """One flush a second hands every pending entry to the thread as one batch."""
        log = self.started()
        for i in (1, 2, 3):
            log.request_finished(record(id=i))
        self.clock.advance(0.9)
        self.assertEqual(self.thread.queue, [])
        self.clock.advance(0.1)
        self.assertEqual(self.thread.names(), ["_thread_insert"])
        self.assertEqual(len(self.thread.queue[0][1][0]), 3)
        self.thread.run()
        self.assertEqual(rows_in(self.path), 3)
        self.clock.advance(1)
        self.assertEqual(self.thread.queue, [])  # nothing pending: no write
        self.stop(log)

    def test_reads_see_pending_entries(self):
        """A read right after a request sees it: the pending batch is written first, in order."""
        log = self.started()
        log.request_finished(record(id=1, usage=USAGE))
        d = log.list(ActivityQuery())
        stats = log.stats("qwen")
        self.assertEqual(self.thread.names(), ["_thread_insert", "_thread_call", "_thread_call"])
        self.assertNoResult(d)
        self.thread.run()
        self.assertEqual([e["id"] for e in self.successResultOf(d)["data"]], [1])
        self.assertEqual(self.successResultOf(stats)["total_input_tokens"], 12)
        self.stop(log)

    def test_shutdown_writes_pending(self):
        """Stopping writes what is pending, then closes the store; the next run reads it."""
        log = self.started()
        log.request_finished(record(id=1))
        log.request_finished(record(id=2))
        d = log.stopService()
        self.assertEqual(self.thread.names(), ["_thread_insert", "_thread_close"])
        self.assertNoResult(d)
        self.thread.run()
        self.successResultOf(d)
        self.assertEqual(rows_in(self.path), 2)
        again = self.started()
        self.assertEqual(again.next_id(), 3)  # ids continue past the stored ones
        d = again.list(ActivityQuery())
        self.thread.run()
        self.assertEqual([e["id"] for e in self.successResultOf(d)["data"]], [2, 1])
        self.stop(again)

    def test_failed_write_is_logged(self):
        """A write that fails is a warning naming the count; the daemon goes on."""
        log = self.started()
        log.request_finished(record(id=1))
        with mock.patch.object(SQLiteActivityStore, "insert", side_effect=sqlite3.OperationalError("disk I/O error")):
            self.clock.advance(1)
            self.thread.run()
        warnings = [e for e in self.events if e.get("count") == 1]
        self.assertEqual(warnings[0]["error"], "disk I/O error")
        self.stop(log)

    def test_open_raises_startup_error(self):
        """A corrupt file fails open() (called before the daemon serves) with the path in the message."""
        with open(self.path, "wb") as f:
            f.write(b"garbage" * 1000)
        log = self.make()
        with self.assertRaises(StartupError) as caught:
            log.open()
        self.assertIn(self.path, str(caught.exception))

    def test_store_lost_after_start_falls_back_to_memory(self):
        """If the thread cannot open the store after all, activity is kept in memory and logged."""
        log = self.make()
        log.open()
        with open(self.path, "wb") as f:
            f.write(b"garbage" * 1000)
        log.request_finished(record(id=1))
        log.startService()
        self.thread.run()
        self.assertEqual(log.store_path, "")
        self.assertIn("activity is kept in memory only", self.events[-1]["log_format"])
        page = self.successResultOf(log.list(ActivityQuery()))
        self.assertEqual([e["id"] for e in page["data"]], [1])
        self.stop(log)

    def test_reload_to_bad_store_keeps_current(self):
        """A reload naming an unusable store warns and keeps the current one."""
        log = self.started()
        bad = os.path.join(os.path.dirname(self.path), "bad.db")
        with open(bad, "wb") as f:
            f.write(b"garbage" * 1000)
        log.reconfigure(bad, 1000)
        self.assertEqual(log.store_path, self.path)
        self.assertIn("file is not a database", self.events[-1]["error"])
        self.stop(log)

    def test_reload_moves_to_new_store(self):
        """A new store.path: pending entries go to the old file, new ones to the new file."""
        log = self.started()
        log.request_finished(record(id=1))
        other = os.path.join(os.path.dirname(self.path), "other.db")
        log.reconfigure(other, 1000)
        self.thread.run()
        log.request_finished(record(id=2))
        self.stop(log)
        self.assertEqual((rows_in(self.path), rows_in(other)), (1, 1))

    def test_reload_to_memory(self):
        """An emptied store.path keeps activity in memory from then on."""
        log = self.started()
        log.reconfigure("", 5)
        self.thread.run()
        log.request_finished(record(id=1))
        self.assertEqual(self.thread.queue, [])
        self.assertEqual(len(self.successResultOf(log.list(ActivityQuery()))["data"]), 1)
        self.stop(log)

    def test_reload_from_memory_to_store(self):
        """A store.path added by a reload opens the store and starts the once-a-second flush."""
        log = self.make(path="")
        log.startService()
        self.assertEqual(self.clock.getDelayedCalls(), [])  # in memory: no timer at all
        log.reconfigure(self.path, 1000)
        self.assertEqual(self.thread.names(), ["_thread_open"])
        self.thread.run()
        log.request_finished(record(id=log.next_id()))
        self.clock.advance(1)
        self.thread.run()
        self.assertEqual(rows_in(self.path), 1)
        self.stop(log)

    def test_has_capture(self):
        """has_capture comes from the capture lookup."""
        log = self.make(path="", has_capture=lambda i: i == 2)
        for i in (1, 2):
            log.request_finished(record(id=i))
        data = self.successResultOf(log.list(ActivityQuery()))["data"]
        self.assertEqual([(e["id"], e["has_capture"]) for e in data], [(2, True), (1, False)])



class RealThreadTests(TestCase):
    """The default: one dedicated thread, results back on the reactor; none without a store."""

    timeout = 30

    def test_no_thread_without_store(self):
        log = ActivityLog(reactor, capture_logger([]), store_path="")
        log.startService()
        self.assertIsNone(log._pool)
        self.assertIsNone(log.stopService())

    def test_round_trip_on_the_thread(self):
        path = os.path.join(tempfile.mkdtemp(prefix="llamaswap-activity-"), "activity.db")
        events: list = []
        log = ActivityLog(reactor, capture_logger(events), store_path=path)
        log.open()
        log.startService()
        self.assertEqual((log._pool.min, log._pool.max), (1, 1))

        async def go():
            log.request_finished(record(id=log.next_id(), usage=USAGE))
            page = await log.list(ActivityQuery())
            stats = await log.stats()
            await log.stopService()
            return page, stats

        d = ensureDeferred(go())

        def check(result):
            page, stats = result
            self.assertEqual([e["model"] for e in page["data"]], ["qwen"])
            self.assertEqual(stats["total_output_tokens"], 30)
            self.assertEqual(rows_in(path), 1)
            self.assertIsNone(log._pool)

        return d.addCallback(check)
