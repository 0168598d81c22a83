"""llamaswap.hooks: bounded JSON calls to a model's own server (hooks.beforeStop / afterReady)."""
from __future__ import annotations

import json

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config.keepcache import Hook
from llamaswap.hooks import TimedOut, bounded, call_hooks, send_json
from tests.fakes import UpstreamStub, capture_logger, flush_all, upstream_client


class BoundedTests(SynchronousTestCase):
    def test_result_within_the_bound(self):
        """The work's result comes back and no timer is left."""
        clock, d = Clock(), Deferred()

        async def work():
            return await d

        out = ensureDeferred(bounded(clock, 5, work()))
        clock.advance(4)
        d.callback("done")
        self.assertEqual(self.successResultOf(out), "done")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cut_at_the_bound(self):
        """At the bound the work is cancelled and TimedOut raised, whatever the cancellation gave."""
        clock = Clock()
        cancelled = []
        d = Deferred(lambda _: cancelled.append(True))

        async def work():
            await d

        out = ensureDeferred(bounded(clock, 5, work()))
        clock.advance(4.9)
        self.assertNoResult(out)
        clock.advance(0.1)
        self.assertEqual(cancelled, [True])
        self.assertEqual(str(self.failureResultOf(out, TimedOut).value), "did not finish within 5s")

    def test_caller_cancel_is_a_cancel(self):
        """The caller cancelling is CancelledError, not TimedOut; the timer goes."""
        clock, d = Clock(), Deferred()

        async def work():
            await d

        out = ensureDeferred(bounded(clock, 5, work()))
        out.cancel()
        self.failureResultOf(out, CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])


class SendJsonTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream = UpstreamStub()
        self.http, self.agent = upstream_client(self.upstream)

    def test_json_body_and_answer(self):
        """The body goes as JSON with its content type; the answer is parsed."""
        self.upstream.reply = (200, {b"content-type": b"application/json"}, b'{"n_saved": 3}')
        d = ensureDeferred(send_json(self.http, "POST", "http://127.0.0.1:1/slots/0?action=save", {"filename": "f"}))
        flush_all(None, self.agent)
        self.assertEqual(self.successResultOf(d), (200, {"n_saved": 3}))
        request, body = self.upstream.requests[0]
        self.assertEqual(json.loads(body), {"filename": "f"})
        self.assertEqual(request.getHeader(b"content-type"), b"application/json")

    def test_not_json(self):
        self.upstream.reply = (502, {}, b"<html>")
        d = ensureDeferred(send_json(self.http, "GET", "http://127.0.0.1:1/slots"))
        flush_all(None, self.agent)
        self.assertEqual(self.successResultOf(d), (502, None))

    def test_cancel_is_cancelled_error(self):
        """Cancelling a request in flight surfaces as CancelledError (not ResponseNeverReceived)."""
        self.upstream.hold = True
        d = ensureDeferred(send_json(self.http, "GET", "http://127.0.0.1:1/slots"))
        flush_all(None, self.agent)
        d.cancel()
        flush_all(None, self.agent)
        self.failureResultOf(d, CancelledError)


class CallHooksTests(SynchronousTestCase):
    def test_calls_in_order_count_successes(self):
        """Every call is made in order against the base URL; the 2xx ones are counted and logged."""
        upstream = UpstreamStub()
        http, agent = upstream_client(upstream)
        events: list = []
        hooks = (Hook("POST", "/sleep?level=1", {"a": 1}), Hook("GET", "/health"))
        d = ensureDeferred(call_hooks(http, Clock(), "http://127.0.0.1:9/base/", hooks, "m", "beforeStop",
                                      capture_logger(events)))
        flush_all(None, agent)
        self.assertEqual(self.successResultOf(d), 2)
        self.assertEqual([(r.method, r.uri) for r, _ in upstream.requests],
                         [(b"POST", b"/base/sleep?level=1"), (b"GET", b"/base/health")])
        self.assertEqual(upstream.requests[1][1], b"")
        self.assertEqual([formatEvent(e) for e in events],
                         ["m: beforeStop hook POST /sleep?level=1 answered 200 in 0.000s",
                          "m: beforeStop hook GET /health answered 200 in 0.000s"])
