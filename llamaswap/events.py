"""``GET /api/events``: llama-swap's live event stream (EVT-1..EVT-3).

:class:`EventHub` collects what the web UI shows live and fans it out to every connected
client as SSE messages framed the llama-swap way::

    event:message
    data:{"type":"modelStatus","data":"[{\\"id\\":\\"qwen\\", ...}]"}

(``data`` is itself a JSON document encoded as a string). A new client first gets a
snapshot: ``logData`` (proxy history), ``logData`` (upstream history), ``modelStatus``,
``metrics`` (the last 100 request records), ``profileChanged`` (``{"active": <name or
null>}``) and ``inflight`` (``{"operation": "snapshot", "requests": [...]}``, as
``GET /api/inflight`` answers), then live events:

* ``modelStatus`` after model events (state changes, queue changes, reload, unload): the
  hub is an ``IModelObserver`` (:meth:`EventHub.observe`) and keeps each model's state and
  counts from the events themselves;
* ``logData`` for new output of the ``proxy`` and ``upstream`` log sources;
* ``metrics``, one record per finished model-dispatched request;
* ``inflight``, llama-swap's in-flight updates: ``{"operation": "upsert", "request": {...}}``
  when a request enters the list, gets its response headers or relays more bytes (at most
  every 0.25 s), ``{"operation": "remove", "id": "7"}`` when it ends (the hub is one of the
  ``InflightRequests.observers``, see :meth:`EventHub.watch_inflight`);
* ``profileChanged`` then ``modelStatus`` when the active profile changes: ``PUT
  /api/profiles/active`` publishes :class:`ProfileChanged` to the router's observers, and a
  reload, which leaves no profile active, deactivates it.

A client whose API key is no admin's gets neither ``logData`` nor ``inflight`` (log output
and in-flight requests' headers may show other people's prompts or clients).

Model status and log output are coalesced per reactor turn (``callLater(0)`` on the
injected clock): a burst of child output or of grants becomes one event, not hundreds.
A ``: keepalive`` comment goes out every 15 s.

Each client is a ``fanout.Subscriber`` on its request (an ``IPushProducer``): while its
transport has paused it, messages are queued; with the ``Disconnect`` policy a client with
more than 1 MiB unsent is disconnected (EVT-3), so a slow reader never stalls the daemon or
other readers. A browser ``EventSource`` reconnects and gets a fresh snapshot.
"""
from __future__ import annotations

import codecs
import itertools
import json
import time
from collections import deque
from typing import Any, Mapping, Optional

import attr
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET

from llamaswap.fanout import Disconnect, Subscriber
from llamaswap.observe import ModelEvent, QueueChanged, Reloaded, Removed, Replaced, StateChanged

from llamaswap.web.render import JSONResource

__all__ = ["EventHub", "EventsPage", "KEEPALIVE_INTERVAL", "MAX_UNSENT", "HISTORY_RECORDS",
           "ModelLive", "ProfileChanged", "frame", "model_status"]

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


@attr.frozen
class ProfileChanged:
    """A model event (``llamaswap.observe``): the active pin profile is now ``active`` (None: none).

    ``PUT /api/profiles/active`` publishes it on the router's observers when the profile changed.
    """

    active: Optional[str]


_NO_INFLIGHT = {"operation": "snapshot", "requests": []}


@attr.s(slots=True)
class ModelLive:
    """What ``modelStatus`` shows of a model besides its config: kept from model events."""

    state: str = attr.ib(default="stopped")
    inflight: int = attr.ib(default=0)
    waiting: int = attr.ib(default=0)


def model_status(models: Mapping[str, Any], live: Mapping[str, ModelLive]) -> list[dict]:
    """EVT-2 ``modelStatus``: every configured model (unlisted included), sorted by id.

    :param models: the current config's ``{id: ModelConfig}``.
    :param live: state and counts by id; a model missing there is stopped and idle.
    """
    out = []
    for model_id in sorted(models):
        m = models[model_id]
        now = live.get(model_id) or ModelLive()
        out.append({"id": model_id, "name": m.name, "description": m.description,
                    "state": now.state, "unlisted": bool(m.unlisted),
                    "aliases": list(m.aliases), "inflight": now.inflight, "waiting": now.waiting})
    return out


def _ms(seconds: Optional[float]) -> int:
    return -1 if seconds is None else int(round(seconds * 1000))


def _timestamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _known(value: Any) -> Any:
    return -1 if value is None else value


def _metrics_item(item: tuple) -> dict:
    """The EVT-2 ``metrics`` record of what ``EventHub.request_finished`` kept."""
    request_id, seconds, model, endpoint, status, duration, ttfb, usage = item
    usage = usage or {}
    return {"id": request_id, "timestamp": _timestamp(seconds), "model": model, "endpoint": endpoint,
            "status": status, "duration_ms": _ms(duration), "ttfb_ms": _ms(ttfb),
            "input_tokens": _known(usage.get("input")), "output_tokens": _known(usage.get("output")),
            "cached_tokens": _known(usage.get("cached")),
            "prompt_per_second": _known(usage.get("prompt_per_second")),
            "tokens_per_second": _known(usage.get("tokens_per_second"))}


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

    Add :meth:`observe` to ``router.observers``: model events keep the hub's view of every
    model (``models``, ``live``) and of the active profile up to date, with no call back into
    the router. :meth:`watch_inflight` makes it follow the requests in flight.

    :param models: the config's ``{id: ModelConfig}`` (names, descriptions, aliases);
        ``Reloaded`` events bring the new one.
    :param logs: the ``LogBroadcaster``; the hub subscribes to ``proxy`` and ``upstream``.
    :param clock: ``IReactorTime`` for coalescing, keepalives and record timestamps.
    """

    def __init__(self, models: Mapping[str, Any], logs: Any, clock: Any, log: Optional[Logger] = None,
                 keepalive: float = KEEPALIVE_INTERVAL, max_unsent: int = MAX_UNSENT,
                 history: int = HISTORY_RECORDS) -> None:
        self.models = models
        self.live: dict[str, ModelLive] = {}  # a model missing here is stopped and idle
        self.logs = logs
        self.clock = clock
        self.log = log or Logger(namespace="llamaswap.events")
        self.max_unsent = max_unsent
        self.records: deque[tuple] = deque(maxlen=history)  # what _metrics_item reads
        self._ids = itertools.count()
        self._clients: list[Subscriber] = []
        self._not_admin: set[Subscriber] = set()  # clients that get no logData nor inflight
        self.active_profile: Optional[str] = None  # none at startup, as in the router
        self.inflight: Any = None  # the InflightRequests followed (watch_inflight)
        self._decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in _LOG_SOURCES}
        self._pending_logs: dict[str, list[str]] = {}
        self._status_dirty = False
        self._flush_call = None
        self._keepalive = LoopingCall(self._send_keepalive)
        self._keepalive.clock = clock
        self._keepalive_interval = keepalive
        for source in _LOG_SOURCES:
            logs.subscribe(source, _SourceTap(self, source), history=False)

    # -- clients ----------------------------------------------------------------------------------

    def add_client(self, request: Any, with_logs: bool = True) -> Subscriber:
        """Send the EVT-1 snapshot to ``request`` (headers already set), then live events.

        ``with_logs`` false leaves out every ``logData`` and ``inflight`` message (an API key
        that is no admin's may not read the logs, which can hold prompts, nor other clients'
        request headers).
        """
        self._flush()  # what is pending is in the history the new client is about to get
        if not self._clients:  # output was not decoded while nobody listened: start afresh
            for source in _LOG_SOURCES:
                self._decoders[source].reset()
        client = Subscriber(request, Disconnect(self.max_unsent, self._too_slow), on_close=self._remove)
        self._clients.append(client)
        if not with_logs:
            self._not_admin.add(client)
        client.attach()
        for source in _LOG_SOURCES if with_logs else ():
            text = self.logs.history(source).decode("utf-8", "replace")
            client.send(frame("logData", {"source": source, "data": text}))
        client.send(frame("modelStatus", model_status(self.models, self.live)))
        client.send(frame("metrics", [_metrics_item(item) for item in self.records]))
        client.send(frame("profileChanged", {"active": self.active_profile}))
        if with_logs:
            client.send(frame("inflight", self.inflight.snapshot() if self.inflight is not None else _NO_INFLIGHT))
        self._follow_inflight()
        if not self._keepalive.running:
            self._keepalive.start(self._keepalive_interval, now=False)
        return client

    def client_count(self) -> int:
        return len(self._clients)

    def _too_slow(self) -> None:
        self.log.info("events client dropped: more than {limit} bytes unsent", limit=self.max_unsent)

    def _remove(self, client: Subscriber) -> None:
        self._not_admin.discard(client)
        if client in self._clients:
            self._clients.remove(client)
        self._follow_inflight()
        if not self._clients and self._keepalive.running:
            self._keepalive.stop()

    def _broadcast(self, data: bytes, skip: frozenset | set = frozenset()) -> None:
        for client in list(self._clients):
            if client not in skip:
                client.send(data)

    def _send_keepalive(self) -> None:
        self._broadcast(KEEPALIVE)

    # -- feeds ------------------------------------------------------------------------------------

    def watch_inflight(self, inflight: Any) -> None:
        """Follow ``inflight`` (an ``InflightRequests``): its snapshot goes to each new admin
        client, its updates to every admin client as ``inflight``. Watching the one already
        watched changes nothing."""
        if inflight is self.inflight:
            return
        if self.inflight is not None and self._inflight_update in self.inflight.observers:
            self.inflight.observers.remove(self._inflight_update)
        self.inflight = inflight
        self._follow_inflight()

    def _follow_inflight(self) -> None:
        """Observe the in-flight requests only while an admin client listens: with no observer
        they build no update at all (one per request and response otherwise)."""
        inflight = self.inflight
        if inflight is None:
            return
        wanted = len(self._not_admin) < len(self._clients)
        following = self._inflight_update in inflight.observers
        if wanted and not following:
            inflight.observers.append(self._inflight_update)
        elif following and not wanted:
            inflight.observers.remove(self._inflight_update)

    def _inflight_update(self, update: dict) -> None:
        if len(self._not_admin) == len(self._clients):
            return  # no admin listens: a new one gets the snapshot
        self._flush()  # keep the order: what happened before this update went first
        self._broadcast(frame("inflight", update), skip=self._not_admin)

    def _profile_changed(self, active: Optional[str], status: bool = True) -> None:
        """llama-swap's ``profileChanged`` to every client, then (``status``) ``modelStatus``."""
        if active == self.active_profile:
            return
        self.active_profile = active
        if self._clients:
            self._flush()
            self._broadcast(frame("profileChanged", {"active": active}))
            if status:
                self._broadcast(frame("modelStatus", model_status(self.models, self.live)))

    def observe(self, event: ModelEvent) -> None:
        """``IModelObserver``: keep each model's state and counts; a change becomes ``modelStatus``.
        :class:`ProfileChanged`, and a reload (which leaves no profile active), become
        ``profileChanged``."""
        if isinstance(event, ProfileChanged):
            self._profile_changed(event.active)
            return
        if isinstance(event, QueueChanged):
            live = self._live(event.model)
            live.inflight, live.waiting = event.inflight, event.waiting
        elif isinstance(event, StateChanged):
            self._live(event.model).state = event.new
        elif isinstance(event, Replaced):
            self._live(event.model).state = event.state
        elif isinstance(event, Reloaded):
            self.models = event.models
            for model_id in event.added:
                self.live.pop(model_id, None)
            self._profile_changed(None, status=False)  # the new models' modelStatus follows
        elif isinstance(event, Removed):
            self.live.pop(event.model, None)
        else:
            return
        if self._clients:
            self._status_dirty = True
            self._schedule_flush()

    def _live(self, model_id: str) -> ModelLive:
        live = self.live.get(model_id)
        if live is None:
            live = self.live[model_id] = ModelLive()
        return live

    def _log_output(self, source: str, data: bytes) -> None:
        if not self._clients:
            return  # nobody listens: a new client gets it from the history
        text = self._decoders[source].decode(data)
        if text:
            self._pending_logs.setdefault(source, []).append(text)
            self._schedule_flush()

    def request_finished(self, record: Any) -> None:
        """``WebContext.request_listeners``: keep the EVT-2 record of a ``RequestRecord`` and send it as
        ``metrics``."""
        # kept as its values: the EVT-2 dict is made only when a client gets it
        item = (next(self._ids), self.clock.seconds(), record.model, record.endpoint, record.status,
                record.duration, record.ttfb, record.usage)
        self.records.append(item)
        if self._clients:
            self._flush()  # keep the order: what happened before this request went first
            self._broadcast(frame("metrics", [_metrics_item(item)]))

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
                self._broadcast(frame("logData", {"source": source, "data": "".join(logs[source])}),
                                skip=self._not_admin)
        if dirty:
            self._broadcast(frame("modelStatus", model_status(self.models, self.live)))

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
    """EP-12: ``GET /api/events``.

    The hub follows the in-flight requests of the site's ``WebContext`` (``request.site.app``)
    from the first client on.
    """

    isLeaf = True

    def __init__(self, hub: EventHub) -> None:
        super().__init__()
        self.hub = hub

    def render_GET(self, request: Any):
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        request.write(b"")  # headers now: a quiet daemon must not look like a hung request
        app = getattr(getattr(request, "site", None), "app", None)
        if getattr(app, "inflight", None) is not None:
            self.hub.watch_inflight(app.inflight)
        self.hub.add_client(request, with_logs=getattr(request, "admin", True))
        return NOT_DONE_YET
