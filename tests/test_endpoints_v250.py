"""llama-swap v250's newer routes and passthrough rules, in memory: ``/props``, the versionless
``/v/...`` routes, ``/v1/audio/voices``, ``/sdapi/v1/*``, ``/audioapi/v1/tasks/run``,
``upstream.ignorePaths``, selectors refused on ``/upstream``, and per-model / per-peer ``timeouts``."""
from __future__ import annotations

import json
from http.cookiejar import CookieJar

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import PeerConfig, SelectorConfig, Timeouts
from llamaswap.peers import PeerClients
from llamaswap.process import State
from llamaswap.proxy import IDLE_FOREVER, ProxyHTTPClient, _to_body_producer, make_http_client
from tests.factories import make_model
from tests.fakes import FakePool
from tests.test_peers import PeerCase
from tests.test_resources import HTTPCase


def proxy_client(agent, clock) -> ProxyHTTPClient:
    """llamaswap's proxy client over an in-memory agent, timed by ``clock``."""
    return ProxyHTTPClient(agent, cookiejar=CookieJar(), data_to_body_producer=_to_body_producer, clock=clock)


class RouteTests(HTTPCase):
    def setUp(self) -> None:
        self.build([make_model(id="a", aliases=("gpt",), use_model_name="real-a"), make_model(id="b")])

    def upstream_uri(self) -> bytes:
        return self.upstream.requests[-1][0].uri

    def test_props_get_with_model_query(self):
        """GET /props?model= goes to that model's /props, ?model= rewritten like a body's model."""
        response, data = self.call(b"GET", "/props?model=gpt")
        self.assertEqual((response.code, data), (200, b'{"ok":true}'))
        up, body = self.upstream.requests[-1]
        self.assertEqual((up.method, up.uri, body), (b"GET", b"/props?model=real-a", b""))
        self.assertEqual(self.router.process("a").state, State.READY)

    def test_get_routes_need_a_model(self):
        response, data = self.call(b"GET", "/props")
        self.assertIn("'model' query parameter", self.assertError(response, data, 400, "missing_model"))
        response, data = self.call(b"GET", "/sdapi/v1/loras?model=nope")
        self.assertError(response, data, 404, "model_not_found")

    def test_methods(self):
        """GET-only and POST-only routes refuse the other method with 405 and an Allow list."""
        response, data = self.call(b"POST", "/props?model=a", b"{}")
        self.assertError(response, data, 405, "method_not_allowed")
        self.assertEqual(self.header(response, b"allow"), b"GET, OPTIONS")
        response, data = self.call(b"GET", "/sdapi/v1/txt2img?model=a")
        self.assertError(response, data, 405, "method_not_allowed")
        self.assertEqual(self.header(response, b"allow"), b"POST, OPTIONS")

    def test_audio_voices_both_methods(self):
        self.call(b"GET", "/v1/audio/voices?model=b")
        self.assertEqual(self.upstream_uri(), b"/v1/audio/voices?model=b")
        self.call(b"POST", "/v1/audio/voices", b'{"model":"b"}')
        self.assertEqual(self.upstream.requests[-1][0].method, b"POST")

    def test_sdapi_routes(self):
        self.call(b"POST", "/sdapi/v1/txt2img", b'{"model":"b","prompt":"cat"}')
        self.assertEqual(self.upstream_uri(), b"/sdapi/v1/txt2img")
        self.call(b"POST", "/sdapi/v1/img2img", b'{"model":"b"}')
        self.assertEqual(self.upstream_uri(), b"/sdapi/v1/img2img")
        self.call(b"GET", "/sdapi/v1/loras?model=b")
        self.assertEqual(self.upstream_uri(), b"/sdapi/v1/loras?model=b")

    def test_prefixes_stripped_upstream(self):
        """/v/<route> is /<route> upstream (llama-swap #728); /audioapi/v1/tasks/run is /v1/tasks/run."""
        for route, upstream in (("/v/chat/completions", b"/chat/completions"), ("/v/responses", b"/responses"),
                                ("/v/completions", b"/completions"), ("/v/messages", b"/messages"),
                                ("/v/messages/count_tokens", b"/messages/count_tokens"),
                                ("/v/embeddings", b"/embeddings"), ("/v/rerank", b"/rerank"),
                                ("/v/reranking", b"/reranking"), ("/audioapi/v1/tasks/run", b"/v1/tasks/run")):
            response, _ = self.call(b"POST", route + "?x=1", b'{"model":"b"}')
            self.assertEqual(response.code, 200, route)
            self.assertEqual(self.upstream_uri(), upstream + b"?x=1", route)

    def test_records_name_the_route(self):
        records: list = []
        self.rewire(request_listeners=[records.append])
        self.call(b"POST", "/v/chat/completions", b'{"model":"b"}')
        self.call(b"GET", "/props?model=b")
        self.assertEqual([(r.endpoint, r.model, r.status) for r in records],
                         [("/v/chat/completions", "b", 200), ("/props", "b", 200)])


class IgnorePathTests(HTTPCase):
    def setUp(self) -> None:
        self.build([make_model(id="a"), make_model(id="b")],
                   upstream_ignore_paths=(r".*\.(js|css|ico)$", r"^/ws$|^/api/jobs$"))

    def test_ignored_path_never_loads_the_model(self):
        """A matching path of a model that is not ready is a 409, and nothing is started."""
        for path in ("/upstream/a/static/app.js", "/upstream/a/api/jobs", "/upstream/a/favicon.ico?v=2"):
            response, data = self.call(b"GET", path)
            message = self.assertError(response, data, 409, "model_not_loaded")
            self.assertEqual(message, "model a is not loaded; path matches upstream.ignorePaths")
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual(self.upstream.requests, [])

    def test_ignored_path_forwarded_when_ready(self):
        self.call(b"POST", "/v1/completions", b'{"model":"a"}')
        response, _ = self.call(b"GET", "/upstream/a/static/app.js")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.upstream.requests[-1][0].uri, b"/static/app.js")

    def test_ignored_path_never_swaps(self):
        """A ready model's page polling another model's ignored path does not swap them."""
        self.call(b"POST", "/v1/completions", b'{"model":"a"}')
        response, _ = self.call(b"GET", "/upstream/b/api/jobs")
        self.assertEqual(response.code, 409)
        self.assertEqual(self.router.process("a").state, State.READY)

    def test_other_paths_load_as_before(self):
        response, _ = self.call(b"GET", "/upstream/a/slots")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.router.process("a").state, State.READY)

    def test_anchors_and_default(self):
        """Expressions match anywhere unless anchored; the default list ignores static assets."""
        response, _ = self.call(b"GET", "/upstream/a/x/ws")  # "^/ws$" does not match
        self.assertEqual(response.code, 200)
        self.change_config(upstream_ignore_paths=(r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$",))
        self.call(b"POST", "/api/models/unload")
        self.flush()
        response, _ = self.call(b"GET", "/upstream/b/config.json")
        self.assertEqual(response.code, 409)


class UpstreamSelectorTests(HTTPCase):
    def test_selector_refused(self):
        """/upstream/<selector> is refused with a JSON 404 naming the targets."""
        self.build([make_model(id="a"), make_model(id="b")],
                   selectors={"quick": SelectorConfig("quick", "warm", ("a", "b"))})
        response, data = self.call(b"GET", "/upstream/quick/health")
        message = self.assertError(response, data, 404, "model_not_found")
        self.assertIn("selector", message)
        self.assertEqual(self.reactor.spawned, [])


class ResponseHeaderTimeoutTests(HTTPCase):
    def setUp(self) -> None:
        self.build([make_model(id="a", timeouts=Timeouts(response_header=5)), make_model(id="b")])
        self.up_client = proxy_client(self.up_agent, self.reactor)

    def test_no_headers_in_time_is_504(self):
        """timeouts.responseHeader: the upstream request is aborted, the client gets 504 JSON, the slot freed."""
        self.upstream.hold = True
        d = self.request(b"POST", "/v1/completions", b'{"model":"a"}')
        up, _ = self.upstream.requests[0]
        self.reactor.advance(4.9)
        self.flush()
        self.assertNoResult(d)
        self.reactor.advance(0.2)
        self.flush()
        response = self.successResultOf(d)
        message = self.assertError(response, self.collect(response).data, 504, "upstream_timeout", "server_error")
        self.assertEqual(message, "upstream for model 'a' sent no response headers within 5 s "
                                  "(timeouts.responseHeader)")
        self.assertTrue(up._disconnected)
        self.assertEqual(self.router.counts("a"), (0, 0))

    def test_headers_in_time_leave_no_timer(self):
        """Headers before the deadline: the stream may then take as long as it likes."""
        d, up = self.open_stream()
        collect = self.collect(self.successResultOf(d))
        self.reactor.advance(60)
        self.flush()
        self.assertNoResult(collect.done)
        up.write(b"data: [DONE]\n\n")
        up.finish()
        self.flush()
        self.successResultOf(collect.done)

    def test_zero_is_no_limit(self):
        """A model without responseHeader (0) waits as long as it takes."""
        self.upstream.hold = True
        d = self.request(b"POST", "/v1/completions", b'{"model":"b"}')
        self.reactor.advance(3600)
        self.flush()
        self.assertNoResult(d)


class ClientTimeoutTests(SynchronousTestCase):
    def test_connect_and_idle_applied(self):
        """connect bounds each new connection, idleConn the pool's idle time; 0 means no limit."""
        reactor = MemoryReactorClock()
        client, pool = make_http_client(reactor)
        client.apply_timeouts(Timeouts(connect=7, idle_conn=45))
        self.assertEqual(pool.cachedConnectionTimeout, 45)
        client.get(b"http://127.0.0.1:5801/health", unbuffered=True)
        self.assertEqual(reactor.tcpClients[-1][3], 7)
        client.apply_timeouts(Timeouts(connect=0, idle_conn=0))
        self.assertEqual(pool.cachedConnectionTimeout, IDLE_FOREVER)
        client.get(b"http://127.0.0.1:5801/health", unbuffered=True)
        self.assertIsNone(reactor.tcpClients[-1][3])

    def test_peer_clients_one_per_peer(self):
        """Each peer has its own client and pool, with its own timeouts."""
        made: list = []

        def make_client(clock):
            client, pool = make_http_client(MemoryReactorClock())
            made.append((client, pool))
            return client, pool

        clients = PeerClients(MemoryReactorClock(), make_client)
        p1 = PeerConfig("p1", "http://one", timeouts=Timeouts(connect=3, response_header=60, idle_conn=10))
        p2 = PeerConfig("p2", "http://two")
        c1 = clients.for_peer(p1)
        self.assertIs(clients.for_peer(p1), c1)
        c2 = clients.for_peer(p2)
        self.assertIsNot(c1, c2)
        self.assertEqual((c1.timeouts, c2.timeouts), (p1.timeouts, p2.timeouts))
        self.assertEqual([pool.cachedConnectionTimeout for _, pool in made], [10, 90])
        self.assertEqual(len(clients.pools()), 2)


class PeerTimeoutTests(PeerCase):
    def test_peer_response_header_timeout(self):
        """A peer's responseHeader (60 s by default) gives 504 too."""
        self.build_peers({"p1": PeerConfig("p1", "http://peer-one.example", "", ("m1",))})
        peer_client = proxy_client(self.peer_agent, self.reactor)
        self.rewire(peer_http=PeerClients(self.reactor, lambda clock: (peer_client, FakePool())))
        self.peer.hold = True
        d = self.request(b"POST", "/v1/completions", b'{"model":"p1/m1"}')
        self.reactor.advance(60)
        self.flush()
        response = self.successResultOf(d)
        message = self.assertError(response, self.collect(response).data, 504, "upstream_timeout", "server_error")
        self.assertIn("'p1/m1'", message)
        self.assertIn("60 s", message)

    def test_listing_unchanged(self):
        self.build_peers({"p1": PeerConfig("p1", "http://peer-one.example", "", ("m1",))})
        _, body = self.call_json(b"GET", "/v1/models")
        self.assertIn("p1/m1", json.dumps(body))


class _RawPeer(Protocol):
    """One end of an in-memory TCP connection that records what it receives."""

    def __init__(self, on_data=None) -> None:
        self.data = b""
        self.lost = False
        self.on_data = on_data

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.on_data is not None:
            self.on_data(self, data)

    def connectionLost(self, reason) -> None:
        self.lost = True


def _upgrading_server(status: bytes = b"101 Switching Protocols"):
    """A fake upstream: answers the upgrade head, then echoes every frame back as 'echo:'."""
    def on_data(proto, data):
        if getattr(proto, "upgraded", False):
            proto.transport.write(b"echo:" + data)
        elif b"\r\n\r\n" in proto.data:
            proto.upgraded = True
            proto.transport.write(b"HTTP/1.1 " + status + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                  b"Sec-WebSocket-Accept: abc=\r\n\r\n")
    return _RawPeer(on_data)


UPGRADE = (b"GET /upstream/%s/ws?client=1 HTTP/1.1\r\nHost: llamaswap\r\nConnection: keep-alive, Upgrade\r\n"
           b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
           b"Authorization: Bearer k\r\n\r\n")


class WebSocketTests(HTTPCase):
    """WebSocket upgrades through /upstream are tunnelled; compat.ignoreWebsockets keeps them out of
    the models' lifecycle."""

    def setUp(self) -> None:
        self.build([make_model(id="a"), make_model(id="b", ignore_websockets=True)], api_keys=("k",))
        self.pumps: list = []

    def connect_client(self) -> _RawPeer:
        client = _RawPeer()
        server = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.pumps.append(iosim.connect(
            server, iosim.FakeTransport(server, isServer=True),
            client, iosim.FakeTransport(client, isServer=False)))
        return client

    def pump(self) -> None:
        for _ in range(4):
            self.flush()
            for pump in self.pumps:
                pump.flush()

    def accept_upstream(self, upstream: _RawPeer) -> tuple:
        host, port, factory, timeout, _ = self.reactor.tcpClients[-1]
        proto = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.pumps.append(iosim.connect(
            upstream, iosim.FakeTransport(upstream, isServer=True),
            proto, iosim.FakeTransport(proto, isServer=False)))
        self.pump()
        return host, port

    def open(self, model: bytes, upstream: _RawPeer) -> _RawPeer:
        client = self.connect_client()
        client.transport.write(UPGRADE % model)
        self.pump()
        self.assertEqual(self.accept_upstream(upstream), ("127.0.0.1", 5800))
        return client

    def test_tunnel_relays_both_ways_and_holds_the_model(self):
        """The upstream's 101 reaches the client, frames pass both ways, and the open socket keeps
        the model busy (in flight) until it closes."""
        upstream = _upgrading_server()
        client = self.open(b"a", upstream)
        head = upstream.data.split(b"\r\n\r\n")[0].split(b"\r\n")
        self.assertEqual(head[0], b"GET /ws?client=1 HTTP/1.1")
        self.assertIn(b"Host: 127.0.0.1:5800", head)
        self.assertIn(b"Connection: Upgrade", head)
        self.assertIn(b"Upgrade: websocket", head)
        self.assertIn(b"Sec-Websocket-Key: dGhlIHNhbXBsZSBub25jZQ==", head)
        self.assertFalse(any(line.lower().startswith(b"authorization") for line in head))  # apiKeys: stripped
        self.assertTrue(client.data.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), client.data)
        self.assertEqual(self.router.counts("a"), (1, 0))
        client.transport.write(b"\x81\x05hello")
        self.pump()
        self.assertTrue(client.data.endswith(b"echo:\x81\x05hello"), client.data)
        client.transport.loseConnection()
        self.pump()
        self.assertTrue(upstream.lost)
        self.assertEqual(self.router.counts("a"), (0, 0))

    def test_upstream_closing_closes_the_client(self):
        upstream = _upgrading_server()
        client = self.open(b"a", upstream)
        upstream.transport.loseConnection()
        self.pump()
        self.assertTrue(client.lost)
        self.assertEqual(self.router.counts("a"), (0, 0))

    def test_ignored_websocket_needs_a_ready_model(self):
        """compat.ignoreWebsockets: an upgrade never starts the model (409)."""
        client = self.connect_client()
        client.transport.write(UPGRADE % b"b")
        self.pump()
        self.assertTrue(client.data.startswith(b"HTTP/1.1 409 "), client.data)
        self.assertIn(b'"code":"model_not_loaded"', client.data)
        self.assertIn(b"ignored websocket requests cannot start it", client.data)
        self.assertEqual(self.reactor.spawned, [])

    def test_ignored_websocket_counts_for_nothing(self):
        """Once the model is ready, an ignored WebSocket is tunnelled without holding it: not in
        flight, so it may still be swapped out."""
        self.call(b"POST", "/v1/completions", b'{"model":"b"}', {b"authorization": b"Bearer k"})
        upstream = _upgrading_server()
        client = self.open(b"b", upstream)
        self.assertTrue(client.data.startswith(b"HTTP/1.1 101 "), client.data)
        self.assertEqual(self.router.counts("b"), (0, 0))
        response, _ = self.call(b"POST", "/v1/completions", b'{"model":"a"}', {b"authorization": b"Bearer k"})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.router.process("b").state, State.STOPPED)

    def test_refused_upgrade_is_502(self):
        upstream = _upgrading_server(b"404 Not Found")
        client = self.open(b"a", upstream)
        self.assertTrue(client.data.startswith(b"HTTP/1.1 502 "), client.data)
        self.assertIn(b"did not accept the WebSocket upgrade: HTTP/1.1 404 Not Found", client.data)
        self.assertEqual(self.router.counts("a"), (0, 0))

    def test_tunnel_without_twisted_upgrade_hook(self):
        """On a Twisted without HTTPChannel's upgrade hook the connection is handed over the same way."""
        from twisted.web.http import HTTPChannel

        self.patch(HTTPChannel, "_protocolUpgradeForWebsockets", None)
        upstream = _upgrading_server()
        client = self.open(b"a", upstream)
        self.assertTrue(client.data.startswith(b"HTTP/1.1 101 "), client.data)
        client.transport.write(b"frame")
        self.pump()
        self.assertTrue(client.data.endswith(b"echo:frame"), client.data)
        client.transport.loseConnection()
        self.pump()
        self.assertEqual(self.router.counts("a"), (0, 0))
