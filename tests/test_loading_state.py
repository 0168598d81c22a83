"""``sendLoadingState`` in memory (RT-12): exact chunks on the fake clock, queue
positions, the upstream stream after ``model ready``, failures as one SSE error event,
and a 429 always decided before any loading output.

Health checks are a ``HealthChecks`` injection set on each ``UpstreamProcess``, so a model
stays ``starting`` until the test answers its probe.
"""
from __future__ import annotations

import json

from twisted.internet.defer import CancelledError
from twisted.web.client import ResponseDone

from llamaswap.loading import loading_chunk
from tests.factories import make_model
from tests.fakes import HealthChecks
from tests.test_resources import Collect, HTTPCase

STREAM = b'{"model":"a","stream":true,"messages":[]}'


def chunks(data: bytes) -> list:
    """Split an SSE body into its ``data:`` payloads (JSON decoded when possible)."""
    out = []
    for event in data.split(b"\n\n"):
        event = event.strip(b"\n")
        if not event:
            continue
        assert event.startswith(b"data: "), data
        payload = event[len(b"data: "):]
        try:
            out.append(json.loads(payload))
        except ValueError:
            out.append(payload)
    return out


def texts(data: bytes) -> list:
    """The reasoning_content texts of the loading chunks in an SSE body."""
    return [c["choices"][0]["delta"]["reasoning_content"] for c in chunks(data)
            if isinstance(c, dict) and c.get("id") == "llamaswap-loading"]


class LoadingCase(HTTPCase):
    def build_loading(self, models, **kw) -> None:
        self.build(models, **kw)
        self.checks = HealthChecks()
        for proc in self.router.processes():
            proc.check = self.checks

    def start_stream(self, body: bytes = STREAM, path: str = "/v1/chat/completions"):
        """Send a request and return (response, Collect) once headers arrived."""
        response = self.successResultOf(self.request(b"POST", path, body))
        return response, self.collect(response)

    def tick(self, seconds: float = 1.0) -> None:
        self.reactor.advance(seconds)
        self.flush()

    def ready(self) -> None:
        self.checks.answer(200)
        self.flush()


class FormatTests(LoadingCase):
    def setUp(self) -> None:
        self.build_loading([make_model(id="a", aliases=("gpt",), send_loading_state=True)])
        self.reactor.advance(1767225600)

    def test_exact_chunks_then_upstream_stream(self):
        """RT-12: 200 + event-stream at once; loading text; a dot per second; model ready; then the
        upstream's SSE body on the same stream (its status and headers dropped)."""
        self.upstream.hold = True
        response, collect = self.start_stream()
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, b"content-type"), b"text/event-stream")
        self.assertEqual(self.header(response, b"x-accel-buffering"), b"no")
        first = ('data: {"id":"llamaswap-loading","object":"chat.completion.chunk","created":1767225600,'
                 '"model":"a","choices":[{"index":0,"delta":{"reasoning_content":"loading model a\u2026\\n"},'
                 '"finish_reason":null}]}\n\n').encode("utf-8")
        self.assertEqual(collect.data, first)
        self.assertEqual(self.upstream.requests, [])
        self.tick(0.5)
        self.assertEqual(collect.data, first)
        self.tick(0.5)
        self.tick(1.0)
        self.assertEqual(texts(collect.data), ["loading model a\u2026\n", ".", "."])
        self.assertEqual(chunks(collect.data)[2]["created"], 1767225602)
        self.tick(0.25)
        self.ready()
        self.assertEqual(texts(collect.data), ["loading model a\u2026\n", ".", ".", "\nmodel ready (2.25s)\n\n"])
        (up, body), = self.upstream.requests
        self.assertEqual(body, STREAM)
        up.setResponseCode(200)
        up.setHeader(b"content-type", b"text/event-stream")
        up.setHeader(b"x-upstream", b"1")
        up.write(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n')
        self.flush()
        self.assertTrue(collect.data.endswith(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'))
        self.assertNoResult(collect.done)
        self.tick(3)  # no more dots once ready
        self.assertEqual(len(texts(collect.data)), 4)
        up.write(b"data: [DONE]\n\n")
        up.finish()
        self.flush()
        self.successResultOf(collect.done)
        self.assertTrue(collect.reason.check(ResponseDone))
        self.assertTrue(collect.data.endswith(b"data: [DONE]\n\n"))
        self.assertIsNone(self.header(response, b"x-upstream"))
        self.assertEqual(self.router.counts("a"), (0, 0))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_model_field_is_the_requested_name(self):
        """RT-12: chunks carry the requested name; the text names the id."""
        body = b'{"model":"gpt","stream":true}'
        _, collect = self.start_stream(body)
        c, = chunks(collect.data)
        self.assertEqual(c["model"], "gpt")
        self.assertEqual(c["choices"][0]["delta"]["reasoning_content"], "loading model a\u2026\n")
        self.assertEqual(loading_chunk("gpt", "x", 5),
                         b'data: {"id":"llamaswap-loading","object":"chat.completion.chunk","created":5,'
                         b'"model":"gpt","choices":[{"index":0,"delta":{"reasoning_content":"x"},'
                         b'"finish_reason":null}]}\n\n')
        self.ready()

    def test_not_used_when_ready_or_not_applicable(self):
        """RT-12: only POST /v1/chat/completions with stream true for a model not ready at admission."""
        self.upstream.reply = (200, {b"content-type": b"application/json"}, b'{"ok":1}')
        d = self.request(b"POST", "/v1/chat/completions", b'{"model":"a","stream":false}')
        self.assertNoResult(d)  # no loading output for a non-streamed request
        self.ready()
        response = self.successResultOf(d)
        self.assertEqual(self.header(response, b"content-type"), b"application/json")
        # ready at admission: the plain upstream response
        response, data = self.call(b"POST", "/v1/chat/completions", STREAM)
        self.assertEqual(data, b'{"ok":1}')
        response, data = self.call(b"POST", "/v1/completions", b'{"model":"a","stream":true}')
        self.assertEqual(data, b'{"ok":1}')

    def test_other_routes_and_models_without_the_flag(self):
        self.build_loading([make_model(id="a", send_loading_state=True), make_model(id="b")])
        d = self.request(b"POST", "/v1/completions", b'{"model":"a","stream":true}')
        self.assertNoResult(d)
        self.ready()
        self.assertEqual(self.successResultOf(d).code, 200)
        d = self.request(b"POST", "/v1/chat/completions", b'{"model":"b","stream":true}')
        self.flush()
        self.assertNoResult(d)
        self.ready()
        self.assertEqual(self.successResultOf(d).code, 200)


class QueueTests(LoadingCase):
    def test_queue_position_changes(self):
        """RT-12: 'waiting in queue (position N)' whenever the position changes."""
        self.build_loading([make_model(id="x"), make_model(id="a", send_loading_state=True)])
        self.upstream.hold = True
        x1 = self.request(b"POST", "/v1/chat/completions", b'{"model":"x"}')
        x2 = self.request(b"POST", "/v1/chat/completions", b'{"model":"x"}')
        self.assertEqual(self.router.counts("x"), (0, 2))
        response, collect = self.start_stream()
        self.assertEqual(response.code, 200)
        self.assertEqual(texts(collect.data), ["loading model a\u2026\n", "waiting in queue (position 3)\n"])
        self.ready()  # x is ready: both x requests are granted, a is now first in line
        self.assertEqual(texts(collect.data)[-1], "waiting in queue (position 1)\n")
        self.tick()
        self.assertEqual(texts(collect.data)[-1], ".")
        for up, _ in self.upstream.requests:
            up.finish()
        self.flush()
        self.successResultOf(x1), self.successResultOf(x2)
        self.assertEqual(self.checks.count, 2)  # x evicted, a starting
        self.upstream.hold = False
        self.upstream.reply = (200, {b"content-type": b"text/event-stream"}, b"data: [DONE]\n\n")
        self.tick(0.5)
        self.ready()
        self.successResultOf(collect.done)
        got = texts(collect.data)
        self.assertEqual(got[:3], ["loading model a\u2026\n", "waiting in queue (position 3)\n",
                                   "waiting in queue (position 1)\n"])
        self.assertEqual(got[-1], "\nmodel ready (1.50s)\n\n")
        self.assertTrue(collect.data.endswith(b"\n\ndata: [DONE]\n\n"))

    def test_position_follows_earlier_requests_only(self):
        """RT-12: an earlier request leaving the queue moves us up; later ones never move us."""
        self.build_loading([make_model(id="x"), make_model(id="a", send_loading_state=True)])
        w1, w2 = self.router.acquire("x"), self.router.acquire("x")
        _, collect = self.start_stream()
        self.assertEqual(texts(collect.data)[-1], "waiting in queue (position 3)\n")
        later = self.router.acquire("x")
        w2.cancel()
        self.flush()
        self.assertEqual(texts(collect.data)[-1], "waiting in queue (position 2)\n")
        later.cancel()
        self.flush()
        self.assertEqual(texts(collect.data).count("waiting in queue (position 2)\n"), 1)
        w1.cancel()
        self.flush()
        self.assertEqual(texts(collect.data)[-1], "waiting in queue (position 1)\n")
        for d in (w1, w2, later):
            self.failureResultOf(d, CancelledError)
        for pump in list(self.agent._pumps):
            pump.clientIO.abortConnection()
        self.flush()
        self.assertEqual(len(self.router.observers), 0)

    def test_429_decided_before_any_loading_output(self):
        """RT-12/SCHED-1: a request over the limit gets a plain 429 JSON, never an event stream."""
        self.build_loading([make_model(id="a", send_loading_state=True, concurrency_limit=1)])
        _, first = self.start_stream()
        self.assertEqual(len(texts(first.data)), 1)
        response, data = self.call(b"POST", "/v1/chat/completions", STREAM)
        self.assertError(response, data, 429, "concurrency_limit", "rate_limit_error")
        self.ready()

    def test_client_leaving_while_loading(self):
        """SCHED-8: the waiter is removed; the dots stop; nothing is left scheduled for it."""
        self.build_loading([make_model(id="a", send_loading_state=True)])
        self.start_stream()
        self.assertEqual(self.router.counts("a"), (0, 1))
        for pump in list(self.agent._pumps):
            pump.clientIO.abortConnection()
        self.flush()
        self.assertEqual(self.router.counts("a"), (0, 0))
        self.tick(3)
        self.assertFalse(any(getattr(l, "__self__", None).__class__.__name__ == "LoadingProgress"
                             for l in self.router.observers))


class FailureTests(LoadingCase):
    def setUp(self) -> None:
        self.build_loading([make_model(id="a", send_loading_state=True)])

    def error_event(self, collect: Collect) -> dict:
        self.successResultOf(collect.done)
        self.assertTrue(collect.reason.check(ResponseDone), collect.reason)
        self.assertNotIn(b"[DONE]", collect.data)
        self.assertTrue(collect.data.endswith(b"\n\n"))
        last = chunks(collect.data)[-1]
        self.assertEqual(set(last), {"error"})
        self.assertEqual(set(last["error"]), {"message", "type", "param", "code"})
        self.assertEqual(last["error"]["type"], "server_error")
        self.assertIsNone(last["error"]["param"])
        return last["error"]

    def test_start_failure(self):
        """RT-12: a failed start is one SSE error event (upstream_start_failed), no [DONE]."""
        _, collect = self.start_stream()
        self.tick()
        self.reactor.spawned[0].output(b"boom\n")
        self.reactor.spawned[0].exit(1)
        self.flush()
        error = self.error_event(collect)
        self.assertEqual(error["code"], "upstream_start_failed")
        self.assertTrue(error["message"].startswith("failed to start model 'a': exited with code 1"), error)
        self.assertEqual(texts(collect.data), ["loading model a\u2026\n", "."])
        self.assertEqual(self.router.counts("a"), (0, 0))
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_upstream_non_2xx(self):
        """RT-12: a non-2xx answer is an upstream_error event with at most 2 KiB of its body."""
        self.upstream.reply = (500, {b"content-type": b"application/json"}, b'{"e":"' + b"x" * 5000 + b'"}')
        _, collect = self.start_stream()
        self.ready()
        error = self.error_event(collect)
        self.assertEqual(error["code"], "upstream_error")
        self.assertIn("answered 500", error["message"])
        self.assertIn('{"e":"xxx', error["message"])
        self.assertEqual(error["message"].count("x"), 2048 - len('{"e":"'))
        self.assertEqual(self.router.counts("a"), (0, 0))

    def test_upstream_not_sse(self):
        """RT-12: a 200 that is not an event stream is an upstream_error event too."""
        self.upstream.reply = (200, {b"content-type": b"application/json"}, b'{"plain":true}')
        _, collect = self.start_stream()
        self.ready()
        error = self.error_event(collect)
        self.assertEqual(error["code"], "upstream_error")
        self.assertIn('{"plain":true}', error["message"])
        self.assertEqual(texts(collect.data)[-1], "\nmodel ready (0.00s)\n\n")

    def test_stream_lost_after_ready(self):
        """PROXY-9 still applies after the loading output."""
        self.upstream.hold = True
        _, collect = self.start_stream()
        self.ready()
        up, _ = self.upstream.requests[0]
        up.setHeader(b"content-type", b"text/event-stream")
        up.write(b"data: 1\n")
        self.flush()
        up.channel.transport.abortConnection()
        self.flush()
        error = self.error_event(collect)
        self.assertEqual(error["code"], "upstream_error")
        self.assertIn(b"data: 1\n\n\ndata: {\"error\"", collect.data)
        self.assertEqual(self.router.counts("a"), (0, 0))

    def test_unload_while_loading(self):
        """SCHED-10 while streaming the loading state: the waiter's error is the event."""
        _, collect = self.start_stream()
        self.call(b"POST", "/api/models/unload/a")
        error = self.error_event(collect)
        self.assertEqual(error["code"], "model_unloaded")
