"""The forwarder's own use of Twisted's HTTP client (``ProxyHTTPClient.forward_request``): the
request as written upstream, pooled connections, the response-header deadline, gzip, the
``chunked`` decoder and the deferred read pause. Driven over in-memory connections."""
from __future__ import annotations

import gzip
import random

from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseNeverReceived
from twisted.web.http import _ChunkedTransferDecoder, _DataLoss, _MalformedChunkedDataError
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.test.requesthelper import DummyRequest

from llamaswap.config import Timeouts
from llamaswap.proxy import (
    BytesProducer, Forwarder, ResponseHeaderTimeout, UpstreamTimeout, _ChunkedDecoder, _copy_response_headers_slow,
    _upstream_headers_slow, copy_response_headers, make_http_client, upstream_headers)
from tests.test_proxy import FakeResponse, incoming


class Collect(Protocol):
    def __init__(self) -> None:
        self.chunks: list = []
        self.reason = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason) -> None:
        self.reason = reason


class CountingTransport(StringTransport):
    """Counts the pauses of reading (each one a stop and a restart of reading for a real socket)."""

    pauses = 0

    def pauseProducing(self) -> None:
        self.pauses += 1
        super().pauseProducing()


class Upstream:
    """The in-memory server end of the client's connections."""

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.client, self.pool = make_http_client(self.reactor)
        self.connections: list = []  # (protocol, transport)

    def connect(self) -> tuple:
        """Complete the newest connection the client asked for."""
        host, port, factory, timeout, bind = self.reactor.tcpClients[len(self.connections)]
        protocol = factory.buildProtocol(None)
        transport = CountingTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return protocol, transport

    def send(self, method=b"POST", url=b"http://127.0.0.1:5801/v1/chat/completions", headers=None,
             body=b'{"model":"m"}'):
        return self.client.forward_request(method, url, headers if headers is not None else Headers(), body)


def head_lines(written: bytes) -> tuple[bytes, list, bytes]:
    head, _, body = written.partition(b"\r\n\r\n")
    first, *lines = head.split(b"\r\n")
    return first, sorted(lines), body


class ForwardRequestTests(SynchronousTestCase):
    def test_request_as_written_upstream(self):
        """The request line, the forwarded headers (as received, repeated ones kept), the upstream's
        Host, Accept-Encoding: gzip and the body's length, then the body."""
        up = Upstream()
        request = incoming({b"Host": b"proxy.example", b"X-Multi": [b"1", b"2"], b"Content-Type": b"application/json",
                            b"Accept-Encoding": b"br", b"Content-Length": b"13"})
        d = up.send(headers=upstream_headers(request, False, b"http"))
        protocol, transport = up.connect()
        first, lines, body = head_lines(transport.value())
        self.assertEqual(first, b"POST /v1/chat/completions HTTP/1.1")
        self.assertEqual(lines, sorted([
            b"Host: 127.0.0.1:5801", b"Accept-Encoding: gzip", b"Content-Length: 13", b"X-Multi: 1", b"X-Multi: 2",
            b"Content-Type: application/json", b"X-Forwarded-Host: proxy.example",
            b"X-Forwarded-For: 10.1.2.3", b"X-Forwarded-Proto: http"]))
        self.assertEqual(body, b'{"model":"m"}')
        self.assertNoResult(d)

    def test_empty_and_absent_bodies(self):
        """An empty POST says Content-Length: 0; a GET has no body header at all."""
        up = Upstream()
        up.send(body=b"")
        _, transport = up.connect()
        self.assertIn(b"Content-Length: 0", head_lines(transport.value())[1])
        up.send(method=b"GET", url=b"http://127.0.0.1:5801/props?model=x", body=b"")
        _, transport = up.connect()
        first, lines, body = head_lines(transport.value())
        self.assertEqual(first, b"GET /props?model=x HTTP/1.1")
        self.assertFalse([line for line in lines if line.lower().startswith(b"content-length")])
        self.assertEqual(body, b"")

    def test_method_sent_upper_cased(self):
        """As treq sent it: a method received in lower case goes upstream in upper case."""
        up = Upstream()
        up.send(method=b"get", body=b"")
        _, transport = up.connect()
        self.assertTrue(transport.value().startswith(b"GET /v1/chat/completions HTTP/1.1\r\n"))

    def test_producer_body(self):
        """A producer body goes through Twisted's own body writing (length-framed)."""
        up = Upstream()
        up.send(body=BytesProducer(b"abcdef"))
        _, transport = up.connect()
        first, lines, body = head_lines(transport.value())
        self.assertIn(b"Content-Length: 6", lines)
        self.assertEqual(body, b"abcdef")

    def test_connection_is_reused(self):
        """Once a response ended, the next request goes out on the same connection."""
        up = Upstream()
        d = up.send()
        protocol, transport = up.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n")
        response = self.successResultOf(d)
        body = Collect()
        response.deliverBody(body)
        protocol.dataReceived(b"{}")
        self.assertEqual((response.code, b"".join(body.chunks)), (200, b"{}"))
        self.assertIsInstance(body.reason.value, ResponseDone)
        transport.clear()
        d2 = up.send(body=b"second")
        self.assertEqual(len(up.reactor.tcpClients), 1)
        self.assertTrue(transport.value().endswith(b"\r\n\r\nsecond"))
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(self.successResultOf(d2).code, 204)

    def test_a_connection_the_upstream_closed_is_not_reused(self):
        up = Upstream()
        d = up.send()
        protocol, transport = up.connect()
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.successResultOf(d)
        protocol.connectionLost(None)
        up.send()
        self.assertEqual(len(up.reactor.tcpClients), 2)

    def test_gzip_is_decoded(self):
        """A gzip body is decoded and loses its Content-Encoding (as treq's decoding did)."""
        up = Upstream()
        d = up.send()
        protocol, _ = up.connect()
        packed = gzip.compress(b"hello world")
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(packed))
        response = self.successResultOf(d)
        self.assertFalse(response.headers.hasHeader(b"content-encoding"))
        body = Collect()
        response.deliverBody(body)
        protocol.dataReceived(packed)
        self.assertEqual(b"".join(body.chunks), b"hello world")

    def test_other_encodings_are_left_alone(self):
        up = Upstream()
        d = up.send()
        protocol, _ = up.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).headers.getRawHeaders(b"content-encoding"), [b"br"])

    def test_chunks_of_one_read_arrive_in_one_piece(self):
        """Every chunk decoded from one read reaches the body's reader in one call."""
        up = Upstream()
        d = up.send()
        protocol, _ = up.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"6\r\ndata: \r\n2\r\n1\n\r\n")
        body = Collect()
        self.successResultOf(d).deliverBody(body)
        self.assertEqual(body.chunks, [b"data: 1\n"])
        protocol.dataReceived(b"1\r\n\n\r\n3\r\nab")
        protocol.dataReceived(b"c\r\n0\r\n\r\n")
        self.assertEqual(body.chunks, [b"data: 1\n", b"\nab", b"c"])
        self.assertIsInstance(body.reason.value, ResponseDone)

    def test_no_pause_when_the_body_is_read_at_once(self):
        """The parser's pause until the body has a reader is not applied when a reader comes
        during the same read; it is when none came."""
        up = Upstream()
        d = up.send()
        protocol, transport = up.connect()
        d.addCallback(lambda response: response.deliverBody(Collect()))
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        self.assertEqual((transport.producerState, transport.pauses), ("producing", 0))

        up2 = Upstream()
        d2 = up2.send()
        protocol2, transport2 = up2.connect()
        protocol2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        self.assertEqual((transport2.producerState, transport2.pauses), ("paused", 1))
        body = Collect()
        self.successResultOf(d2).deliverBody(body)
        self.assertEqual(transport2.producerState, "producing")
        protocol2.dataReceived(b"67890")
        self.assertEqual(b"".join(body.chunks), b"1234567890")

    def test_a_response_ending_in_its_first_read_leaves_the_connection_reading(self):
        """A whole response read at once, its body taken later: the kept-alive connection is not
        left paused."""
        up = Upstream()
        d = up.send()
        protocol, transport = up.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual((transport.producerState, transport.pauses), ("producing", 0))
        body = Collect()
        self.successResultOf(d).deliverBody(body)
        self.assertEqual(body.chunks, [b"ok"])

    def test_cancel_before_the_response(self):
        up = Upstream()
        d = up.send()
        protocol, transport = up.connect()
        d.cancel()
        failure = self.failureResultOf(d)
        self.assertTrue(failure.check(CancelledError, ResponseNeverReceived))
        self.assertTrue(transport.disconnecting or transport.disconnected)


class HeaderCopyTests(SynchronousTestCase):
    """The one-pass header copies give what the header-by-header ones gave."""

    CASES = [
        {},
        {b"Host": b"h:1", b"X-A": [b"1", b"2"], b"Authorization": b"Bearer k", b"X-Api-Key": b"k"},
        {b"Connection": [b"keep-alive, X-Secret", b"x-other"], b"X-Secret": b"s", b"X-Other": b"o",
         b"Keep-Alive": b"5", b"TE": b"trailers", b"X-Fine": b"f"},
        {b"X-Forwarded-For": [b"1.1.1.1", b"2.2.2.2"], b"X-Forwarded-Proto": b"https", b"Accept-Encoding": b"br",
         b"Content-Length": b"3", b"Transfer-Encoding": b"chunked", b"Upgrade": b"h2c", b"ETag": b"x"},
    ]

    def test_upstream_headers(self):
        for headers in self.CASES:
            for strip_auth in (False, True):
                request = incoming(headers)
                fast = upstream_headers(request, strip_auth, b"http")
                slow = _upstream_headers_slow(request, request.requestHeaders, strip_auth, b"http")
                self.assertEqual(list(fast.getAllRawHeaders()), list(slow.getAllRawHeaders()), headers)

    def test_response_headers(self):
        for headers in self.CASES + [{b"Content-Type": b"text/event-stream", b"Cache-Control": b"private"},
                                     {b"Content-Encoding": [b""], b"Content-Type": b"application/json"}]:
            for length in (UNKNOWN_LENGTH, 12):
                out = []
                for copy in (copy_response_headers, _copy_response_headers_slow):
                    request = DummyRequest([b""])
                    sse = copy(FakeResponse(headers={k: v if isinstance(v, list) else [v]
                                                     for k, v in headers.items()}, length=length), request)
                    out.append((sse, list(request.responseHeaders.getAllRawHeaders())))
                self.assertEqual(out[0], out[1], headers)


class HeaderDeadlineTests(SynchronousTestCase):
    def test_armed_once_the_body_is_sent(self):
        """timeouts.responseHeader counts from the sent body, not from the connection attempt."""
        up = Upstream()
        up.client.apply_timeouts(Timeouts(response_header=5))
        d = up.send()
        up.reactor.advance(30)  # still connecting: no deadline yet
        self.assertNoResult(d)
        up.connect()
        up.reactor.advance(4.9)
        self.assertNoResult(d)
        up.reactor.advance(0.2)
        self.failureResultOf(d, ResponseHeaderTimeout)

    def test_without_a_body_at_once(self):
        """A request without a body is timed from the start (as before the short path)."""
        up = Upstream()
        up.client.apply_timeouts(Timeouts(response_header=5))
        d = up.send(method=b"GET", body=b"")
        up.reactor.advance(5.1)
        self.failureResultOf(d, ResponseHeaderTimeout)

    def test_on_a_pooled_connection(self):
        up = Upstream()
        up.client.apply_timeouts(Timeouts(response_header=5))
        d = up.send()
        protocol, _ = up.connect()
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.successResultOf(d)
        d2 = up.send()
        up.reactor.advance(5.1)
        self.failureResultOf(d2, ResponseHeaderTimeout)

    def test_headers_in_time_cancel_it(self):
        up = Upstream()
        up.client.apply_timeouts(Timeouts(response_header=5))
        d = up.send()
        protocol, _ = up.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n")
        self.successResultOf(d)
        self.assertEqual(up.reactor.getDelayedCalls(), [])

    def test_forwarder_reports_504(self):
        up = Upstream()
        up.client.apply_timeouts(Timeouts(response_header=2))
        forwarder = Forwarder(up.reactor, fresh_client=lambda: self.fail("no retry"))
        d = forwarder.send(incoming({}), http=up.client, url=b"http://127.0.0.1:5801/v1/completions",
                           headers=Headers(), body=lambda: b"{}", model_id="m", still_ready=lambda: True)
        up.connect()
        up.reactor.advance(2.1)
        self.assertIn("within 2 s", self.failureResultOf(d, UpstreamTimeout).value.message)


def chunked(pieces: list, ext: bool = False, trailers: bytes = b"", rest: bytes = b"") -> bytes:
    out = b""
    for i, piece in enumerate(pieces):
        out += b"%x%s\r\n%s\r\n" % (len(piece), b";name=value" if ext and i % 2 else b"", piece)
    return out + b"0\r\n" + trailers + b"\r\n" + rest


class ChunkedDecoderTests(SynchronousTestCase):
    """``_ChunkedDecoder`` decodes as Twisted's decoder does, in fewer pieces."""

    def run_both(self, stream: bytes, cuts: list) -> tuple:
        results = []
        for cls in (_ChunkedTransferDecoder, _ChunkedDecoder):
            data, finished, calls = [], [], []
            decoder = cls(data.append, finished.append)
            error = None
            start = 0
            try:
                for cut in cuts + [len(stream)]:
                    if finished:
                        break  # the parser hands later bytes to the next response
                    before = len(data)
                    decoder.dataReceived(stream[start:cut])
                    calls.append(len(data) - before)
                    start = cut
            except _MalformedChunkedDataError as e:
                error = str(e)
            results.append((b"".join(data), finished, error, calls, decoder.state))
        return results

    def test_same_result_whatever_the_reads(self):
        rng = random.Random(17)
        streams = [
            chunked([b"data: " + bytes([97 + i % 26]) * rng.randint(1, 300) + b"\n\n" for i in range(40)]),
            chunked([b"x" * 5000, b"y", b"z" * 17], ext=True),
            chunked([b"abc", b"de"], trailers=b"X-Trailer: 1\r\nX-Other: 2\r\n", rest=b"HTTP/1.1 200"),
            chunked([b"A" * 0x1f, b"B" * 0xab]).replace(b"1f\r\n", b"1F\r\n"),
        ]
        for stream in streams:
            for _ in range(30):
                cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 12))))
                twisted, ours = self.run_both(stream, cuts)
                self.assertEqual(ours[:3], twisted[:3])
                self.assertEqual(ours[4], twisted[4])
                self.assertTrue(all(n <= 1 for n in ours[3]), ours[3])

    def test_malformed_streams_fail_alike(self):
        """Bad sizes, extensions, missing CRLFs and oversized size lines are refused as Twisted
        refuses them, after delivering what came before."""
        bad = [
            b"5\r\nhello\r\nzz\r\n",
            b"5\r\nhello\r\n-1\r\nx\r\n",
            b"5\r\nhello\r\n0x3\r\nabc\r\n",
            b"5\r\nhelloXX3\r\nabc\r\n",
            b"3;\x00bad\r\nabc\r\n0\r\n\r\n",
            b"5\r\nhello\r\n" + b"1" * 2000,
            b"5\r\nhello\r\n" + b"1" * 1030 + b"\r\n",
        ]
        for stream in bad:
            for cuts in ([], [3], [7, 9], list(range(1, len(stream), 5))):
                twisted, ours = self.run_both(stream, cuts)
                self.assertIsNotNone(twisted[2], stream)
                self.assertEqual(ours[:3], twisted[:3], (stream, cuts))

    def test_data_loss_when_cut_short(self):
        decoder = _ChunkedDecoder(lambda data: None, lambda rest: None)
        decoder.dataReceived(b"5\r\nhel")
        self.assertRaises(_DataLoss, decoder.noMoreData)
