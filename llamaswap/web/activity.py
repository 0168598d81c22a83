"""``GET /api/metrics/activity``, ``GET /api/metrics/stats`` and ``GET /api/performance``.

The answers have llama-swap's shapes; the query parameters and their error messages are
llama-swap's too, each error sent as llamaswap's JSON error envelope (400
``invalid_query``). ``activity_pages`` gives the path -> resource entries the service adds
to the route table.
"""
from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Optional

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from llamaswap.activitystore import DEFAULT_LIMIT, SORT_COLUMNS, ActivityQuery
from llamaswap.errors import LlamaSwapError
from llamaswap.web.render import JSONResource, async_render, not_found, write_error, write_json

__all__ = ["ActivityResource", "ActivityStatsResource", "InvalidQuery", "PerformanceResource", "activity_pages",
           "parse_activity_query", "parse_rfc3339"]

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
_INTEGER = re.compile(r"[+-]?\d+")  # what Go's strconv.Atoi takes (Python's int() also takes "1_0")


class InvalidQuery(LlamaSwapError):
    status, kind, code = 400, "invalid_request_error", "invalid_query"


def parse_rfc3339(text: str) -> Optional[float]:
    """POSIX seconds of an RFC 3339 time (``2026-08-22T09:29:57Z``, a fraction allowed, as Go's
    ``time.Parse(time.RFC3339, …)`` takes it); None when it is not one."""
    if not _RFC3339.fullmatch(text):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _first(args: dict, name: str) -> str:
    values = args.get(name.encode("ascii")) or [b""]
    return values[0].decode("utf-8", "replace")


def _time(args: dict, name: str) -> Optional[int]:
    raw = _first(args, name).strip()
    if not raw:
        return None
    seconds = parse_rfc3339(raw)
    if seconds is None:
        raise InvalidQuery(f"invalid '{name}' timestamp, use RFC3339 format")
    return int(seconds // 1)  # the store compares whole seconds (Go's Time.Unix)


def _id(args: dict, name: str) -> int:
    raw = _first(args, name).strip()
    if not raw:
        return 0
    if not _INTEGER.fullmatch(raw) or int(raw) < 1:
        raise InvalidQuery(f"{name} must be >= 1")
    return int(raw)


def parse_activity_query(args: dict) -> ActivityQuery:
    """llama-swap's ``parseActivityQuery`` over ``request.args``.

    ``model`` (repeatable), ``start``/``end`` (RFC 3339), ``min_id``/``max_id``, ``limit``
    (1..999, default 25), ``page`` (from 1), ``sort`` (a key of ``SORT_COLUMNS``), ``order``
    (``asc``/``desc``).

    :raises InvalidQuery: with llama-swap's message.
    """
    models = tuple(m for m in (v.decode("utf-8", "replace").strip() for v in args.get(b"model", [])) if m)
    start, end = _time(args, "start"), _time(args, "end")
    if start is not None and end is not None and start > end:
        raise InvalidQuery("start must be before end")
    min_id, max_id = _id(args, "min_id"), _id(args, "max_id")
    if min_id and max_id and min_id > max_id:
        raise InvalidQuery("min_id must be <= max_id")
    limit = DEFAULT_LIMIT
    raw = _first(args, "limit").strip()
    if raw:
        if not _INTEGER.fullmatch(raw):
            raise InvalidQuery("invalid limit")
        limit = int(raw)
        if not 0 < limit < 1000:
            raise InvalidQuery("limit must be between 1 and 999")
    page = 1
    raw = _first(args, "page").strip()
    if raw:
        if not _INTEGER.fullmatch(raw) or int(raw) < 1:
            raise InvalidQuery("page must be >= 1")
        page = int(raw)
    sort = _first(args, "sort").strip() or "id"
    if sort not in SORT_COLUMNS:
        raise InvalidQuery("invalid sort column")
    order = _first(args, "order").strip().lower() or "desc"
    if order not in ("asc", "desc"):
        raise InvalidQuery("order must be asc or desc")
    return ActivityQuery(models=models, start=start, end=end, min_id=min_id, max_id=max_id, limit=limit,
                         page=page, sort=sort, order=order)


class _Endpoint(JSONResource):
    """An exact path: anything below it is a 404, as in llama-swap's route table."""

    isLeaf = True

    def __init__(self, log: Logger) -> None:
        super().__init__()
        self.log = log

    def render(self, request: Request) -> Any:
        if any(request.postpath):
            write_error(request, not_found(request))
            return NOT_DONE_YET
        return super().render(request)


async def _read(deferred: Any, log: Logger, what: str) -> Any:
    """Await a store read; a failure is logged and answered 500 ``failed to get <what>``."""
    try:
        return await deferred
    except CancelledError:
        raise
    except Exception:
        log.failure("reading {what} failed", what=what)
        raise LlamaSwapError(f"failed to get {what}") from None


class ActivityResource(_Endpoint):
    """``GET /api/metrics/activity``: one page of activity (llama-swap's ``ActivityPage``)."""

    def __init__(self, activity: Any, log: Logger) -> None:
        super().__init__(log)
        self.activity = activity

    @async_render
    async def render_GET(self, request: Request) -> None:
        query = parse_activity_query(request.args)
        page = await _read(self.activity.list(query), self.log, "activity")
        write_json(request, 200, page)


class ActivityStatsResource(_Endpoint):
    """``GET /api/metrics/stats[?model=]``: totals and speed histograms (llama-swap's ``ActivityStats``)."""

    def __init__(self, activity: Any, log: Logger) -> None:
        super().__init__(log)
        self.activity = activity

    @async_render
    async def render_GET(self, request: Request) -> None:
        model = _first(request.args, "model").strip()
        stats = await _read(self.activity.stats(model), self.log, "activity stats")
        write_json(request, 200, stats)


class PerformanceResource(_Endpoint):
    """``GET /api/performance[?after=<RFC 3339>]``: the monitor's samples, or 503
    ``{"enabled": false}`` without a monitor (``performance.disabled``), as llama-swap answers."""

    def __init__(self, monitor: Any, log: Logger) -> None:
        super().__init__(log)
        self.monitor = monitor

    def render_GET(self, request: Request) -> Any:
        if self.monitor is None:
            write_json(request, 503, {"enabled": False})
            return NOT_DONE_YET
        after: Optional[float] = None
        raw = _first(request.args, "after")
        if raw:
            after = parse_rfc3339(raw)
            if after is None:
                write_error(request, InvalidQuery("invalid 'after' timestamp, use RFC3339 format"))
                return NOT_DONE_YET
        sys_stats, gpu_stats = self.monitor.current(after)
        write_json(request, 200, {"enabled": True, "sys_stats": sys_stats, "gpu_stats": gpu_stats})
        return NOT_DONE_YET


def activity_pages(activity: Any, performance: Any, log: Logger) -> dict[str, Resource]:
    """The route table entries of these endpoints.

    :param activity: the ``ActivityLog``.
    :param performance: the ``PerformanceMonitor``, or None when ``performance.disabled``.
    """
    return {"/api/metrics/activity": ActivityResource(activity, log),
            "/api/metrics/stats": ActivityStatsResource(activity, log),
            "/api/performance": PerformanceResource(performance, log)}
