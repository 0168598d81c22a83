"""The TLS stack (pyOpenSSL and cryptography, ~12 MB resident), loaded only once something uses it.

Twisted loads it eagerly: importing ``twisted.internet.tcp`` (so any reactor),
``twisted.internet.endpoints`` or ``twisted.web.client`` tries to import pyOpenSSL, and each
falls back to working without TLS when that fails. A daemon that listens on plain TCP or a
unix socket and forwards to ``http://`` upstreams never uses it, yet carried it.

:func:`defer` imports those modules while pyOpenSSL is hidden, so they take their TLS-less
fallback, then unhides it: nothing has loaded the stack, and anything may load it later.
llamaswap's own clients reach ``https://`` upstreams and peers through
:func:`client_endpoint`, which loads the stack on first use and wraps the connection itself
(``TLSMemoryBIOFactory``, as ``twisted.internet.endpoints.wrapClientTLS`` does), so they do not
depend on those fallbacks. The twistd plugin calls :func:`defer` only when the listener needs
no TLS (an ``ssl:`` listener keeps Twisted's usual eager loading), and only in a process where
none of those modules is loaded yet; anywhere else it does nothing.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Any

from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

__all__ = ["TRY_TLS", "client_endpoint", "defer", "loaded"]

#: the modules that import pyOpenSSL if they can, and work without it (in import order)
TRY_TLS = ("twisted.internet.tcp", "twisted.internet.posixbase", "twisted.internet.endpoints",
           "twisted.web.client", "treq")


class _Hidden(importlib.abc.MetaPathFinder):
    """Refuses ``OpenSSL`` (and its submodules) while it is on ``sys.meta_path``."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "OpenSSL" or name.startswith("OpenSSL."):
            raise ImportError(f"{name} is loaded when a TLS connection first needs it", name=name)
        return None


def loaded() -> bool:
    """Whether the TLS stack is loaded in this process."""
    return "OpenSSL" in sys.modules


def defer() -> bool:
    """Import :data:`TRY_TLS` with pyOpenSSL hidden; True when that was done.

    Nothing happens (False) when pyOpenSSL or one of those modules is already loaded: they then
    have TLS as usual.
    """
    if loaded() or any(name in sys.modules for name in TRY_TLS):
        return False
    hidden = _Hidden()
    sys.meta_path.insert(0, hidden)
    try:
        for name in TRY_TLS:
            importlib.import_module(name)
    finally:
        sys.meta_path.remove(hidden)
    return True


def client_endpoint(host: str, inner: Any) -> "TLSClientEndpoint":
    """``inner`` (a TCP client endpoint to ``host``) wrapped in TLS, verified against ``host``
    with the platform's trust roots, as Agent's ``BrowserLikePolicyForHTTPS`` does."""
    from twisted.internet.ssl import optionsForClientTLS  # loads the TLS stack on first use

    return TLSClientEndpoint(optionsForClientTLS(host), inner)


@implementer(IStreamClientEndpoint)
class TLSClientEndpoint:
    """A client endpoint whose connections speak TLS over ``inner``'s.

    :param creator: an ``IOpenSSLClientConnectionCreator`` (``optionsForClientTLS``).
    :param inner: the endpoint of the underlying (TCP) connection.
    """

    def __init__(self, creator: Any, inner: Any) -> None:
        self.creator, self.inner = creator, inner

    def connect(self, factory: Any) -> Any:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        wrapped = TLSMemoryBIOFactory(self.creator, True, factory)
        return self.inner.connect(wrapped).addCallback(lambda protocol: protocol.wrappedProtocol)
