"""Metrics (MET-1..MET-3): exposition, the model series, router and request feeds,
token parsing from SSE and JSON bodies, and bounded label sets.

Requests go through the in-memory site of tests/test_resources.py (``HTTPCase``) with the
metrics wired the way service.py wires them; time is the fake reactor's clock.
"""
from __future__ import annotations

import gzip
import json
import os
import textwrap

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from llamaswap.errors import ModelUnloaded, UpstreamStartFailed
from llamaswap.metrics import (
    DURATION_BUCKETS, LOAD_BUCKETS, MAX_SSE_LINE, STATES, STOP_REASONS, TPS_BUCKETS,
    JSONUsageParser, Metrics, MetricsPage, SSEUsageParser, exposition, response_parser, usage_from)
from llamaswap.observe import (
    QueueChanged, Reloaded, Removed, Replaced, StartFailed, Started, Starting, StateChanged, Stopping)
from llamaswap.web.context import RequestRecord
from tests.factories import make_model
from tests.fakes import drop_clients
from tests.test_plugin import FAKE_CMD
from tests.test_resources import Collect, HTTPCase

ALL_NAMES = {
    "llamaswap_requests_total": "counter",
    "llamaswap_request_duration_seconds": "histogram",
    "llamaswap_time_to_first_byte_seconds": "histogram",
    "llamaswap_queue_wait_seconds": "histogram",
    "llamaswap_model_load_duration_seconds": "histogram",
    "llamaswap_swaps_total": "counter",
    "llamaswap_model_stops_total": "counter",
    "llamaswap_queue_depth": "gauge",
    "llamaswap_inflight_requests": "gauge",
    "llamaswap_model_state": "gauge",
    "llamaswap_tokens_total": "counter",
    "llamaswap_prompt_tokens_per_second": "histogram",
    "llamaswap_generation_tokens_per_second": "histogram",
    "llamaswap_upstream_stream_errors_total": "counter",
    "llamaswap_config_reloads_total": "counter",
    "llamaswap_log_bytes_dropped_total": "counter",
}


def samples(metrics: Metrics) -> dict:
    """{(sample name, frozenset(labels)): value} parsed back from the exposition."""
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode("utf-8")):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, frozenset(labels.items())), 0.0)


def buckets(metrics: Metrics, name: str) -> list[float]:
    """The ``le`` bounds of one histogram's first series (without +Inf)."""
    seen = []
    for family in text_string_to_metric_families(metrics.exposition().decode("utf-8")):
        if family.name == name:
            first = None
            for s in family.samples:
                if s.name != name + "_bucket":
                    continue
                key = {k: v for k, v in s.labels.items() if k != "le"}
                first = first or key
                if key == first and s.labels["le"] != "+Inf":
                    seen.append(float(s.labels["le"]))
    return seen


# -- MET-3 parsers -----------------------------------------------------------------------------

SSE_BODY = (
    b'data: {"choices":[{"delta":{"content":"he"}}]}\n\n'
    b'data: {"choices":[{"delta":{"content":"llo"}}],"usage":null}\n\n'
    b': a comment with usage in it\n\n'
    b'data: not json but mentions usage\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":30,"completion_tokens":7,'
    b'"prompt_tokens_details":{"cached_tokens":4}}}\r\n\r\n'
    b'data: [DONE]\n\n')


class SSEParserTests(SynchronousTestCase):
    def parse(self, chunks) -> dict:
        p = SSEUsageParser()
        for c in chunks:
            p.feed(c)
        return p.result()

    def test_usage_from_stream(self):
        """MET-3: usage is read from data: lines; comments, invalid JSON and [DONE] are skipped."""
        self.assertEqual(self.parse([SSE_BODY]), {"input": 30, "output": 7, "cached": 4,
                                                  "prompt_per_second": None, "tokens_per_second": None})

    def test_every_two_way_split(self):
        """MET-3: the result does not depend on where chunk boundaries fall."""
        whole = self.parse([SSE_BODY])
        for cut in range(len(SSE_BODY) + 1):
            self.assertEqual(self.parse([SSE_BODY[:cut], SSE_BODY[cut:]]), whole, cut)

    def test_byte_by_byte_and_uneven_chunks(self):
        """MET-3: one byte at a time, or chunks of 3, 7 and 13 bytes, give the same result."""
        whole = self.parse([SSE_BODY])
        self.assertEqual(self.parse([SSE_BODY[i:i + 1] for i in range(len(SSE_BODY))]), whole)
        for size in (3, 7, 13):
            self.assertEqual(self.parse([SSE_BODY[i:i + size] for i in range(0, len(SSE_BODY), size)]),
                             whole)

    def test_later_nonzero_values_replace_earlier(self):
        """MET-3: Anthropic's message_start then message_delta: output comes from the last one."""
        body = (b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
                b'{"input_tokens":25,"output_tokens":1,"cache_read_input_tokens":5}}}\n\n'
                b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":15}}\n\n'
                b'event: message_delta\ndata: {"type":"message_delta","usage":{"input_tokens":0}}\n\n')
        self.assertEqual(self.parse([body]), {"input": 25, "output": 15, "cached": 5,
                                              "prompt_per_second": None, "tokens_per_second": None})

    def test_responses_api_usage(self):
        """MET-3: response.usage of the Responses API, with input_tokens_details.cached_tokens."""
        body = (b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":'
                b'{"input_tokens":12,"output_tokens":3,"input_tokens_details":{"cached_tokens":2}}}}\n\n')
        self.assertEqual(self.parse([body])["input"], 12)
        self.assertEqual(self.parse([body])["output"], 3)
        self.assertEqual(self.parse([body])["cached"], 2)

    def test_timings_take_precedence(self):
        """MET-3: llama.cpp timings win over usage; the last timings object is kept."""
        body = (b'data: {"timings":{"prompt_n":1,"predicted_n":1,"prompt_per_second":1,'
                b'"predicted_per_second":1}}\n\n'
                b'data: {"usage":{"prompt_tokens":30,"completion_tokens":7},"timings":{"prompt_n":25,'
                b'"predicted_n":10,"cache_n":3,"prompt_per_second":812.5,"predicted_per_second":42.0}}\n\n')
        self.assertEqual(self.parse([body]), {"input": 25, "output": 10, "cached": 3,
                                              "prompt_per_second": 812.5, "tokens_per_second": 42.0})

    def test_no_usage_gives_none(self):
        """MET-3: a stream without usage or timings yields nothing (tokens unknown)."""
        self.assertIsNone(self.parse([b'data: {"choices":[]}\n\ndata: [DONE]\n\n']))

    def test_long_lines_skipped_not_kept(self):
        """MET-3: a data: line over 1 MiB is skipped (and not kept in memory); later lines count."""
        huge = b'data: {"usage":{"prompt_tokens":999},"pad":"' + b"x" * (MAX_SSE_LINE + 10) + b'"}\n\n'
        tail = b'data: {"usage":{"prompt_tokens":5,"completion_tokens":6}}\n\n'
        p = SSEUsageParser()
        for i in range(0, len(huge), 65536):
            p.feed(huge[i:i + 65536])
            self.assertLessEqual(sum(len(x) for x in p._parts), MAX_SSE_LINE)
        p.feed(tail)
        self.assertEqual((p.result()["input"], p.result()["output"]), (5, 6))
        self.assertEqual(self.parse([huge + tail])["input"], 5)


class JSONParserTests(SynchronousTestCase):
    def test_openai_usage(self):
        """MET-3: a JSON body is parsed once complete; usage names of OpenAI."""
        p = JSONUsageParser()
        body = json.dumps({"usage": {"prompt_tokens": 9, "completion_tokens": 2,
                                     "prompt_tokens_details": {"cached_tokens": 1}}}).encode()
        p.feed(body[:5])
        p.feed(body[5:])
        self.assertEqual(p.result(), {"input": 9, "output": 2, "cached": 1,
                                      "prompt_per_second": None, "tokens_per_second": None})

    def test_timings_in_json(self):
        """MET-3: llama.cpp /completion timings take precedence in JSON too."""
        got = usage_from({"usage": {"prompt_tokens": 30}, "timings": {
            "prompt_n": 25, "predicted_n": 10, "prompt_per_second": 100, "predicted_per_second": 10}})
        self.assertEqual(got, {"input": 25, "output": 10, "cached": None,
                               "prompt_per_second": 100.0, "tokens_per_second": 10.0})

    def test_large_body_not_parsed(self):
        """MET-3: bodies over 4 MiB are not parsed (and not kept)."""
        p = JSONUsageParser(limit=100)
        p.feed(b'{"usage":{"prompt_tokens":1},"pad":"' + b"x" * 100 + b'"}')
        self.assertIsNone(p.result())
        self.assertIsNone(p._parts)

    def test_invalid_json(self):
        p = JSONUsageParser()
        p.feed(b'{"usage": ')
        self.assertIsNone(p.result())


class ResponseParserTests(SynchronousTestCase):
    def headers(self, **kw: str) -> Headers:
        h = Headers()
        for name, v in kw.items():
            h.setRawHeaders(name.replace("_", "-"), [v.encode()])
        return h

    def test_choice(self):
        """MET-3: SSE and JSON 2xx bodies get a parser; other types, statuses and encodings do not."""
        self.assertIsInstance(response_parser(200, self.headers(content_type="text/event-stream")),
                              SSEUsageParser)
        self.assertIsInstance(response_parser(201, self.headers(content_type="application/json; charset=utf-8")),
                              JSONUsageParser)
        self.assertIsInstance(response_parser(200, self.headers(content_type="application/json",
                                                                content_encoding="identity")),
                              JSONUsageParser)
        self.assertIsNone(response_parser(200, self.headers(content_type="text/plain")))
        self.assertIsNone(response_parser(200, self.headers(content_type="audio/mpeg")))
        self.assertIsNone(response_parser(500, self.headers(content_type="application/json")))
        self.assertIsNone(response_parser(200, self.headers(content_type="application/json",
                                                            content_encoding="gzip")))


# -- the registry (MET-1, MET-2) ---------------------------------------------------------------

class ExpositionTests(SynchronousTestCase):
    def test_content_type_and_every_name(self):
        """MET-1: text format 0.0.4 with HELP and TYPE for every MET-2 metric."""
        m = Metrics(["a"])
        request = DummyRequest([b""])
        body = MetricsPage(m.registry).render_GET(request)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"),
                         [b"text/plain; version=0.0.4; charset=utf-8"])
        text = body.decode()
        for name, kind in ALL_NAMES.items():
            self.assertIn(f"# HELP {name} ", text)
            self.assertIn(f"# TYPE {name} {kind}\n", text)
        self.assertNotIn("_created", text)

    def test_zero_series_per_model_at_start(self):
        """MET-1: every configured model has its gauges (and counters) from startup, at zero."""
        m = Metrics(["a", "vendor/b"])
        s = samples(m)
        for model in ("a", "vendor/b"):
            self.assertEqual(s[("llamaswap_queue_depth", frozenset({"model": model}.items()))], 0)
            self.assertEqual(s[("llamaswap_inflight_requests", frozenset({"model": model}.items()))], 0)
            for state in STATES:
                self.assertEqual(s[("llamaswap_model_state", frozenset({"model": model, "state": state}.items()))],
                                 1 if state == "stopped" else 0)
            self.assertEqual(s[("llamaswap_swaps_total", frozenset({"model": model}.items()))], 0)
            self.assertEqual(s[("llamaswap_upstream_stream_errors_total", frozenset({"model": model}.items()))], 0)
            for kind in ("input", "output", "cached"):
                self.assertEqual(s[("llamaswap_tokens_total", frozenset({"model": model, "type": kind}.items()))], 0)
            for reason in STOP_REASONS:
                self.assertEqual(s[("llamaswap_model_stops_total",
                                    frozenset({"model": model, "reason": reason}.items()))], 0)
        for result in ("success", "failure"):
            self.assertEqual(s[("llamaswap_config_reloads_total", frozenset({"result": result}.items()))], 0)

    def test_buckets(self):
        """MET-2: the documented buckets."""
        m = Metrics(["a"])
        m.request_finished(RequestRecord(model="a", endpoint="/v1/completions", status=200, started=0.0,
                                         duration=1.0, ttfb=0.5, queue_wait=0.0))
        for name in ("llamaswap_request_duration_seconds", "llamaswap_time_to_first_byte_seconds",
                     "llamaswap_queue_wait_seconds"):
            self.assertEqual(buckets(m, name), list(DURATION_BUCKETS), name)
        self.assertEqual(buckets(m, "llamaswap_model_load_duration_seconds"), list(LOAD_BUCKETS))
        self.assertEqual(buckets(m, "llamaswap_generation_tokens_per_second"), list(TPS_BUCKETS))
        self.assertEqual(buckets(m, "llamaswap_prompt_tokens_per_second"), list(TPS_BUCKETS))

    def test_reload_and_log_drops(self):
        """MET-2: config reloads by result; dropped log bytes by source."""
        m = Metrics(["a"])
        m.reload("success")
        m.reload("failure")
        m.reload("success")
        m.log_bytes_dropped("upstream", 100)
        m.log_bytes_dropped("a", 5)
        self.assertEqual(value(m, "llamaswap_config_reloads_total", result="success"), 2)
        self.assertEqual(value(m, "llamaswap_config_reloads_total", result="failure"), 1)
        self.assertEqual(value(m, "llamaswap_log_bytes_dropped_total", source="upstream"), 100)
        self.assertEqual(value(m, "llamaswap_log_bytes_dropped_total", source="a"), 5)


class RouterFeedTests(SynchronousTestCase):
    """MET-2 from model events: every value comes from the event itself."""

    def setUp(self) -> None:
        self.m = Metrics(["a", "b"])
        self.states = {"a": "stopped", "b": "stopped"}

    def move(self, model_id: str, new: str) -> None:
        old, self.states[model_id] = self.states[model_id], new
        self.m.observe(StateChanged(model_id, old, new))

    def test_state_gauge(self):
        """MET-2: model_state is 1 for the current state only."""
        self.move("a", "starting")
        self.assertEqual(value(self.m, "llamaswap_model_state", model="a", state="starting"), 1)
        self.assertEqual(value(self.m, "llamaswap_model_state", model="a", state="stopped"), 0)
        self.move("a", "ready")
        self.assertEqual(value(self.m, "llamaswap_model_state", model="a", state="ready"), 1)
        self.assertEqual(value(self.m, "llamaswap_model_state", model="a", state="starting"), 0)

    def test_load_duration_success(self):
        """MET-2: load duration from the start to ready, as Started says."""
        self.m.observe(Started("a", 3.0))
        self.assertEqual(value(self.m, "llamaswap_model_load_duration_seconds_sum", model="a",
                               outcome="success"), 3)
        self.assertEqual(value(self.m, "llamaswap_model_load_duration_seconds_count", model="a",
                               outcome="failure"), 0)

    def test_failed_start(self):
        """MET-2: each StartFailed is a failed_start stop and a failure load duration."""
        self.m.observe(StartFailed("a", "health check did not pass within 2s", 2.0))
        self.assertEqual(value(self.m, "llamaswap_model_load_duration_seconds_sum", model="a",
                               outcome="failure"), 2)
        self.assertEqual(value(self.m, "llamaswap_model_stops_total", model="a", reason="failed_start"), 1)
        self.m.observe(StartFailed("a", "exited with code 1", 1.0))
        self.assertEqual(value(self.m, "llamaswap_model_stops_total", model="a", reason="failed_start"), 2)
        self.assertEqual(value(self.m, "llamaswap_model_load_duration_seconds_sum", model="a",
                               outcome="failure"), 3)

    def test_aborted_start_is_not_a_failure(self):
        """MET-2: an unload during the start, or a swap evicting a starting model, is no failure
        (the router publishes no StartFailed for them)."""
        self.move("a", "starting")
        self.m.observe(Stopping("a", "unload"))
        self.move("a", "stopping")
        self.move("a", "stopped")
        self.move("a", "starting")
        self.move("a", "stopping")
        self.m.observe(Stopping("a", "swap"))
        self.move("a", "stopped")
        self.assertEqual(value(self.m, "llamaswap_model_stops_total", model="a", reason="failed_start"), 0)
        self.assertEqual(value(self.m, "llamaswap_model_stops_total", model="a", reason="unload"), 1)
        self.assertEqual(value(self.m, "llamaswap_model_stops_total", model="a", reason="swap"), 1)
        self.assertEqual(value(self.m, "llamaswap_model_load_duration_seconds_count", model="a",
                               outcome="failure"), 0)

    def test_swaps_and_stops(self):
        """MET-2: swaps count starts that evicted; stops count by reason."""
        self.m.observe(Starting("a", False))
        self.m.observe(Starting("b", True))
        for reason in ("ttl", "exited", "shutdown", "reload"):
            self.m.observe(Stopping("a", reason))
        self.assertEqual(value(self.m, "llamaswap_swaps_total", model="a"), 0)
        self.assertEqual(value(self.m, "llamaswap_swaps_total", model="b"), 1)
        for reason in ("ttl", "exited", "shutdown", "reload"):
            self.assertEqual(value(self.m, "llamaswap_model_stops_total", model="a", reason=reason), 1)

    def test_queue_gauges(self):
        """MET-2: queue depth and in-flight are the counts QueueChanged carries."""
        self.m.observe(QueueChanged("a", 2, 3))
        self.assertEqual(value(self.m, "llamaswap_inflight_requests", model="a"), 2)
        self.assertEqual(value(self.m, "llamaswap_queue_depth", model="a"), 3)
        self.m.observe(QueueChanged("gone", 1, 1))  # not a model of ours: no series
        self.assertNotIn('model="gone"', self.m.exposition().decode())

    def test_replaced_model_takes_its_new_state(self):
        """MET-2: a model replaced by a reload shows its new child's state."""
        self.move("a", "ready")
        self.m.observe(Replaced("a", "starting"))
        self.assertEqual(value(self.m, "llamaswap_model_state", model="a", state="starting"), 1)
        self.assertEqual(value(self.m, "llamaswap_model_state", model="a", state="ready"), 0)

    def test_reload_adds_and_removes_series(self):
        """MET-1/bounded labels: a reload adds the new model's series and drops a removed one's."""
        self.m.observe(Reloaded(("c",), (), (), {}))
        self.assertEqual(value(self.m, "llamaswap_model_state", model="c", state="stopped"), 1)
        self.m.request_finished(RequestRecord(model="b", endpoint="/v1/completions", status=200, started=0.0,
                                              duration=0.1, ttfb=0.1, queue_wait=0))
        self.m.observe(Removed("b"))
        text = self.m.exposition().decode()
        self.assertNotIn('model="b"', text)
        self.m.request_finished(RequestRecord(model="b", endpoint="/v1/completions", status=404, started=0.0,
                                              duration=0.1, ttfb=0.1))
        self.assertNotIn('model="b"', self.m.exposition().decode())


# -- requests through the in-memory site (MET-2, MET-3) ----------------------------------------

class RequestMetricsTests(HTTPCase):
    def setUp(self) -> None:
        self.build([make_model(id="a", aliases=("gpt",)), make_model(id="b")])
        self.metrics = Metrics(self.config.models)
        self.router.observers.add(self.metrics.observe)
        self.rewire(request_listeners=[self.metrics.request_finished], response_observer_factory=response_parser)

    def value(self, name: str, **labels: str) -> float:
        return value(self.metrics, name, **labels)

    def test_failed_and_aborted_starts_through_the_router(self):
        """MET-2: a child exiting during its start is one failed_start; an unload during a start is none."""
        for proc in self.router.processes():
            proc.check = lambda http, url: Deferred()  # never healthy
        d = self.router.load("a")
        self.reactor.advance(1.5)
        self.reactor.spawned[-1].exit(code=1)
        self.failureResultOf(d, UpstreamStartFailed)
        self.assertEqual(self.value("llamaswap_model_stops_total", model="a", reason="failed_start"), 1)
        self.assertEqual(self.value("llamaswap_model_load_duration_seconds_sum", model="a", outcome="failure"),
                         1.5)
        self.assertEqual(self.value("llamaswap_model_state", model="a", state="stopped"), 1)
        d = self.router.load("a")
        self.router.unload(["a"])
        self.failureResultOf(d, ModelUnloaded)
        self.reactor.advance(0)
        self.assertEqual(self.value("llamaswap_model_stops_total", model="a", reason="failed_start"), 1)
        self.assertEqual(self.value("llamaswap_model_stops_total", model="a", reason="unload"), 1)
        self.assertEqual(self.value("llamaswap_model_load_duration_seconds_count", model="a",
                                    outcome="failure"), 1)

    def test_counted_with_tokens(self):
        """MET-2/MET-3: a JSON completion counts once, with duration, TTFB, queue wait and tokens."""
        self.upstream.reply = (200, {b"content-type": b"application/json"}, json.dumps({
            "usage": {"prompt_tokens": 11, "completion_tokens": 4},
            "timings": {"prompt_n": 11, "predicted_n": 4, "prompt_per_second": 300.0,
                        "predicted_per_second": 30.0}}).encode())
        response, _ = self.call(b"POST", "/v1/chat/completions", b'{"model":"gpt"}')
        self.assertEqual(response.code, 200)
        labels = dict(model="a", endpoint="/v1/chat/completions")
        self.assertEqual(self.value("llamaswap_requests_total", status="200", **labels), 1)
        self.assertEqual(self.value("llamaswap_request_duration_seconds_count", **labels), 1)
        self.assertEqual(self.value("llamaswap_time_to_first_byte_seconds_count", **labels), 1)
        self.assertEqual(self.value("llamaswap_queue_wait_seconds_count", model="a"), 1)
        self.assertEqual(self.value("llamaswap_tokens_total", model="a", type="input"), 11)
        self.assertEqual(self.value("llamaswap_tokens_total", model="a", type="output"), 4)
        self.assertEqual(self.value("llamaswap_generation_tokens_per_second_sum", model="a"), 30)
        self.assertEqual(self.value("llamaswap_prompt_tokens_per_second_sum", model="a"), 300)
        self.assertEqual(self.value("llamaswap_model_state", model="a", state="ready"), 1)
        self.assertEqual(self.value("llamaswap_model_load_duration_seconds_count", model="a",
                                    outcome="success"), 1)
        self.assertEqual(self.value("llamaswap_inflight_requests", model="a"), 0)

    def test_sse_tokens_across_chunks(self):
        """MET-3: SSE usage split over several upstream writes is parsed as it passes."""
        d, up = self.open_stream(first=None)
        body = b'data: {"x":1}\n\ndata: {"usage":{"prompt_tokens":8,"completion_tokens":3}}\n\ndata: [DONE]\n\n'
        for i in range(0, len(body), 9):
            up.write(body[i:i + 9])
            self.flush()
        collect = self.collect(self.successResultOf(d))
        self.assertEqual(self.value("llamaswap_inflight_requests", model="a"), 1)
        up.finish()
        self.flush()
        self.assertEqual(collect.data, body)
        self.assertEqual(self.value("llamaswap_tokens_total", model="a", type="input"), 8)
        self.assertEqual(self.value("llamaswap_tokens_total", model="a", type="output"), 3)
        self.assertEqual(self.value("llamaswap_generation_tokens_per_second_count", model="a"), 0)
        self.assertEqual(self.value("llamaswap_requests_total", model="a",
                                    endpoint="/v1/chat/completions", status="200"), 1)

    def test_ttfb_and_duration_on_the_clock(self):
        """MET-2: TTFB to the first body byte, duration to the last, from receipt (injected clock)."""
        d, up = self.open_stream(first=None)
        self.reactor.advance(2)
        up.write(b"data: 1\n\n")
        self.flush()
        response = self.successResultOf(d)
        response.deliverBody(Collect())
        self.reactor.advance(3)
        up.finish()
        self.flush()
        labels = dict(model="a", endpoint="/v1/chat/completions")
        self.assertEqual(self.value("llamaswap_time_to_first_byte_seconds_sum", **labels), 2)
        self.assertEqual(self.value("llamaswap_request_duration_seconds_sum", **labels), 5)

    def test_gzip_body_tokens(self):
        """MET-3: a gzip body relayed decoded (no Content-Encoding left) is still parsed."""
        payload = gzip.compress(b'{"usage":{"prompt_tokens":2,"completion_tokens":1}}')
        self.upstream.reply = (200, {b"content-type": b"application/json", b"content-encoding": b"gzip"},
                               payload)
        response, data = self.call(b"POST", "/v1/completions", b'{"model":"a"}')
        self.assertEqual(response.code, 200)
        if response.headers.hasHeader(b"content-encoding"):
            self.assertEqual(self.value("llamaswap_tokens_total", model="a", type="input"), 0)
        else:
            self.assertEqual(self.value("llamaswap_tokens_total", model="a", type="input"), 2)

    def test_upstream_error_counted_without_tokens(self):
        """MET-2/MET-3: an upstream 500 is counted with its status; its body is not parsed."""
        self.upstream.reply = (500, {b"content-type": b"application/json"},
                               b'{"usage":{"prompt_tokens":5}}')
        self.call(b"POST", "/v1/embeddings", b'{"model":"b"}')
        self.assertEqual(self.value("llamaswap_requests_total", model="b", endpoint="/v1/embeddings",
                                    status="500"), 1)
        self.assertEqual(self.value("llamaswap_tokens_total", model="b", type="input"), 0)

    def test_llamaswap_errors_counted(self):
        """MET-2: errors answered by llamaswap on inference routes count, model "" when unresolved."""
        self.call(b"POST", "/v1/chat/completions", b'{"model":"nope"}')
        self.call(b"POST", "/v1/chat/completions", b"{not json")
        self.call(b"POST", "/v1/completions", b'{"messages":[]}')
        self.call(b"GET", "/v1/chat/completions")
        for status in ("404", "400", "405"):
            self.assertGreaterEqual(self.value("llamaswap_requests_total", model="",
                                               endpoint="/v1/chat/completions", status=status), 1, status)
        self.assertEqual(self.value("llamaswap_requests_total", model="", endpoint="/v1/completions",
                                    status="400"), 1)
        self.assertEqual(self.value("llamaswap_time_to_first_byte_seconds_count", model="",
                                    endpoint="/v1/chat/completions"), 3)

    def test_unauthorized_counted(self):
        """MET-2/SEC-2: a 401 on an inference or /upstream route counts, model "", nothing else does."""
        self.change_config(api_keys=("k",))
        for path in ("/v1/chat/completions", "/v1/messages/count_tokens/x", "/upstream/a/health"):
            response, _ = self.call(b"POST", path, b'{"model":"a"}')
            self.assertEqual(response.code, 401)
        self.call(b"GET", "/v1/models")
        self.call(b"GET", "/upstream")
        for endpoint in ("/v1/chat/completions", "/v1/messages/count_tokens", "/upstream"):
            self.assertEqual(self.value("llamaswap_requests_total", model="", endpoint=endpoint,
                                        status="401"), 1, endpoint)
        self.assertEqual(self.metrics.exposition().decode().count("llamaswap_requests_total{"), 3)

    def test_concurrency_limit_counted_with_model(self):
        """MET-2: a 429 after resolution carries the model label."""
        self.build([make_model(id="a", concurrency_limit=1)])
        self.metrics = Metrics(self.config.models)
        self.rewire(request_listeners=[self.metrics.request_finished])
        self.upstream.hold = True
        self.request(b"POST", "/v1/completions", b'{"model":"a"}')
        response, _ = self.call(b"POST", "/v1/completions", b'{"model":"a"}')
        self.assertEqual(response.code, 429)
        self.assertEqual(self.value("llamaswap_requests_total", model="a", endpoint="/v1/completions",
                                    status="429"), 1)
        self.assertEqual(self.value("llamaswap_queue_wait_seconds_count", model="a"), 0)
        up, _ = self.upstream.requests[0]
        up.finish()
        self.flush()
        self.assertEqual(self.value("llamaswap_queue_wait_seconds_count", model="a"), 1)
        self.assertEqual(self.value("llamaswap_requests_total", model="a", endpoint="/v1/completions",
                                    status="200"), 1)

    def test_client_disconnect_is_499(self):
        """MET-2/ERR-3: a client that leaves mid-stream is counted as 499."""
        d, _ = self.open_stream()
        self.successResultOf(d)
        drop_clients(self.agent)
        self.flush()
        self.assertEqual(self.value("llamaswap_requests_total", model="a", endpoint="/v1/chat/completions",
                                    status="499"), 1)

    def test_stream_error_counted(self):
        """MET-2: a PROXY-9 stream loss counts as an upstream stream error."""
        d, up = self.open_stream(b"data: 1\n")
        self.collect(self.successResultOf(d))
        up.channel.transport.abortConnection()
        self.flush()
        self.assertEqual(self.value("llamaswap_upstream_stream_errors_total", model="a"), 1)
        self.assertEqual(self.value("llamaswap_requests_total", model="a", endpoint="/v1/chat/completions",
                                    status="200"), 1)

    def test_label_sets_bounded(self):
        """MET-2: endpoint is the route pattern and model a configured id or "": no raw client strings."""
        self.call(b"POST", "/v1/chat/completions/some/thing?x=1", b'{"model":"a"}')
        self.call(b"POST", "/upstream/a/v1/anything/else", b"{}")
        self.call(b"POST", "/upstream/unknown-model-xyz/p", b"{}")
        self.call(b"POST", "/v1/chat/completions", b'{"model":"client-chosen-name-123"}')
        text = self.metrics.exposition().decode()
        for raw in ("some/thing", "anything", "unknown-model-xyz", "client-chosen-name-123", "x=1"):
            self.assertNotIn(raw, text)
        endpoints, models = set(), set()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if "endpoint" in s.labels:
                    endpoints.add(s.labels["endpoint"])
                if "model" in s.labels:
                    models.add(s.labels["model"])
        self.assertEqual(endpoints, {"/v1/chat/completions", "/upstream"})
        self.assertEqual(models, {"", "a", "b"})
        self.assertEqual(self.value("llamaswap_requests_total", model="a", endpoint="/upstream",
                                    status="200"), 1)
        self.assertEqual(self.value("llamaswap_requests_total", model="", endpoint="/upstream",
                                    status="404"), 1)

    def test_upstream_redirect_not_counted(self):
        """MET-2: /upstream/<model> without a slash is a redirect, not a forwarded request."""
        response, _ = self.call(b"GET", "/upstream/a")
        self.assertEqual(response.code, 301)
        self.assertNotIn("llamaswap_requests_total{", self.metrics.exposition().decode())

    def test_management_routes_not_counted(self):
        """MET-2: only model-dispatched requests are counted."""
        for path in ("/v1/models", "/running", "/health", "/api/models", "/logs"):
            self.call(b"GET", path)
        self.assertNotIn("llamaswap_requests_total{", self.metrics.exposition().decode())

    def test_metrics_page_on_site_not_access_logged(self):
        """EP-11/LOG-5: /metrics answers the exposition and writes no access-log line."""
        from tests.test_resources import build_root
        from treq.testing import RequestTraversalAgent
        from llamaswap.web.site import AccessLogSite
        from tests.fakes import capture_logger

        root = build_root(self.app, {"/metrics": MetricsPage(self.metrics.registry)})
        self.agent = RequestTraversalAgent(root)
        self.site = AccessLogSite(root, self.app, reactor=self.agent._memoryReactor,
                                  log=capture_logger(self.access))
        self.agent._serverFactory = self.site
        response, data = self.call(b"GET", "/metrics")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, b"content-type"), b"text/plain; version=0.0.4; charset=utf-8")
        self.assertIn(b"# TYPE llamaswap_model_state gauge", data)
        self.assertEqual(self.access_lines(), [])


class FastFamilyTests(SynchronousTestCase):
    """Our series are exposed exactly as prometheus_client's own classes would be."""

    def test_same_exposition_as_prometheus_client(self):
        import random

        from prometheus_client import CollectorRegistry, disable_created_metrics, enable_created_metrics

        from llamaswap import metrics

        disable_created_metrics()  # their *_created series: ours have none (nothing asks for them)
        self.addCleanup(enable_created_metrics)
        for ours in (CollectorRegistry(auto_describe=True), metrics.Registry()):
            self.check_same_exposition(CollectorRegistry(auto_describe=True), ours, random.Random(5))

    def check_same_exposition(self, theirs, ours, rnd):
        from prometheus_client import Counter, Gauge, Histogram, generate_latest

        from llamaswap import metrics
        from llamaswap.metrics import DURATION_BUCKETS, TPS_BUCKETS

        budget = (Gauge("x_budget_bytes", "Budget.", registry=theirs), metrics.Gauge("x_budget_bytes", "Budget.", (), ours))
        pairs = [
            (Counter("x_requests_total", "Requests.", ["model", "status"], registry=theirs),
             metrics.Counter("x_requests_total", "Requests.", ["model", "status"], ours)),
            (Histogram("x_seconds", "Durations.", ["model"], buckets=DURATION_BUCKETS, registry=theirs),
             metrics.Histogram("x_seconds", "Durations.", ["model"], ours, DURATION_BUCKETS)),
            (Histogram("x_tps", "Speeds.", ["model"], buckets=TPS_BUCKETS, registry=theirs),
             metrics.Histogram("x_tps", "Speeds.", ["model"], ours, TPS_BUCKETS)),
            (Gauge("x_state", "State.", ["model", "state"], registry=theirs),
             metrics.Gauge("x_state", "State.", ["model", "state"], ours)),
        ]
        self.assertEqual(generate_latest(ours), generate_latest(theirs))  # zero series of the unlabelled one
        budget[0].set(2**40 + 0.5)
        budget[1].labels().set(2**40 + 0.5)
        for their, our in pairs:
            their.labels(*(["a"] * len(their._labelnames)))  # a zero series
            our.labels(*(["a"] * len(our.labelnames)))
        for _ in range(2000):
            model = rnd.choice(["a", "b", "c/d", 'q"uote'])
            counter, hist, tps, state = pairs
            status = rnd.choice([200, 404, "500"])
            n = rnd.choice([1, 2, 7.5])
            counter[0].labels(model=model, status=status).inc(n)
            counter[1].labels(model=model, status=status).inc(n)
            v = rnd.choice([0.0, 0.005, 0.0051, 1, 299.9, 300, 301, rnd.random() * 10])
            hist[0].labels(model).observe(v)
            hist[1].labels(model).observe(v)
            t = rnd.choice([1, 5000, 5001, rnd.random() * 3000])
            tps[0].labels(model=model).observe(t)
            tps[1].labels(model=model).observe(t)
            g = rnd.choice([0, 1, 1e-9, 12345678901234, -3])
            state[0].labels(model, "ready").set(g)
            state[1].labels(model, "ready").set(g)
        self.assertEqual(generate_latest(ours), generate_latest(theirs))
        for their, our in pairs:
            extra = {("model", "status"): [404], ("model", "state"): ["ready"]}.get(our.labelnames, [])
            their.remove("b", *extra)
            our.remove("b", *extra)
        self.assertEqual(generate_latest(ours), generate_latest(theirs))

    def test_counters_only_go_up(self):
        from llamaswap.metrics import Counter, Registry

        counter = Counter("y_total", "Y.", ["m"], Registry())
        with self.assertRaises(ValueError):
            counter.labels("a").inc(-1)
        with self.assertRaises(ValueError):
            counter.labels("a", "b")

    def test_registry_sample_values(self):
        from llamaswap.metrics import Counter, Gauge, Registry

        registry = Registry()
        counter = Counter("z_total", "Z.", ["m"], registry)
        gauge = Gauge("z_bytes", "Z bytes.", (), registry)
        counter.labels("a").inc(3)
        gauge.labels().set(7)
        self.assertEqual(registry.get_sample_value("z_total", {"m": "a"}), 3.0)
        self.assertEqual(registry.get_sample_value("z_bytes"), 7.0)
        self.assertIsNone(registry.get_sample_value("z_total", {"m": "b"}))
        with self.assertRaises(ValueError):
            registry.register(counter)
        registry.unregister(counter)
        self.assertIsNone(registry.get_sample_value("z_total", {"m": "a"}))
        self.assertNotIn(b"z_total", exposition(registry))


# Run in a fresh interpreter: what is loaded depends on what was imported before.
_NOT_LOADED_UNTIL_SCRAPED = textwrap.dedent("""
    import sys
    from twisted.scripts.twistd import ServerOptions
    config = ServerOptions()
    config.parseOptions(["llamaswap", "--config", sys.argv[1], "--listen", "tcp:0:interface=127.0.0.1",
                         "--state-file", sys.argv[2]])
    from llamaswap import tap
    service = tap.makeService(config.subOptions)
    assert "prometheus_client" not in sys.modules, "loaded before anything scraped"
    from twisted.web.test.requesthelper import DummyRequest
    from llamaswap.metrics import MetricsPage
    page = MetricsPage(service.metrics.registry)
    text = page.render_GET(DummyRequest([b""])).decode()
    assert "prometheus_client" in sys.modules
    assert 'llamaswap_model_state{model="a",state="stopped"} 1.0' in text, text
    print("ok")
""")


class LoadedAtFirstScrapeTests(SynchronousTestCase):
    def test_prometheus_client_loaded_by_the_first_scrape(self):
        """A daemon nobody scrapes does not carry prometheus_client (about 1 MB resident)."""
        import subprocess
        import sys
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "config.yaml")
            with open(path, "w") as f:
                f.write(f"models:\n  a:\n    cmd: {FAKE_CMD}\n")
            run = subprocess.run([sys.executable, "-c", _NOT_LOADED_UNTIL_SCRAPED, path, os.path.join(d, "s.json")],
                                 capture_output=True, text=True, timeout=120)
        self.assertEqual((run.returncode, run.stdout.strip()), (0, "ok"), run.stderr)
