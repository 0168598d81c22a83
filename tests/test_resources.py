"""The HTTP face, in memory: routes, errors, forwarding, streaming, access log.

The daemon side is ``build_root`` behind our ``AccessLogSite`` (so ``LlamaSwapRequest``
runs), reached through a ``RequestTraversalAgent``; upstreams are an ``UpstreamStub``
behind another one. Models are real ``UpstreamProcess`` objects on a ``FakeProcessReactor``.
"""
from __future__ import annotations

import json

import attr
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, _SynchronousProducer
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llamaswap.logs import LogBroadcaster
from llamaswap.process import State, UpstreamProcess
from llamaswap.proxy import Forwarder
from llamaswap.router import ModelRouter
from llamaswap.web.context import WebContext
from llamaswap.web.site import AccessLogSite
from llamaswap.web.tree import build_root
from tests.fakes import (
    FakeLogs, FakePool, FakeProcessReactor, UpstreamStub, capture_logger, drop_clients,
    flush_all, upstream_client)
from tests.factories import make_config, make_model
from tests.test_requestbody import BOUNDARY, multipart

STARTED = 1767225600


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.done.callback(None)


class RefusingAgent:
    """An IAgent whose every connection is refused (PROXY-8)."""

    def request(self, method, uri, headers=None, bodyProducer=None):
        return fail(ierror.ConnectionRefusedError("Connection was refused by other side: 111"))


class HTTPCase(SynchronousTestCase):
    def build(self, models, upstream_agent_factory=None, **config_kw) -> None:
        self.reactor = FakeProcessReactor()
        self.reactor.auto_exit = True
        self.upstream = UpstreamStub()
        self.up_client, self.up_agent = upstream_client(self.upstream)
        self.events: list = []
        self.access: list = []
        self.config = make_config(models, **config_kw)

        def http_factory(reactor):
            if upstream_agent_factory is not None:
                return HTTPClient(upstream_agent_factory()), FakePool()
            return self.up_client, FakePool()

        def make_process(model, on_transition):
            return UpstreamProcess(
                model=model, reactor=self.reactor, clock=self.reactor, logs=FakeLogs(),
                on_transition=on_transition,
                http_factory=http_factory, check=lambda http, url: succeed(200),
                kill=self.reactor.killpg, group_alive=self.reactor.group_alive,
                log=capture_logger(self.events))

        self.router = ModelRouter(self.config, make_process, self.reactor, log=capture_logger(self.events))
        self.logs = LogBroadcaster()
        self.app = WebContext(self.router, self.logs, Forwarder(self.reactor), self.reactor,
                              log=capture_logger(self.events), started=STARTED)
        self.rewire()

    def rewire(self, **changes) -> None:
        """Serve a web context like the current one but for ``changes`` (request listeners,
        response parsers, the peer client): it is frozen, so a new one is built."""
        self.app = attr.evolve(self.app, **changes)
        self.root = build_root(self.app)
        self.agent = RequestTraversalAgent(self.root)
        self.site = AccessLogSite(self.root, self.app, reactor=self.agent._memoryReactor,
                                  log=capture_logger(self.access))
        self.agent._serverFactory = self.site

    def change_config(self, **changes) -> None:
        """Swap in the config with ``changes``, as a reload that keeps every model does."""
        self.config = self.router.config = attr.evolve(self.config, **changes)

    def flush(self) -> None:
        flush_all(self.reactor, self.up_agent, self.agent)

    def request(self, method: bytes, path: str, body: bytes = b"", headers=None):
        """Send a request with the raw agent (no redirects followed, nothing decoded)."""
        h = Headers()
        for name, value in (headers or {}).items():
            h.setRawHeaders(name, [value])
        producer = _SynchronousProducer(body) if body else None
        d = self.agent.request(method, b"http://llamaswap" + path.encode("utf-8"), h, producer)
        self.flush()
        return d

    def collect(self, response) -> "Collect":
        """Read ``response``'s body; what has arrived so far is in the returned ``Collect``."""
        collect = Collect()
        response.deliverBody(collect)
        self.flush()
        return collect

    def call(self, method: bytes, path: str, body: bytes = b"", headers=None):
        """Send a request and return (response, body bytes)."""
        response = self.successResultOf(self.request(method, path, body, headers))
        return response, self.collect(response).data

    def open_stream(self, first: bytes | None = b"data: 1\n\n", model: bytes = b"a", upstream=None):
        """A streaming chat completion for ``model`` that ``upstream`` (the model's stub unless
        given) holds, its SSE content type set and ``first`` (unless None) written and flushed.
        Returns (the client's response Deferred, the upstream's request)."""
        upstream = self.upstream if upstream is None else upstream
        upstream.hold = True
        d = self.request(b"POST", "/v1/chat/completions", b'{"model":"%b","stream":true}' % model)
        up, _ = upstream.requests[0]
        up.setHeader(b"content-type", b"text/event-stream")
        if first is not None:
            up.write(first)
            self.flush()
        return d, up

    def call_json(self, method: bytes, path: str, body: bytes = b"", headers=None):
        response, data = self.call(method, path, body, headers)
        return response, json.loads(data)

    def assertError(self, response, data: bytes, status: int, code: str, kind: str = "invalid_request_error"):
        self.assertEqual(response.code, status, data)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        body = json.loads(data)
        self.assertEqual(set(body), {"error"})
        self.assertEqual(set(body["error"]), {"message", "type", "param", "code"})
        self.assertEqual((body["error"]["code"], body["error"]["type"], body["error"]["param"]),
                         (code, kind, None))
        return body["error"]["message"]

    def header(self, response, name: bytes):
        values = response.headers.getRawHeaders(name)
        return values[0] if values else None

    def access_lines(self) -> list[str]:
        return [formatEvent(e) for e in self.access]


class ForwardingTests(HTTPCase):
    def setUp(self) -> None:
        self.build([make_model(id="a", aliases=("gpt",), proxy="http://127.0.0.1:5800/base/")])

    def test_json_request_forwarded_byte_for_byte(self):
        """EP-1/RT-10/PROXY-1: path unchanged under the base path; body unchanged; response relayed."""
        raw = b'{ "model" : "a",\n "messages": [] }'
        self.upstream.reply = (201, {b"content-type": b"application/json", b"x-upstream": b"1"}, b'{"r":1}')
        response, data = self.call(b"POST", "/v1/chat/completions?x=1&y=2", raw,
                                   {b"content-type": b"text/plain"})
        self.assertEqual((response.code, data), (201, b'{"r":1}'))
        self.assertEqual(self.header(response, b"x-upstream"), b"1")
        (up, body), = self.upstream.requests
        self.assertEqual(body, raw)
        self.assertEqual(up.uri, b"/base/v1/chat/completions?x=1&y=2")
        self.assertEqual(up.method, b"POST")
        self.assertEqual(up.requestHeaders.getRawHeaders(b"content-length"), [b"%d" % len(raw)])
        self.assertFalse(up.requestHeaders.hasHeader(b"transfer-encoding"))
        self.assertEqual(self.router.process("a").state, State.READY)
        self.assertEqual(self.router.counts("a"), (0, 0))

    def test_forwarded_headers(self):
        """PROXY-2: X-Forwarded-For/Host/Proto; headers named by Connection dropped."""
        self.call(b"POST", "/v1/completions", b'{"model":"a"}',
                  {b"x-forwarded-for": b"9.9.9.9", b"x-custom": b"c", b"authorization": b"Bearer u"})
        (up, _), = self.upstream.requests
        h = up.requestHeaders
        self.assertEqual(h.getRawHeaders(b"x-forwarded-for"), [b"9.9.9.9, 127.0.0.1"])
        self.assertEqual(h.getRawHeaders(b"x-forwarded-host"), [b"llamaswap"])
        self.assertEqual(h.getRawHeaders(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(h.getRawHeaders(b"x-custom"), [b"c"])
        self.assertEqual(h.getRawHeaders(b"authorization"), [b"Bearer u"])  # no apiKeys: kept

    def test_auth_headers_stripped_when_api_keys_set(self):
        """SEC-6/PROXY-2: with apiKeys, Authorization and x-api-key never reach the upstream."""
        self.change_config(api_keys=("k",))
        self.call(b"POST", "/v1/completions", b'{"model":"a"}',
                  {b"authorization": b"Bearer k", b"x-api-key": b"k", b"x-custom": b"c"})
        (up, _), = self.upstream.requests
        self.assertFalse(up.requestHeaders.hasHeader(b"authorization"))
        self.assertFalse(up.requestHeaders.hasHeader(b"x-api-key"))
        self.assertEqual(up.requestHeaders.getRawHeaders(b"x-custom"), [b"c"])

    def test_alias_model_unchanged_without_use_model_name(self):
        """RT-8: without useModelName the body goes unchanged even for an alias."""
        raw = b'{"model":"gpt"}'
        self.call(b"POST", "/v1/chat/completions", raw)
        self.assertEqual(self.upstream.requests[0][1], raw)

    def test_query_model(self):
        """RT-1: with no model in the body, ?model= is used."""
        response, _ = self.call(b"POST", "/v1/embeddings?model=gpt", b"")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.upstream.requests[0][0].uri, b"/base/v1/embeddings?model=gpt")

    def test_upstream_error_relayed_unchanged(self):
        """PROXY-5: upstream 4xx/5xx are relayed, not wrapped."""
        self.upstream.reply = (500, {b"content-type": b"text/plain"}, b"boom")
        response, data = self.call(b"POST", "/v1/chat/completions", b'{"model":"a"}')
        self.assertEqual((response.code, data), (500, b"boom"))

    def test_no_content_encoding_added(self):
        """PROXY-5: an upstream response without Content-Encoding is relayed without one."""
        response, data = self.call(b"POST", "/v1/chat/completions", b'{"model":"a"}')
        self.assertEqual(data, b'{"ok":true}')
        self.assertIsNone(response.headers.getRawHeaders(b"content-encoding"),
                          response.headers)

    def test_gzip_decoded_and_relayed_plain(self):
        """PROXY-4: a gzip body is decoded and relayed without Content-Encoding/Content-Length."""
        import gzip

        self.upstream.reply = (200, {b"content-type": b"application/json", b"content-encoding": b"gzip"},
                               gzip.compress(b'{"big":"answer"}'))
        response, data = self.call(b"POST", "/v1/chat/completions", b'{"model":"a"}')
        self.assertEqual(data, b'{"big":"answer"}')
        self.assertFalse(response.headers.getRawHeaders(b"content-encoding"))
        self.assertIsNone(response.headers.getRawHeaders(b"content-length"))
        self.assertIn(b"gzip", self.upstream.requests[0][0].getHeader(b"accept-encoding"))

    def test_sse_streamed_with_headers(self):
        """PROXY-5/6: SSE chunks reach the client before the upstream finishes."""
        d, up = self.open_stream()
        response = self.successResultOf(d)
        self.assertEqual(self.header(response, b"x-accel-buffering"), b"no")
        self.assertEqual(self.header(response, b"cache-control"), b"no-cache")
        collect = self.collect(response)
        self.assertEqual(collect.data, b"data: 1\n\n")
        self.assertNoResult(collect.done)
        self.assertEqual(self.router.counts("a"), (1, 0))
        up.write(b"data: [DONE]\n\n")
        up.finish()
        self.flush()
        self.successResultOf(collect.done)
        self.assertTrue(collect.reason.check(ResponseDone), collect.reason)
        self.assertEqual(collect.data, b"data: 1\n\ndata: [DONE]\n\n")
        self.assertEqual(self.router.counts("a"), (0, 0))

    def test_sse_mid_stream_loss_gets_error_event(self):
        """PROXY-9: a lost SSE stream ends with an error event and no [DONE]."""
        d, up = self.open_stream(b"data: 1\n")
        collect = self.collect(self.successResultOf(d))
        up.channel.transport.abortConnection()
        self.flush()
        self.successResultOf(collect.done)
        self.assertTrue(collect.reason.check(ResponseDone), collect.reason)
        self.assertTrue(collect.data.startswith(b"data: 1\n\n\ndata: "), collect.data)
        self.assertNotIn(b"[DONE]", collect.data)
        self.assertTrue(collect.data.endswith(b"\n\n"))
        event = json.loads(collect.data[len(b"data: 1\n\n\ndata: "):])
        self.assertEqual(event["error"]["code"], "upstream_error")
        self.assertEqual(event["error"]["type"], "server_error")
        self.assertIsNone(event["error"]["param"])
        self.assertTrue(event["error"]["message"].startswith(
            "upstream for model 'a' closed the stream: "), event)
        self.assertEqual(self.router.counts("a"), (0, 0))

    def test_client_disconnect_releases_lease(self):
        """PROXY-7: the client leaving closes the upstream request; in-flight drops to 0."""
        d, up = self.open_stream()
        self.successResultOf(d)
        self.assertEqual(self.router.counts("a"), (1, 0))
        for pump in list(self.agent._pumps):
            pump.clientIO.abortConnection()
        self.flush()
        self.assertEqual(self.router.counts("a"), (0, 0))
        self.assertTrue(up._disconnected)


class UseModelNameTests(HTTPCase):
    def setUp(self) -> None:
        self.build([
            make_model(id="a", aliases=("gpt",), use_model_name="real-a",
                      strip_params=("top_k",), set_params={"opts.think": False}),
            make_model(id="b")], profiles={"P": ("a", "b")})

    def test_filters_applied(self):
        """RT-8/RT-9/RT-10: useModelName, strip, set; compact JSON, key order kept."""
        self.call(b"POST", "/v1/chat/completions", b'{"model": "gpt", "top_k": 3, "x": 1}')
        body = self.upstream.requests[0][1]
        self.assertEqual(body, b'{"model":"real-a","x":1,"opts":{"think":false}}')
        self.assertEqual(self.upstream.requests[0][0].requestHeaders.getRawHeaders(b"content-length"),
                         [b"%d" % len(body)])

    def test_profile_prefix_removed(self):
        """RT-4: the model sent upstream is M (without the profile)."""
        self.call(b"POST", "/v1/chat/completions", b'{"model":"P:b","x":1}')
        self.assertEqual(self.upstream.requests[0][1], b'{"model":"b","x":1}')

    def test_query_model_rewritten(self):
        """RT-8: a ?model= value is replaced too."""
        self.call(b"POST", "/v1/embeddings?model=gpt&k=v", b"")
        self.assertEqual(self.upstream.requests[0][0].uri, b"/v1/embeddings?model=real-a&k=v")

    def test_multipart_model_field_rewritten(self):
        """RT-9: multipart: only the model value changes; other parts stay byte-identical."""
        audio = bytes(range(256)) * 20
        body = multipart([(b"file", b'; filename="a.wav"\r\nContent-Type: audio/wav', audio),
                          (b"model", b"", b"gpt"), (b"language", b"", b"en")])
        response, _ = self.call(b"POST", "/v1/audio/transcriptions", body,
                                {b"content-type": b"multipart/form-data; boundary=" + BOUNDARY})
        self.assertEqual(response.code, 200)
        up, sent = self.upstream.requests[0]
        self.assertEqual(sent, body.replace(b"\r\n\r\ngpt\r\n", b"\r\n\r\nreal-a\r\n"))
        self.assertEqual(up.requestHeaders.getRawHeaders(b"content-length"), [b"%d" % len(sent)])

    def test_multipart_unchanged_forwarded_byte_for_byte(self):
        """RT-10: a multipart body for a model without useModelName goes unchanged."""
        body = multipart([(b"model", b"", b"b"), (b"file", b'; filename="x"', b"\x00\xff" * 100)])
        self.call(b"POST", "/v1/audio/transcriptions", body,
                  {b"content-type": b"multipart/form-data; boundary=" + BOUNDARY})
        self.assertEqual(self.upstream.requests[0][1], body)

    def test_invalid_multipart(self):
        """RT-1: a malformed multipart body gives 400 invalid_multipart."""
        body = multipart([(b"model", b"", b"b")])[:-10]
        response, data = self.call(b"POST", "/v1/audio/transcriptions", body,
                                   {b"content-type": b"multipart/form-data; boundary=" + BOUNDARY})
        self.assertError(response, data, 400, "invalid_multipart")
        self.assertEqual(self.reactor.spawned, [])

    def test_multipart_without_model(self):
        body = multipart([(b"file", b"", b"x")])
        response, data = self.call(b"POST", "/v1/audio/transcriptions", body,
                                   {b"content-type": b"multipart/form-data; boundary=" + BOUNDARY})
        self.assertError(response, data, 400, "missing_model")


class ErrorTests(HTTPCase):
    def setUp(self) -> None:
        self.build([make_model(id="a", concurrency_limit=1)], profiles={"P": ("a",)})

    def test_invalid_json(self):
        """RT-1/ERR-2: not JSON, or not an object -> 400 invalid_json."""
        for raw in (b"{", b"[1,2]", b'"x"'):
            response, data = self.call(b"POST", "/v1/chat/completions", raw)
            message = self.assertError(response, data, 400, "invalid_json")
            self.assertTrue(message.startswith("invalid JSON body"))
        self.assertEqual(self.reactor.spawned, [])

    def test_missing_model(self):
        """RT-1: model absent, empty or not a string -> 400 missing_model."""
        for raw in (b"{}", b'{"model":""}', b'{"model":5}', b'{"model":null}', b""):
            response, data = self.call(b"POST", "/v1/chat/completions", raw)
            message = self.assertError(response, data, 400, "missing_model")
            self.assertEqual(message, "missing or invalid 'model' key")

    def test_model_not_found(self):
        """RT-2: 404 model_not_found with the message."""
        response, data = self.call(b"POST", "/v1/chat/completions", b'{"model":"zz"}')
        self.assertEqual(self.assertError(response, data, 404, "model_not_found"),
                         "model 'zz' not found (1 model is available: GET /v1/models lists them)")
        response, data = self.call(b"POST", "/v1/chat/completions", b'{"model":"P:zz"}')
        self.assertEqual(self.assertError(response, data, 404, "model_not_found"),
                         "model 'zz' is not a member of profile 'P'")

    def test_unknown_path(self):
        """every unlisted path gives 404 not_found (JSON)."""
        for method, path in ((b"GET", "/nope"), (b"GET", "/v1/nope"), (b"GET", "/api/nope/deeper"),
                             (b"POST", "/v1/chat"), (b"GET", "/v1"), (b"GET", "/api")):
            response, data = self.call(method, path)
            self.assertEqual(response.code, 404, f"{method.decode()} {path}: {data!r}")
            self.assertError(response, data, 404, "not_found")

    def test_method_not_allowed(self):
        """a known path with the wrong method -> 405 method_not_allowed with Allow."""
        response, data = self.call(b"GET", "/v1/chat/completions")
        self.assertError(response, data, 405, "method_not_allowed")
        self.assertIn(b"POST", self.header(response, b"allow"))
        response, data = self.call(b"POST", "/v1/models")
        self.assertError(response, data, 405, "method_not_allowed")
        self.assertIn(b"GET", self.header(response, b"allow"))
        self.assertNotIn(b"POST", self.header(response, b"allow"))
        response, data = self.call(b"DELETE", "/running")
        self.assertError(response, data, 405, "method_not_allowed")

    def test_error_cors_with_origin(self):
        """SEC-8: llamaswap's errors carry Access-Control-Allow-Origin: * when Origin was sent."""
        response, _ = self.call(b"POST", "/v1/chat/completions", b"{", {b"origin": b"http://x"})
        self.assertEqual(self.header(response, b"access-control-allow-origin"), b"*")
        response, _ = self.call(b"POST", "/v1/chat/completions", b"{")
        self.assertIsNone(self.header(response, b"access-control-allow-origin"))

    def test_concurrency_limit_429(self):
        """SCHED-1: 429 concurrency_limit with Retry-After: 1."""
        self.upstream.hold = True
        self.request(b"POST", "/v1/chat/completions", b'{"model":"a"}')
        response, data = self.call(b"POST", "/v1/chat/completions", b'{"model":"a"}')
        message = self.assertError(response, data, 429, "concurrency_limit", "rate_limit_error")
        self.assertEqual(message, "too many requests for model 'a' (limit 1)")
        self.assertEqual(self.header(response, b"retry-after"), b"1")
        up, _ = self.upstream.requests[0]
        up.finish()
        self.flush()

    def test_upstream_unreachable_502(self):
        """PROXY-8: a connect failure before headers -> 502 upstream_unreachable."""
        self.build([make_model(id="a")], upstream_agent_factory=RefusingAgent)
        response, data = self.call(b"POST", "/v1/chat/completions", b'{"model":"a"}')
        message = self.assertError(response, data, 502, "upstream_unreachable", "server_error")
        self.assertTrue(message.startswith("upstream for model 'a' unreachable: "), message)
        self.assertEqual(self.router.counts("a"), (0, 0))

    def test_start_failure_502(self):
        """PROC-7/ERR-2: a start failure is 502 upstream_start_failed."""
        self.reactor.spawn_error = FileNotFoundError(2, "No such file or directory")
        response, data = self.call(b"POST", "/v1/chat/completions", b'{"model":"a"}')
        message = self.assertError(response, data, 502, "upstream_start_failed", "server_error")
        self.assertTrue(message.startswith("failed to start model 'a': "))

    def test_request_too_large_413(self):
        """CFG-28: a body over maxRequestBody -> 413 request_too_large; nothing starts."""
        self.build([make_model(id="a")], max_request_body=64)
        body = b'{"model":"a","pad":"' + b"x" * 100 + b'"}'
        response, data = self.call(b"POST", "/v1/chat/completions", body)
        self.assertError(response, data, 413, "request_too_large")
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual(self.upstream.requests, [])
        response, _ = self.call(b"POST", "/v1/chat/completions", b'{"model":"a"}')
        self.assertEqual(response.code, 200)


class CorsTests(HTTPCase):
    def setUp(self) -> None:
        self.build([make_model(id="a")])

    def test_options_preflight(self):
        """SEC-8/EP-16: OPTIONS -> 204 with the CORS headers; never forwarded."""
        response, data = self.call(b"OPTIONS", "/v1/chat/completions",
                                   headers={b"access-control-request-headers": b"X-Foo, Content-Type"})
        self.assertEqual(response.code, 204)
        self.assertEqual(data, b"")
        self.assertEqual(self.header(response, b"access-control-allow-origin"), b"*")
        self.assertEqual(self.header(response, b"access-control-allow-methods"),
                         b"GET, POST, PUT, PATCH, DELETE, OPTIONS")
        self.assertEqual(self.header(response, b"access-control-allow-headers"), b"X-Foo, Content-Type")
        self.assertEqual(self.header(response, b"access-control-max-age"), b"86400")
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.reactor.spawned, [])

    def test_options_any_path_and_bad_request_headers(self):
        """SEC-8: any path; non-token request headers fall back to the default list."""
        for path in ("/nope/x", "/upstream/a/props", "/"):
            response, _ = self.call(b"OPTIONS", path, headers={b"access-control-request-headers": b"a(b)"})
            self.assertEqual(response.code, 204, path)
            self.assertEqual(self.header(response, b"access-control-allow-headers"),
                             b"Content-Type, Authorization, Accept, X-Requested-With")
        self.assertEqual(self.upstream.requests, [])


class ManagementTests(HTTPCase):
    def setUp(self) -> None:
        self.build([
            make_model(id="b", name="B model", description="second", aliases=("bee",),
                      metadata={"family": "x", "port": 5801}, ttl=60),
            make_model(id="a"),
            make_model(id="hidden", unlisted=True)])

    def test_models_list_shape(self):
        """EP-2: listed models sorted by id; unlisted hidden; empty fields left out."""
        response, body = self.call_json(b"GET", "/v1/models", headers={b"origin": b"http://ui.example"})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, b"content-type"), b"application/json")
        self.assertEqual(self.header(response, b"access-control-allow-origin"), b"http://ui.example")
        self.assertEqual(body["object"], "list")
        self.assertEqual([e["id"] for e in body["data"]], ["a", "b"])
        a, b = body["data"]
        self.assertEqual(a, {"id": "a", "object": "model", "created": STARTED, "owned_by": "llama-swap",
                             "status": {"value": "unloaded"}, "meta": {"llamaswap": {"type": "model"}}})
        self.assertEqual(b["name"], "B model")
        self.assertEqual(b["description"], "second")
        self.assertEqual(b["meta"], {"llamaswap": {"family": "x", "port": 5801, "aliases": ["bee"], "type": "model"}})
        _, same = self.call_json(b"GET", "/models")
        self.assertEqual(same, body)

    def test_models_status_values(self):
        """EP-2: status.value is loaded / loading / unloaded."""
        self.upstream.hold = True
        self.request(b"POST", "/v1/chat/completions", b'{"model":"a"}')
        _, body = self.call_json(b"GET", "/v1/models")
        self.assertEqual(body["data"][0]["status"], {"value": "loaded"})
        self.upstream.requests[0][0].finish()
        self.flush()

    def test_models_with_aliases_listed(self):
        """EP-2/CFG-17: includeAliasesInList adds alias entries pointing at the id."""
        self.change_config(include_aliases_in_list=True)
        _, body = self.call_json(b"GET", "/v1/models")
        self.assertEqual([e["id"] for e in body["data"]], ["a", "b", "bee"])
        bee = body["data"][2]
        self.assertEqual(bee["meta"], {"llamaswap": {"family": "x", "port": 5801, "type": "alias", "modelID": "b"}})
        self.assertEqual(bee["name"], "B model")

    def test_running_shape(self):
        """EP-5: starting/ready/stopping models, sorted, with the documented fields."""
        _, body = self.call_json(b"GET", "/running")
        self.assertEqual(body, {"running": []})
        self.call(b"POST", "/v1/chat/completions", b'{"model":"b"}')
        _, body = self.call_json(b"GET", "/running")
        proc = self.router.process("b")
        self.assertEqual(body, {"running": [{
            "model": "b", "state": "ready", "cmd": proc.model.cmd, "proxy": "http://127.0.0.1:5800",
            "ttl": 60, "name": "B model", "description": "second", "pid": proc.pid,
            "inflight": 0, "waiting": 0}]})

    def test_health(self):
        """EP-8: 200 OK text, not access-logged (LOG-5)."""
        response, data = self.call(b"GET", "/health")
        self.assertEqual((response.code, data), (200, b"OK"))
        self.assertEqual(self.header(response, b"content-type"), b"text/plain; charset=utf-8")
        self.assertEqual(self.access_lines(), [])

    def test_upstream_listing_and_redirect(self):
        """EP-3/EP-4: listing of listed models; /upstream/<m> redirects with the query kept."""
        response, data = self.call(b"GET", "/upstream")
        self.assertIn(b'<a href="/upstream/a/">', data)
        self.assertIn(b'<a href="/upstream/b/">', data)
        self.assertNotIn(b"hidden", data)
        response, _ = self.call(b"GET", "/upstream/b?x=1")
        self.assertEqual(response.code, 301)
        self.assertEqual(self.header(response, b"location"), b"/upstream/b/?x=1")
        response, _ = self.call(b"POST", "/upstream/b")
        self.assertEqual(response.code, 308)

    def test_upstream_passthrough(self):
        """EP-4/RT-5: /upstream/<model>/<rest> goes to <proxy>/<rest> with the query."""
        response, _ = self.call(b"GET", "/upstream/bee/props?a=%20b")
        self.assertEqual(response.code, 200)
        (up, _), = self.upstream.requests
        self.assertEqual(up.uri, b"/props?a=%20b")
        response, data = self.call(b"GET", "/upstream/zz/props")
        self.assertError(response, data, 404, "model_not_found")

    def test_unload_endpoints(self):
        """EP-6: unload one model or all; unknown model 404."""
        self.call(b"POST", "/v1/chat/completions", b'{"model":"a"}')
        response, body = self.call_json(b"POST", "/api/models/unload/a")
        self.assertEqual((response.code, body), (200, {"msg": "ok"}))
        self.assertEqual(self.router.process("a").state, State.STOPPED)
        response, data = self.call(b"POST", "/api/models/unload/zz")
        self.assertError(response, data, 404, "model_not_found")
        response, data = self.call(b"GET", "/unload")
        self.assertEqual((response.code, data), (200, b"OK"))

    def test_load_endpoint(self):
        """EP-7: load answers once ready."""
        response, body = self.call_json(b"POST", "/api/models/load/bee")
        self.assertEqual(body, {"msg": "ok", "model": "b", "state": "ready"})
        self.assertEqual(self.upstream.requests, [])


class AccessLogTests(HTTPCase):
    def setUp(self) -> None:
        self.build([make_model(id="a")])

    def test_line_format(self):
        """LOG-5: Request <ip> "<METHOD> <path> <protocol>" <status> <bytes> "<UA>" <duration>."""
        self.call(b"POST", "/v1/chat/completions?q=1", b'{"model":"a"}', {b"user-agent": b"curl/8"})
        line, = self.access_lines()
        self.assertRegex(
            line, r'^Request 127\.0\.0\.1 "POST /v1/chat/completions\?q=1 HTTP/1\.1" 200 11 "curl/8" '
                  r'\d+\.\d{3}s$')

    def test_event_as_logger_info_makes_it(self):
        """The access event is what ``Logger.info("{line}", line=...)`` would emit."""
        from twisted.logger import Logger, LogLevel

        self.call(b"GET", "/v1/models")
        event, = self.access
        seen = []
        Logger(namespace="llamaswap.access", observer=seen.append).info("{line}", line=event["line"])
        self.assertEqual(set(event), set(seen[0]))
        self.assertEqual((event["log_level"], event["log_format"]), (LogLevel.info, "{line}"))
        self.assertIsInstance(event["log_time"], float)

    def test_client_ip_from_headers(self):
        """LOG-5: first X-Forwarded-For entry, else X-Real-IP."""
        self.call(b"GET", "/v1/models", headers={b"x-forwarded-for": b"1.2.3.4, 5.6.7.8",
                                                 b"x-real-ip": b"9.9.9.9"})
        self.call(b"GET", "/v1/models", headers={b"x-real-ip": b"9.9.9.9"})
        lines = self.access_lines()
        self.assertTrue(lines[0].startswith('Request 1.2.3.4 "GET /v1/models HTTP/1.1" 200 '), lines)
        self.assertTrue(lines[1].startswith('Request 9.9.9.9 "GET /v1/models HTTP/1.1" 200 '), lines)

    def test_errors_logged_with_status(self):
        self.call(b"GET", "/nope")
        line, = self.access_lines()
        self.assertRegex(line, r'^Request 127\.0\.0\.1 "GET /nope HTTP/1\.1" 404 \d+ "" \d+\.\d{3}s$')


class _Held(Resource):
    """Keeps every request open until the test finishes it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list = []

    def render(self, request):
        self.requests.append(request)
        return NOT_DONE_YET


class InjectedClockTests(HTTPCase):
    """Every time the request layer reads comes from the web context's clock."""

    def setUp(self) -> None:
        self.build([make_model(id="a")])

    def test_access_log_duration_from_clock(self):
        """The access log's duration is how far the injected Clock moved while the request was open."""
        clock = Clock()
        held = _Held()
        app = WebContext(self.router, self.logs, Forwarder(self.reactor), clock, log=capture_logger(self.events))
        root = build_root(app, {"/held": held})
        agent = RequestTraversalAgent(root)
        agent._serverFactory = AccessLogSite(root, app, reactor=agent._memoryReactor,
                                             log=capture_logger(self.access))
        d = agent.request(b"GET", b"http://llamaswap/held")
        agent.flush()
        clock.advance(2.5)
        request, = held.requests
        request.write(b"ok")
        request.finish()
        agent.flush()
        self.assertEqual(self.successResultOf(d).code, 200)
        line, = self.access_lines()
        self.assertTrue(line.endswith('"GET /held HTTP/1.1" 200 2 "" 2.500s'), line)

    def test_record_times_from_clock(self):
        """A model-dispatched request's record is emitted once, timed by the clock, when it ends."""
        records: list = []
        self.rewire(request_listeners=[records.append])
        self.upstream.hold = True
        d = self.request(b"POST", "/v1/chat/completions", b'{"model":"a"}')
        up, _ = self.upstream.requests[0]
        self.reactor.advance(1.25)
        up.setHeader(b"content-type", b"application/json")
        up.write(b"{}")
        self.flush()
        self.reactor.advance(0.5)
        up.finish()
        self.flush()
        self.successResultOf(d)
        record, = records
        self.assertEqual((record.model, record.endpoint, record.status), ("a", "/v1/chat/completions", 200))
        self.assertEqual((record.ttfb, record.duration), (1.25, 1.75))
        line, = self.access_lines()
        self.assertTrue(line.endswith(" 1.750s"), line)

    def test_client_gone_flag(self):
        """A client that leaves sets the request's client_gone flag; its record says 499, once."""
        records: list = []
        self.rewire(request_listeners=[records.append])
        held = _Held()
        self.root = build_root(self.app, {"/held": held})
        self.agent = RequestTraversalAgent(self.root)
        self.agent._serverFactory = AccessLogSite(self.root, self.app, reactor=self.agent._memoryReactor,
                                                  log=capture_logger(self.access))
        d = self.request(b"GET", "/held")
        request, = held.requests
        self.assertFalse(request.client_gone)
        request.begin_record("/held")
        drop_clients(self.agent)
        self.failureResultOf(d)
        self.assertTrue(request.client_gone)
        record, = records
        self.assertEqual((record.endpoint, record.status), ("/held", 499))
