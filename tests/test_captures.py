"""Request/response captures (``captureBuffer``, ``GET /api/captures/<id>``): the ring, the masks,
redaction, and the HTTP face in memory."""
from __future__ import annotations

import base64
import json
import os

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llamaswap.captures import (
    REQ_BODY, REQ_HEADERS, RESP_BODY, RESP_HEADERS, CaptureBuffer, canonical_header_name, capture_fields_for,
    header_map)
from llamaswap.config import PeerConfig
from tests.factories import make_model
from tests.test_peers import PeerCase
from tests.test_resources import HTTPCase

MB = 1024 * 1024


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Record:
    """What ``CaptureBuffer.request_finished`` reads of a ``RequestRecord``."""

    def __init__(self, capture, status=200):
        self.capture, self.status = capture, status


def captured(buffer: CaptureBuffer, request_id: int, resp: bytes, status: int = 200, route="/v1/chat/completions",
             req: bytes = b'{"model":"m"}') -> None:
    draft = buffer.draft(request_id, route, route)
    draft.set_request(Headers({b"content-type": [b"application/json"]}), req)
    draft.on_response(Headers({b"content-type": [b"application/json"]}))
    draft.on_data(resp)
    buffer.request_finished(Record(draft, status))


class HeaderTests(SynchronousTestCase):
    def test_canonical_names_and_redaction(self):
        """Go's canonical names, the first value only, credentials and cookies redacted, Host left out."""
        headers = Headers({b"content-type": [b"a", b"b"], b"x-api-key": [b"k"], b"AUTHORIZATION": [b"Bearer s"],
                           b"cookie": [b"c=1"], b"proxy-authorization": [b"p"], b"host": [b"h"],
                           b"x-custom-thing": [b"v"]})
        self.assertEqual(header_map(headers), {
            "Content-Type": "a", "X-Api-Key": "[REDACTED]", "Authorization": "[REDACTED]",
            "Cookie": "[REDACTED]", "Proxy-Authorization": "[REDACTED]", "X-Custom-Thing": "v"})
        self.assertEqual(canonical_header_name("www-authenticate"), "Www-Authenticate")

    def test_masks(self):
        """llama-swap's masks: audio and image routes keep less; every other route everything."""
        self.assertEqual(capture_fields_for("/v1/chat/completions"), REQ_HEADERS | REQ_BODY | RESP_HEADERS | RESP_BODY)
        self.assertEqual(capture_fields_for("/v1/audio/speech"), REQ_HEADERS | REQ_BODY | RESP_HEADERS)
        self.assertEqual(capture_fields_for("/v1/images/edits"), REQ_HEADERS | RESP_HEADERS)
        self.assertEqual(capture_fields_for("/sdapi/v1/txt2img"), REQ_HEADERS | REQ_BODY | RESP_HEADERS)


class RingTests(SynchronousTestCase):
    def test_round_trip(self):
        """A capture comes back in llama-swap's JSON shape, bodies base64."""
        buffer = CaptureBuffer(lambda: 1)
        captured(buffer, 7, b'{"usage":{}}')
        self.assertEqual(buffer.get(7), {
            "id": 7, "req_path": "/v1/chat/completions", "req_headers": {"Content-Type": "application/json"},
            "req_body": b64(b'{"model":"m"}'), "resp_headers": {"Content-Type": "application/json"},
            "resp_body": b64(b'{"usage":{}}')})
        self.assertTrue(buffer.has(7))
        self.assertIsNone(buffer.get(8))

    def test_not_200_keeps_no_response_body(self):
        buffer = CaptureBuffer(lambda: 1)
        captured(buffer, 1, b'{"error":"x"}', status=500)
        capture = buffer.get(1)
        self.assertIsNone(capture["resp_body"])
        self.assertEqual(capture["resp_headers"], {"Content-Type": "application/json"})
        self.assertEqual(capture["req_body"], b64(b'{"model":"m"}'))

    def test_mask_leaves_parts_null(self):
        buffer = CaptureBuffer(lambda: 1)
        captured(buffer, 1, b"RIFF....", route="/v1/audio/speech")
        capture = buffer.get(1)
        self.assertIsNone(capture["resp_body"])
        self.assertEqual(capture["req_body"], b64(b'{"model":"m"}'))

    def test_oldest_dropped_when_full(self):
        """The ring counts compressed bytes and drops the oldest captures first."""
        buffer = CaptureBuffer(lambda: 1)
        for request_id in range(1, 6):
            captured(buffer, request_id, os.urandom(400 * 1024))  # incompressible: two fit
        self.assertEqual([i for i in range(1, 6) if buffer.has(i)], [4, 5])
        self.assertLessEqual(buffer.size, MB)

    def test_too_big_is_not_kept(self):
        """A capture bigger than the whole ring is not kept, and pushes nothing out."""
        buffer = CaptureBuffer(lambda: 1)
        captured(buffer, 1, b"small")
        captured(buffer, 2, os.urandom(MB + 10))
        self.assertTrue(buffer.has(1))
        self.assertFalse(buffer.has(2))

    def test_streamed_body_is_compressed_as_it_comes(self):
        """A large but compressible answer fits: parts are compressed, not held raw."""
        buffer = CaptureBuffer(lambda: 1)
        draft = buffer.draft(1, "/v1/chat/completions", "/v1/chat/completions")
        draft.set_request(Headers(), b"{}")
        draft.on_response(Headers())
        for _ in range(300):
            draft.on_data(b"data: " + b"x" * 10000 + b"\n\n")  # 3 MB raw
        buffer.request_finished(Record(draft))
        capture = buffer.get(1)
        self.assertEqual(len(base64.b64decode(capture["resp_body"])), 300 * 10008)
        self.assertLess(buffer.size, MB)

    def test_off_and_resized(self):
        """captureBuffer 0 gives no drafts and empties the ring; a smaller size trims it."""
        size = [2]
        buffer = CaptureBuffer(lambda: size[0])
        for request_id in range(1, 4):
            captured(buffer, request_id, os.urandom(800 * 1024))
        self.assertEqual([i for i in range(1, 4) if buffer.has(i)], [2, 3])
        size[0] = 1
        self.assertEqual([i for i in range(1, 4) if buffer.has(i)], [3])
        size[0] = 0
        self.assertFalse(buffer.has(3))
        self.assertEqual((len(buffer), buffer.size), (0, 0))
        self.assertIsNone(buffer.draft(9, "/v1/completions", "/v1/completions"))


class CaptureHTTPTests(HTTPCase):
    def setUp(self) -> None:
        self.build([make_model(id="a", aliases=("gpt",), use_model_name="real-a")], capture_buffer_mb=1)
        self.records: list = []
        self.rewire(request_listeners=[self.records.append])

    def capture_of(self, record_index: int = -1):
        record = [r for r in self.records if r.endpoint != "/api/captures"][record_index]
        response, body = self.call_json(b"GET", f"/api/captures/{record.id}")
        return response, body, record

    def test_chat_request_captured(self):
        """The capture's id is the activity id; the request body is what went upstream; credentials
        never appear in clear."""
        self.upstream.reply = (200, {b"content-type": b"application/json", b"set-cookie": b"s=1"},
                               b'{"choices":[],"usage":{"prompt_tokens":1}}')
        self.call(b"POST", "/v1/chat/completions", b'{"model":"gpt","messages":[]}',
                  {b"authorization": b"Bearer sk-secret", b"x-api-key": b"sk-other",
                   b"content-type": b"application/json"})
        response, capture, record = self.capture_of()
        self.assertEqual(response.code, 200)
        self.assertEqual(capture["id"], record.id)
        self.assertEqual(capture["req_path"], "/v1/chat/completions")
        self.assertEqual(json.loads(base64.b64decode(capture["req_body"])), {"model": "real-a", "messages": []})
        self.assertEqual(base64.b64decode(capture["resp_body"]), b'{"choices":[],"usage":{"prompt_tokens":1}}')
        self.assertEqual(capture["req_headers"]["Authorization"], "[REDACTED]")
        self.assertEqual(capture["req_headers"]["X-Api-Key"], "[REDACTED]")
        self.assertEqual(capture["resp_headers"]["Set-Cookie"], "[REDACTED]")
        self.assertNotIn(b"sk-secret", json.dumps(capture).encode())
        self.assertTrue(self.app.captures.has(record.id))

    def test_stream_captured_whole(self):
        d, up = self.open_stream(b"data: 1\n\n", model=b"a")
        collect = self.collect(self.successResultOf(d))
        up.write(b"data: [DONE]\n\n")
        up.finish()
        self.flush()
        self.successResultOf(collect.done)
        _, capture, _ = self.capture_of()
        self.assertEqual(base64.b64decode(capture["resp_body"]), b"data: 1\n\ndata: [DONE]\n\n")
        self.assertEqual(capture["resp_headers"]["Content-Type"], "text/event-stream")

    def test_versionless_route_captured_under_its_upstream_path(self):
        self.call(b"POST", "/v/chat/completions", b'{"model":"a"}')
        (up, _), = self.upstream.requests
        self.assertEqual(up.uri, b"/v1/chat/completions".replace(b"/v1", b""))
        _, capture, _ = self.capture_of()
        self.assertEqual(capture["req_path"], "/chat/completions")

    def test_get_routes_and_other_paths_not_captured(self):
        """Only POSTs to the model routes are captured (GET /props is not; /upstream's other paths neither)."""
        self.call(b"GET", "/props?model=a")
        response, data = self.call(b"GET", f"/api/captures/{self.records[-1].id}")
        self.assertEqual(self.assertError(response, data, 404, "not_found"), "capture not found")
        self.call(b"POST", "/upstream/a/slots?action=save", b'{"filename":"x"}')
        response, _ = self.call(b"GET", f"/api/captures/{self.records[-1].id}")
        self.assertEqual(response.code, 404)

    def test_upstream_model_route_captured(self):
        self.call(b"POST", "/upstream/a/v1/embeddings", b'{"input":"x"}')
        _, capture, _ = self.capture_of()
        self.assertEqual(capture["req_path"], "/v1/embeddings")
        self.assertEqual(base64.b64decode(capture["req_body"]), b'{"input":"x"}')

    def test_bad_ids(self):
        response, data = self.call(b"GET", "/api/captures/abc")
        self.assertError(response, data, 400, "bad_request")
        response, data = self.call(b"GET", "/api/captures/424242")
        self.assertError(response, data, 404, "not_found")
        response, data = self.call(b"GET", "/api/captures")
        self.assertError(response, data, 404, "not_found")
        response, data = self.call(b"POST", "/api/captures/1")
        self.assertError(response, data, 405, "method_not_allowed")

    def test_captures_off(self):
        """captureBuffer: 0: nothing is captured."""
        self.change_config(capture_buffer_mb=0)
        self.call(b"POST", "/v1/chat/completions", b'{"model":"a"}')
        response, _ = self.call(b"GET", f"/api/captures/{self.records[-1].id}")
        self.assertEqual(response.code, 404)
        self.assertEqual(len(self.app.captures), 0)


class PeerCaptureTests(PeerCase):
    def test_peer_request_captured(self):
        self.build_peers({"p1": PeerConfig("p1", "http://peer-one.example", "", ("m1",))}, capture_buffer_mb=1)
        records: list = []
        self.rewire(request_listeners=[records.append])
        self.call(b"POST", "/v1/completions", b'{"model":"p1/m1"}')
        capture = self.app.captures.get(records[-1].id)
        self.assertEqual(json.loads(base64.b64decode(capture["req_body"])), {"model": "m1"})
        self.assertEqual(base64.b64decode(capture["resp_body"]), b'{"from":"peer"}')
