"""Peers (RT-13, CFG-55): models served by other llama-swap/llamaswap instances.

A peer model is addressed as ``<peerId>/<model>``, or by its bare name when that is not a
local id or alias and exactly one peer lists it. The request goes to ``<peer.proxy><path>``
with ``model`` rewritten to the peer's own name and the peer's filters applied
(``stripParams``, ``setParams``); the peer's ``apiKey``, when set, replaces the client's
``Authorization``/``x-api-key`` (which SEC-6 already stripped when ``apiKeys`` is set).
There is no process, TTL, health check, swap or concurrency limit; a transport failure
before response headers is 502 ``peer_unreachable``. The response is relayed by the same
``Forwarder`` as local models (streaming, back-pressure, PROXY-9), through the treq client
and connection pool :class:`PeerPool` keeps for each peer (the web context's ``peer_http``),
with the peer's ``timeouts`` (connect, idle connections, response headers: 504).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList

from llamaswap.errors import ModelNotFound, PeerUnreachable
from llamaswap.proxy import RelayOutcome, UsageTap, make_http_client, upstream_headers

if TYPE_CHECKING:
    from llamaswap.config import Config, PeerConfig


@attr.s(frozen=True)
class PeerTarget:
    """A requested name resolved to a peer: the peer, and the model's name on the peer."""

    peer: Any = attr.ib()
    model: str = attr.ib()

    @property
    def label(self) -> str:
        """``<peerId>/<model>``: the name in /v1/models, logs, metrics and error messages."""
        return f"{self.peer.id}/{self.model}"


@attr.s(frozen=True)
class _PeerFilters:
    """What ``apply_filters`` reads of a model, for a peer (RT-9 (2) and (3))."""

    strip_params: tuple = attr.ib()
    set_params: Any = attr.ib()
    set_params_by_id: Any = attr.ib(factory=dict)
    use_model_name: str = attr.ib(default="")


def filters_of(peer: PeerConfig) -> _PeerFilters:
    return _PeerFilters(tuple(peer.strip_params), dict(peer.set_params))


def find_peer(config: Config, name: str) -> Optional[PeerTarget]:
    """RT-2 step 4 / RT-13: the peer model ``name`` designates, or None.

    Call it only once steps 1-3 found nothing. A bare name listed by several peers is
    ambiguous: ``ModelNotFound`` says which peers list it.
    """
    peers = config.peers
    if not peers:
        return None
    if ":" in name and name.split(":", 1)[0] in config.profiles:
        return None  # RT-2 step 3 owns P:M names
    for peer_id, peer in peers.items():
        prefix = f"{peer_id}/"
        if name.startswith(prefix) and name[len(prefix):] in peer.models:
            return PeerTarget(peer, name[len(prefix):])
    owners = sorted(peer_id for peer_id, peer in peers.items() if name in peer.models)
    if len(owners) == 1:
        return PeerTarget(peers[owners[0]], name)
    if owners:
        raise ModelNotFound(f"model '{name}' is served by several peers ({', '.join(owners)}); "
                            f"use '<peer>/{name}'")
    return None


class PeerClients:
    """The peers' treq clients: one per peer, each on a connection pool of its own, made when the
    peer is first used. ``for_peer`` gives a peer's client with the peer's current ``timeouts``
    applied; used as a client itself, it is the first one made (a peer-less default).

    :param clock: the reactor the clients connect with.
    :param make_client: ``(reactor) -> (client, pool)``; ``proxy.make_http_client``.
    """

    def __init__(self, clock: Any, make_client: Any = make_http_client) -> None:
        self._clock, self._make_client = clock, make_client
        self._clients: dict[str, tuple] = {}
        self._default: Optional[tuple] = None

    def for_peer(self, peer: PeerConfig) -> Any:
        made = self._clients.get(peer.id)
        if made is None:
            made = self._clients[peer.id] = self._make_client(self._clock)
        client = made[0]
        apply = getattr(client, "apply_timeouts", None)
        if apply is not None:
            apply(peer.timeouts)
        return client

    def pools(self) -> list:
        made = list(self._clients.values()) + ([self._default] if self._default is not None else [])
        return [pool for _, pool in made]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._default is None:
            self._default = self._make_client(self._clock)
        return getattr(self._default[0], name)  # request, get, post, ...: the default client's


class PeerPool(Service):
    """The treq clients, each on a connection pool of its own, that peer requests use.

    Peers are remote and long-lived, so their connections are kept alive across requests
    (unlike a child's, whose pool lives as long as the child). Stopping closes the idle
    ones; the router has stopped by then, so no request still uses them.

    :param clock: the reactor the clients connect with.
    :param make_client: ``(reactor) -> (client, pool)``; ``proxy.make_http_client``.
    :ivar http: the ``PeerClients`` (the web context's ``peer_http``).
    """

    name = "peer-pool"

    def __init__(self, clock: Any, make_client: Any = make_http_client) -> None:
        self.http = PeerClients(clock, make_client)

    def stopService(self) -> Deferred:
        super().stopService()
        closing = [pool.closeCachedConnections() for pool in self.http.pools()]
        return DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)


def peer_headers(request: Any, peer: PeerConfig, strip_auth: bool, scheme: bytes) -> Any:
    """PROXY-2 headers for a peer; its ``apiKey`` replaces the client's credentials."""
    headers = upstream_headers(request, strip_auth, scheme)
    if peer.api_key:
        key = peer.api_key.encode("utf-8")
        headers.removeHeader(b"authorization")
        headers.removeHeader(b"x-api-key")
        headers.setRawHeaders(b"authorization", [b"Bearer " + key])
        headers.setRawHeaders(b"x-api-key", [key])
    return headers


def listing(config: Config, created: int) -> list[dict]:
    """EP-2/RT-13: one ``/v1/models`` entry per peer model, ``<peerId>/<model>``, sorted."""
    entries = []
    for peer_id, peer in config.peers.items():
        for model in peer.models:
            entries.append({"id": f"{peer_id}/{model}", "object": "model", "created": created,
                            "owned_by": "llama-swap", "meta": {"llamaswap": {"peerID": peer_id}}})
    return sorted(entries, key=lambda e: e["id"])


async def forward(app: Any, request: Any, record: Any, target: PeerTarget, url: bytes,
                  body: Any, watch: Any = None) -> RelayOutcome:
    """Forward to the peer and relay its answer; ``PeerUnreachable`` before any header,
    ``UpstreamTimeout`` (504) when the peer's ``timeouts.responseHeader`` passes first.

    ``record`` (the request's ``RequestRecord``) gets the stream error and parsed usage;
    ``watch`` (``on_headers()``, ``on_data(chunk)``: the in-flight entry and capture) sees the
    relayed headers and body.
    """
    scheme = b"https" if request.isSecure() else b"http"
    headers = peer_headers(request, target.peer, bool(app.config.api_keys), scheme)
    tap = UsageTap(app.response_observer_factory)
    http = app.peer_http
    for_peer = getattr(http, "for_peer", None)
    if for_peer is not None:
        http = for_peer(target.peer)

    def unreachable(reason: str) -> PeerUnreachable:
        return PeerUnreachable(f"peer '{target.peer.id}' unreachable for model '{target.label}': {reason}")

    def on_headers(response: Any) -> None:
        tap.on_headers(response)
        if watch is not None:
            watch.on_headers()

    def on_data(chunk: bytes) -> None:
        tap.on_data(chunk)
        if watch is not None:
            watch.on_data(chunk)

    try:
        outcome = await app.forwarder.forward(
            request, http=http, url=url, headers=headers, body=body,
            model_id=target.label, still_ready=lambda: True, on_headers=on_headers, on_data=on_data,
            unreachable=unreachable)
    finally:
        record.usage = tap.usage()
    record.stream_error = outcome.error
    return outcome
