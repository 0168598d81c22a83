"""llamaswap.fanout: one back-pressured subscriber, two overflow policies (LOG-7, EVT-3)."""
from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.fanout import Disconnect, DropExcess, Subscriber
from tests.fakes import FakeStreamRequest


def marker(n: int) -> bytes:
    return b"<%d dropped>" % n


class SubscriberTests(SynchronousTestCase):
    def make(self, overflow) -> Subscriber:
        self.request = FakeStreamRequest()
        self.closed: list = []
        sub = Subscriber(self.request, overflow, on_close=self.closed.append)
        sub.attach()
        return sub

    def test_registers_as_streaming_push_producer(self):
        """attach() registers the subscriber on its request, streaming."""
        sub = self.make(DropExcess(10, marker))
        self.assertEqual((self.request.producer, self.request.streaming), (sub, True))
        self.assertTrue(IPushProducer.providedBy(sub))

    def test_drop_excess_keeps_limit_then_marks(self):
        """DropExcess: up to the limit is queued, the rest counted, the marker follows the queue."""
        dropped: list = []
        sub = self.make(DropExcess(4, marker, on_dropped=dropped.append))
        sub.send(b"ab")
        sub.pauseProducing()
        sub.send(b"cde")
        sub.send(b"fgh")
        sub.send(b"ij")
        self.assertEqual((sub.queued_bytes, dropped), (4, [2, 2]))
        sub.resumeProducing()
        sub.send(b"k")
        self.assertEqual(self.request.data, b"abcdef<4 dropped>k")

    def test_disconnect_over_limit(self):
        """Disconnect: more than the limit unsent aborts the connection and closes once."""
        told: list = []
        sub = self.make(Disconnect(4, lambda: told.append(True)))
        sub.pauseProducing()
        sub.send(b"abcd")
        self.assertFalse(self.request.channel.transport.aborted)
        sub.send(b"e")
        self.assertTrue(self.request.channel.transport.aborted)
        self.assertEqual((told, self.closed, sub.queued_bytes), ([True], [sub], 0))
        sub.resumeProducing()
        self.assertEqual(self.request.data, b"")

    def test_client_leaving_closes_without_touching_request(self):
        """notifyFinish failing (connection lost) closes; end() then leaves the request alone."""
        sub = self.make(DropExcess(4, marker))
        self.request.done.errback(Failure(ConnectionError("gone")))
        self.assertEqual(self.closed, [sub])
        sub.end()
        sub.send(b"x")
        self.assertFalse(self.request.finished)
        self.assertEqual(self.request.data, b"")

    def test_end_finishes_once(self):
        """end() unregisters and finishes the response, once."""
        sub = self.make(Disconnect(4))
        sub.end()
        sub.end()
        self.assertTrue(self.request.finished)
        self.assertIsNone(self.request.producer)
        self.assertEqual(self.closed, [sub])
