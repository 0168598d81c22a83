"""The per-request shortcuts keep the answers of the long way: the scheduler's plain decision,
the capture ring's one-segment storage, cached metric children, cached header names and the
access log's line formatting."""
from __future__ import annotations

import base64
import io
import itertools
import json
import os
import random

from twisted.logger import LogLevel, eventAsText
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llamaswap import captures
from llamaswap.captures import RAW_BODY_MAX, CaptureBuffer, header_map
from llamaswap.metrics import Metrics
from llamaswap.observe import QueueChanged
from llamaswap.proxylog import format_proxy_line
from llamaswap.scheduler import (
    NOTHING, Decision, GroupRule, ModelView, Snapshot, Waiter, decide, evict_set, plain_decision)

MB = 1024 * 1024


def _evict(target, profile, running):
    return evict_set(target, None, running, lambda m: GroupRule("(default)"))


def _waiting(snap: Snapshot):
    return [(m.id, m.state, len(m.waiting)) for m in snap.models.values() if m.waiting]


class PlainDecisionTests(SynchronousTestCase):
    def test_the_two_plain_cases(self):
        self.assertIs(plain_decision([]), NOTHING)
        self.assertEqual(plain_decision([("a", "ready", 3)]), Decision(grants=(("a", 3),)))
        self.assertIsNone(plain_decision([("a", "starting", 1)]))
        self.assertIsNone(plain_decision([("a", "ready", 1), ("b", "ready", 1)]))

    def test_same_as_decide_whenever_it_answers(self):
        """Over many seeded worlds (states, waiters, swaps, fifo, a budget), whenever the plain
        decision answers, it is the full pass's decision."""
        rng = random.Random(17)
        states = ("stopped", "starting", "ready", "stopping", "shutdown")
        answered = 0
        for _ in range(3000):
            seq = itertools.count()
            models = {}
            for model_id in rng.sample("abcd", rng.randint(1, 4)):
                waiting = tuple(Waiter(next(seq), rng.random() * 40, None, rng.choice((0, 0, 1)))
                                for _ in range(rng.choice((0, 0, 1, 2, 3))))
                models[model_id] = ModelView(model_id, rng.choice(states), rng.randint(0, 2), waiting,
                                             need=rng.choice((None, 5, 50)), need_source="declared")
            snap = Snapshot(models, 45.0, 30.0, rng.choice(("swap-aware", "fifo")),
                            frozenset(rng.sample(sorted(models), rng.randint(0, 1))),
                            rng.choice((None, 20)), priority=rng.choice(({}, {"a": 2})))
            plain = plain_decision(_waiting(snap))
            if plain is not None:
                answered += 1
                self.assertEqual(plain, decide(snap, _evict))
        self.assertGreater(answered, 500)


def _captured(buffer, request_id, resp_chunks, status=200, req=b'{"model":"m"}'):
    draft = buffer.draft(request_id, "/v1/chat/completions", "/v1/chat/completions")
    draft.set_request(Headers({b"content-type": [b"application/json"]}), req)
    draft.on_response(Headers({b"content-type": [b"text/event-stream"]}))
    for chunk in resp_chunks:
        draft.on_data(chunk)

    class Record:
        capture = draft

    Record.status = status
    buffer.request_finished(Record)


class CaptureStorageTests(SynchronousTestCase):
    def test_short_and_long_bodies_round_trip(self):
        """Bodies held whole and bodies compressed as they came both come back byte for byte,
        whatever was captured in between."""
        buffer = CaptureBuffer(lambda: 5)
        short = [b"data: a\n\n", b"data: b\n\n"]
        long = [b"data: " + os.urandom(1000).hex().encode() + b"\n\n" for _ in range(2 * RAW_BODY_MAX // 2000)]
        _captured(buffer, 1, short)
        _captured(buffer, 2, long, req=b"x" * 100000)
        _captured(buffer, 3, [])
        self.assertEqual(base64.b64decode(buffer.get(1)["resp_body"]), b"".join(short))
        self.assertEqual(base64.b64decode(buffer.get(2)["resp_body"]), b"".join(long))
        self.assertEqual(base64.b64decode(buffer.get(2)["req_body"]), b"x" * 100000)
        self.assertEqual(buffer.get(3)["resp_body"], "")
        self.assertEqual(buffer.get(1)["resp_headers"], {"Content-Type": "text/event-stream"})

    def test_long_answer_not_200_keeps_no_body(self):
        buffer = CaptureBuffer(lambda: 5)
        _captured(buffer, 1, [b"e" * 1000] * (RAW_BODY_MAX // 500), status=500)
        self.assertIsNone(buffer.get(1)["resp_body"])
        self.assertEqual(base64.b64decode(buffer.get(1)["req_body"]), b'{"model":"m"}')

    def test_size_counts_compressed_bytes(self):
        """A compressible capture takes far less room than its raw size."""
        buffer = CaptureBuffer(lambda: 1)
        _captured(buffer, 1, [b"data: " + b"token " * 100 + b"\n\n"] * 50)
        self.assertLess(buffer.size, 3000)

    def test_blocks_keep_the_accounting_honest(self):
        """Over a seeded mix of small, large, compressible and random captures and ring resizes:
        the size is exactly the bytes held (raw captures, and every block a kept capture is in),
        never over the limit, and every kept capture comes back whole."""
        rng = random.Random(5)
        megabytes = [1]
        buffer = CaptureBuffer(lambda: megabytes[0])
        sent = {}
        for request_id in range(1, 400):
            if rng.random() < 0.02:
                megabytes[0] = rng.choice((1, 2))
            kind = rng.random()
            if kind < 0.8:
                body = b"data: %d tokens\n\n" % request_id * rng.randint(1, 40)
            elif kind < 0.9:
                body = os.urandom(rng.randint(1, 300000))
            else:
                body = b"x" * rng.randint(RAW_BODY_MAX, 4 * RAW_BODY_MAX)
            req = b'{"model":"m","n":%d}' % request_id
            _captured(buffer, request_id, [body[i:i + 5000] for i in range(0, len(body), 5000)], req=req)
            sent[request_id] = (req, body)
            kept = [buffer._items[i] for i in buffer._items]
            blocks = {id(s.block): s.block for s in kept if s.block is not None}
            held = sum(s.size for s in kept) + sum(len(b.data) for b in blocks.values())
            self.assertEqual(buffer.size, held)
            self.assertLessEqual(buffer.size, megabytes[0] * MB)
            for block in blocks.values():
                self.assertEqual(block.live, sum(1 for s in kept if s.block is block))
        self.assertGreater(len(buffer), 50)
        for request_id in buffer._items:
            capture = buffer.get(request_id)
            req, body = sent[request_id]
            self.assertEqual((base64.b64decode(capture["req_body"]), base64.b64decode(capture["resp_body"])),
                             (req, body))

    def test_small_captures_compressed_together(self):
        """Similar small captures compress far better together than one by one."""
        buffer = CaptureBuffer(lambda: 1)
        for request_id in range(1, 201):
            body = b'{"id":"chatcmpl-%d","choices":[{"message":{"content":"Hello from the upstream"}}]}' % request_id
            _captured(buffer, request_id, [body])
        alone = CaptureBuffer(lambda: 1)
        _captured(alone, 1, [body])
        alone._compress_held()  # one capture compressed by itself
        self.assertEqual(len(buffer), 200)
        self.assertLess(buffer.size, 200 * alone.size / 3)

    def test_request_body_too_big_is_not_kept(self):
        buffer = CaptureBuffer(lambda: 1)
        _captured(buffer, 1, [b"ok"])
        _captured(buffer, 2, [b"ok"], req=os.urandom(MB + 10))
        self.assertEqual((buffer.has(1), buffer.has(2)), (True, False))


class HeaderNameTests(SynchronousTestCase):
    def test_cached_names_give_the_same_maps(self):
        headers = Headers({b"x-weird-NAME": [b"1"], b"set-cookie": [b"s"], b"host": [b"h"],
                           b"content-encoding": [b"gzip"]})
        for _ in range(2):  # the second time from the cache
            self.assertEqual(header_map(headers), {"X-Weird-Name": "1", "Set-Cookie": "[REDACTED]",
                                                   "Content-Encoding": "gzip"})
            self.assertEqual(header_map(headers, skip=(b"Content-Encoding",)),
                             {"X-Weird-Name": "1", "Set-Cookie": "[REDACTED]", "Host": "h"})

    def test_json_form_is_json_dumps_of_the_map(self):
        """A capture keeps its header maps as JSON written directly: the same text json.dumps gives."""
        rnd = random.Random(3)
        names = [b"host", b"Content-Type", b"content-type", b"authorization", b"x-api-key", b"set-cookie",
                 b"X-Weird_Name", b"content-encoding", b"x-y"]
        values = [b"a", b"\xe9\xff", b'"quoted"\\', b"", b"tab\tx", b"\xe2\x9c\x93"]
        for _ in range(500):
            headers = Headers()
            for _ in range(rnd.randint(0, 6)):
                headers.addRawHeader(rnd.choice(names), rnd.choice(values))
            for skip in ((b"host",), (b"Content-Encoding",), ()):
                self.assertEqual(captures.header_json(headers, skip=skip),
                                 json.dumps(header_map(headers, skip=skip), separators=(",", ":")))
            self.assertEqual(captures.header_json(headers), json.dumps(header_map(headers), separators=(",", ":")))

    def test_cache_is_bounded(self):
        self.patch(captures, "_NAMES", {})
        self.patch(captures, "_NAMES_MAX", 3)
        headers = Headers({f"x-h{i}".encode(): [b"v"] for i in range(10)})
        self.assertEqual(len(header_map(headers)), 10)
        self.assertEqual(len(captures._NAMES), 3)


class _Record:
    def __init__(self, model="a", status=200, **kw):
        self.model, self.endpoint, self.status = model, "/v1/chat/completions", status
        self.duration, self.ttfb, self.queue_wait = 0.01, 0.005, 0.0
        self.stream_error, self.key = None, kw.get("key", "")
        self.usage = {"input": 3, "output": 4, "cached": None, "prompt_per_second": 10.0,
                      "tokens_per_second": 20.0}


class MetricChildrenTests(SynchronousTestCase):
    def value(self, metrics, name, **labels):
        return metrics.registry.get_sample_value(name, labels)

    def test_removed_model_counts_afresh(self):
        """A model removed by a reload and added again counts from zero, in the exposition."""
        metrics = Metrics(["a"])
        metrics.request_finished(_Record())
        metrics.request_finished(_Record())
        labels = dict(model="a", endpoint="/v1/chat/completions", status="200")
        self.assertEqual(self.value(metrics, "llamaswap_requests_total", **labels), 2)
        metrics.remove_model("a")
        metrics.add_model("a")
        metrics.request_finished(_Record())
        self.assertEqual(self.value(metrics, "llamaswap_requests_total", **labels), 1)
        self.assertEqual(self.value(metrics, "llamaswap_tokens_total", model="a", type="output"), 4)

    def test_queue_gauges_follow_every_event(self):
        """Gauges set only on change still show every event's counts, also after a removal."""
        metrics = Metrics(["a"])
        for inflight, waiting in ((0, 1), (1, 0), (1, 0), (0, 0), (2, 3)):
            metrics.observe(QueueChanged("a", inflight, waiting))
            self.assertEqual((self.value(metrics, "llamaswap_inflight_requests", model="a"),
                              self.value(metrics, "llamaswap_queue_depth", model="a")), (inflight, waiting))
        metrics.remove_model("a")
        metrics.add_model("a")
        self.assertEqual(self.value(metrics, "llamaswap_inflight_requests", model="a"), 0)
        metrics.observe(QueueChanged("a", 2, 3))
        self.assertEqual((self.value(metrics, "llamaswap_inflight_requests", model="a"),
                          self.value(metrics, "llamaswap_queue_depth", model="a")), (2, 3))

    def test_key_label_switch(self):
        """Turning the key label on replaces the counters; the cached children follow."""
        metrics = Metrics(["a"])
        metrics.request_finished(_Record())
        metrics.set_key_names(["alice"])
        metrics.request_finished(_Record(key="alice"))
        self.assertEqual(self.value(metrics, "llamaswap_requests_total", model="a",
                                    endpoint="/v1/chat/completions", status="200", key="alice"), 1)
        self.assertEqual(self.value(metrics, "llamaswap_tokens_total", model="a", type="input", key="alice"), 3)

    def test_no_series_for_what_a_record_lacks(self):
        metrics = Metrics(["a"])
        record = _Record(model="")
        record.ttfb = None
        metrics.request_finished(record)
        text = metrics.exposition().decode()
        self.assertIn('llamaswap_request_duration_seconds_count{endpoint="/v1/chat/completions",model=""} 1.0', text)
        self.assertNotIn('llamaswap_time_to_first_byte_seconds_count{endpoint="/v1/chat/completions",model=""}', text)


class AccessLineTests(SynchronousTestCase):
    def test_line_events_formatted_as_twisted_would(self):
        for event in ({"log_format": "{line}", "line": 'Request 1.2.3.4 "GET /x" {not a field}'},
                      {"log_format": "{line} and {other}", "line": "a", "other": 1},
                      {"log_format": "{line}", "line": 7}):
            event.update(log_level=LogLevel.info, log_namespace="llamaswap.access", log_time=0.0)
            expected = eventAsText(event, includeTraceback=True, includeTimestamp=False, includeSystem=False)
            self.assertEqual(format_proxy_line(event, "INFO"), f"[INFO] {expected}\n".encode())


class BodyTests(SynchronousTestCase):
    def test_known_length_body_in_memory(self):
        """A body of known length up to the spool size is a plain in-memory file."""
        from llamaswap.web.site import SPOOL_BYTES, LlamaSwapRequest

        request = LlamaSwapRequest.__new__(LlamaSwapRequest)
        request.site_limit = lambda: 10 * SPOOL_BYTES
        request.gotLength(100)
        self.assertIsInstance(request.content, io.BytesIO)
        request.gotLength(None)
        self.assertNotIsInstance(request.content, io.BytesIO)
        request.gotLength(SPOOL_BYTES + 1)
        self.assertNotIsInstance(request.content, io.BytesIO)


class InflightFollowingTests(SynchronousTestCase):
    def test_hub_observes_inflight_only_while_an_admin_listens(self):
        """No admin client: the in-flight list has no observer, so it builds no update."""
        from twisted.internet.task import Clock

        from llamaswap.events import EventHub
        from llamaswap.web.inflight import InflightRequests
        from llamaswap.logs import LogBroadcaster
        from tests.test_events import FakeEventRequest

        clock = Clock()
        hub = EventHub({}, LogBroadcaster(), clock)
        self.addCleanup(hub.stopService)
        inflight = InflightRequests(clock)
        hub.watch_inflight(inflight)
        self.assertEqual(inflight.observers, [])
        other = FakeEventRequest()
        hub.add_client(other, with_logs=False)
        self.assertEqual(inflight.observers, [])
        admin = FakeEventRequest()
        hub.add_client(admin)
        self.assertEqual(inflight.observers, [hub._inflight_update])
        second = FakeEventRequest()
        hub.add_client(second)
        self.assertEqual(inflight.observers, [hub._inflight_update])
        admin.lose()
        self.assertEqual(inflight.observers, [hub._inflight_update])  # the second admin still listens
        second.lose()
        self.assertEqual(inflight.observers, [])

