"""``GET /api/events`` (EVT-1..EVT-3): framing, the snapshot, live events (llama-swap's
``inflight`` updates and ``profileChanged`` included), keepalives on the injected clock, and slow
clients dropped without stalling others.

The router is the real ``ModelRouter`` over fake processes (tests/test_resources.py's
``HTTPCase``); most tests attach a ``FakeEventRequest`` to the hub directly, and one goes
through the in-memory site for the HTTP headers.
"""
from __future__ import annotations

import json

from treq.testing import RequestTraversalAgent

from llamaswap.config import ProfileConfig
from llamaswap.events import KEEPALIVE_INTERVAL, MAX_UNSENT, EventHub, EventsPage, ProfileChanged, frame
from llamaswap.observe import QueueChanged, StateChanged
from llamaswap.web.context import RequestRecord
from llamaswap.web.site import AccessLogSite
from llamaswap.web.inflight import UPDATE_INTERVAL
from llamaswap.web.tree import build_root
from tests.factories import make_config, make_model
from tests.fakes import FakeStreamRequest, capture_logger
from tests.test_resources import HTTPCase


class FakeEventRequest(FakeStreamRequest):
    """What the hub uses of a twisted.web request, and the events it was sent."""

    def messages(self) -> list:
        """[(type, payload)] and ("keepalive", None) for every complete message so far."""
        out = []
        for block in self.data.split(b"\n\n"):
            if not block:
                continue
            if block == b": keepalive":
                out.append(("keepalive", None))
                continue
            event, data = block.split(b"\n")
            assert event == b"event:message", block
            assert data.startswith(b"data:"), block
            outer = json.loads(data[len(b"data:"):])
            assert set(outer) == {"type", "data"} and isinstance(outer["data"], str), outer
            out.append((outer["type"], json.loads(outer["data"])))
        return out

    def clear(self) -> None:
        self.data = b""


class EventsCase(HTTPCase):
    def setUp(self) -> None:
        self.build([make_model(id="b", unlisted=True, name="B", description="second"),
                    make_model(id="a", aliases=("gpt",), name="Model A", description="first")],
                   pin_profiles={"coding": ProfileConfig("coding", "", {"public": "b"})})
        self.hub = EventHub(self.config.models, self.logs, self.reactor, log=capture_logger(self.events))
        self.router.observers.add(self.hub.observe)
        self.rewire(request_listeners=[self.hub.request_finished])

    def tearDown(self) -> None:
        self.hub.stopService()

    def connect(self, admin: bool = True) -> FakeEventRequest:
        request = FakeEventRequest()
        self.hub.add_client(request, with_logs=admin)
        return request

    def turn(self) -> None:
        self.reactor.advance(0)


class FramingTests(EventsCase):
    def test_frame(self):
        """EVT-1: event:message, then data: with the payload JSON encoded as a string."""
        self.assertEqual(frame("logData", {"source": "proxy", "data": "x\n"}),
                         b'event:message\ndata:{"type":"logData","data":"{\\"source\\":\\"proxy\\",'
                         b'\\"data\\":\\"x\\\\n\\"}"}\n\n')

    def test_http_headers_and_snapshot(self):
        """EP-12/EVT-1: text/event-stream, no-cache, no buffering; the snapshot arrives at once."""
        root = build_root(self.app, {"/api/events": EventsPage(self.hub)})
        self.agent = RequestTraversalAgent(root)
        self.site = AccessLogSite(root, self.app, reactor=self.agent._memoryReactor,
                                  log=capture_logger(self.access))
        self.agent._serverFactory = self.site
        response = self.successResultOf(self.request(b"GET", "/api/events"))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, b"content-type"), b"text/event-stream")
        self.assertEqual(self.header(response, b"cache-control"), b"no-cache")
        self.assertEqual(self.header(response, b"x-accel-buffering"), b"no")
        collect = self.collect(response)
        fake = FakeEventRequest()
        fake.data = collect.data
        self.assertEqual([t for t, _ in fake.messages()], ["logData", "logData", "modelStatus", "metrics",
                                                           "profileChanged", "inflight"])
        self.assertNoResult(collect.done)
        self.logs.write_proxy(b"[INFO] live\n")
        self.flush()
        fake.data = collect.data
        self.assertEqual(fake.messages()[-1], ("logData", {"source": "proxy", "data": "[INFO] live\n"}))
        self.assertEqual(self.hub.client_count(), 1)
        from tests.fakes import drop_clients
        drop_clients(self.agent)
        self.assertEqual(self.hub.client_count(), 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])  # keepalive stopped with the last client


class SnapshotTests(EventsCase):
    def test_snapshot_order_and_contents(self):
        """EVT-1/EVT-2: proxy history, upstream history, modelStatus (sorted, unlisted included),
        then the last metrics records."""
        self.logs.write_proxy(b"[INFO] hello\n")
        self.logs.write("a", b"child says hi\n")
        self.call(b"POST", "/v1/chat/completions", b'{"model":"nope"}')
        request = self.connect()
        messages = request.messages()
        self.assertEqual([t for t, _ in messages], ["logData", "logData", "modelStatus", "metrics",
                                                    "profileChanged", "inflight"])
        self.assertEqual(messages[0][1]["source"], "proxy")
        self.assertIn("[INFO] hello\n", messages[0][1]["data"])
        self.assertEqual(messages[1][1], {"source": "upstream", "data": "[a] child says hi\n"})
        self.assertEqual(messages[2][1], [
            {"id": "a", "name": "Model A", "description": "first", "state": "stopped", "unlisted": False,
             "aliases": ["gpt"], "inflight": 0, "waiting": 0},
            {"id": "b", "name": "B", "description": "second", "state": "stopped", "unlisted": True,
             "aliases": [], "inflight": 0, "waiting": 0}])
        [record] = messages[3][1]
        self.assertEqual(record["model"], "")
        self.assertEqual(record["status"], 404)
        self.assertEqual(record["endpoint"], "/v1/chat/completions")
        self.assertEqual(messages[4][1], {"active": None})
        self.assertEqual(messages[5][1], {"operation": "snapshot", "requests": []})

    def test_snapshot_keeps_last_100_records(self):
        """EVT-1: at most the last 100 records, ids increasing."""
        for _ in range(105):
            self.hub.request_finished(RequestRecord(model="a", endpoint="/v1/completions", status=200,
                                                    started=0.0, duration=0.01))
        records = self.connect().messages()[3][1]
        self.assertEqual(len(records), 100)
        ids = [r["id"] for r in records]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(ids[-1] - ids[0], 99)

    def test_pending_output_not_sent_twice(self):
        """EVT-1: output written just before a client connects is in its history only once."""
        first = self.connect()
        self.logs.write_proxy(b"[INFO] just now\n")
        second = self.connect()  # before the coalescing turn
        self.turn()
        joined = "".join(p["data"] for t, p in second.messages() if t == "logData")
        self.assertEqual(joined.count("just now"), 1)
        self.assertEqual(sum(p["data"].count("just now") for t, p in first.messages() if t == "logData"), 1)


class LiveTests(EventsCase):
    def test_model_status_on_state_changes(self):
        """EVT-2: modelStatus follows the model through starting and ready, then unload."""
        request = self.connect()
        request.clear()
        d = self.router.load("a")
        self.turn()
        states = [p[0]["state"] for t, p in request.messages() if t == "modelStatus"]
        self.assertIn(states[-1], ("starting", "ready"))
        self.flush()
        self.successResultOf(d)
        self.turn()
        statuses = [p for t, p in request.messages() if t == "modelStatus"]
        self.assertEqual(statuses[-1][0]["state"], "ready")
        self.assertEqual(statuses[-1][1]["state"], "stopped")
        request.clear()
        self.router.unload(["a"])
        self.flush()
        statuses = [p for t, p in request.messages() if t == "modelStatus"]
        self.assertEqual(statuses[-1][0]["state"], "stopped")

    def test_in_flight_counts_live(self):
        """EVT-2: queue changes (a request in flight) send modelStatus with the counts."""
        self.upstream.hold = True
        request = self.connect()
        self.request(b"POST", "/v1/completions", b'{"model":"a"}')
        statuses = [p for t, p in request.messages() if t == "modelStatus"]
        self.assertEqual((statuses[-1][0]["inflight"], statuses[-1][0]["state"]), (1, "ready"))
        up, _ = self.upstream.requests[0]
        up.finish()
        self.flush()
        statuses = [p for t, p in request.messages() if t == "modelStatus"]
        self.assertEqual(statuses[-1][0]["inflight"], 0)

    def test_status_comes_from_the_events_alone(self):
        """EVT-2: modelStatus is built from model events; the hub never asks the router."""
        hub = EventHub(self.config.models, self.logs, self.reactor)
        hub.observe(StateChanged("a", "stopped", "starting"))
        hub.observe(QueueChanged("a", 0, 2))
        request = FakeEventRequest()
        hub.add_client(request)
        [status] = [p for t, p in request.messages() if t == "modelStatus"]
        self.assertEqual([(s["id"], s["state"], s["inflight"], s["waiting"]) for s in status],
                         [("a", "starting", 0, 2), ("b", "stopped", 0, 0)])
        hub.stopService()

    def test_reload_brings_the_new_models(self):
        """EVT-2: after a reload, modelStatus lists the new config's models with their new names."""
        request = self.connect()
        request.clear()
        self.router.reconfigure(make_config([make_model(id="a", aliases=("gpt",), name="Renamed"),
                                             make_model(id="c")]))
        self.flush()
        statuses = [p for t, p in request.messages() if t == "modelStatus"]
        self.assertEqual([(s["id"], s["name"], s["state"]) for s in statuses[-1]],
                         [("a", "Renamed", "stopped"), ("c", "", "stopped")])

    def test_log_data_coalesced_per_source(self):
        """EVT-2: new output becomes logData per source, one event per reactor turn."""
        request = self.connect()
        request.clear()
        self.logs.write("a", b"one\n")
        self.logs.write("b", b"two\n")
        self.logs.write_proxy(b"[INFO] p\n")
        self.assertEqual(request.messages(), [])
        self.turn()
        self.assertEqual(request.messages(), [
            ("logData", {"source": "proxy", "data": "[INFO] p\n"}),
            ("logData", {"source": "upstream", "data": "[a] one\n[b] two\n"})])

    def test_utf8_split_between_chunks(self):
        """EVT-2: a character split across two chunks of child output arrives whole."""
        request = self.connect()
        request.clear()
        self.logs.write("a", b"caf\xc3")
        self.turn()
        self.logs.write("a", b"\xa9\n")
        self.turn()
        text = "".join(p["data"] for t, p in request.messages() if t == "logData")
        self.assertEqual(text, "[a] café\n")

    def test_metrics_record_per_request(self):
        """EVT-2: one metrics event per finished request, with every field; unknown values are -1."""
        self.upstream.reply = (200, {b"content-type": b"application/json"}, b"{}")
        request = self.connect()
        request.clear()
        self.reactor.advance(1767225600)
        self.call(b"POST", "/v1/chat/completions", b'{"model":"gpt"}')
        [record] = [p for t, p in request.messages() if t == "metrics"][-1]
        self.assertEqual(set(record), {"id", "timestamp", "model", "endpoint", "status", "duration_ms",
                                       "ttfb_ms", "input_tokens", "output_tokens", "cached_tokens",
                                       "prompt_per_second", "tokens_per_second"})
        self.assertEqual((record["model"], record["endpoint"], record["status"]),
                         ("a", "/v1/chat/completions", 200))
        self.assertEqual(record["timestamp"], "2026-01-01T00:00:00Z")
        self.assertIsInstance(record["duration_ms"], int)
        for key in ("input_tokens", "output_tokens", "cached_tokens", "prompt_per_second",
                    "tokens_per_second"):
            self.assertEqual(record[key], -1, key)

    def test_metrics_record_with_tokens(self):
        """EVT-2: parsed tokens and tokens/s appear in the record."""
        self.hub.request_finished(RequestRecord(
            model="a", endpoint="/v1/chat/completions", status=200, started=0.0, duration=1.2346, ttfb=0.1,
            usage={"input": 25, "output": 10, "cached": 0, "prompt_per_second": 100.0,
                   "tokens_per_second": 10.0}))
        [record] = self.connect().messages()[3][1]
        self.assertEqual((record["duration_ms"], record["ttfb_ms"]), (1235, 100))
        self.assertEqual((record["input_tokens"], record["output_tokens"], record["cached_tokens"]),
                         (25, 10, 0))
        self.assertEqual((record["prompt_per_second"], record["tokens_per_second"]), (100.0, 10.0))


class InflightTests(EventsCase):
    """llama-swap's ``inflight`` messages: the snapshot, then upsert/remove as requests come and go,
    for admin clients only (the entries carry request headers)."""

    def setUp(self) -> None:
        super().setUp()
        self.hub.watch_inflight(self.app.inflight)

    @staticmethod
    def inflight(request: FakeEventRequest) -> list:
        return [p for t, p in request.messages() if t == "inflight"]

    def test_upsert_then_remove_for_admins_only(self):
        admin, other = self.connect(), self.connect(admin=False)
        self.assertEqual(self.inflight(admin), [{"operation": "snapshot", "requests": []}])
        admin.clear()
        other.clear()
        self.upstream.hold = True
        d = self.request(b"POST", "/v1/chat/completions", b'{"model":"a","stream":true}',
                         headers={b"X-Session-ID": b"s1"})
        up, _ = self.upstream.requests[0]
        up.setHeader(b"content-type", b"text/event-stream")
        [begun] = self.inflight(admin)
        self.assertEqual(begun["operation"], "upsert")
        entry = begun["request"]
        self.assertEqual((entry["model"], entry["req_path"], entry["method"], entry["resp_bytes"],
                          entry["resp_headers"], entry["session_id"]),
                         ("a", "/v1/chat/completions", "POST", 0, {}, "s1"))
        self.assertEqual(entry["req_headers"]["X-Session-Id"], "s1")
        self.assertEqual(entry, self.app.inflight.snapshot()["requests"][0])
        # a client connecting now finds it in its snapshot
        late = self.connect()
        self.assertEqual(self.inflight(late), [{"operation": "snapshot", "requests": [entry]}])

        up.write(b"data: 1\n\n")
        self.flush()
        updates = self.inflight(admin)
        self.assertEqual([u["operation"] for u in updates], ["upsert", "upsert"])
        self.assertEqual(updates[1]["request"]["resp_headers"]["Content-Type"], "text/event-stream")
        up.write(b"data: [DONE]\n\n")
        up.finish()
        self.flush()
        self.successResultOf(d)
        self.assertEqual(self.inflight(admin)[-1], {"operation": "remove", "id": entry["id"]})
        self.assertEqual(self.inflight(late)[-1], {"operation": "remove", "id": entry["id"]})
        self.assertEqual(self.inflight(other), [])
        self.assertNotIn(b"s1", other.data)
        self.assertNotIn(b"req_headers", other.data)

    def test_bytes_relayed_at_llama_swaps_pace(self):
        """More bytes: one upsert at most every 0.25 s per request, the last one's total in it."""
        admin = self.connect()
        d, up = self.open_stream(first=b"data: 1\n\n")
        admin.clear()
        for _ in range(3):
            up.write(b"data: 22\n\n")
            self.flush()
        self.assertEqual(self.inflight(admin), [])  # the headers' upsert was just now
        self.reactor.advance(UPDATE_INTERVAL)
        [paced] = self.inflight(admin)
        self.assertEqual(paced["request"]["resp_bytes"], 9 + 3 * 10)
        self.assertEqual(paced["request"]["elapsed_ms"], int(UPDATE_INTERVAL * 1000))
        admin.clear()
        self.reactor.advance(1)
        up.write(b"data: 333\n\n")
        self.flush()
        [at_once] = self.inflight(admin)  # the last update is old: no wait
        self.assertEqual(at_once["request"]["resp_bytes"], 9 + 3 * 10 + 11)
        up.write(b"data: 4\n\n")
        self.flush()
        up.finish()
        self.flush()
        self.successResultOf(d)
        self.assertEqual([u["operation"] for u in self.inflight(admin)], ["upsert", "remove"])
        # the pending paced update went with the request
        self.assertEqual([c for c in self.reactor.getDelayedCalls()
                          if getattr(c.func, "__name__", "") == "_paced_upsert"], [])
        self.reactor.advance(UPDATE_INTERVAL)
        self.assertEqual([u["operation"] for u in self.inflight(admin)], ["upsert", "remove"])

    def test_no_admin_listening_costs_nothing(self):
        """Without clients (or with non-admin ones only), updates are dropped, not queued."""
        other = self.connect(admin=False)
        self.call(b"POST", "/v1/chat/completions", b'{"model":"a"}')
        self.assertEqual(self.inflight(other), [])
        admin = self.connect()
        self.assertEqual(self.inflight(admin), [{"operation": "snapshot", "requests": []}])

    def test_events_page_follows_the_sites_inflight_requests(self):
        """``GET /api/events`` binds the hub to the in-flight requests of the site's web context."""
        hub = EventHub(self.config.models, self.logs, self.reactor)
        self.addCleanup(hub.stopService)
        root = build_root(self.app, {"/api/events": EventsPage(hub)})
        self.agent = RequestTraversalAgent(root)
        self.agent._serverFactory = AccessLogSite(root, self.app, reactor=self.agent._memoryReactor,
                                                  log=capture_logger(self.access))
        self.assertIsNone(hub.inflight)
        response = self.successResultOf(self.request(b"GET", "/api/events"))
        collect = self.collect(response)
        self.assertIs(hub.inflight, self.app.inflight)
        self.successResultOf(self.request(b"GET", "/api/events"))  # a second client: bound once
        self.assertEqual(self.app.inflight.observers.count(hub._inflight_update), 1)
        self.successResultOf(self.request(b"POST", "/v1/chat/completions", b'{"model":"a"}'))
        self.flush()
        fake = FakeEventRequest()
        fake.data = collect.data
        self.assertEqual([p["operation"] for t, p in fake.messages() if t == "inflight"],
                         ["snapshot", "upsert", "upsert", "remove"])
        from tests.fakes import drop_clients
        drop_clients(self.agent)


class ProfileTests(EventsCase):
    """llama-swap's ``profileChanged`` (``{"active": <name or null>}``), then ``modelStatus``."""

    def put(self, name) -> int:
        response, _ = self.call(b"PUT", "/api/profiles/active", json.dumps({"name": name}).encode())
        return response.code

    def test_put_active_profile_sends_profile_changed(self):
        request = self.connect()
        request.clear()
        self.assertEqual(self.put("coding"), 200)
        self.turn()
        self.assertEqual([t for t, _ in request.messages()], ["profileChanged", "modelStatus"])
        self.assertEqual(request.messages()[0][1], {"active": "coding"})
        request.clear()
        self.assertEqual(self.put("coding"), 200)  # no change: nothing sent
        self.assertEqual(self.put("nope"), 404)
        self.turn()
        self.assertEqual(request.messages(), [])
        self.assertEqual(self.connect(admin=False).messages()[-1], ("profileChanged", {"active": "coding"}))
        self.assertEqual(self.put(None), 200)
        self.assertEqual(request.messages()[0], ("profileChanged", {"active": None}))

    def test_reload_deactivates_the_profile(self):
        """A reload leaves no profile active: clients are told, before the new models' status."""
        request = self.connect()
        self.put("coding")
        request.clear()
        self.router.reconfigure(self.config)
        self.flush()
        self.assertEqual([t for t, _ in request.messages()], ["profileChanged", "modelStatus"])
        self.assertEqual(request.messages()[0][1], {"active": None})
        request.clear()
        self.router.reconfigure(self.config)  # none was active: nothing to say
        self.flush()
        self.assertEqual([t for t, _ in request.messages()], ["modelStatus"])

    def test_profile_changed_is_a_model_event_others_ignore(self):
        """Published on the router's observers; the hub keeps it for the next snapshot."""
        seen = []
        self.router.observers.add(seen.append)
        self.put("coding")
        self.assertEqual(seen, [ProfileChanged("coding")])
        self.assertEqual(self.hub.active_profile, "coding")
        self.assertEqual([p for t, p in self.connect().messages() if t == "profileChanged"], [{"active": "coding"}])


class KeepaliveTests(EventsCase):
    def test_keepalive_every_15_seconds(self):
        """EVT-1: a `: keepalive` comment every 15 s on the injected clock."""
        request = self.connect()
        request.clear()
        self.reactor.advance(KEEPALIVE_INTERVAL - 0.5)
        self.assertEqual(request.data, b"")
        self.reactor.advance(0.5)
        self.assertEqual(request.data, b": keepalive\n\n")
        self.reactor.advance(KEEPALIVE_INTERVAL)
        self.assertEqual(request.data, b": keepalive\n\n" * 2)

    def test_no_timer_without_clients(self):
        """The keepalive runs only while someone listens."""
        request = self.connect()
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        request.lose()
        self.assertEqual(self.hub.client_count(), 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class SlowClientTests(EventsCase):
    def test_paused_client_queues_then_catches_up(self):
        """EVT-3: while paused, events are queued and written in order on resume."""
        request = self.connect()
        request.clear()
        request.producer.pauseProducing()
        self.logs.write_proxy(b"[INFO] 1\n")
        self.turn()
        self.reactor.advance(KEEPALIVE_INTERVAL)
        self.assertEqual(request.data, b"")
        request.producer.resumeProducing()
        self.assertEqual([t for t, _ in request.messages()], ["logData", "keepalive"])

    def test_over_1_mib_unsent_disconnects_only_that_client(self):
        """EVT-3: a client with more than 1 MiB unsent is dropped; others get everything."""
        slow, fast = self.connect(), self.connect()
        slow.producer.pauseProducing()
        fast.clear()
        chunk = b"x" * 65536 + b"\n"
        sent = 0
        while sent <= MAX_UNSENT:
            self.logs.write("a", chunk)
            self.turn()
            sent += len(b"[a] ") + len(chunk)  # upstream lines carry the model id
        self.assertTrue(slow.channel.transport.aborted)
        self.assertFalse(fast.channel.transport.aborted)
        self.assertEqual(self.hub.client_count(), 1)
        received = "".join(p["data"] for t, p in fast.messages() if t == "logData")
        self.assertEqual(len(received), sent)
        self.logs.write_proxy(b"[INFO] after\n")
        self.turn()
        self.assertEqual(fast.messages()[-1], ("logData", {"source": "proxy", "data": "[INFO] after\n"}))
        self.assertTrue(any(e.get("limit") == MAX_UNSENT for e in self.events))

    def test_stop_service_finishes_clients(self):
        """Shutdown ends every events stream cleanly."""
        request = self.connect()
        self.hub.stopService()
        self.assertTrue(request.finished)
        self.assertEqual(self.hub.client_count(), 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
