"""Tests for llamaswap.logs: rings, fan-out, slow readers (LOG-1..LOG-7) and the proxy observer."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import LogLevel, Logger, LogPublisher, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import Request
from twisted.web.test.requesthelper import DummyChannel

from llamaswap.logs import LINE_BUFFER_LIMIT, QUEUE_LIMIT, LogBroadcaster, drop_marker
from llamaswap.proxylog import LOG_TIME_FORMATS, ProxyLogObserver, format_log_time, make_logger


class FakeConsumer:
    """A twisted.web Request stand-in: records writes, producer registration and finish."""

    def __init__(self) -> None:
        self.data = b""
        self.producer = None
        self.streaming = None
        self.finished = False
        self.unregistered = False
        self._finish_waiters: list[Deferred] = []

    def write(self, data: bytes) -> None:
        assert not self.finished, "write after finish"
        self.data += data

    def registerProducer(self, producer, streaming) -> None:
        assert self.producer is None
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self) -> None:
        self.producer = None
        self.unregistered = True

    def finish(self) -> None:
        assert not self.finished, "finish called twice"
        self.finished = True
        waiters, self._finish_waiters = self._finish_waiters, []
        for d in waiters:
            d.callback(None)

    def notifyFinish(self) -> Deferred:
        d = Deferred()
        self._finish_waiters.append(d)
        return d

    def lose_connection(self) -> None:
        """What a real Request sees when the client disconnects."""
        waiters, self._finish_waiters = self._finish_waiters, []
        for d in waiters:
            d.errback(Failure(ConnectionError("gone")))


class BareConsumer:
    """The minimum a consumer needs: write, registerProducer, unregisterProducer."""

    def __init__(self) -> None:
        self.data = b""
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data += data

    def registerProducer(self, producer, streaming) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


class RingTests(SynchronousTestCase):
    def test_history_keeps_newest_bytes_exactly(self):
        """A ring of N bytes keeps exactly the newest N bytes, across chunk boundaries."""
        logs = LogBroadcaster(history_bytes=10)
        logs.add_source("m")
        logs.write("m", b"abcd")
        logs.write("m", b"efgh")
        logs.write("m", b"ijkl")
        self.assertEqual(logs.history("m"), b"cdefghijkl")
        logs.write("m", b"m")
        self.assertEqual(logs.history("m"), b"defghijklm")

    def test_chunk_larger_than_ring(self):
        """A single write bigger than the ring leaves only its tail."""
        logs = LogBroadcaster(history_bytes=4)
        logs.add_source("m")
        logs.write("m", b"xy")
        logs.write("m", b"0123456789")
        self.assertEqual(logs.history("m"), b"6789")

    def test_default_size_is_100_kib(self):
        """LOG-2: each source keeps 102 400 bytes by default."""
        logs = LogBroadcaster()
        logs.add_source("m")
        data = bytes(range(256)) * 500  # 128 000 bytes
        lines = b"".join(b"[INFO] %d\n" % i for i in range(20_000))
        for i in range(0, len(data), 1000):
            logs.write("m", data[i : i + 1000])
        logs.write_proxy(lines)
        self.assertEqual(logs.history("m"), data[-102400:])
        self.assertEqual(logs.history("proxy"), lines[-102400:])
        self.assertEqual(len(logs.history("upstream")), 102400)
        self.assertEqual(logs.history("combined"), lines[-102400:])

    def test_bytes_stored_verbatim(self):
        """LOG-3: invalid UTF-8, NULs, \\r and partial lines are stored byte-for-byte, no prefix."""
        logs = LogBroadcaster()
        logs.add_source("m")
        chunks = [b"\xff\xfe bad \x00", b"half a li", b"ne\r\n", b"\xe2\x82"]
        for c in chunks:
            logs.write("m", c)
        self.assertEqual(logs.history("m"), b"".join(chunks))

    def test_empty_history(self):
        """A source with nothing written has empty history."""
        logs = LogBroadcaster()
        self.assertEqual(logs.history("upstream"), b"")


class SourceTests(SynchronousTestCase):
    def setUp(self):
        self.logs = LogBroadcaster()
        self.logs.add_source("a")
        self.logs.add_source("b")

    def test_child_output_fans_out(self):
        """LOG-1/LOG-3: child output reaches its model raw, upstream and combined prefixed with
        the model id; not proxy or other models."""
        self.logs.write("a", b"from a\n")
        self.logs.write("b", b"from b\n")
        self.assertEqual(self.logs.history("a"), b"from a\n")
        self.assertEqual(self.logs.history("b"), b"from b\n")
        self.assertEqual(self.logs.history("upstream"), b"[a] from a\n[b] from b\n")
        self.assertEqual(self.logs.history("combined"), b"[a] from a\n[b] from b\n")
        self.assertEqual(self.logs.history("proxy"), b"")

    def test_proxy_goes_to_proxy_and_combined(self):
        """write_proxy interleaves with child output in combined, in arrival order."""
        self.logs.write("a", b"1\n")
        self.logs.write_proxy(b"[INFO] 2\n")
        self.logs.write("b", b"3\n")
        self.assertEqual(self.logs.history("proxy"), b"[INFO] 2\n")
        self.assertEqual(self.logs.history("upstream"), b"[a] 1\n[b] 3\n")
        self.assertEqual(self.logs.history("combined"), b"[a] 1\n[INFO] 2\n[b] 3\n")

    def test_proxy_data_always_ends_a_line(self):
        """Proxy data without a final newline gets one, so child lines start on their own."""
        self.logs.write_proxy(b"[INFO] no newline")
        self.logs.write("a", b"x\n")
        self.assertEqual(self.logs.history("combined"), b"[INFO] no newline\n[a] x\n")

    def test_sources(self):
        """Built-in sources then models in order; has_source matches."""
        self.assertEqual(self.logs.sources(), ["proxy", "upstream", "combined", "a", "b"])
        self.assertTrue(self.logs.has_source("a"))
        self.assertTrue(self.logs.has_source("combined"))
        self.assertFalse(self.logs.has_source("c"))

    def test_add_existing_keeps_history(self):
        """Re-adding a model keeps its history (kept across restarts, LOG-1)."""
        self.logs.write("a", b"old\n")
        self.logs.add_source("a")
        self.assertEqual(self.logs.history("a"), b"old\n")

    def test_unknown_model_output_still_reaches_upstream(self):
        """Output for a model without a source (e.g. removed, still stopping) goes to upstream only."""
        self.logs.write("gone", b"bye\n")
        self.assertFalse(self.logs.has_source("gone"))
        self.assertEqual(self.logs.history("upstream"), b"[gone] bye\n")

    def test_builtin_names_are_not_model_ids(self):
        """add_source/remove_source refuse the built-in names."""
        self.assertRaises(ValueError, self.logs.add_source, "proxy")
        self.assertRaises(ValueError, self.logs.remove_source, "combined")

    def test_remove_source_forgets_history(self):
        """A removed model's source is gone; upstream keeps its output (the held line flushed)."""
        self.logs.write("a", b"x")
        self.logs.remove_source("a")
        self.assertFalse(self.logs.has_source("a"))
        self.assertRaises(KeyError, self.logs.history, "a")
        self.assertEqual(self.logs.history("upstream"), b"[a] x\n")
        self.logs.remove_source("a")  # unknown: ignored

    def test_unknown_source_raises(self):
        """subscribe and history raise KeyError for unknown sources."""
        self.assertRaises(KeyError, self.logs.subscribe, "nope", FakeConsumer())


class WholeLineTests(SynchronousTestCase):
    """upstream and combined only ever get whole lines, prefixed with the model id; the
    model's own source keeps the raw bytes."""

    def setUp(self):
        self.lines = []
        self.logs = LogBroadcaster(upstream_line_observer=lambda m, line: self.lines.append((m, line)))
        self.logs.add_source("a")
        self.logs.add_source("b")
        self.live = {s: FakeConsumer() for s in ("combined", "upstream", "proxy", "a", "b")}
        for source, consumer in self.live.items():
            self.logs.subscribe(source, consumer)

    def history_and_live(self, source):
        """The history of ``source``, checked equal to what its live subscriber received."""
        history = self.logs.history(source)
        self.assertEqual(self.live[source].data, history, source)
        return history

    def test_stdout_and_stderr_hold_their_own_partial_lines(self):
        """One child's two pipes: a half line on stderr is completed by stderr's bytes, never
        by stdout's; flushing at exit ends both held halves."""
        self.logs.write("a", b"err: hal", 2)
        self.logs.write("a", b"out line\n", 1)
        self.logs.write("a", b"f\n", 2)
        self.logs.write("a", b"tail without newline", 1)
        self.logs.write("a", b"stop cmd says", "cmdStop2")
        self.assertEqual(self.history_and_live("upstream"), b"[a] out line\n[a] err: half\n")
        self.logs.flush_line("a")
        self.assertEqual(self.history_and_live("upstream"),
                         b"[a] out line\n[a] err: half\n[a] tail without newline\n[a] stop cmd says\n")
        self.assertEqual(self.history_and_live("a"),
                         b"err: halout line\nf\ntail without newlinestop cmd says")

    def test_interleaved_partial_lines_never_splice(self):
        """Two children writing halves of lines around a proxy line: combined and upstream
        get whole prefixed lines, each completed when its newline arrives; the models' own
        sources get their bytes as written."""
        access = b'[INFO] Request 127.0.0.1 "POST /v1/chat/completions HTTP/1.1" 200 5 "x" 0.144s\n'
        self.logs.write("a", b"hel")
        self.logs.write("b", b"wor")
        self.logs.write_proxy(access)
        self.assertEqual(self.history_and_live("combined"), access)
        self.assertEqual(self.history_and_live("upstream"), b"")
        self.logs.write("a", b"lo\n")
        self.logs.write("b", b"ld\n")
        self.assertEqual(self.history_and_live("combined"), access + b"[a] hello\n[b] world\n")
        self.assertEqual(self.history_and_live("upstream"), b"[a] hello\n[b] world\n")
        self.assertEqual(self.history_and_live("proxy"), access)
        self.assertEqual(self.history_and_live("a"), b"hello\n")
        self.assertEqual(self.history_and_live("b"), b"world\n")
        self.assertEqual(self.lines, [("a", "hello"), ("b", "world")])

    def test_several_lines_in_one_chunk(self):
        """A chunk completing several lines adds them all, keeping the unfinished rest."""
        self.logs.write("a", b"one\ntwo\n\nthr")
        self.logs.write("a", b"ee\n")
        self.assertEqual(self.history_and_live("upstream"), b"[a] one\n[a] two\n[a] \n[a] three\n")
        self.assertEqual(self.history_and_live("a"), b"one\ntwo\n\nthree\n")

    def test_child_exit_flushes_the_held_line(self):
        """flush_line (the child exited) emits the held partial line with a newline added;
        the next child's output starts on a new line, and a second flush does nothing."""
        self.logs.write("a", b"last words")
        self.logs.flush_line("a")
        self.logs.flush_line("a")
        self.logs.flush_line("b")
        self.logs.write("a", b"next child\n")
        self.assertEqual(self.history_and_live("combined"), b"[a] last words\n[a] next child\n")
        self.assertEqual(self.history_and_live("a"), b"last wordsnext child\n")

    def test_long_line_bounded(self):
        """A held line longer than the limit is emitted as a line; a UTF-8 character cut at
        the limit stays whole, in the next line."""
        self.logs.write("a", b"x" * LINE_BUFFER_LIMIT)
        self.assertEqual(self.logs.history("upstream"), b"")
        self.logs.write("a", b"y\xe2\x82")
        self.assertEqual(self.history_and_live("upstream"), b"[a] " + b"x" * LINE_BUFFER_LIMIT + b"y\n")
        self.logs.write("a", b"\xac\n")
        self.assertTrue(self.history_and_live("upstream").endswith(b"y\n[a] \xe2\x82\xac\n"))
        self.assertEqual(self.logs._partial_lines, {})

    def test_carriage_return_runs_bounded(self):
        """Output of nothing but \\r holds a single byte, however much of it comes."""
        for _ in range(3):
            self.logs.write("a", b"\r" * 100_000)
        self.assertEqual(self.logs._partial_lines, {("a", 1): b"\r"})
        self.logs.write("a", b"x\n")
        self.assertEqual(self.history_and_live("upstream"), b"[a] x\n")

    def test_crlf_is_a_newline(self):
        """\r\n ends a line like \n, also when split between chunks or doubled; the model's
        source keeps the \r."""
        self.logs.write("a", b"one\r\ntwo\r")
        self.logs.write("a", b"\nthree\r\r\n")
        self.assertEqual(self.history_and_live("upstream"), b"[a] one\n[a] two\n[a] three\n")
        self.assertEqual(self.history_and_live("a"), b"one\r\ntwo\r\nthree\r\r\n")

    def test_progress_bar_carriage_returns(self):
        """A lone \r ends a line too, so each progress update is a line of its own; blank
        updates are skipped and a held \r is dropped at exit."""
        self.logs.write("a", b"loading\n\r 10%\r")
        self.logs.write("a", b" 20%\r   \r")
        self.logs.write("b", b"b line\n")
        self.logs.write("a", b"done\n\r")
        self.logs.flush_line("a")
        self.assertEqual(self.history_and_live("upstream"),
                         b"[a] loading\n[a]  10%\n[a]  20%\n[b] b line\n[a] done\n")
        self.assertEqual(self.history_and_live("a"), b"loading\n\r 10%\r 20%\r   \rdone\n\r")

    def test_utf8_split_between_chunks(self):
        """A character split across chunks arrives whole in the line."""
        self.logs.write("a", b"caf\xc3")
        self.logs.write("a", b"\xa9\n")
        self.assertEqual(self.history_and_live("upstream"), "[a] caf\u00e9\n".encode("utf-8"))
        self.assertEqual(self.lines, [("a", "caf\u00e9")])


class SubscribeTests(SynchronousTestCase):
    def setUp(self):
        self.logs = LogBroadcaster()
        self.logs.add_source("m")

    def test_registers_streaming_push_producer(self):
        """The subscription is an IPushProducer registered with streaming=True."""
        consumer = FakeConsumer()
        sub = self.logs.subscribe("m", consumer)
        self.assertIs(consumer.producer, sub)
        self.assertTrue(consumer.streaming)
        self.assertTrue(IPushProducer.providedBy(sub))

    def test_history_then_live(self):
        """EP-10: history first, then live data."""
        self.logs.write("m", b"old\n")
        consumer = FakeConsumer()
        self.logs.subscribe("m", consumer)
        self.logs.write("m", b"new\n")
        self.assertEqual(consumer.data, b"old\nnew\n")

    def test_no_history(self):
        """history=False streams live data only."""
        self.logs.write("m", b"old\n")
        consumer = FakeConsumer()
        self.logs.subscribe("m", consumer, history=False)
        self.logs.write("m", b"new\n")
        self.assertEqual(consumer.data, b"new\n")

    def test_live_fan_out_per_source(self):
        """Subscribers of model, upstream, combined and proxy each see their own source."""
        subs = {s: FakeConsumer() for s in ("m", "upstream", "combined", "proxy")}
        for source, consumer in subs.items():
            self.logs.subscribe(source, consumer)
        self.logs.write("m", b"child\n")
        self.logs.write_proxy(b"[INFO] p\n")
        self.assertEqual(subs["m"].data, b"child\n")
        self.assertEqual(subs["upstream"].data, b"[m] child\n")
        self.assertEqual(subs["combined"].data, b"[m] child\n[INFO] p\n")
        self.assertEqual(subs["proxy"].data, b"[INFO] p\n")

    def test_stop_producing_unsubscribes(self):
        """stopProducing (client gone) unsubscribes without touching the consumer."""
        consumer = FakeConsumer()
        sub = self.logs.subscribe("m", consumer)
        sub.stopProducing()
        self.logs.write("m", b"after\n")
        self.assertEqual(consumer.data, b"")
        self.assertEqual(self.logs.subscriber_count("m"), 0)
        self.assertFalse(consumer.finished)
        self.assertFalse(consumer.unregistered)

    def test_lost_connection_unsubscribes(self):
        """A notifyFinish errback (connection lost) unsubscribes too, and is not an error."""
        consumer = FakeConsumer()
        self.logs.subscribe("m", consumer)
        consumer.lose_connection()
        self.logs.write("m", b"after\n")
        self.assertEqual(consumer.data, b"")
        self.assertEqual(self.logs.subscriber_count("m"), 0)
        self.logs.stopService()
        self.assertFalse(consumer.finished)

    def test_remove_source_ends_subscribers(self):
        """Removing a model (reload) finishes its streams; other sources keep theirs."""
        model_consumer, upstream_consumer = FakeConsumer(), FakeConsumer()
        self.logs.subscribe("m", model_consumer)
        self.logs.subscribe("upstream", upstream_consumer)
        self.logs.remove_source("m")
        self.assertTrue(model_consumer.finished)
        self.assertTrue(model_consumer.unregistered)
        self.assertFalse(upstream_consumer.finished)
        self.logs.write("m", b"x\n")
        self.assertEqual(upstream_consumer.data, b"[m] x\n")

    def test_stop_service_ends_everyone(self):
        """stopService finishes every live stream; later writes are still recorded."""
        self.logs.startService()
        consumers = [FakeConsumer(), FakeConsumer(), BareConsumer()]
        self.logs.subscribe("m", consumers[0])
        self.logs.subscribe("combined", consumers[1])
        self.logs.subscribe("proxy", consumers[2])
        self.logs.stopService()
        self.assertTrue(consumers[0].finished)
        self.assertTrue(consumers[1].finished)
        self.assertIsNone(consumers[2].producer)
        self.logs.write_proxy(b"late\n")
        self.assertEqual(self.logs.history("proxy"), b"late\n")
        self.assertEqual(consumers[2].data, b"")

    def test_subscribe_after_stop_gets_history_and_ends(self):
        """A subscriber arriving after stopService gets the history and is finished at once."""
        self.logs.write("m", b"h\n")
        self.logs.stopService()
        consumer = FakeConsumer()
        self.logs.subscribe("m", consumer)
        self.assertEqual(consumer.data, b"h\n")
        self.assertTrue(consumer.finished)


class SlowReaderTests(SynchronousTestCase):
    """LOG-7: a paused subscriber queues 256 KiB, then drops and counts, for itself only."""

    def setUp(self):
        self.dropped_calls = []
        self.logs = LogBroadcaster(on_dropped=lambda source, n: self.dropped_calls.append((source, n)))
        self.logs.add_source("m")
        self.slow, self.fast = FakeConsumer(), FakeConsumer()
        self.slow_sub = self.logs.subscribe("m", self.slow, history=False)
        self.logs.subscribe("m", self.fast, history=False)

    def test_paused_queues_then_flushes_in_order(self):
        """Data written while paused arrives on resume, in order, without a marker."""
        self.logs.write("m", b"a")
        self.slow_sub.pauseProducing()
        self.logs.write("m", b"b")
        self.logs.write("m", b"c")
        self.assertEqual(self.slow.data, b"a")
        self.slow_sub.resumeProducing()
        self.logs.write("m", b"d")
        self.assertEqual(self.slow.data, b"abcd")
        self.assertEqual(self.logs.dropped_bytes["m"], 0)

    def test_queue_bound_drop_count_and_marker(self):
        """Past 256 KiB bytes are discarded and counted; resume writes queue, marker, then live."""
        self.slow_sub.pauseProducing()
        chunk = b"x" * 100_000
        for _ in range(3):
            self.logs.write("m", chunk)
        self.logs.write("m", b"yyyy")
        self.assertEqual(self.slow_sub.queued_bytes, QUEUE_LIMIT)
        expected_drop = 300_004 - QUEUE_LIMIT
        self.assertEqual(self.logs.dropped_bytes["m"], expected_drop)
        self.assertEqual(sum(n for _, n in self.dropped_calls), expected_drop)
        self.assertEqual({s for s, _ in self.dropped_calls}, {"m"})
        self.slow_sub.resumeProducing()
        self.logs.write("m", b"live")
        marker = "\n\u2014 %d bytes dropped \u2014\n" % expected_drop
        self.assertEqual(self.slow.data, b"x" * QUEUE_LIMIT + marker.encode("utf-8") + b"live")

    def test_marker_bytes(self):
        """The marker uses UTF-8 em dashes."""
        self.assertEqual(drop_marker(7), b"\n\xe2\x80\x94 7 bytes dropped \xe2\x80\x94\n")

    def test_other_readers_and_rings_unaffected(self):
        """A paused reader does not slow or truncate the fast reader or the ring."""
        self.slow_sub.pauseProducing()
        data = b"z" * (QUEUE_LIMIT + 10)
        self.logs.write("m", data)
        self.assertEqual(self.fast.data, data)
        self.assertEqual(self.logs.history("m"), data[-102400:])

    def test_drop_count_resets_after_marker(self):
        """A second pause reports only the bytes dropped during it."""
        self.slow_sub.pauseProducing()
        self.logs.write("m", b"q" * (QUEUE_LIMIT + 5))
        self.slow_sub.resumeProducing()
        self.slow.data = b""
        self.slow_sub.pauseProducing()
        self.logs.write("m", b"r" * (QUEUE_LIMIT + 3))
        self.slow_sub.resumeProducing()
        self.assertTrue(self.slow.data.endswith(drop_marker(3)))
        self.assertEqual(self.logs.dropped_bytes["m"], 8)

    def test_repause_during_resume_write_keeps_order(self):
        """If the resume write pauses us again, later data queues behind it."""

        class PausingConsumer(FakeConsumer):
            def write(inner, data):
                super().write(data)
                if data == b"queued":
                    inner.producer.pauseProducing()

        consumer = PausingConsumer()
        sub = self.logs.subscribe("m", consumer, history=False)
        sub.pauseProducing()
        self.logs.write("m", b"queued")
        sub.resumeProducing()
        self.logs.write("m", b"later")
        self.assertEqual(consumer.data, b"queued")
        sub.resumeProducing()
        self.assertEqual(consumer.data, b"queuedlater")

    def test_history_queued_when_paused_at_subscribe(self):
        """A consumer that pauses during registration still gets history first, on resume."""

        class PauseOnRegister(FakeConsumer):
            def registerProducer(inner, producer, streaming):
                super().registerProducer(producer, streaming)
                producer.pauseProducing()

        self.logs.write("m", b"hist")
        consumer = PauseOnRegister()
        sub = self.logs.subscribe("m", consumer)
        self.logs.write("m", b"live")
        self.assertEqual(consumer.data, b"")
        sub.resumeProducing()
        self.assertEqual(consumer.data, b"histlive")

    def test_ended_while_paused_discards_queue(self):
        """A subscriber that leaves while paused is dropped along with its queue."""
        self.slow_sub.pauseProducing()
        self.logs.write("m", b"abc")
        self.slow_sub.stopProducing()
        self.slow_sub.resumeProducing()
        self.assertEqual(self.slow.data, b"")
        self.assertEqual(self.logs.subscriber_count("m"), 1)


class LineSplitterTests(SynchronousTestCase):
    """LOG-6: the twistd log copy of child output, one callback per complete line."""

    def setUp(self):
        self.lines = []
        self.logs = LogBroadcaster(upstream_line_observer=lambda m, line: self.lines.append((m, line)))
        self.logs.add_source("a")
        self.logs.add_source("b")

    def test_line_split_across_chunks(self):
        """A line split across chunks is emitted once complete; models keep separate partials."""
        self.logs.write("a", b"hel")
        self.logs.write("b", b"other\n")
        self.logs.write("a", b"lo\nwor")
        self.assertEqual(self.lines, [("b", "other"), ("a", "hello")])
        self.logs.write("a", b"ld\n\n")
        self.assertEqual(self.lines[2:], [("a", "world"), ("a", "")])

    def test_crlf(self):
        """\\r\\n endings lose the \\r, even when split between chunks."""
        self.logs.write("a", b"one\r\ntwo\r")
        self.logs.write("a", b"\n")
        self.assertEqual(self.lines, [("a", "one"), ("a", "two")])

    def test_undecodable_bytes_replaced(self):
        """Invalid UTF-8 is replaced in the line copy but kept in the ring."""
        self.logs.write("a", b"caf\xc3")
        self.logs.write("a", b"\xa9 \xff\n")
        self.assertEqual(self.lines, [("a", "caf\u00e9 \ufffd")])
        self.assertEqual(self.logs.history("a"), b"caf\xc3\xa9 \xff\n")

    def test_runaway_partial_line_flushed(self):
        """A partial line over 64 KiB is flushed as a line instead of growing forever."""
        self.logs.write("a", b"x" * 60_000)
        self.assertEqual(self.lines, [])
        self.logs.write("a", b"x" * 10_000)
        self.assertEqual(self.lines, [("a", "x" * 70_000)])
        self.logs.write("a", b"tail\n")
        self.assertEqual(self.lines[1:], [("a", "tail")])

    def test_flush_on_remove_and_stop(self):
        """A pending partial line is emitted when the model is removed or the service stops."""
        self.logs.write("a", b"last words")
        self.logs.write("b", b"bye")
        self.logs.remove_source("a")
        self.assertEqual(self.lines, [("a", "last words")])
        self.logs.stopService()
        self.assertEqual(self.lines[1:], [("b", "bye")])

    def test_no_observer_still_split(self):
        """Without an observer, upstream and combined still get whole lines only."""
        logs = LogBroadcaster()
        logs.write("a", b"partial")
        self.assertEqual(logs.history("upstream"), b"")
        logs.write("a", b" line\n")
        self.assertEqual(logs.history("upstream"), b"[a] partial line\n")


class ProxyLogObserverTests(SynchronousTestCase):
    def setUp(self):
        self.logs = LogBroadcaster()
        self.forwarded = []
        self.observer = ProxyLogObserver(self.logs, forward=self.forwarded.append)
        self.log = make_logger(self.observer, "llamaswap.test")

    def test_line_format(self):
        """LOG-4: '[LEVEL] message\\n' with fields formatted, in proxy and combined."""
        self.log.info("Starting {model}", model="qwen")
        self.log.warn("careful")
        self.log.error("broken {n}", n=3)
        self.log.critical("very broken")
        expected = b"[INFO] Starting qwen\n[WARN] careful\n[ERROR] broken 3\n[ERROR] very broken\n"
        self.assertEqual(self.logs.history("proxy"), expected)
        self.assertEqual(self.logs.history("combined"), expected)

    def test_level_filtering(self):
        """Events below the level are neither stored nor forwarded."""
        self.log.debug("hidden")
        self.assertEqual(self.logs.history("proxy"), b"")
        self.assertEqual(self.forwarded, [])
        self.observer.set_level("DEBUG")
        self.log.debug("shown")
        self.assertEqual(self.logs.history("proxy"), b"[DEBUG] shown\n")
        self.observer.set_level("error")
        self.log.warn("hidden too")
        self.log.error("kept")
        self.assertEqual(self.logs.history("proxy"), b"[DEBUG] shown\n[ERROR] kept\n")
        self.assertEqual(self.observer.level, "error")

    def test_level_applies_to_every_namespace(self):
        """One level for all llamaswap loggers, set again at reload; critical counts as ERROR."""
        other = make_logger(self.observer, "llamaswap.router.deep")
        self.observer.set_level("warn")
        other.info("hidden")
        other.critical("shown")
        self.assertEqual(self.logs.history("proxy"), b"[ERROR] shown\n")
        self.assertEqual(self.observer.level, "warn")

    def test_events_without_level_or_namespace_dropped(self):
        """Only a Logger's events are kept: one without log_level or log_namespace is dropped."""
        self.observer({"log_format": "no level", "log_namespace": "llamaswap.test"})
        self.observer({"log_format": "no namespace", "log_level": LogLevel.error})
        self.assertEqual((self.logs.history("proxy"), self.forwarded), (b"", []))

    def test_bad_values_rejected(self):
        """Unknown levels and logToStdout values raise ValueError."""
        self.assertRaises(ValueError, self.observer.set_level, "verbose")
        self.assertRaises(ValueError, self.observer.set_to_stdout, "stderr")
        self.assertRaises(ValueError, ProxyLogObserver, self.logs, level="trace")

    def test_forwarding_per_to_stdout(self):
        """Proxy events reach the twistd log only for 'proxy' and 'both'; always stored."""
        for value, forwarded in (("proxy", True), ("both", True), ("upstream", False), ("none", False)):
            self.forwarded.clear()
            self.observer.set_to_stdout(value)
            self.log.info("m {v}", v=value)
            self.assertEqual(len(self.forwarded) == 1, forwarded, value)
            if forwarded:
                self.assertEqual(self.forwarded[0]["v"], value)
        self.assertEqual(self.logs.history("proxy").count(b"[INFO] m "), 4)

    def test_failure_traceback_included(self):
        """log.failure stores the message then the traceback."""
        try:
            1 / 0
        except ZeroDivisionError:
            self.log.failure("Health check crashed for {model}", model="qwen")
        text = self.logs.history("proxy").decode()
        self.assertTrue(text.startswith("[ERROR] Health check crashed for qwen\nTraceback"), text)
        self.assertIn("ZeroDivisionError", text)
        self.assertTrue(text.endswith("\n") and not text.endswith("\n\n"))

    def test_upstream_lines_per_to_stdout(self):
        """LOG-6: child lines go to the twistd log as '[<id>] <line>' for 'upstream' and 'both'."""
        self.logs = LogBroadcaster(upstream_line_observer=self.observer.upstream_line)
        self.logs.add_source("qwen")
        for value, forwarded in (("proxy", False), ("none", False), ("both", True), ("upstream", True)):
            self.forwarded.clear()
            self.observer.set_to_stdout(value)
            self.logs.write("qwen", b"loading {weights}\n")
            self.assertEqual(len(self.forwarded), int(forwarded), value)
        self.assertEqual(formatEvent(self.forwarded[0]), "[qwen] loading {weights}")
        self.assertEqual(self.logs.history("proxy"), b"")

    def test_works_with_real_publisher(self):
        """Forwarding to a LogPublisher delivers the original event to its observers."""
        publisher, seen = LogPublisher(), []
        publisher.addObserver(seen.append)
        observer = ProxyLogObserver(self.logs, forward=publisher, level="warn")
        Logger(namespace="x", observer=observer).emit(LogLevel.warn, "w {a}", a=1)
        self.assertEqual([e["a"] for e in seen], [1])


class LogTimeFormatTests(SynchronousTestCase):
    """logTimeFormat: a Go layout name puts the event's time before each proxy line."""

    # Wed 2025-12-31 17:04:05.123456 at UTC-7, i.e. Thu 2026-01-01 00:04:05.123456 UTC
    WHEN = 1767225845.123456

    def test_every_layout(self):
        """Each name writes what Go's layout of that name writes."""
        from datetime import timedelta, timezone
        utc, west = timezone.utc, timezone(timedelta(hours=-7))
        expected = {
            "ansic": ("Thu Jan  1 00:04:05 2026", "Wed Dec 31 17:04:05 2025"),
            "unixdate": ("Thu Jan  1 00:04:05 UTC 2026", "Wed Dec 31 17:04:05 -0700 2025"),
            "rubydate": ("Thu Jan 01 00:04:05 +0000 2026", "Wed Dec 31 17:04:05 -0700 2025"),
            "rfc822": ("01 Jan 26 00:04 UTC", "31 Dec 25 17:04 -0700"),
            "rfc822z": ("01 Jan 26 00:04 +0000", "31 Dec 25 17:04 -0700"),
            "rfc850": ("Thursday, 01-Jan-26 00:04:05 UTC", "Wednesday, 31-Dec-25 17:04:05 -0700"),
            "rfc1123": ("Thu, 01 Jan 2026 00:04:05 UTC", "Wed, 31 Dec 2025 17:04:05 -0700"),
            "rfc1123z": ("Thu, 01 Jan 2026 00:04:05 +0000", "Wed, 31 Dec 2025 17:04:05 -0700"),
            "rfc3339": ("2026-01-01T00:04:05Z", "2025-12-31T17:04:05-07:00"),
            "rfc3339nano": ("2026-01-01T00:04:05.123456Z", "2025-12-31T17:04:05.123456-07:00"),
            "kitchen": ("12:04AM", "5:04PM"),
            "stamp": ("Jan  1 00:04:05", "Dec 31 17:04:05"),
            "stampmilli": ("Jan  1 00:04:05.123", "Dec 31 17:04:05.123"),
            "stampmicro": ("Jan  1 00:04:05.123456", "Dec 31 17:04:05.123456"),
            "stampnano": ("Jan  1 00:04:05.123456000", "Dec 31 17:04:05.123456000"),
        }
        self.assertEqual(set(expected), set(LOG_TIME_FORMATS))
        for name, (in_utc, in_west) in expected.items():
            self.assertEqual(format_log_time(name, self.WHEN, utc), in_utc, name)
            self.assertEqual(format_log_time(name, self.WHEN, west), in_west, name)

    def test_names_match_the_config_reader(self):
        """The config accepts exactly the names the log can write."""
        from llamaswap.config import LOG_TIME_FORMATS as ACCEPTED
        self.assertEqual(set(ACCEPTED), set(LOG_TIME_FORMATS))

    def test_name_any_case_unknown_or_empty(self):
        """Names match in any case; "" or an unknown name (a custom layout) gives no time."""
        self.assertEqual(format_log_time(" RFC3339 ", 0), format_log_time("rfc3339", 0))
        self.assertEqual(format_log_time("", 0), "")
        self.assertEqual(format_log_time("2006-01-02 15:04:05", 0), "")

    def test_proxy_line_prefix(self):
        """With a format, stored proxy lines start '<time> [LEVEL]'; a reload can change or drop it."""
        logs = LogBroadcaster()
        observer = ProxyLogObserver(logs, forward=lambda e: None, time_format="rfc3339")
        log = make_logger(observer, "llamaswap.test")
        observer({"log_format": "started {model}", "model": "qwen", "log_level": LogLevel.info,
                  "log_namespace": "llamaswap.test", "log_time": self.WHEN})
        stamp = format_log_time("rfc3339", self.WHEN).encode()
        self.assertEqual(logs.history("proxy"), stamp + b" [INFO] started qwen\n")
        observer.set_time_format("")
        log.info("plain")
        self.assertTrue(logs.history("proxy").endswith(b"\n[INFO] plain\n"))


class RealRequestTests(SynchronousTestCase):
    """The subscription against a real twisted.web Request on a DummyChannel."""

    def setUp(self):
        self.logs = LogBroadcaster()
        self.channel = DummyChannel()
        self.request = Request(self.channel)
        self.request.method, self.request.clientproto = b"GET", b"HTTP/1.1"

    def test_streams_and_finishes(self):
        """Live data is written to the response; stopService finishes it."""
        self.logs.subscribe("proxy", self.request, history=False)
        self.logs.write_proxy(b"[INFO] hello\n")
        self.logs.stopService()
        self.assertTrue(self.request.finished)
        self.assertIn(b"[INFO] hello\n", self.channel.transport.written.getvalue())

    def test_disconnected_request_is_left_alone(self):
        """After the connection is lost, stopService neither finishes nor unregisters (pitfall 9)."""
        self.logs.subscribe("proxy", self.request)
        self.request.connectionLost(Failure(ConnectionError("gone")))
        self.logs.write_proxy(b"x\n")
        self.logs.stopService()  # would raise RuntimeError/AttributeError if it touched the request
        self.assertEqual(self.logs.subscriber_count("proxy"), 0)
