"""``HTTPPools``: the upstream connection pools, owned by one service.

Every child lifetime gets a client on a fresh pool of its own (PROXY-10: a connection is
never reused across children); the ``UpstreamProcess`` closes it when its child exits.
This service makes them (it is each process's ``http_factory``) and, when the daemon
stops, closes the idle connections of any that are still open, after the router has
stopped every child.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList

from llamaswap.proxy import make_http_client

__all__ = ["HTTPPools"]


class HTTPPools(Service):
    """Makes the per-child treq clients and closes their pools' cached connections at stop.

    :param make_client: ``(reactor) -> (client, pool)``; ``proxy.make_http_client``.
    """

    name = "http-pools"

    def __init__(self, make_client: Callable[[Any], tuple] = make_http_client) -> None:
        self._make_client = make_client
        self._pools: weakref.WeakSet = weakref.WeakSet()  # a pool its process dropped may go

    def for_child(self, reactor: Any) -> tuple:
        """``UpstreamProcess.http_factory``: a client on a new pool, for one child lifetime."""
        client, pool = self._make_client(reactor)
        self._pools.add(pool)
        return client, pool

    def stopService(self) -> Deferred:
        """Close the idle keep-alive connections of every pool still open."""
        super().stopService()
        closing = [pool.closeCachedConnections() for pool in list(self._pools)]
        return DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)
