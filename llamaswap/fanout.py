"""One back-pressured reader of a fan-out: ``/logs/stream*`` subscribers and ``/api/events`` clients.

A :class:`Subscriber` is an ``IPushProducer`` registered on its consumer (a twisted.web
``Request``): the consumer's transport pauses it when the client reads too slowly, so a
slow reader never slows the writer or the other readers. While paused, data is queued;
what happens when the queue grows past its bound is the one thing the two users differ in,
so it is a policy object given to the subscriber:

* :class:`DropExcess` (LOG-7): keep ``limit`` bytes queued, discard and count the rest for
  this reader only, and write a marker saying how much was lost after the queue on resume;
* :class:`Disconnect` (EVT-3): past ``limit`` bytes unsent, abort the connection (a browser
  ``EventSource`` reconnects and gets a fresh snapshot).

A policy instance belongs to one subscriber (``DropExcess`` counts that reader's losses).
The owner of the fan-out keeps its subscribers in a list, calls :meth:`Subscriber.send` for
each, and passes ``on_close`` to hear when one is gone, whichever side ended it.

This module imports nothing else from llamaswap.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Protocol

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

__all__ = ["Disconnect", "DropExcess", "Subscriber"]


class Consumer(Protocol):
    """What a subscriber writes to: a twisted.web ``Request`` or a test fake.

    ``finish``, ``notifyFinish`` and ``channel.transport.abortConnection`` are used when
    present."""

    def write(self, data: bytes) -> None: ...

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...


class DropExcess:
    """LOG-7: queue at most ``limit`` bytes; discard the rest and say so on resume.

    :param limit: bytes kept while paused.
    :param marker: ``(nbytes) -> bytes`` written after the queue when bytes were discarded.
    :param on_dropped: ``(nbytes)`` called for every discard (the dropped-bytes counters).
    """

    def __init__(self, limit: int, marker: Callable[[int], bytes],
                 on_dropped: Callable[[int], None] = lambda nbytes: None) -> None:
        self.limit = limit
        self.marker = marker
        self.on_dropped = on_dropped
        self.dropped = 0  # discarded since the last resume: the marker still owed

    def admit(self, subscriber: "Subscriber", data: bytes) -> bytes:
        """The part of ``data`` to queue behind what ``subscriber`` holds already."""
        room = self.limit - subscriber.queued_bytes
        kept = data[:room] if room > 0 else b""
        discarded = len(data) - len(kept)
        if discarded:
            self.dropped += discarded
            self.on_dropped(discarded)
        return kept

    def trailer(self) -> bytes:
        """The marker owed for bytes discarded since the last resume, once."""
        if not self.dropped:
            return b""
        nbytes, self.dropped = self.dropped, 0
        return self.marker(nbytes)


class Disconnect:
    """EVT-3: a reader with more than ``limit`` bytes unsent is disconnected.

    :param on_disconnect: called once, just before the connection is aborted (to log it).
    """

    def __init__(self, limit: int, on_disconnect: Callable[[], None] = lambda: None) -> None:
        self.limit = limit
        self.on_disconnect = on_disconnect

    def admit(self, subscriber: "Subscriber", data: bytes) -> bytes:
        if subscriber.queued_bytes + len(data) > self.limit:
            self.on_disconnect()
            subscriber.abort()
            return b""
        return data

    def trailer(self) -> bytes:
        return b""


@implementer(IPushProducer)
class Subscriber:
    """One reader of a fan-out: writes at once, queues while paused, bounded by ``overflow``.

    :param consumer: the request to write to; the subscriber registers itself on it as a
        streaming producer and treats ``notifyFinish`` firing as the client leaving.
    :param overflow: a :class:`DropExcess` or :class:`Disconnect` of its own.
    :param on_close: ``(subscriber)`` called once when it stops receiving: the client left,
        :meth:`end`, or :meth:`abort`.
    """

    def __init__(self, consumer: Consumer, overflow: DropExcess | Disconnect,
                 on_close: Callable[["Subscriber"], None]) -> None:
        self.consumer = consumer
        self.overflow = overflow
        self.paused = False
        self.closed = False  # never write, finish or unregister again (pitfall 9)
        self._on_close = on_close
        self._queue: deque[bytes] = deque()
        self._queued = 0

    def attach(self) -> None:
        """Register on the consumer (streaming) and watch for the client leaving."""
        self.consumer.registerProducer(self, True)
        notify = getattr(self.consumer, "notifyFinish", None)
        if notify is not None:
            notify().addBoth(self._client_left)

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting for :meth:`resumeProducing`."""
        return self._queued

    def send(self, data: bytes) -> None:
        """Write ``data`` now, or queue it while paused as the overflow policy allows; never raises."""
        if self.closed or not data:
            return
        if not self.paused:
            self.consumer.write(data)
            return
        kept = self.overflow.admit(self, data)
        if kept and not self.closed:
            self._queue.append(kept)
            self._queued += len(kept)

    # IPushProducer

    def pauseProducing(self) -> None:
        """The consumer's buffer is full: queue from now on."""
        self.paused = True

    def resumeProducing(self) -> None:
        """Write the queue, then the policy's trailer (the drop marker), then go live."""
        self.paused = False
        if self.closed:
            return
        pending = b"".join(self._queue) + self.overflow.trailer()
        self._queue.clear()
        self._queued = 0
        if pending:
            # one write: if it pauses us again, later data queues behind it, in order
            self.consumer.write(pending)

    def stopProducing(self) -> None:
        """The client is gone: stop without touching the consumer again."""
        self._close()

    # Ending from our side

    def end(self) -> None:
        """Stop and, if the client is still connected, finish its response. Idempotent."""
        if self.closed:
            return
        self._close()
        try:
            self.consumer.unregisterProducer()
            finish = getattr(self.consumer, "finish", None)
            if finish is not None:
                finish()
        except (AttributeError, RuntimeError):
            pass  # the connection went away without telling us (pitfall 9)

    def abort(self) -> None:
        """Stop and drop the connection."""
        self._close()
        channel = getattr(self.consumer, "channel", None)
        transport = getattr(channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def _client_left(self, result: object) -> None:
        self._close()
        return None  # a lost connection is not an error (ERR-3)

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self._queued = 0
        self._on_close(self)
