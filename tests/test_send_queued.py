"""The response's end leaves at once (``send_queued``) and a complete relayed body finishes it."""
from __future__ import annotations

from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from llamaswap.web.site import send_queued


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
