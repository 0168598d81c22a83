"""``/api/metrics/activity``, ``/api/metrics/stats`` and ``/api/performance`` over HTTP, in memory.

The root is the daemon's (``build_root`` with ``activity_pages``) behind our ``AccessLogSite``,
reached through a ``RequestTraversalAgent``; the activity log is fed ``RequestRecord`` objects
as the web layer emits them.
"""
from __future__ import annotations

import json
import os
import tempfile
from types import SimpleNamespace

from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.activity import ActivityLog
from llamaswap.logs import LogBroadcaster
from llamaswap.proxy import Forwarder
from llamaswap.web.activity import activity_pages, parse_activity_query, parse_rfc3339
from llamaswap.web.context import WebContext
from llamaswap.web.site import AccessLogSite
from llamaswap.web.tree import build_root
from tests.factories import make_config
from tests.fakes import capture_logger, flush_all
from tests.test_activity import USAGE, ManualThread, record
from tests.test_resources import Collect

NOW = 1_767_225_600  # 2026-01-01T00:00:00Z


class FakeMonitor:
    """A PerformanceMonitor's ``current``: records the ``after`` it was asked for."""

    def __init__(self, sys_stats=None, gpu_stats=None) -> None:
        self.asked: list = []
        self.answer = (sys_stats, gpu_stats)

    def current(self, after=None):
        self.asked.append(after)
        return self.answer


class WebCase(SynchronousTestCase):
    def build(self, store_path: str = "", monitor=None, api_keys=()) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.events: list = []
        self.thread = ManualThread()
        self.activity = ActivityLog(self.clock, capture_logger(self.events), store_path=store_path,
                                    run_in_thread=self.thread)
        if store_path:
            self.activity.open()
        self.activity.startService()
        self.thread.run()
        self.addCleanup(self._stop)
        router = SimpleNamespace(config=make_config(api_keys=tuple(api_keys)))
        self.app = WebContext(router, LogBroadcaster(), Forwarder(self.clock), self.clock,
                              log=capture_logger(self.events), request_listeners=(self.activity.request_finished,),
                              request_ids=self.activity.next_id)
        root = build_root(self.app, activity_pages(self.activity, monitor, capture_logger(self.events)))
        self.agent = RequestTraversalAgent(root)
        self.agent._serverFactory = AccessLogSite(root, self.app, reactor=self.agent._memoryReactor,
                                                  log=capture_logger([]))

    def _stop(self) -> None:
        d = self.activity.stopService()
        self.thread.run()
        if d is not None:
            self.successResultOf(d)

    def finish(self, *records) -> None:
        for r in records:
            self.app.emit(r)

    def get(self, path: str, headers=None, run_thread: bool = True):
        """(status, parsed JSON body) of a GET; the store thread runs while the request waits."""
        from twisted.web.http_headers import Headers
        d = self.agent.request(b"GET", b"http://llamaswap" + path.encode(), Headers(headers or {}))
        flush_all(self.clock, self.agent)
        if run_thread:
            self.thread.run()
            flush_all(self.clock, self.agent)
        response = self.successResultOf(d)
        collect = Collect()
        response.deliverBody(collect)
        flush_all(self.clock, self.agent)
        return response.code, json.loads(collect.data), response


class ActivityEndpointTests(WebCase):
    def test_page_shape(self):
        """The page has llama-swap's fields, newest entry first, 25 a page by default."""
        self.build()
        self.finish(record(id=1, usage=USAGE), record(id=2, status=502))
        status, body, response = self.get("/api/metrics/activity")
        self.assertEqual(status, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual({k: body[k] for k in ("page", "limit", "total", "total_pages")},
                         {"page": 1, "limit": 25, "total": 2, "total_pages": 1})
        newest, oldest = body["data"]
        self.assertEqual((newest["id"], newest["resp_status_code"], newest["error_msg"]), (2, 502, "502 Bad Gateway"))
        self.assertEqual(oldest["tokens"], {"cache_tokens": 4, "draft_tokens": -1, "draft_acc_tokens": -1,
                                            "input_tokens": 12, "output_tokens": 30, "prompt_per_second": 250.5,
                                            "tokens_per_second": 42.0})
        self.assertEqual((oldest["model"], oldest["req_path"], oldest["duration_ms"], oldest["has_capture"]),
                         ("qwen", "/v1/chat/completions", 250, False))
        self.assertEqual(oldest["timestamp"][:4], "2026")

    def test_filters_and_paging(self):
        """model (repeated), min_id/max_id, limit, page, sort and order narrow and order the rows."""
        self.build()
        for i in range(1, 8):
            self.finish(record(id=i, model=("a", "b", "c")[i % 3], duration=i / 10))
        _, body, _ = self.get("/api/metrics/activity?model=a&model=b&min_id=2&max_id=6&sort=duration&order=asc"
                              "&limit=2&page=2")
        # ids 2..6 of models a or b: 3 (a), 4 (b), 6 (a); by duration: 3, 4 | 6
        self.assertEqual([e["id"] for e in body["data"]], [6])
        self.assertEqual((body["total"], body["total_pages"], body["limit"], body["page"]), (3, 2, 2, 2))
        _, body, _ = self.get("/api/metrics/activity?model=a&model=b&min_id=2&max_id=6&sort=duration&order=desc")
        self.assertEqual([e["id"] for e in body["data"]], [6, 4, 3])

    def test_time_window(self):
        """start and end (RFC 3339) bound the entries' times, both inclusive."""
        self.build()
        self.finish(record(id=1))
        self.clock.advance(60)
        self.finish(record(id=2))
        _, body, _ = self.get("/api/metrics/activity?start=2026-01-01T00:00:30Z")
        self.assertEqual([e["id"] for e in body["data"]], [2])
        _, body, _ = self.get("/api/metrics/activity?end=2026-01-01T01:00:00%2B01:00")
        self.assertEqual([e["id"] for e in body["data"]], [1])

    def test_bad_parameters(self):
        """Each bad parameter is a 400 in the JSON error envelope, with llama-swap's message."""
        self.build()
        cases = {"limit=0": "limit must be between 1 and 999", "limit=1000": "limit must be between 1 and 999",
                 "limit=x": "invalid limit", "limit=1_0": "invalid limit", "page=0": "page must be >= 1",
                 "sort=bogus": "invalid sort column", "order=up": "order must be asc or desc",
                 "min_id=0": "min_id must be >= 1", "min_id=5&max_id=2": "min_id must be <= max_id",
                 "start=yesterday": "invalid 'start' timestamp, use RFC3339 format",
                 "start=2026-01-02T00:00:00Z&end=2026-01-01T00:00:00Z": "start must be before end"}
        for query, message in cases.items():
            status, body, _ = self.get("/api/metrics/activity?" + query)
            self.assertEqual((status, body["error"]["message"], body["error"]["code"]),
                             (400, message, "invalid_query"), query)

    def test_below_the_path_is_404(self):
        """Only the exact path answers."""
        self.build()
        status, body, _ = self.get("/api/metrics/activity/1")
        self.assertEqual((status, body["error"]["code"]), (404, "not_found"))

    def test_store_backed_answers_and_ids(self):
        """With a store, reads go through the store thread and see requests not yet flushed."""
        path = os.path.join(tempfile.mkdtemp(prefix="llamaswap-web-"), "activity.db")
        self.build(store_path=path)
        ids = [self.app.request_ids() for _ in range(3)]
        self.finish(*(record(id=i, usage=USAGE) for i in ids))
        _, body, _ = self.get("/api/metrics/activity")
        self.assertEqual([e["id"] for e in body["data"]], ids[::-1])
        self.assertEqual(self.get("/api/metrics/stats")[1]["total_output_tokens"], 90)

    def test_store_failure_is_500(self):
        """A store read that fails is a 500 error envelope, logged."""
        path = os.path.join(tempfile.mkdtemp(prefix="llamaswap-web-"), "activity.db")
        self.build(store_path=path)
        self.activity._store.close()
        status, body, _ = self.get("/api/metrics/activity")
        self.assertEqual((status, body["error"]["message"]), (500, "failed to get activity"))
        self.assertTrue(any(e.get("log_failure") for e in self.events))
        self.activity._store = None

    def test_api_key_required(self):
        """The endpoints sit behind apiKeys like every other."""
        self.build(api_keys=("secret-key-1",))
        self.assertEqual(self.get("/api/metrics/activity", run_thread=False)[0], 401)
        status, _, _ = self.get("/api/metrics/stats", {b"authorization": [b"Bearer secret-key-1"]})
        self.assertEqual(status, 200)


class StatsEndpointTests(WebCase):
    def test_shape_and_model_filter(self):
        """Totals and histograms of all requests, or of one model with ?model=."""
        self.build()
        self.finish(record(id=1, usage=USAGE), record(id=2, model="other", usage=dict(USAGE, input=100)),
                    record(id=3, usage=None))
        _, body, _ = self.get("/api/metrics/stats")
        self.assertEqual(set(body), {"total_requests", "total_input_tokens", "total_output_tokens",
                                     "total_cache_tokens", "prompt_histogram", "gen_histogram"})
        self.assertEqual((body["total_requests"], body["total_input_tokens"], body["total_cache_tokens"]),
                         (3, 112, 8))
        self.assertEqual(body["gen_histogram"], {"bins": [2], "min": 42.0, "max": 42.0, "binSize": 0,
                                                 "p50": 42.0, "p95": 42.0, "p99": 42.0})
        _, body, _ = self.get("/api/metrics/stats?model=%20other%20")
        self.assertEqual((body["total_requests"], body["total_input_tokens"]), (1, 100))
        _, body, _ = self.get("/api/metrics/stats?model=nobody")
        self.assertEqual((body["total_requests"], body["prompt_histogram"]), (0, None))


class PerformanceEndpointTests(WebCase):
    def test_disabled(self):
        """Without a monitor: 503 and {"enabled": false}, as llama-swap answers."""
        self.build(monitor=None)
        status, body, _ = self.get("/api/performance")
        self.assertEqual((status, body), (503, {"enabled": False}))

    def test_samples(self):
        """With a monitor: enabled, its sys and GPU samples (null when none, as Go's nil slices)."""
        monitor = FakeMonitor(sys_stats=[{"timestamp": "2026-01-01T00:00:05Z", "load_avg_1": 0.5}])
        self.build(monitor=monitor)
        status, body, _ = self.get("/api/performance")
        self.assertEqual((status, body), (200, {"enabled": True, "sys_stats": monitor.answer[0], "gpu_stats": None}))
        self.assertEqual(monitor.asked, [None])

    def test_after(self):
        """?after= is parsed as RFC 3339 and handed on; a bad one is a 400 with llama-swap's message."""
        monitor = FakeMonitor([], [])
        self.build(monitor=monitor)
        self.get("/api/performance?after=2026-01-01T00:00:10.5Z")
        self.assertEqual(monitor.asked, [NOW + 10.5])
        status, body, _ = self.get("/api/performance?after=10")
        self.assertEqual((status, body["error"]["message"]), (400, "invalid 'after' timestamp, use RFC3339 format"))


class ParseTests(SynchronousTestCase):
    def test_rfc3339(self):
        """Full RFC 3339 times only: a date, a space separator or a missing zone is refused."""
        self.assertEqual(parse_rfc3339("2026-01-01T00:00:00Z"), NOW)
        self.assertEqual(parse_rfc3339("2026-01-01T02:00:00.25+02:00"), NOW + 0.25)
        for bad in ("2026-01-01", "2026-01-01 00:00:00Z", "2026-01-01T00:00:00", "2026-13-01T00:00:00Z"):
            self.assertIsNone(parse_rfc3339(bad), bad)

    def test_defaults(self):
        """No parameters: everything, 25 a page, newest id first; blank models are ignored."""
        q = parse_activity_query({b"model": [b" ", b"x "]})
        self.assertEqual((q.models, q.limit, q.page, q.sort, q.order), (("x",), 25, 1, "id", "desc"))
