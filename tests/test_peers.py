"""Peers in memory (RT-13, CFG-55, RT-2 step 4, EP-2, ERR-2 ``peer_unreachable``).

The peer is another ``UpstreamStub`` behind its own ``RequestTraversalAgent``, installed as
the web context's ``peer_http`` (the client llamaswap uses for every peer).
"""
from __future__ import annotations

import json

from treq.client import HTTPClient

from llamaswap.config import PeerConfig
from llamaswap.peers import find_peer
from llamaswap.errors import ModelNotFound
from tests.factories import make_model
from tests.fakes import UpstreamStub, flush_all, upstream_client
from tests.test_resources import STARTED, HTTPCase, RefusingAgent


class PeerCase(HTTPCase):
    def build_peers(self, peers: dict, models=None, refusing: bool = False, **kw) -> None:
        self.build(models if models is not None else [make_model(id="local", aliases=("both",))], peers=peers,
                   **kw)
        self.peer = UpstreamStub()
        self.peer.reply = (200, {b"content-type": b"application/json"}, b'{"from":"peer"}')
        if refusing:
            self.rewire(peer_http=HTTPClient(RefusingAgent()))
            self.peer_agent = None
        else:
            peer_http, self.peer_agent = upstream_client(self.peer)
            self.rewire(peer_http=peer_http)

    def flush(self) -> None:
        agents = [self.up_agent, self.agent] + ([self.peer_agent] if getattr(self, "peer_agent", None) else [])
        flush_all(self.reactor, *agents)


P1 = PeerConfig("p1", "http://peer-one.example/api", "", ("m1", "shared", "org/big"))
P2 = PeerConfig("p2", "http://peer-two.example", "peer-two-key", ("m2", "shared", "both"),
                ("top_k",), {"opts.think": False, "model": "nope"})


class RoutingTests(PeerCase):
    def setUp(self) -> None:
        self.build_peers({"p1": P1, "p2": P2})

    def test_peer_id_slash_model(self):
        """RT-13: <peerId>/<model> goes to <peer.proxy><path> with model rewritten; no process."""
        raw = b'{"model": "p1/m1", "messages": []}'
        response, data = self.call(b"POST", "/v1/chat/completions?x=1", raw)
        self.assertEqual((response.code, data), (200, b'{"from":"peer"}'))
        (up, body), = self.peer.requests
        self.assertEqual(up.uri, b"/api/v1/chat/completions?x=1")
        self.assertEqual(up.getHeader(b"host"), b"peer-one.example")
        self.assertEqual(json.loads(body), {"model": "m1", "messages": []})
        self.assertEqual(up.getHeader(b"content-length"), b"%d" % len(body))
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.router.counts("local"), (0, 0))

    def test_model_names_with_slashes(self):
        self.call(b"POST", "/v1/completions", b'{"model":"p1/org/big"}')
        (up, body), = self.peer.requests
        self.assertEqual(json.loads(body)["model"], "org/big")
        self.assertEqual(up.uri, b"/api/v1/completions")

    def test_bare_name_listed_by_one_peer(self):
        """RT-13: a bare name works when it is not local and exactly one peer lists it; a
        body that needs no change goes byte-for-byte (RT-10)."""
        raw = b'{ "model" : "m1" }'
        response, _ = self.call(b"POST", "/v1/chat/completions", raw)
        self.assertEqual(response.code, 200)
        (up, body), = self.peer.requests
        self.assertEqual(body, raw)

    def test_bare_name_listed_by_several_peers_is_not_found(self):
        response, data = self.call(b"POST", "/v1/chat/completions", b'{"model":"shared"}')
        message = self.assertError(response, data, 404, "model_not_found")
        self.assertIn("p1, p2", message)
        self.assertEqual(self.peer.requests, [])
        response, _ = self.call(b"POST", "/v1/chat/completions", b'{"model":"p2/shared"}')
        self.assertEqual(response.code, 200)

    def test_local_names_win(self):
        """RT-2: ids and aliases come before peers ('both' is a local alias and a p2 model)."""
        response, _ = self.call(b"POST", "/v1/chat/completions", b'{"model":"both"}')
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.upstream.requests), 1)
        self.assertEqual(self.peer.requests, [])
        response, _ = self.call(b"POST", "/v1/chat/completions", b'{"model":"p2/both"}')
        self.assertEqual(len(self.peer.requests), 1)

    def test_unknown_names(self):
        for name in ("zz", "p1/zz", "p3/m1", "p1/", "p1/m2"):
            response, data = self.call(b"POST", "/v1/chat/completions", json.dumps({"model": name}).encode())
            self.assertError(response, data, 404, "model_not_found")
        self.assertEqual(self.peer.requests, [])

    def test_query_model_rewritten(self):
        """RT-1/RT-13: a model from ?model= is rewritten in the query."""
        response, _ = self.call(b"POST", "/v1/embeddings?model=p1/m1&a=b", b"")
        self.assertEqual(response.code, 200)
        (up, body), = self.peer.requests
        self.assertEqual(up.uri, b"/api/v1/embeddings?model=m1&a=b")
        self.assertEqual(body, b"")

    def test_peer_filters(self):
        """RT-9 on peers: stripParams, then setParams; 'model' is protected."""
        self.call(b"POST", "/v1/chat/completions", b'{"model":"m2","top_k":3,"keep":1}')
        (_, body), = self.peer.requests
        self.assertEqual(json.loads(body), {"model": "m2", "keep": 1, "opts": {"think": False}})

    def test_peer_error_relayed_unchanged(self):
        """PROXY-5: what the peer answers (even 4xx/5xx) is relayed as is."""
        self.peer.reply = (401, {b"content-type": b"application/json"}, b'{"error":"peer says no"}')
        response, data = self.call(b"POST", "/v1/chat/completions", b'{"model":"p1/m1"}')
        self.assertEqual((response.code, data), (401, b'{"error":"peer says no"}'))

    def test_streaming_relayed(self):
        """PROXY-6 for peers: chunks reach the client before the peer finishes."""
        d, up = self.open_stream(model=b"p1/m1", upstream=self.peer)
        response = self.successResultOf(d)
        self.assertEqual(self.header(response, b"x-accel-buffering"), b"no")
        collect = self.collect(response)
        self.assertEqual(collect.data, b"data: 1\n\n")
        self.assertNoResult(collect.done)
        up.write(b"data: [DONE]\n\n")
        up.finish()
        self.flush()
        self.successResultOf(collect.done)
        self.assertEqual(collect.data, b"data: 1\n\ndata: [DONE]\n\n")

    def test_find_peer(self):
        config = self.config
        self.assertEqual(find_peer(config, "p1/m1").label, "p1/m1")
        self.assertEqual(find_peer(config, "m2").label, "p2/m2")
        self.assertIsNone(find_peer(config, "nope"))
        self.assertRaises(ModelNotFound, find_peer, config, "shared")


class HeaderTests(PeerCase):
    def peer_headers(self, name: str, headers: dict):
        self.call(b"POST", "/v1/chat/completions", json.dumps({"model": name}).encode(), headers)
        up, _ = self.peer.requests[-1]
        return up.requestHeaders

    def test_api_key_injected(self):
        """RT-13: the peer's apiKey replaces Authorization: Bearer and x-api-key."""
        self.build_peers({"p1": P1, "p2": P2})
        h = self.peer_headers("p2/m2", {b"authorization": b"Bearer client", b"x-api-key": b"client",
                                        b"x-custom": b"c"})
        self.assertEqual(h.getRawHeaders(b"authorization"), [b"Bearer peer-two-key"])
        self.assertEqual(h.getRawHeaders(b"x-api-key"), [b"peer-two-key"])
        self.assertEqual(h.getRawHeaders(b"x-custom"), [b"c"])

    def test_client_key_never_reaches_a_peer_when_api_keys_set(self):
        """SEC-6 for peers: with apiKeys set, the client's key is stripped; with a peer apiKey
        the peer's key is sent instead."""
        self.build_peers({"p1": P1, "p2": P2}, api_keys=("ours",))
        h = self.peer_headers("p1/m1", {b"authorization": b"Bearer ours"})
        self.assertFalse(h.hasHeader(b"authorization"))
        self.assertFalse(h.hasHeader(b"x-api-key"))
        h = self.peer_headers("p2/m2", {b"x-api-key": b"ours"})
        self.assertEqual(h.getRawHeaders(b"authorization"), [b"Bearer peer-two-key"])
        self.assertEqual(h.getRawHeaders(b"x-api-key"), [b"peer-two-key"])
        response, data = self.call(b"POST", "/v1/chat/completions", b'{"model":"p1/m1"}')
        self.assertEqual(response.code, 401)  # and our own auth still applies first

    def test_no_keys_anywhere_forwards_client_headers(self):
        self.build_peers({"p1": P1})
        h = self.peer_headers("p1/m1", {b"authorization": b"Bearer client"})
        self.assertEqual(h.getRawHeaders(b"authorization"), [b"Bearer client"])


class FailureAndListingTests(PeerCase):
    def test_peer_unreachable_502(self):
        """RT-13/ERR-2: a transport failure is 502 peer_unreachable."""
        self.build_peers({"p1": P1}, refusing=True)
        response, data = self.call(b"POST", "/v1/chat/completions", b'{"model":"p1/m1"}',
                                   {b"origin": b"http://ui"})
        message = self.assertError(response, data, 502, "peer_unreachable", "server_error")
        self.assertTrue(message.startswith("peer 'p1' unreachable"), message)
        self.assertEqual(self.header(response, b"access-control-allow-origin"), b"*")

    def test_models_listing(self):
        """EP-2/RT-13: peers listed as <peerId>/<model> with meta.llamaswap.peerID, after local ones."""
        self.build_peers({"p2": P2, "p1": P1})
        _, body = self.call_json(b"GET", "/v1/models")
        ids = [e["id"] for e in body["data"]]
        self.assertEqual(ids, ["local", "p1/m1", "p1/org/big", "p1/shared", "p2/both", "p2/m2", "p2/shared"])
        self.assertEqual(body["data"][1], {"id": "p1/m1", "object": "model", "created": STARTED,
                                           "owned_by": "llama-swap", "name": "p1: m1",
                                           "meta": {"llamaswap": {"type": "peer", "peerID": "p1"}},
                                           "status": {"value": "unloaded"}})

    def test_no_peers(self):
        self.build_peers({})
        _, body = self.call_json(b"GET", "/v1/models")
        self.assertEqual([e["id"] for e in body["data"]], ["local"])
        response, data = self.call(b"POST", "/v1/chat/completions", b'{"model":"p1/m1"}')
        self.assertError(response, data, 404, "model_not_found")
