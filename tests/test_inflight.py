"""Requests in flight, in memory: ``GET /api/inflight`` and ``POST /api/inflight/<id>/cancel``.

The daemon side is ``build_root`` behind ``AccessLogSite`` (``tests.test_resources.HTTPCase``),
the upstream an ``UpstreamStub``; time is the fake reactor's clock.
"""
from __future__ import annotations

import json

from twisted.web.client import ResponseDone

from llamaswap.config import PeerConfig
from llamaswap.web.inflight import rfc3339
from tests.factories import make_model
from tests.test_peers import PeerCase
from tests.test_resources import HTTPCase


def sse_events(data: bytes) -> list:
    return [line[len(b"data: "):] for line in data.split(b"\n") if line.startswith(b"data: ")]


class InflightCase(HTTPCase):
    def inflight(self) -> list:
        response, body = self.call_json(b"GET", "/api/inflight")
        self.assertEqual(response.code, 200)
        self.assertEqual(body["operation"], "snapshot")
        return body["requests"]

    def cancel(self, request_id) -> tuple:
        return self.call_json(b"POST", f"/api/inflight/{request_id}/cancel")


class ListingTests(InflightCase):
    def setUp(self) -> None:
        self.build([make_model(id="a", aliases=("gpt",))], session_id_headers=("X-Session-ID", "X-Trace"))

    def test_listed_while_streaming_then_gone(self):
        """An open stream is listed in llama-swap's shape (id = activity id, headers redacted,
        session from the first configured header), and leaves the list when it ends."""
        records: list = []
        self.rewire(request_listeners=[records.append])
        self.reactor.advance(1000)
        started = self.reactor.seconds()
        self.upstream.hold = True
        d = self.request(b"POST", "/v1/chat/completions", b'{"model":"gpt","stream":true}',
                         {b"authorization": b"Bearer secret", b"x-trace": b"t-1", b"x-session-id": b"",
                          b"x-forwarded-for": b"10.9.8.7, 1.1.1.1", b"content-type": b"application/json"})
        self.reactor.advance(1.5)
        entry, = self.inflight()
        self.assertEqual(set(entry), {"id", "timestamp", "model", "req_path", "method", "req_headers", "remote_ip",
                                      "resp_headers", "resp_bytes", "elapsed_ms", "session_id"})
        self.assertEqual((entry["model"], entry["req_path"], entry["method"]), ("a", "/v1/chat/completions", "POST"))
        self.assertEqual(entry["timestamp"], rfc3339(started))
        self.assertEqual(entry["elapsed_ms"], 1500)
        self.assertEqual(entry["req_headers"]["Authorization"], "[REDACTED]")
        self.assertEqual(entry["req_headers"]["Content-Type"], "application/json")
        self.assertNotIn("Host", entry["req_headers"])
        self.assertEqual(entry["remote_ip"], "10.9.8.7")
        self.assertEqual(entry["session_id"], "t-1")  # X-Session-ID is empty: the next header counts
        self.assertEqual((entry["resp_headers"], entry["resp_bytes"]), ({}, 0))
        up, _ = self.upstream.requests[0]
        up.setHeader(b"content-type", b"text/event-stream")
        up.write(b"data: 1\n\n")
        self.flush()
        response = self.successResultOf(d)
        collect = self.collect(response)
        entry, = self.inflight()
        self.assertEqual(entry["resp_headers"]["Content-Type"], "text/event-stream")
        self.assertEqual(entry["resp_bytes"], len(b"data: 1\n\n"))
        up.write(b"data: [DONE]\n\n")
        up.finish()
        self.flush()
        self.successResultOf(collect.done)
        self.assertEqual(self.inflight(), [])
        record, = [r for r in records if r.endpoint == "/v1/chat/completions"]
        self.assertEqual(entry["id"], str(record.id))

    def test_oldest_first(self):
        """The snapshot lists the oldest request first."""
        self.upstream.hold = True
        self.request(b"POST", "/v1/completions", b'{"model":"a"}')
        self.reactor.advance(1)
        self.request(b"POST", "/v1/embeddings", b'{"model":"a"}')
        paths = [e["req_path"] for e in self.inflight()]
        self.assertEqual(paths, ["/v1/completions", "/v1/embeddings"])

    def test_observers_see_upserts_and_removal(self):
        """Observers get llama-swap's upsert/remove messages."""
        updates: list = []
        self.app.inflight.observers.append(updates.append)
        self.call(b"POST", "/v1/completions", b'{"model":"a"}')
        self.assertEqual([u["operation"] for u in updates], ["upsert", "upsert", "remove"])
        self.assertEqual(updates[1]["request"]["resp_headers"]["Content-Type"], "application/json")
        self.assertEqual(updates[2]["id"], updates[0]["request"]["id"])

    def test_upstream_passthrough_listed_only_for_model_routes(self):
        """/upstream/<model>/<path> is listed when <path> is a model route, under that path."""
        self.upstream.hold = True
        self.request(b"POST", "/upstream/a/v1/chat/completions", b'{"x":1}')
        self.request(b"GET", "/upstream/a/slots")
        entry, = self.inflight()
        self.assertEqual((entry["model"], entry["req_path"]), ("a", "/v1/chat/completions"))


class CancelTests(InflightCase):
    def setUp(self) -> None:
        self.build([make_model(id="a"), make_model(id="b")])

    def test_cancel_stream_tells_client_and_frees_slot(self):
        """Cancelling a stream: an SSE error event, no [DONE], the upstream request closed, the slot
        freed, {"msg":"ok"} to the caller."""
        d, up = self.open_stream(b"data: 1\n")
        collect = self.collect(self.successResultOf(d))
        self.assertEqual(self.router.counts("a"), (1, 0))
        entry, = self.inflight()
        response, body = self.cancel(entry["id"])
        self.assertEqual((response.code, body), (200, {"msg": "ok"}))
        self.flush()
        self.successResultOf(collect.done)
        self.assertTrue(collect.reason.check(ResponseDone), collect.reason)
        self.assertTrue(collect.data.startswith(b"data: 1\n\n\ndata: "), collect.data)
        self.assertNotIn(b"[DONE]", collect.data)
        event = json.loads(sse_events(collect.data)[-1])
        self.assertEqual((event["error"]["code"], event["error"]["type"]), ("request_cancelled", "server_error"))
        self.assertIn(f"request {entry['id']} was cancelled", event["error"]["message"])
        self.assertTrue(up._disconnected)
        self.assertEqual(self.router.counts("a"), (0, 0))
        self.assertEqual(self.inflight(), [])

    def test_cancel_frees_the_way_for_a_queued_swap(self):
        """The model the cancelled request kept busy can be swapped out: the request waiting for
        another model of its group goes on."""
        d, up = self.open_stream()
        collect = self.collect(self.successResultOf(d))
        waiting = self.request(b"POST", "/v1/chat/completions", b'{"model":"b"}')
        self.assertNoResult(waiting)
        self.assertEqual(self.router.counts("b"), (0, 1))
        first = self.inflight()[0]
        self.upstream.hold = False  # b's request is answered at once
        self.cancel(first["id"])
        self.flush()
        self.successResultOf(collect.done)
        response = self.successResultOf(waiting)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.router.process("a").state.value, "stopped")
        self.assertEqual(self.router.process("b").state.value, "ready")
        self.assertEqual(self.router.counts("a"), (0, 0))
        self.assertEqual(self.router.counts("b"), (0, 0))

    def test_cancel_while_waiting_for_the_model(self):
        """A request still queued for its model leaves the queue and gets 502 request_cancelled."""
        d, up = self.open_stream()
        self.successResultOf(d)
        waiting = self.request(b"POST", "/v1/chat/completions", b'{"model":"b"}')
        queued = [e for e in self.inflight() if e["model"] == "b"][0]
        self.cancel(queued["id"])
        response = self.successResultOf(waiting)
        message = self.assertError(response, self.collect(response).data, 502, "request_cancelled", "server_error")
        self.assertIn("was cancelled", message)
        self.assertEqual(self.router.counts("b"), (0, 0))
        self.assertEqual(self.router.counts("a"), (1, 0))  # the other request is untouched

    def test_cancel_before_response_headers(self):
        """An upstream request still waiting for headers is aborted; the client gets 502 JSON."""
        self.upstream.hold = True
        d = self.request(b"POST", "/v1/completions", b'{"model":"a"}')
        up, _ = self.upstream.requests[0]
        entry, = self.inflight()
        self.cancel(entry["id"])
        self.flush()
        response = self.successResultOf(d)
        self.assertError(response, self.collect(response).data, 502, "request_cancelled", "server_error")
        self.assertTrue(up._disconnected)
        self.assertEqual(self.router.counts("a"), (0, 0))

    def test_cancel_in_the_middle_of_a_plain_body_aborts(self):
        """Half a non-stream body: the connection is aborted, never a truncated 200."""
        self.upstream.hold = True
        d = self.request(b"POST", "/v1/completions", b'{"model":"a"}')
        up, _ = self.upstream.requests[0]
        up.setHeader(b"content-type", b"application/json")
        up.write(b'{"partial":')
        self.flush()
        collect = self.collect(self.successResultOf(d))
        entry, = self.inflight()
        self.cancel(entry["id"])
        self.flush()
        self.successResultOf(collect.done)
        self.assertFalse(collect.reason.check(ResponseDone), collect.reason)
        self.assertEqual(self.router.counts("a"), (0, 0))

    def test_unknown_ids(self):
        """An id not in flight, or no id at all, is a 404 JSON; GET on the cancel path a 405."""
        response, data = self.call(b"POST", "/api/inflight/12345/cancel")
        self.assertEqual(self.assertError(response, data, 404, "not_found"), "inflight request not found")
        response, data = self.call(b"POST", "/api/inflight/abc/cancel")
        self.assertError(response, data, 404, "not_found")
        response, data = self.call(b"POST", "/api/inflight/1/stop")
        self.assertError(response, data, 404, "not_found")
        response, data = self.call(b"GET", "/api/inflight/1/cancel")
        self.assertError(response, data, 405, "method_not_allowed")
        response, data = self.call(b"DELETE", "/api/inflight")
        self.assertError(response, data, 405, "method_not_allowed")

    def test_client_leaving_before_headers_is_not_retried(self):
        """A client that leaves while the upstream has not answered ends the upstream request
        (never a retried second one) and frees the slot at once."""
        self.upstream.hold = True
        d = self.request(b"POST", "/v1/completions", b'{"model":"a"}')
        up, _ = self.upstream.requests[0]
        for pump in list(self.agent._pumps):
            pump.clientIO.abortConnection()
        self.flush()
        self.failureResultOf(d)
        self.assertTrue(up._disconnected)
        self.assertEqual(len(self.upstream.requests), 1)
        self.assertEqual(self.router.counts("a"), (0, 0))
        self.assertEqual(len(self.app.inflight), 0)

    def test_client_leaving_removes_the_entry(self):
        """A client that leaves is no longer in flight (and nothing is written)."""
        d, up = self.open_stream()
        self.successResultOf(d)
        for pump in list(self.agent._pumps):
            pump.clientIO.abortConnection()
        self.flush()
        self.assertEqual(self.inflight(), [])
        self.assertEqual(self.router.counts("a"), (0, 0))


class LoadingCancelTests(InflightCase):
    def test_cancel_during_loading_state(self):
        """A loading-state stream that is cancelled ends with the error event (no [DONE])."""
        self.build([make_model(id="a", send_loading_state=True), make_model(id="b")])
        d, up = self.open_stream(model=b"b")
        self.successResultOf(d)
        waiting = self.request(b"POST", "/v1/chat/completions", b'{"model":"a","stream":true}')
        collect = self.collect(self.successResultOf(waiting))
        self.assertIn(b"loading model a", collect.data)
        queued = [e for e in self.inflight() if e["model"] == "a"][0]
        self.cancel(queued["id"])
        self.flush()
        self.successResultOf(collect.done)
        event = json.loads(sse_events(collect.data)[-1])
        self.assertEqual(event["error"]["code"], "request_cancelled")
        self.assertNotIn(b"[DONE]", collect.data)
        self.assertEqual(self.router.counts("a"), (0, 0))


class PeerInflightTests(PeerCase, InflightCase):
    def test_peer_request_listed_and_cancelled(self):
        """A peer's request is in flight under its label and can be cancelled."""
        self.build_peers({"p1": PeerConfig("p1", "http://peer-one.example", "", ("m1",))})
        self.peer.hold = True
        d = self.request(b"POST", "/v1/completions", b'{"model":"p1/m1"}')
        entry, = self.inflight()
        self.assertEqual(entry["model"], "p1/m1")
        self.cancel(entry["id"])
        self.flush()
        response = self.successResultOf(d)
        self.assertError(response, self.collect(response).data, 502, "request_cancelled", "server_error")
        self.assertEqual(self.inflight(), [])
