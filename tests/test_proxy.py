"""Forwarding helpers: header filtering (PROXY-2, SEC-6), response relay (PROXY-5, PROXY-6,
PROXY-9), body producers."""
from __future__ import annotations

import io
from types import SimpleNamespace

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.test.requesthelper import DummyRequest

from llamaswap.proxy import (
    BytesProducer, FileSliceProducer, Forwarder, RelayOutcome, copy_response_headers, upstream_headers)


def incoming(headers: dict, ip: str = "10.1.2.3") -> DummyRequest:
    request = DummyRequest([b""])
    request.client = IPv4Address("TCP", ip, 5555)
    for name, values in headers.items():
        request.requestHeaders.setRawHeaders(name, values if isinstance(values, list) else [values])
    return request


class UpstreamHeaderTests(SynchronousTestCase):
    def assertUpstream(self, headers: dict, expected: dict, strip_auth: bool = False,
                       scheme: bytes = b"http") -> None:
        """``upstream_headers`` of a request with ``headers``: each expected name has exactly these
        raw values upstream (None: the header is not sent)."""
        out = upstream_headers(incoming(headers), strip_auth=strip_auth, scheme=scheme)
        for name, values in expected.items():
            self.assertEqual(out.getRawHeaders(name), values, name)

    def test_hop_by_hop_removed(self):
        """PROXY-2: hop-by-hop headers never go upstream."""
        hop_by_hop = (b"connection", b"keep-alive", b"proxy-authorization", b"proxy-authenticate",
                      b"te", b"trailer", b"transfer-encoding", b"upgrade", b"content-length")
        self.assertUpstream({
            b"Connection": b"keep-alive", b"Keep-Alive": b"timeout=5", b"Proxy-Authorization": b"x",
            b"Proxy-Authenticate": b"y", b"TE": b"trailers", b"Trailer": b"X-T",
            b"Transfer-Encoding": b"chunked", b"Upgrade": b"websocket", b"Content-Length": b"12",
            b"Accept-Encoding": b"br", b"X-Keep": b"1"},
            {**dict.fromkeys(hop_by_hop), b"x-keep": [b"1"]})

    def test_headers_named_by_connection_removed(self):
        """PROXY-2: every header named in Connection is hop-by-hop too."""
        self.assertUpstream({b"Connection": [b"close, X-Secret", b"X-Other"], b"X-Secret": b"s",
                             b"X-Other": b"o", b"X-Fine": b"f"},
                            {b"x-secret": None, b"x-other": None, b"x-fine": [b"f"]})

    def test_forwarded_headers_added(self):
        """PROXY-2: Host goes to X-Forwarded-Host, the client IP to X-Forwarded-For, proto set."""
        self.assertUpstream({b"Host": b"llamaswap.example:8080"},
                            {b"host": None, b"x-forwarded-host": [b"llamaswap.example:8080"],
                             b"x-forwarded-for": [b"10.1.2.3"], b"x-forwarded-proto": [b"https"]},
                            scheme=b"https")

    def test_x_forwarded_for_appended_and_proto_kept(self):
        """PROXY-2: '<existing>, <ip>'; an existing X-Forwarded-Proto is forwarded."""
        self.assertUpstream({b"X-Forwarded-For": b"1.1.1.1, 2.2.2.2", b"X-Forwarded-Proto": b"https"},
                            {b"x-forwarded-for": [b"1.1.1.1, 2.2.2.2, 10.1.2.3"],
                             b"x-forwarded-proto": [b"https"]})

    def test_auth_stripped_when_api_keys_set(self):
        """SEC-6: Authorization and x-api-key are removed when apiKeys is non-empty."""
        self.assertUpstream({b"Authorization": b"Bearer k", b"X-Api-Key": b"k", b"X-Other": b"1"},
                            {b"authorization": None, b"x-api-key": None, b"x-other": [b"1"]},
                            strip_auth=True)

    def test_auth_forwarded_when_no_api_keys(self):
        """SEC-6: without apiKeys, client headers are forwarded unchanged."""
        self.assertUpstream({b"Authorization": b"Bearer k", b"X-Api-Key": b"k"},
                            {b"authorization": [b"Bearer k"], b"x-api-key": [b"k"]})

    def test_repeated_headers_kept(self):
        """Everything else is forwarded unchanged, repeated values included."""
        self.assertUpstream({b"X-Multi": [b"a", b"b"]}, {b"x-multi": [b"a", b"b"]})


class FakeResponse:
    def __init__(self, code=200, phrase=b"OK", headers=None, length=UNKNOWN_LENGTH):
        self.code, self.phrase, self.length = code, phrase, length
        self.headers = Headers({k: v for k, v in (headers or {}).items()})


class ResponseHeaderTests(SynchronousTestCase):
    def test_status_and_headers_relayed(self):
        """PROXY-5: status, reason and headers (minus hop-by-hop) are relayed."""
        request = DummyRequest([b""])
        response = FakeResponse(418, b"I'm a teapot", {
            b"Content-Type": [b"application/json"], b"X-Custom": [b"1", b"2"],
            b"Connection": [b"keep-alive"], b"Keep-Alive": [b"timeout=5"],
            b"Transfer-Encoding": [b"chunked"], b"Set-Cookie": [b"a=b"]}, length=12)
        sse = copy_response_headers(response, request)
        self.assertFalse(sse)
        self.assertEqual(request.responseCode, 418)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"x-custom"), [b"1", b"2"])
        self.assertEqual(request.responseHeaders.getRawHeaders(b"set-cookie"), [b"a=b"])
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-length"), [b"12"])
        for name in (b"connection", b"keep-alive", b"transfer-encoding"):
            self.assertFalse(request.responseHeaders.hasHeader(name), name)

    def test_unknown_length_not_set(self):
        """PROXY-5: without a Content-Length the response is chunked."""
        request = DummyRequest([b""])
        copy_response_headers(FakeResponse(headers={b"Content-Length": [b"99"]}), request)
        self.assertFalse(request.responseHeaders.hasHeader(b"content-length"))

    def test_sse_gets_buffering_headers(self):
        """PROXY-5: text/event-stream gets X-Accel-Buffering: no and Cache-Control: no-cache."""
        request = DummyRequest([b""])
        sse = copy_response_headers(
            FakeResponse(headers={b"Content-Type": [b"text/event-stream; charset=utf-8"]}), request)
        self.assertTrue(sse)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"x-accel-buffering"), [b"no"])
        self.assertEqual(request.responseHeaders.getRawHeaders(b"cache-control"), [b"no-cache"])

    def test_sse_upstream_values_win(self):
        """PROXY-5: unless the upstream sent them."""
        request = DummyRequest([b""])
        copy_response_headers(FakeResponse(headers={
            b"Content-Type": [b"text/event-stream"], b"Cache-Control": [b"private"],
            b"X-Accel-Buffering": [b"yes"]}), request)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"cache-control"), [b"private"])
        self.assertEqual(request.responseHeaders.getRawHeaders(b"x-accel-buffering"), [b"yes"])


class Consumer:
    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data


class ProducerTests(SynchronousTestCase):
    def test_bytes_producer(self):
        """A fixed-length body from bytes, written at once."""
        producer = BytesProducer(b"hello")
        self.assertEqual(producer.length, 5)
        consumer = Consumer()
        self.successResultOf(producer.startProducing(consumer))
        self.assertEqual(consumer.data, b"hello")

    def test_file_slices_with_replacement(self):
        """RT-9/PROXY-3: slices of the spooled file and replacement bytes, in order, on the clock."""
        clock = Clock()
        f = io.BytesIO(b"0123456789")
        producer = FileSliceProducer(f, [(0, 3), b"XY", (5, 5)], clock)
        self.assertEqual(producer.length, 10)
        consumer = Consumer()
        d = producer.startProducing(consumer)
        self.assertEqual(consumer.data, b"")  # nothing written synchronously
        clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(consumer.data, b"012XY56789")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_large_slice_chunked_and_pausable(self):
        """A large slice is read chunk by chunk; a paused transport pauses reading."""
        clock = Clock()
        data = bytes(range(256)) * 1024  # 256 KiB
        producer = FileSliceProducer(io.BytesIO(data), [(0, len(data))], clock)

        class PausingConsumer(Consumer):
            def write(self, chunk):
                super().write(chunk)
                producer.pauseProducing()  # a transport whose buffer is full

        consumer = PausingConsumer()
        d = producer.startProducing(consumer)
        clock.advance(0)
        self.assertEqual(len(consumer.data), 64 * 1024)
        clock.advance(0)
        self.assertEqual(len(consumer.data), 64 * 1024)
        self.assertEqual(clock.getDelayedCalls(), [])
        for _ in range(10):
            producer.resumeProducing()
            clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(consumer.data, data)

    def test_stop_producing_cancels(self):
        """stopProducing leaves no timer behind."""
        clock = Clock()
        producer = FileSliceProducer(io.BytesIO(b"abc"), [(0, 3)], clock)
        producer.startProducing(Consumer())
        producer.stopProducing()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_file_shorter_than_slices_fails(self):
        """A spooled file that ends early is an error, not a short body."""
        clock = Clock()
        producer = FileSliceProducer(io.BytesIO(b"abc"), [(0, 10)], clock)
        d = producer.startProducing(Consumer())
        for _ in range(3):
            clock.advance(0)
        self.failureResultOf(d, IOError)


class RelayRequest(DummyRequest):
    """A DummyRequest with the bits of twisted.web's Request the relay reads."""

    client_gone = False
    channel = None
    producer = None

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None


class BodyResponse(FakeResponse):
    """A response whose body protocol the test drives by hand."""

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(StringTransport())


class RelayTests(SynchronousTestCase):
    def relay(self, response=None, **kw):
        request = RelayRequest([b""])
        response = response or BodyResponse(headers={b"Content-Type": [b"text/event-stream"]})
        seen = []
        d = Forwarder(reactor=None).relay(request, response, model_id="m", sse=kw.pop("sse", True),
                                          on_data=seen.append, **kw)
        return request, response, d, seen

    def test_complete_body(self):
        """PROXY-6: every chunk is written at once; the outcome says the body completed."""
        request, response, d, seen = self.relay()
        self.assertIs(request.producer, response.protocol.transport)  # back-pressure
        response.protocol.dataReceived(b"data: 1\n\n")
        self.assertEqual(request.written, [b"data: 1\n\n"])
        self.assertNoResult(d)
        finished_first = []
        d.addCallback(lambda outcome: finished_first.append(request.finished) or outcome)
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(d), RelayOutcome(200, 9, True, None, None))
        self.assertEqual(seen, [b"data: 1\n\n"])
        self.assertIsNone(request.producer)
        # the response ends with its body, before whoever waits on the outcome runs
        self.assertEqual(finished_first, [1])

    def test_complete_body_of_a_gone_client_does_not_finish(self):
        request, response, d, _ = self.relay()
        request.client_gone = True
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.assertTrue(self.successResultOf(d).completed)
        self.assertEqual(request.finished, 0)

    def test_sse_stream_lost(self):
        """PROXY-9: a lost SSE body ends with one error event, no [DONE]; the outcome has the reason."""
        request, response, d, _ = self.relay()
        response.protocol.dataReceived(b"data: 1\n")
        response.protocol.connectionLost(Failure(ConnectionLost("gone")))
        outcome = self.successResultOf(d)
        self.assertEqual((outcome.status, outcome.bytes_sent, outcome.completed), (200, 8, False))
        self.assertIn("gone", outcome.error)
        self.assertTrue(outcome.reason.check(ConnectionLost))
        event = b"".join(request.written[1:])
        self.assertTrue(event.startswith(b"\n\ndata: {\"error\""), event)
        self.assertIn(b"upstream for model 'm' closed the stream", event)
        self.assertEqual(request.finished, 1)

    def test_tail_and_status_of_an_already_started_response(self):
        """A response that already ended with a blank line gets no extra one; status as given."""
        request, response, d, _ = self.relay(status=299, tail=b"\n\n")
        response.protocol.connectionLost(Failure(ConnectionLost("gone")))
        self.assertEqual(self.successResultOf(d).status, 299)
        self.assertTrue(request.written[0].startswith(b"data: {\"error\""))

    def test_cancel_stops_the_transfer(self):
        request, response, d, _ = self.relay()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(response.protocol.transport.producerState, "stopped")
        response.protocol.connectionLost(Failure(ConnectionLost("gone")))
        self.assertEqual(request.written, [])

    def test_forward_relays_headers_then_body(self):
        """PROXY-5: status and headers first (on_headers sees the response), then the body."""
        request = RelayRequest([b""])
        request.method = b"POST"
        response = BodyResponse(201, b"Created", {b"X-Up": [b"1"]})
        client = SimpleNamespace(request=lambda *a, **kw: succeed(response))
        heard = []
        d = Forwarder(reactor=None).forward(
            request, http=client, url=b"http://up/", headers=Headers(), body=lambda: b"",
            model_id="m", still_ready=lambda: True, on_headers=heard.append)
        self.assertEqual((request.responseCode, heard), (201, [response]))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"x-up"), [b"1"])
        response.protocol.dataReceived(b"ok")
        response.protocol.connectionLost(Failure(PotentialDataLoss()))
        self.assertEqual(self.successResultOf(d), RelayOutcome(201, 2, True))
