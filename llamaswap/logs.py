"""
Log sources, their history rings and their live subscribers (LOG-1..LOG-3, LOG-7).

:class:`LogBroadcaster` keeps a 100 KiB byte ring per source (``proxy``, ``upstream``,
``combined`` and one per model id) and fans new bytes out to live stream subscribers
(EP-9, EP-10).  Each subscriber is a ``fanout.Subscriber`` (an ``IPushProducer``
registered on its HTTP request, with the ``DropExcess`` policy), so a slow reader is
paused by its own transport and never slows a child, the rings or other readers
(LOG-3, LOG-7).

A model's own source holds its child's output byte-for-byte, as llama-swap's does.
``upstream`` and ``combined`` only ever receive whole lines, each child line prefixed
with its model id (``[chat-a] I slot print_timing: ...``): a pipe read can end in the
middle of a line, and copying such chunks raw would splice another child's output or a
proxy line (the access log) into it; with several children resident, unprefixed lines
could not be told apart either.  llama-swap's ``upstream`` is raw, so this is a
deliberate difference.

What writes the ``proxy`` source (the observer behind every llamaswap ``Logger``) is in
``llamaswap.proxylog``.  This module imports only ``llamaswap.fanout`` (the subscribers'
back-pressure).
"""

from __future__ import annotations

import re
from collections import Counter, deque
from typing import Callable

from twisted.application.service import Service

from llamaswap.fanout import Consumer, DropExcess, Subscriber

__all__ = [
    "COMBINED",
    "DEFAULT_HISTORY_BYTES",
    "LINE_BUFFER_LIMIT",
    "LogBroadcaster",
    "PROXY",
    "QUEUE_LIMIT",
    "UPSTREAM",
    "drop_marker",
]

PROXY = "proxy"
UPSTREAM = "upstream"
COMBINED = "combined"
_BUILTIN_SOURCES = (PROXY, UPSTREAM, COMBINED)

DEFAULT_HISTORY_BYTES = 102400  # LOG-2: 100 KiB per source
QUEUE_LIMIT = 256 * 1024  # LOG-7: bytes queued per paused subscriber
LINE_BUFFER_LIMIT = 64 * 1024  # a longer partial line is flushed as a line

# End of a line: \n, with any \r before it (\r\n), or a run of lone \r (progress bars).
_EOL = re.compile(rb"\r*\n|\r+")


def drop_marker(nbytes: int) -> bytes:
    """
    The LOG-7 line telling a slow reader that bytes were discarded for it.

    :returns: ``\\n— <N> bytes dropped —\\n`` in UTF-8 (em dashes).
    """
    return f"\n\u2014 {nbytes} bytes dropped \u2014\n".encode("utf-8")


class _ByteRing:
    """
    The newest ``capacity`` bytes written, oldest dropped first (LOG-2).

    Chunks are kept as written in a deque with a running size; only the head chunk is
    sliced when trimming, so a write costs O(len(data)), not O(capacity).
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._chunks: deque[bytes] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        """Store ``data`` and trim the oldest bytes beyond the capacity."""
        if not data or self._capacity <= 0:
            return
        if len(data) >= self._capacity:
            self._chunks.clear()
            self._chunks.append(data[-self._capacity :])
            self._size = self._capacity
            return
        self._chunks.append(data)
        self._size += len(data)
        self._trim()

    def _trim(self) -> None:
        while self._size > self._capacity:
            excess = self._size - self._capacity
            head = self._chunks.popleft()
            if len(head) > excess:
                self._chunks.appendleft(head[excess:])
                self._size -= excess
            else:
                self._size -= len(head)

    def contents(self) -> bytes:
        """Exactly the stored bytes, oldest first (the first line may be partial)."""
        if len(self._chunks) > 1:
            joined = b"".join(self._chunks)
            self._chunks.clear()
            self._chunks.append(joined)  # later reads of an idle source are cheap
        return self._chunks[0] if self._chunks else b""


class LogBroadcaster(Service):
    """
    History rings and live fan-out for every log source (LOG-1..LOG-3, LOG-7).

    ``history(source)`` returns exactly the newest ``history_bytes`` bytes, so its first
    line may be partial (LOG-2 allows dropping it; we keep the bytes untouched and let the
    reader decide — a byte-exact copy is easier to reason about and to test).

    Child output (:meth:`write`) is kept raw in the model's source and split into lines
    for everything else: ``upstream``, ``combined`` and the twistd log copy.  A partial
    line is held per model until its end arrives, the child exits (:meth:`flush_line`),
    the model is removed or the service stops; a held line longer than
    :data:`LINE_BUFFER_LIMIT` is emitted as a line of its own.  ``\\r\\n`` ends a line like
    ``\\n``; a lone ``\\r`` (a progress bar redrawing itself) ends one too, so each update
    becomes a line, and blank updates are skipped.

    :param history_bytes: ring size per source (LOG-2: 102 400).
    :param on_dropped: ``callable(source, nbytes)`` called whenever bytes are discarded
        for a slow subscriber; wire it to ``llamaswap_log_bytes_dropped_total``.
    :param upstream_line_observer: ``callable(model_id, line: str)`` receiving child output
        one complete line at a time (without its line ending, undecodable bytes replaced)
        for the twistd log copy (LOG-6): ``proxylog.TwistdLogCopy.upstream_line``.
    :ivar dropped_bytes: ``Counter`` source -> bytes discarded for slow subscribers.
    """

    def __init__(
        self,
        history_bytes: int = DEFAULT_HISTORY_BYTES,
        on_dropped: Callable[[str, int], None] | None = None,
        upstream_line_observer: Callable[[str, str], None] | None = None,
        queue_limit: int = QUEUE_LIMIT,
    ) -> None:
        self._history_bytes = history_bytes
        self._queue_limit = queue_limit
        self._rings: dict[str, _ByteRing] = {s: _ByteRing(history_bytes) for s in _BUILTIN_SOURCES}
        self._subscribers: dict[str, list[Subscriber]] = {s: [] for s in _BUILTIN_SOURCES}
        self._partial_lines: dict[tuple[str, object], bytes] = {}
        self._stopped = False
        self._on_dropped = on_dropped
        self._upstream_line_observer = upstream_line_observer
        self.dropped_bytes: Counter[str] = Counter()

    # Sources

    def sources(self) -> list[str]:
        """Every source name: the three built-in ones, then model ids in the order added."""
        return list(self._rings)

    def has_source(self, source: str) -> bool:
        """True for ``proxy``, ``upstream``, ``combined`` and every added model id."""
        return source in self._rings

    def add_source(self, model_id: str) -> None:
        """
        Start a per-model source (LOG-1).  Adding an existing one keeps its history
        (a model's log survives restarts).

        :raises ValueError: if ``model_id`` is a built-in source name.
        """
        self._check_model_id(model_id)
        if model_id not in self._rings:
            self._rings[model_id] = _ByteRing(self._history_bytes)
            self._subscribers[model_id] = []

    def remove_source(self, model_id: str) -> None:
        """
        Forget a model's source and history; its live subscribers are finished cleanly
        (EP-10: "until ... the model is removed by a reload").  Unknown ids are ignored.

        :raises ValueError: if ``model_id`` is a built-in source name.
        """
        self._check_model_id(model_id)
        self.flush_line(model_id)
        if model_id not in self._rings:
            return
        for sub in list(self._subscribers[model_id]):
            sub.end()
        del self._rings[model_id]
        del self._subscribers[model_id]

    @staticmethod
    def _check_model_id(model_id: str) -> None:
        if model_id in _BUILTIN_SOURCES:
            raise ValueError(f"{model_id!r} is a built-in log source, not a model id")

    # Writing

    def write(self, model_id: str, data: bytes, stream: object = 1) -> None:
        """
        Record a chunk of child output; never blocks, never raises because of a slow reader.

        ``stream`` names the pipe the chunk came from (1 stdout, 2 stderr, or any other
        key, e.g. for a ``cmdStop`` command's output): each pipe has its own partial line,
        so a half line on stderr is never completed by stdout's next bytes.

        The chunk goes byte-for-byte into the model's source (when :meth:`add_source` was
        called for it) and to its live subscribers (LOG-3).  The lines it completes go to
        ``upstream`` and ``combined`` as ``[<model_id>] <line>\\n``, and to
        the ``upstream_line_observer`` (LOG-6); an unfinished line is held back.
        """
        if not data:
            return
        data = bytes(data)
        if model_id in self._rings and model_id not in _BUILTIN_SOURCES:
            self._publish(model_id, data)
        self._emit_lines(model_id, self._split_lines((model_id, stream), data))

    def write_proxy(self, data: bytes) -> None:
        """
        Record proxy log lines (``[LEVEL] message\\n``, LOG-4) in ``proxy`` and ``combined``.

        ``data`` is published in one piece, so it can never be split by child output; a
        missing final newline is added.
        """
        if not data:
            return
        data = bytes(data)
        if not data.endswith(b"\n"):
            data += b"\n"
        self._publish(PROXY, data)
        self._publish(COMBINED, data)

    def _publish(self, source: str, data: bytes) -> None:
        self._rings[source].append(data)
        for sub in list(self._subscribers[source]):
            sub.send(data)

    # Line splitting for upstream, combined and the twistd log copy

    def _split_lines(self, key: tuple[str, object], data: bytes) -> list[bytes]:
        """The lines ``data`` completes for ``key`` (model id, pipe) without their endings;
        holds the rest."""
        buffered = self._partial_lines.pop(key, b"") + data
        # A trailing \r may be the first half of \r\n: decide once the next byte is here.
        body = buffered.rstrip(b"\r")
        lines = []
        start = 0
        for match in _EOL.finditer(body):
            line = body[start : match.start()]
            start = match.end()
            if match.group().endswith(b"\r") and not line.strip():
                continue  # a progress bar clearing or starting its line
            lines.append(line)
        rest = buffered[start:]
        if rest.endswith(b"\r\r"):
            rest = rest.rstrip(b"\r") + b"\r"  # one held \r decides as well as many
        if len(rest) > LINE_BUFFER_LIMIT:
            # A runaway line must not grow without bound; keep a cut UTF-8 character whole.
            cut = _utf8_boundary(rest.rstrip(b"\r"))
            lines.append(rest[:cut])
            rest = rest[cut:]
        if rest:
            self._partial_lines[key] = rest
        return lines

    def flush_line(self, model_id: str) -> None:
        """
        Emit ``model_id``'s held partial lines (one per pipe), each with a newline added.

        Call it when the child exited (its last line may lack a newline), so that the
        next child of the same model starts on a line of its own.
        """
        for key in [k for k in self._partial_lines if k[0] == model_id]:
            rest = self._partial_lines.pop(key).rstrip(b"\r")
            if rest:
                self._emit_lines(model_id, [rest])

    def _emit_lines(self, model_id: str, lines: list[bytes]) -> None:
        if not lines:
            return
        prefix = b"[" + model_id.encode("utf-8", errors="replace") + b"] "
        data = b"".join(prefix + line + b"\n" for line in lines)
        self._publish(UPSTREAM, data)
        self._publish(COMBINED, data)
        observer = self._upstream_line_observer
        if observer is not None:
            for line in lines:
                observer(model_id, line.decode("utf-8", errors="replace"))

    # Reading

    def history(self, source: str) -> bytes:
        """
        The stored bytes of ``source``, oldest first (at most ``history_bytes``; the first
        line may be partial, LOG-2).

        :raises KeyError: for an unknown source.
        """
        return self._rings[source].contents()

    def subscribe(self, source: str, consumer: Consumer, history: bool = True) -> Subscriber:
        """
        Stream ``source`` to ``consumer``: its history (unless ``history`` is false), then
        live data, until the client leaves, the source is removed or the service stops.

        The caller sets the response headers first (EP-10) and returns ``NOT_DONE_YET``;
        the ``fanout.Subscriber`` registers itself with ``consumer.registerProducer(sub,
        True)``. While paused it queues up to ``queue_limit`` bytes, then discards and
        counts, and writes :func:`drop_marker` on resume (LOG-7). Call
        ``sub.stopProducing()`` to unsubscribe without touching the consumer, or
        ``sub.end()`` to also finish the response.

        :raises KeyError: for an unknown source (check :meth:`has_source` first).
        """
        ring = self._rings[source]
        overflow = DropExcess(self._queue_limit, drop_marker,
                              on_dropped=lambda nbytes: self._count_dropped(source, nbytes))
        sub = Subscriber(consumer, overflow, on_close=lambda s: self._unsubscribe(source, s))
        self._subscribers[source].append(sub)
        sub.attach()
        if history:
            sub.send(ring.contents())
        if self._stopped:
            sub.end()
        return sub

    def subscriber_count(self, source: str) -> int:
        """How many live subscribers ``source`` has (0 for an unknown source)."""
        return len(self._subscribers.get(source, ()))

    def _unsubscribe(self, source: str, sub: Subscriber) -> None:
        subs = self._subscribers.get(source)
        if subs is not None and sub in subs:
            subs.remove(sub)

    def _count_dropped(self, source: str, nbytes: int) -> None:
        self.dropped_bytes[source] += nbytes
        if self._on_dropped is not None:
            self._on_dropped(source, nbytes)

    # Service

    def stopService(self) -> None:
        """
        End every live subscriber, finishing the responses still connected.

        Runs last at shutdown; output written afterwards is still recorded.
        """
        super().stopService()
        self._stopped = True
        for model_id in {key[0] for key in self._partial_lines}:
            self.flush_line(model_id)
        for subs in list(self._subscribers.values()):
            for sub in list(subs):
                sub.end()

    def startService(self) -> None:
        super().startService()
        self._stopped = False


def _utf8_boundary(data: bytes) -> int:
    """``len(data)``, or less so that a UTF-8 sequence cut at the end is left out."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data)  # ASCII: nothing is cut
        if byte >= 0xC0:  # the lead byte of a sequence of `need` bytes
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)  # only continuation bytes: not UTF-8 we could keep whole
