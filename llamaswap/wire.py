"""Sending on a TCP connection now rather than at the reactor's next turn.

Twisted's transports queue what is written and send it when the reactor next finds the socket
writable: each write registers the socket for writability (an ``epoll_ctl``), the reactor's
poll reports it, the data is sent, and the socket is unregistered (another ``epoll_ctl``), all
after everything else the current event causes has run. On the data path (a forwarded
request, a response's head and body, every streamed chunk) that costs a wait and three system
calls per write. :func:`write_now` sends straight away whatever the socket takes when nothing
is queued before it; :func:`send_queued` sends what is queued. Anything the socket does not
take, any error, and every other kind of transport (TLS, UNIX sockets, test transports) keep
Twisted's own path.
"""
from __future__ import annotations

from typing import Any

from twisted.internet import tcp

__all__ = ["send_queued", "write_now"]

_TCP = (tcp.Client, tcp.Server)


def _idle(transport: Any) -> bool:
    """A connected TCP transport with nothing queued and no close under way."""
    if type(transport) not in _TCP or not transport.connected or transport.disconnecting:
        return False
    try:
        return not transport._tempDataBuffer and transport.offset == len(transport.dataBuffer) \
            and not transport._writeDisconnecting
    except AttributeError:  # pragma: no cover - a FileDescriptor without that layout
        return False


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sent at once as far as the socket takes it when the transport
    is an idle TCP connection; the rest, if any, is queued as usual."""
    if data and _idle(transport):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            if sent == len(data):
                return
            data = data[sent:]
        # nothing sent, or an error: Twisted's own write path finds it
    transport.write(data)


def send_queued(transport: Any) -> None:
    """Send what a connection has queued at once, as far as the socket takes it.

    For a TCP connection (also the one beneath TLS) with nothing stopping it; whatever the
    socket does not take, or any error, is left to the reactor as usual. Other transports
    are left alone.
    """
    if transport is not None and type(transport) not in _TCP:
        transport = getattr(transport, "transport", None)  # TLS: the connection beneath
    if type(transport) not in _TCP or not transport.connected or transport.disconnecting:
        return
    try:
        if transport._writeDisconnecting or not (
                transport._tempDataBuffer or transport.offset < len(transport.dataBuffer)):
            return
    except AttributeError:  # pragma: no cover - a FileDescriptor without that layout
        return
    if transport.doWrite() is not None:
        transport.startWriting()  # the reactor calls doWrite again and handles what it says
