"""``GET /api/events``: llama-swap's live event stream (EVT-1..EVT-3).

:class:`EventHub` collects what the web UI shows live and fans it out to every connected
client as SSE messages framed the llama-swap way::

    event:message
    data:{"type":"modelStatus","data":"[{\\"id\\":\\"qwen\\", ...}]"}

(``data`` is itself a JSON document encoded as a string). A new client first gets a
snapshot: ``logData`` (proxy history), ``logData`` (upstream history), ``modelStatus`` and
``metrics`` (the last 100 request records), then live events:

* ``modelStatus`` after router events (state changes, queue changes, reload, unload);
* ``logData`` for new output of the ``proxy`` and ``upstream`` log sources;
* ``metrics``, one record per finished model-dispatched request.

Model status and log output are coalesced per reactor turn (``callLater(0)`` on the
injected clock): a burst of child output or of grants becomes one event, not hundreds.
A ``: keepalive`` comment goes out every 15 s.

Each client is an ``IPushProducer`` on its request: while its transport has paused it,
messages are queued; a client with more than 1 MiB unsent is disconnected (EVT-3), so a
slow reader never stalls the daemon or other readers. A browser ``EventSource``
reconnects and gets a fresh snapshot.
"""
from __future__ import annotations

import codecs
import itertools
import json
import time
from collections import deque
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from llamaswap.resources import JSONResource

__all__ = ["EventHub", "EventsPage", "KEEPALIVE_INTERVAL", "MAX_UNSENT", "HISTORY_RECORDS",
           "frame", "model_status"]

#: EVT-1: a ``: keepalive`` comment this often.
KEEPALIVE_INTERVAL = 15.0
#: EVT-3: at most this much unsent per client.
MAX_UNSENT = 1024 * 1024
#: EVT-1: metrics records in the snapshot.
HISTORY_RECORDS = 100
KEEPALIVE = b": keepalive\n\n"
_LOG_SOURCES = ("proxy", "upstream")


def frame(kind: str, payload: Any) -> bytes:
    """One EVT-1 message: ``event:message\\ndata:{"type":kind,"data":"<json>"}\\n\\n``."""
    inner = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    outer = json.dumps({"type": kind, "data": inner}, ensure_ascii=False, separators=(",", ":"))
    return b"event:message\ndata:" + outer.encode("utf-8") + b"\n\n"


def model_status(router: Any) -> list[dict]:
    """EVT-2 ``modelStatus``: every configured model (unlisted included), sorted by id."""
    config = router.config
    out = []
    for model_id in sorted(config.models):
        try:
            proc = router.process(model_id)
            inflight, waiting = router.counts(model_id)
        except KeyError:
            continue
        m = config.models[model_id]
        out.append({"id": model_id, "name": m.name, "description": m.description,
                    "state": proc.state.value, "unlisted": bool(m.unlisted),
                    "aliases": list(m.aliases), "inflight": inflight, "waiting": waiting})
    return out


def _ms(seconds: Optional[float]) -> int:
    return -1 if seconds is None else int(round(seconds * 1000))


def _timestamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@implementer(IPushProducer)
class _Client:
    """One connected ``/api/events`` reader."""

    def __init__(self, hub: "EventHub", request: Any, max_unsent: int) -> None:
        self.hub = hub
        self.request = request
        self.max_unsent = max_unsent
        self.paused = False
        self.gone = False
        self._queue: list[bytes] = []
        self._queued = 0

    def send(self, data: bytes) -> None:
        if self.gone:
            return
        if not self.paused:
            self.request.write(data)
            return
        self._queue.append(data)
        self._queued += len(data)
        if self._queued > self.max_unsent:
            self.hub.log.info("events client dropped: more than {limit} bytes unsent",
                              limit=self.max_unsent)
            self.disconnect()

    def disconnect(self) -> None:
        """EVT-3: drop the connection (the browser reconnects and gets a fresh snapshot)."""
        self._forget()
        channel = getattr(self.request, "channel", None)
        transport = getattr(channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def end(self) -> None:
        """Finish the response cleanly (daemon shutdown)."""
        if self.gone:
            return
        self._forget()
        try:
            self.request.unregisterProducer()
            self.request.finish()
        except (AttributeError, RuntimeError):
            pass

    def _forget(self) -> None:
        self.gone = True
        self._queue, self._queued = [], 0
        self.hub._remove(self)

    # IPushProducer

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self._queue and not self.gone:
            pending, self._queue, self._queued = b"".join(self._queue), [], 0
            self.request.write(pending)

    def stopProducing(self) -> None:
        self._forget()


class _SourceTap:
    """A ``LogBroadcaster`` subscriber that hands new output of one source to the hub."""

    def __init__(self, hub: "EventHub", source: str) -> None:
        self.hub = hub
        self.source = source

    def write(self, data: bytes) -> None:
        self.hub._log_output(self.source, data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass  # never paused: the hub's own clients carry the back-pressure

    def unregisterProducer(self) -> None:
        pass


class EventHub(Service):
    """The live state behind ``/api/events`` and its connected clients.

    :param router: the ``ModelRouter`` (``listeners``, ``config``, ``process``, ``counts``).
    :param logs: the ``LogBroadcaster``; the hub subscribes to ``proxy`` and ``upstream``.
    :param clock: ``IReactorTime`` for coalescing, keepalives and record timestamps.
    """

    def __init__(self, router: Any, logs: Any, clock: Any, log: Optional[Logger] = None,
                 keepalive: float = KEEPALIVE_INTERVAL, max_unsent: int = MAX_UNSENT,
                 history: int = HISTORY_RECORDS) -> None:
        self.router = router
        self.logs = logs
        self.clock = clock
        self.log = log or Logger(namespace="llamaswap.events")
        self.max_unsent = max_unsent
        self.records: deque[dict] = deque(maxlen=history)
        self._ids = itertools.count()
        self._clients: list[_Client] = []
        self._decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in _LOG_SOURCES}
        self._pending_logs: dict[str, list[str]] = {}
        self._status_dirty = False
        self._flush_call = None
        self._keepalive = LoopingCall(self._send_keepalive)
        self._keepalive.clock = clock
        self._keepalive_interval = keepalive
        router.listeners.append(self.router_event)
        for source in _LOG_SOURCES:
            logs.subscribe(source, _SourceTap(self, source), history=False)

    # -- clients ----------------------------------------------------------------------------------

    def add_client(self, request: Any) -> _Client:
        """Send the EVT-1 snapshot to ``request`` (headers already set), then live events."""
        self._flush()  # what is pending is in the history the new client is about to get
        if not self._clients:  # output was not decoded while nobody listened: start afresh
            for source in _LOG_SOURCES:
                self._decoders[source].reset()
        client = _Client(self, request, self.max_unsent)
        request.registerProducer(client, True)
        self._clients.append(client)
        notify = getattr(request, "notifyFinish", None)
        if notify is not None:
            notify().addBoth(lambda _: client._forget())
        for source in _LOG_SOURCES:
            text = self.logs.history(source).decode("utf-8", "replace")
            client.send(frame("logData", {"source": source, "data": text}))
        client.send(frame("modelStatus", model_status(self.router)))
        client.send(frame("metrics", list(self.records)))
        if not self._keepalive.running:
            self._keepalive.start(self._keepalive_interval, now=False)
        return client

    def client_count(self) -> int:
        return len(self._clients)

    def _remove(self, client: _Client) -> None:
        if client in self._clients:
            self._clients.remove(client)
        if not self._clients and self._keepalive.running:
            self._keepalive.stop()

    def _broadcast(self, data: bytes) -> None:
        for client in list(self._clients):
            client.send(data)

    def _send_keepalive(self) -> None:
        self._broadcast(KEEPALIVE)

    # -- feeds ------------------------------------------------------------------------------------

    def router_event(self, event: str, payload: Any) -> None:
        """``router.listeners``: model state and queue changes become ``modelStatus``."""
        if self._clients and event in ("state", "queue", "reload", "removed", "replaced"):
            self._status_dirty = True
            self._schedule_flush()

    def _log_output(self, source: str, data: bytes) -> None:
        if not self._clients:
            return  # nobody listens: a new client gets it from the history
        text = self._decoders[source].decode(data)
        if text:
            self._pending_logs.setdefault(source, []).append(text)
            self._schedule_flush()

    def request_finished(self, record: dict) -> None:
        """``App.request_listeners``: keep the EVT-2 record and send it as ``metrics``."""
        usage = record.get("usage") or {}

        def known(value: Any) -> Any:
            return -1 if value is None else value

        item = {"id": next(self._ids), "timestamp": _timestamp(self.clock.seconds()),
                "model": record.get("model") or "", "endpoint": record.get("endpoint") or "",
                "status": record.get("status"), "duration_ms": _ms(record.get("duration")),
                "ttfb_ms": _ms(record.get("ttfb")),
                "input_tokens": known(usage.get("input")), "output_tokens": known(usage.get("output")),
                "cached_tokens": known(usage.get("cached")),
                "prompt_per_second": known(usage.get("prompt_per_second")),
                "tokens_per_second": known(usage.get("tokens_per_second"))}
        self.records.append(item)
        if self._clients:
            self._flush()  # keep the order: what happened before this request went first
            self._broadcast(frame("metrics", [item]))

    # -- coalescing -------------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        logs, self._pending_logs = self._pending_logs, {}
        dirty, self._status_dirty = self._status_dirty, False
        if not self._clients:
            return
        for source in _LOG_SOURCES:
            if source in logs:
                self._broadcast(frame("logData", {"source": source, "data": "".join(logs[source])}))
        if dirty:
            self._broadcast(frame("modelStatus", model_status(self.router)))

    # -- service ----------------------------------------------------------------------------------

    def stopService(self) -> None:
        """Finish every client's response (daemon shutdown); stop the timers."""
        super().stopService()
        self._flush()
        for client in list(self._clients):
            client.end()
        if self._keepalive.running:
            self._keepalive.stop()


class EventsPage(JSONResource):
    """EP-12: ``GET /api/events``."""

    isLeaf = True

    def __init__(self, hub: EventHub) -> None:
        super().__init__()
        self.hub = hub

    def render_GET(self, request: Any):
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        request.write(b"")  # headers now: a quiet daemon must not look like a hung request
        self.hub.add_client(request)
        return NOT_DONE_YET
