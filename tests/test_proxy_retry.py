"""PROXY-10: a request on a connection the upstream silently dropped is retried once."""
from types import SimpleNamespace

from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived

from llamaswap.errors import UpstreamUnreachable
from llamaswap.proxy import Forwarder


class ScriptedClient:
    """A treq-like client answering each request with the next scripted outcome."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls = []

    def request(self, method, url, **kw):
        self.calls.append((method, url, kw["data"]))
        outcome = self.outcomes.pop(0)
        return fail(outcome) if isinstance(outcome, Exception) else succeed(outcome)


def never_received():
    return ResponseNeverReceived([Failure(ConnectionRefusedError("reset"))])


class RetryTests(SynchronousTestCase):
    def send(self, pooled, fresh, ready=True):
        forwarder = Forwarder(reactor=None, fresh_client=lambda: fresh)
        bodies = iter([b"first-body", b"second-body"])
        return forwarder.send(
            SimpleNamespace(method=b"POST"), http=pooled, url=b"http://up/v1/chat/completions",
            headers={}, body=lambda: next(bodies), model_id="m", still_ready=lambda: ready)

    def test_dropped_keepalive_connection_is_retried_once(self):
        """A POST that never got a response while the model is ready is retried on a new connection."""
        for error in (never_received(), RequestNotSent(), RequestTransmissionFailed([])):
            pooled, fresh = ScriptedClient(error), ScriptedClient("response")
            self.assertEqual(self.successResultOf(self.send(pooled, fresh)), "response")
            self.assertEqual(len(pooled.calls), 1)
            self.assertEqual(fresh.calls, [("POST", b"http://up/v1/chat/completions", b"second-body")])

    def test_no_retry_when_model_no_longer_ready(self):
        """A model that went away is not retried: 502 upstream_unreachable at once."""
        pooled, fresh = ScriptedClient(never_received()), ScriptedClient("response")
        f = self.failureResultOf(self.send(pooled, fresh, ready=False), UpstreamUnreachable)
        self.assertIn("upstream for model 'm' unreachable", f.value.message)
        self.assertEqual(fresh.calls, [])

    def test_retry_happens_only_once(self):
        """A second failure is reported as 502, not retried again."""
        pooled, fresh = ScriptedClient(never_received()), ScriptedClient(never_received())
        self.failureResultOf(self.send(pooled, fresh), UpstreamUnreachable)
        self.assertEqual(len(fresh.calls), 1)

    def test_connect_failure_is_not_retried(self):
        """PROXY-8: a refused connection is a 502 at once (no retry loop)."""
        pooled, fresh = ScriptedClient(ConnectionRefusedError("nope")), ScriptedClient("response")
        f = self.failureResultOf(self.send(pooled, fresh), UpstreamUnreachable)
        self.assertEqual(f.value.code, "upstream_unreachable")
        self.assertEqual(fresh.calls, [])

    def test_caller_builds_the_unreachable_error(self):
        """The caller (e.g. peers) gets the short reason as data and picks the error."""
        forwarder = Forwarder(reactor=None, fresh_client=lambda: ScriptedClient())
        d = forwarder.send(SimpleNamespace(method=b"GET"), http=ScriptedClient(ConnectionRefusedError("nope")),
                           url=b"http://up/", headers={}, body=lambda: b"", model_id="m",
                           still_ready=lambda: True, unreachable=lambda reason: ValueError(reason))
        f = self.failureResultOf(d, ValueError)
        self.assertIn("nope", str(f.value))
        self.assertNotIn("unreachable", str(f.value))

    def test_cancelled_request_is_not_retried(self):
        """A request cancelled before its response (the client left, or /api/inflight/<id>/cancel)
        reaches Agent as ResponseNeverReceived([CancelledError]): it ends there, as a cancellation,
        never as a second upstream request."""
        from twisted.internet.defer import CancelledError

        pooled = ScriptedClient(ResponseNeverReceived([Failure(CancelledError())]))
        fresh = ScriptedClient("response")
        self.failureResultOf(self.send(pooled, fresh), CancelledError)
        self.assertEqual(fresh.calls, [])

    def test_retry_keeps_the_timeouts(self):
        """The fresh connection of a retry gets the model's timeouts too."""
        from llamaswap.config import Timeouts

        timeouts = Timeouts(response_header=9)
        pooled = ScriptedClient(never_received())
        pooled.timeouts = timeouts
        fresh = ScriptedClient("response")
        fresh.applied = []
        fresh.apply_timeouts = fresh.applied.append
        self.successResultOf(self.send(pooled, fresh))
        self.assertEqual(fresh.applied, [timeouts])
