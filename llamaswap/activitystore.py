"""Where activity entries live and how they are queried: llama-swap's ``ActivityLogEntry`` and
its store, in two forms that answer every query alike.

* :class:`MemoryActivity`: a ring of the newest ``metricsMaxInMemory`` entries;
* :class:`SQLiteActivityStore`: llama-swap's ``activity`` table in an SQLite file (a file
  llama-swap wrote is used as is), versioned by ``PRAGMA user_version``.

Both follow llama-swap's store queries: the filters, the sort keys (ties ordered by id), the
paging, the totals and the speed histograms. Nothing here knows about Twisted: the store's
methods block, and :class:`llamaswap.activity.ActivityLog` calls them on a thread of their own.
"""
from __future__ import annotations

import json
import math
from collections import deque
from typing import TYPE_CHECKING, Any, Iterable, Optional

import attr

from llamaswap.listener import StartupError
from llamaswap.proxylog import rfc3339nano

if TYPE_CHECKING:  # sqlite3 (~1 MB) is imported only when a store is opened
    import sqlite3

__all__ = [
    "ActivityEntry", "ActivityQuery", "DEFAULT_LIMIT", "MemoryActivity", "SCHEMA_VERSION", "SORT_COLUMNS",
    "SQLiteActivityStore", "StoreError", "histogram",
]

#: ``PRAGMA user_version`` of the files this llamaswap writes.
SCHEMA_VERSION = 1
DEFAULT_LIMIT = 25

#: the sortable API keys and their columns (llama-swap's ``activitySortColumns``).
SORT_COLUMNS = {
    "id": "id", "time": "ts_created", "model": "model_id", "req_path": "req_path",
    "resp_status_code": "resp_status_code", "resp_content_type": "resp_content_type",
    "cached": "cache_tokens", "prompt": "input_tokens", "generated": "output_tokens",
    "drafted": "draft_tokens", "prompt_speed": "prompt_per_second", "gen_speed": "tokens_per_second",
    "duration": "duration_ms",
}

# llama-swap's migration 00001_create_activity.sql; a file it wrote is used as is.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS activity (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_created INTEGER NOT NULL,
    model_id TEXT NOT NULL,
    req_path TEXT NOT NULL DEFAULT '',
    resp_content_type TEXT NOT NULL DEFAULT '',
    resp_status_code INTEGER NOT NULL DEFAULT 0,
    cache_tokens INTEGER NOT NULL DEFAULT 0,
    draft_tokens INTEGER NOT NULL DEFAULT 0,
    draft_acc_tokens INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    prompt_per_second REAL NOT NULL DEFAULT 0,
    tokens_per_second REAL NOT NULL DEFAULT 0,
    duration_ms INTEGER NOT NULL DEFAULT 0,
    error_msg TEXT NOT NULL DEFAULT '',
    metadata_json TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS idx_activity_created_id ON activity (ts_created DESC, id DESC);
CREATE INDEX IF NOT EXISTS idx_activity_model_created_id ON activity (model_id, ts_created DESC, id DESC);
"""

_COLUMNS = ("id", "ts_created", "model_id", "req_path", "resp_content_type", "resp_status_code",
            "cache_tokens", "draft_tokens", "draft_acc_tokens", "input_tokens", "output_tokens",
            "prompt_per_second", "tokens_per_second", "duration_ms", "error_msg", "metadata_json")


# -- entries ---------------------------------------------------------------------------------------

@attr.s(frozen=True, slots=True, auto_attribs=True)
class ActivityEntry:
    """One finished request, the fields of llama-swap's ``ActivityLogEntry``.

    ``ts`` is whole seconds, as the store keeps it. Token fields are ``-1`` when the response
    reported usage but not that figure, ``0`` when it reported no usage at all (llama-swap's
    "minimal metrics").
    """

    id: int
    ts: int
    model: str
    req_path: str = ""
    resp_content_type: str = ""
    resp_status_code: int = 0
    cache_tokens: int = 0
    draft_tokens: int = 0
    draft_acc_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    prompt_per_second: float = 0.0
    tokens_per_second: float = 0.0
    duration_ms: int = 0
    error_msg: str = ""
    metadata: Optional[dict] = None

    def row(self) -> tuple:
        """The values of ``_COLUMNS``."""
        meta = json.dumps(self.metadata, separators=(",", ":"), sort_keys=True) if self.metadata else ""
        return (self.id, self.ts, self.model, self.req_path, self.resp_content_type, self.resp_status_code,
                self.cache_tokens, self.draft_tokens, self.draft_acc_tokens, self.input_tokens,
                self.output_tokens, self.prompt_per_second, self.tokens_per_second, self.duration_ms,
                self.error_msg, meta)

    @classmethod
    def from_row(cls, row: Iterable) -> "ActivityEntry":
        (id_, ts, model, path, ctype, status, cached, drafted, accepted, prompt, generated, pps, tps,
         duration, error, meta) = row
        return cls(id=id_, ts=ts, model=model, req_path=path, resp_content_type=ctype,
                   resp_status_code=status, cache_tokens=cached, draft_tokens=drafted,
                   draft_acc_tokens=accepted, input_tokens=prompt, output_tokens=generated,
                   prompt_per_second=pps, tokens_per_second=tps, duration_ms=duration, error_msg=error,
                   metadata=json.loads(meta) if meta else None)

    def as_json(self, has_capture: bool = False) -> dict:
        """The entry as llama-swap's API writes it (``error_msg`` and ``metadata`` only when set)."""
        out = {"id": self.id, "timestamp": rfc3339nano(self.ts), "model": self.model,
               "req_path": self.req_path, "resp_content_type": self.resp_content_type,
               "resp_status_code": self.resp_status_code,
               "tokens": {"cache_tokens": self.cache_tokens, "draft_tokens": self.draft_tokens,
                          "draft_acc_tokens": self.draft_acc_tokens, "input_tokens": self.input_tokens,
                          "output_tokens": self.output_tokens, "prompt_per_second": self.prompt_per_second,
                          "tokens_per_second": self.tokens_per_second},
               "duration_ms": self.duration_ms, "has_capture": has_capture}
        if self.error_msg:
            out["error_msg"] = self.error_msg
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        return out

    def sort_value(self, column: str) -> Any:
        return self.row()[_COLUMNS.index(column)]


# -- queries ---------------------------------------------------------------------------------------

@attr.s(frozen=True, slots=True, auto_attribs=True)
class ActivityQuery:
    """Which rows a listing shows (llama-swap's ``ActivityQuery``); every set field narrows it.

    ``start``/``end`` are inclusive POSIX seconds; ``min_id``/``max_id`` inclusive ids (0: none).
    """

    models: tuple = ()
    start: Optional[int] = None
    end: Optional[int] = None
    min_id: int = 0
    max_id: int = 0
    limit: int = DEFAULT_LIMIT
    page: int = 1
    sort: str = "id"
    order: str = "desc"

    def matches(self, entry: ActivityEntry) -> bool:
        return ((not self.models or entry.model in self.models)
                and (self.start is None or entry.ts >= self.start)
                and (self.end is None or entry.ts <= self.end)
                and (not self.min_id or entry.id >= self.min_id)
                and (not self.max_id or entry.id <= self.max_id))

    def where(self) -> tuple[str, list]:
        """The SQL form of :meth:`matches`."""
        conditions, args = [], []
        if self.models:
            conditions.append(f"model_id IN ({', '.join('?' * len(self.models))})")
            args += list(self.models)
        for test, value in (("ts_created >= ?", self.start), ("ts_created <= ?", self.end)):
            if value is not None:
                conditions.append(test)
                args.append(value)
        for test, value in (("id >= ?", self.min_id), ("id <= ?", self.max_id)):
            if value:
                conditions.append(test)
                args.append(value)
        return (" WHERE " + " AND ".join(conditions) if conditions else ""), args

    def order_by(self) -> str:
        column = SORT_COLUMNS.get(self.sort, "id")
        direction = "ASC" if self.order.lower() == "asc" else "DESC"
        return f" ORDER BY {column} {direction}" + ("" if column == "id" else f", id {direction}")


def _page(entries: list, total: int, query: ActivityQuery) -> dict:
    """llama-swap's ``ActivityPage``; ``data`` still holds entries (the log makes them JSON)."""
    return {"data": entries, "page": query.page, "limit": query.limit, "total": total,
            "total_pages": math.ceil(total / query.limit) if total and query.limit > 0 else 0}


def _percentile(ordered: list, p: float) -> float:
    if len(ordered) == 1:
        return ordered[0]
    rank = p / 100 * (len(ordered) - 1)
    lower, upper = math.floor(rank), math.ceil(rank)
    return ordered[lower] + (rank - lower) * (ordered[upper] - ordered[lower])


def histogram(values: list) -> Optional[dict]:
    """llama-swap's ``HistogramData`` of speeds: Sturges' bin count within 5..20, p50/p95/p99
    interpolated; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    low, high = ordered[0], ordered[-1]
    out = {"bins": [len(values)], "min": low, "max": high, "binSize": 0,
           "p50": _percentile(ordered, 50), "p95": _percentile(ordered, 95), "p99": _percentile(ordered, 99)}
    if low == high:
        return out
    count = min(20, max(5, math.ceil(math.log2(len(values))) + 1))
    size = (high - low) / count
    bins = [0] * count
    for value in values:
        bins[min(int(math.floor((value - low) / size)), count - 1)] += 1
    out.update(bins=bins, binSize=size)
    return out


def _stats(count: int, prompt: int, output: int, cached: int, prompt_speeds: list, gen_speeds: list) -> dict:
    """llama-swap's ``ActivityStats``."""
    return {"total_requests": count, "total_input_tokens": prompt, "total_output_tokens": output,
            "total_cache_tokens": cached, "prompt_histogram": histogram(prompt_speeds),
            "gen_histogram": histogram(gen_speeds)}


class MemoryActivity:
    """The newest ``capacity`` entries (``metricsMaxInMemory``), queried as the store is."""

    def __init__(self, capacity: int = 1000) -> None:
        self._rows: deque = deque(maxlen=max(1, capacity))

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, entry: ActivityEntry) -> None:
        self._rows.append(entry)

    def resize(self, capacity: int) -> None:
        """Keep the newest ``capacity`` entries from now on (a reload changed the setting)."""
        if max(1, capacity) != self._rows.maxlen:
            self._rows = deque(self._rows, maxlen=max(1, capacity))

    def list(self, query: ActivityQuery) -> dict:
        rows = [e for e in self._rows if query.matches(e)]
        column = SORT_COLUMNS.get(query.sort, "id")
        rows.sort(key=lambda e: (e.sort_value(column), e.id), reverse=query.order.lower() != "asc")
        offset = (query.page - 1) * query.limit
        return _page(rows[offset:offset + query.limit], len(rows), query)

    def stats(self, model: str = "") -> dict:
        rows = [e for e in self._rows if not model or e.model == model]
        return _stats(len(rows), sum(e.input_tokens for e in rows), sum(e.output_tokens for e in rows),
                      sum(e.cache_tokens for e in rows if e.cache_tokens > 0),
                      [e.prompt_per_second for e in rows if e.prompt_per_second > 0],
                      [e.tokens_per_second for e in rows if e.tokens_per_second > 0])


# -- the SQLite store ------------------------------------------------------------------------------

class StoreError(StartupError):
    """The activity store cannot be used; ``str`` names the file and says why."""


def _reason(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if text == "unable to open database file":
        text += " (does its directory exist and is it writable?)"
    return text


class SQLiteActivityStore:
    """llama-swap's ``activity`` table in an SQLite file, versioned by ``PRAGMA user_version``.

    Its methods block on the disk: ``ActivityLog`` calls them on its own thread only (the
    connection is made with ``check_same_thread=False`` for that, and is used by one thread at
    a time). :meth:`open` is the exception: it runs once at startup, to fail before the daemon
    serves.
    """

    def __init__(self, path: str, connection: "sqlite3.Connection") -> None:
        self.path = path
        self._db = connection

    @classmethod
    def open(cls, path: str) -> "SQLiteActivityStore":
        """Open (creating it if absent) and migrate the store at ``path``.

        :raises StoreError: naming the path, when it is not an SQLite file, cannot be created or
            written, or holds a newer schema or a foreign ``activity`` table.
        """
        import sqlite3

        db = None
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA busy_timeout = 5000")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"activity store '{path}' (store.path): cannot enable WAL mode (got {mode!r})")
            cls._migrate(db, path)
            return cls(path, db)
        except sqlite3.Error as e:
            if db is not None:
                db.close()
            raise StoreError(f"activity store '{path}' (store.path) cannot be used: {_reason(e)}") from None
        except StoreError:
            if db is not None:
                db.close()
            raise

    @staticmethod
    def _migrate(db: "sqlite3.Connection", path: str) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"activity store '{path}' (store.path) has schema version {version}; this "
                             f"llamaswap reads version {SCHEMA_VERSION} (written by a newer llamaswap?)")
        if version == SCHEMA_VERSION:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            # executescript would COMMIT first: the statements run one by one, in this transaction
            table, *indexes = filter(str.strip, _SCHEMA.split(";"))
            db.execute(table)
            have = {row[1] for row in db.execute("PRAGMA table_info(activity)")}
            missing = [c for c in _COLUMNS if c not in have]
            if missing:
                raise StoreError(f"activity store '{path}' (store.path) has an 'activity' table without "
                                 f"the columns {', '.join(missing)}: not an activity store")
            for statement in indexes:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()

    def max_id(self) -> int:
        """The highest id ever used (AUTOINCREMENT's sequence included): new ids start above it."""
        row_max = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM activity").fetchone()[0]
        seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'activity'"
                               ).fetchone()[0]
        return max(row_max, seq)

    def insert(self, entries: list) -> None:
        """Write ``entries`` in one transaction, each under its own id; an id already taken (another
        program writes the file too) gets a new one rather than losing the row."""
        import sqlite3

        marks = ", ".join("?" * len(_COLUMNS))
        sql = f"INSERT INTO activity ({', '.join(_COLUMNS)}) VALUES ({marks})"
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for entry in entries:
                row = entry.row()
                try:
                    self._db.execute(sql, row)
                except sqlite3.IntegrityError:
                    self._db.execute(sql, (None,) + row[1:])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def list(self, query: ActivityQuery) -> dict:
        where, args = query.where()
        total = self._db.execute("SELECT COUNT(*) FROM activity" + where, args).fetchone()[0]
        rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM activity{where}{query.order_by()} "
                                "LIMIT ? OFFSET ?", args + [query.limit, (query.page - 1) * query.limit])
        return _page([ActivityEntry.from_row(r) for r in rows], total, query)

    def stats(self, model: str = "") -> dict:
        where, args = ActivityQuery(models=(model,) if model else ()).where()
        count, prompt, output, cached = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), "
            "COALESCE(SUM(CASE WHEN cache_tokens > 0 THEN cache_tokens ELSE 0 END), 0) FROM activity" + where,
            args).fetchone()
        reported = (where + " AND" if where else " WHERE") + " (prompt_per_second > 0 OR tokens_per_second > 0)"
        prompt_speeds, gen_speeds = [], []
        for pps, tps in self._db.execute("SELECT prompt_per_second, tokens_per_second FROM activity" + reported,
                                         args):
            if pps > 0:
                prompt_speeds.append(pps)
            if tps > 0:
                gen_speeds.append(tps)
        return _stats(count, prompt, output, cached, prompt_speeds, gen_speeds)
