"""The response's end leaves at once (``send_queued``) and a complete relayed body finishes it."""
from __future__ import annotations

from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from llamaswap.wire import send_queued, write_now


class _Ends(protocol.Protocol):
    def __init__(self) -> None:
        self.lost = defer.Deferred()

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


class _Server(_Ends):
    def connectionMade(self) -> None:
        self.factory.made.callback(self)


class _Client(_Ends):
    pass


class SendQueuedTests(TestCase):
    """On a real loopback connection (nothing timed: what is sent is sent before the call returns)."""

    @defer.inlineCallbacks
    def setUp(self):
        factory = protocol.ServerFactory()
        factory.protocol = _Server
        factory.made = defer.Deferred()
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        creator = protocol.ClientCreator(reactor, _Client)
        self.client = yield creator.connectTCP("127.0.0.1", self.port.getHost().port)
        self.server = yield factory.made
        self.addCleanup(self._close)

    def _close(self):
        for end in (self.server, self.client):
            vars(end.transport).pop("doWrite", None)
            vars(end.transport).pop("startWriting", None)
            end.transport.loseConnection()
        return defer.gatherResults([self.server.lost, self.client.lost])

    def test_queued_bytes_sent_now(self):
        transport = self.server.transport
        self.assertIs(type(transport), tcp.Server)
        transport.write(b"HTTP/1.1 200 OK\r\n")
        transport.writeSequence([b"Content-Length: 0\r\n", b"\r\n"])
        self.assertTrue(transport._tempDataBuffer or transport.dataBuffer)  # Twisted only queued them
        send_queued(transport)
        self.assertFalse(transport._tempDataBuffer)
        self.assertEqual(transport.offset, len(transport.dataBuffer))
        self.assertFalse(transport.writing if hasattr(transport, "writing") else False)

    def test_nothing_queued_nothing_done(self):
        transport = self.server.transport
        calls = []
        transport.doWrite = lambda: calls.append(1)  # would be a zero-byte send
        send_queued(transport)
        self.assertEqual(calls, [])

    def test_closing_connection_left_to_the_reactor(self):
        transport = self.server.transport
        transport.write(b"bye")
        transport.loseConnection()
        calls = []
        transport.doWrite = lambda: calls.append(1)
        send_queued(transport)
        self.assertEqual(calls, [])

    def test_an_error_is_left_for_the_reactor(self):
        transport = self.server.transport
        transport.write(b"x")
        started = []
        transport.doWrite = lambda: ConnectionError("gone")
        original = transport.startWriting
        transport.startWriting = lambda: (started.append(1), original())
        send_queued(transport)
        self.assertEqual(started, [1])

    def test_other_transports_untouched(self):
        fake = StringTransport()
        fake.write(b"data")
        send_queued(fake)
        send_queued(None)
        self.assertEqual(fake.value(), b"data")

    def test_tls_style_wrapper_flushes_the_connection_beneath(self):
        class Wrapper:
            transport = self.server.transport

        self.server.transport.write(b"under tls")
        send_queued(Wrapper())
        self.assertFalse(self.server.transport._tempDataBuffer)


class _Recording:
    """A transport that records each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def writeSequence(self, seq) -> None:
        self.writes.append(b"".join(seq))


class ChannelTests(TestCase):
    def channel(self):
        from llamaswap.web.site import LlamaSwapChannel

        channel = LlamaSwapChannel()
        channel.transport = _Recording()
        return channel

    def test_head_goes_out_with_the_first_body_bytes(self):
        from twisted.web.http_headers import Headers

        channel = self.channel()
        channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", Headers({b"content-type": [b"text/plain"]}))
        self.assertEqual(channel.transport.writes, [])
        channel.writeSequence([b"5\r\n", b"hello", b"\r\n"])
        self.assertEqual(channel.transport.writes,
                         [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n5\r\nhello\r\n"])
        channel.write(b"0\r\n\r\n")
        self.assertEqual(channel.transport.writes[1:], [b"0\r\n\r\n"])

    def test_a_head_alone_is_sent_by_send_held(self):
        from twisted.web.http_headers import Headers

        channel = self.channel()
        channel.writeHeaders(b"HTTP/1.1", b"204", b"No Content", Headers())
        channel.send_held()
        self.assertEqual(channel.transport.writes, [b"HTTP/1.1 204 No Content\r\n\r\n"])
        self.assertIsNone(channel.held)

    def test_other_header_types_keep_twisteds_path(self):
        channel = self.channel()
        channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", [(b"x-a", b"1")])
        self.assertEqual(channel.transport.writes, [b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n"])


class ServedTests(TestCase):
    """A real site on loopback with our channel: responses are sent as written, and whole."""

    @defer.inlineCallbacks
    def get(self, raw: bytes, resource):
        from twisted.web.server import Site

        from llamaswap.web import site as site_module

        class _Site(Site):
            protocol = site_module._channel_protocol

        port = reactor.listenTCP(0, _Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = yield protocol.ClientCreator(reactor, _Reader).connectTCP("127.0.0.1", port.getHost().port)
        client.transport.write(raw)
        data = yield client.lost
        return data

    def test_plain_head_and_streamed_responses(self):
        from twisted.web.resource import Resource
        from twisted.web.server import NOT_DONE_YET

        queued_after_write = []

        class Page(Resource):
            isLeaf = True

            def render_GET(self, request):
                request.setHeader(b"content-type", b"text/plain")
                if request.path == b"/stream":
                    for word in (b"one ", b"two"):
                        request.write(word)
                        transport = request.channel.transport
                        queued_after_write.append(bool(transport._tempDataBuffer)
                                                   or transport.offset < len(transport.dataBuffer))
                    request.finish()
                    return NOT_DONE_YET
                return b"hello"

            def render_HEAD(self, request):
                request.setHeader(b"content-length", b"5")
                return b""

        raw = (b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n"
               b"HEAD /plain HTTP/1.1\r\nHost: x\r\n\r\n"
               b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        d = self.get(raw, Page())

        def check(data: bytes) -> None:
            responses = data.split(b"HTTP/1.1 200 OK\r\n")
            self.assertEqual(len(responses), 4, data)
            self.assertTrue(responses[1].endswith(b"\r\n\r\nhello"), responses[1])
            self.assertIn(b"Content-Length: 5\r\n", responses[2])
            self.assertTrue(responses[2].endswith(b"\r\n\r\n"), responses[2])
            self.assertIn(b"Transfer-Encoding: chunked", responses[3])
            self.assertTrue(responses[3].endswith(b"\r\n\r\n4\r\none \r\n3\r\ntwo\r\n0\r\n\r\n"), responses[3])
            self.assertEqual(queued_after_write, [False, False])  # each write left at once

        return d.addCallback(check)


class _Reader(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.lost.callback(self.data)


class WriteNowTests(TestCase):
    def test_falls_back_for_other_transports(self):
        fake = StringTransport()
        write_now(fake, b"abc")
        self.assertEqual(fake.value(), b"abc")


class ChannelAnswersTests(TestCase):
    def test_host_and_security_read_once_per_transport(self):
        from twisted.internet.address import IPv4Address

        from llamaswap.web.site import LlamaSwapChannel

        class T(StringTransport):
            asked = 0

            def getHost(self):
                self.asked += 1
                return IPv4Address("TCP", "127.0.0.1", 8080)

        channel = LlamaSwapChannel()
        first = channel.transport = T()
        for _ in range(3):
            self.assertEqual(channel.getHost().port, 8080)
            self.assertFalse(channel.isSecure())
        self.assertEqual(first.asked, 1)
        second = channel.transport = T()
        channel.getHost()
        self.assertEqual(second.asked, 1)
