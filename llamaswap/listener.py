"""The listening socket (CLI-3, CLI-6, CLI-7): ``ListenerService`` binds a server endpoint
description before twistd daemonizes when it can, so that a taken port or a bad endpoint is
one line on the launching terminal (:class:`StartupError`).
"""
from __future__ import annotations

import os
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["ListenerService", "StartupError", "describe_port"]


def describe_port(port: Any) -> str:
    """``tcp:127.0.0.1:41233`` / ``unix:/path`` for a listening port (CLI-7)."""
    host = port.getHost()
    kind = getattr(host, "type", "")
    if kind in ("TCP", "TCP6"):
        prefix = "tcp" if kind == "TCP" else "tcp6"
        return f"{prefix}:{host.host}:{host.port}"
    name = getattr(host, "name", None)
    if name is not None:
        return f"unix:{name.decode() if isinstance(name, bytes) else name}"
    return str(host)


class StartupError(Exception):
    """A startup failure; ``str`` is the one line the user sees (CLI-6)."""


def _reason(error: BaseException, filename: bool = False) -> str:
    """``address already in use`` / ``permission denied`` / the error's own text, on one line."""
    inner = getattr(error, "socketError", None)  # CannotListenError wraps the OSError
    if isinstance(inner, str) and "lock" in inner:  # a unix socket's lock held by a live process
        path = getattr(error, "port", b"")
        path = path.decode(errors="replace") if isinstance(path, bytes) else str(path)
        return f"address already in use (locked by {path}.lock)"
    error = inner or error
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.strerror}: {error.filename}" if filename and error.filename else error.strerror
    else:
        text = str(error).strip()
    text = " ".join(text.split()) or type(error).__name__
    return text[:1].lower() + text[1:]


class ListenerService(Service):
    """Listens on a server endpoint description (CLI-3).

    :meth:`bind` listens at once and raises :class:`StartupError`; ``make_service`` calls
    it before twistd daemonizes, so a taken port is reported by the launching process.
    Otherwise ``privilegedStartService`` binds. Either way ``on_listening(port)`` is
    called from ``privilegedStartService``, once twistd's log is running.

    :param label: ``--listen`` as the user wrote it, for error messages.
    """

    def __init__(self, description: str, factory: Any, reactor: Any, on_listening,
                 label: Optional[str] = None) -> None:
        self.description = description
        self.label = label or description
        self.factory = factory
        self.reactor = reactor
        self.on_listening = on_listening
        self.port = None
        self._pending: Optional[Deferred] = None

    def bind(self) -> None:
        if self.port is not None or self._pending is not None:
            return
        try:
            endpoint = endpoints.serverFromString(self.reactor, self.description)
        except Exception as e:
            raise StartupError(f"bad --listen endpoint '{self.label}': {_reason(e, filename=True)}") from None
        result: list = []
        d = endpoint.listen(self.factory)
        d.addBoth(result.append)
        if not result:  # an endpoint that binds later (rare): reported when it does
            self._pending = Deferred()
            d.addBoth(self._pending.callback)
        elif isinstance(result[0], Failure):
            raise StartupError(f"cannot listen on {self.label}: {_reason(result[0].value)}")
        else:
            self.port = result[0]

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self.bind()
        if self.port is not None:
            self._own_lock(self.port)
            self.on_listening(self.port)
        elif self._pending is not None:
            self._pending.addBoth(self._late)

    @staticmethod
    def _own_lock(port: Any) -> None:
        """A ``unix:`` endpoint locks ``<path>.lock`` (a symlink to the pid) by default. When
        twistd has forked since the bind, that is the launcher's pid, which exits once the
        daemon runs: point the lock at the daemon, or the next start would break it. The
        launcher waits for us until startup ends, so the lock is never stale meanwhile."""
        lock = getattr(port, "lockFile", None)
        name = getattr(lock, "name", None)
        if not getattr(lock, "locked", False) or name is None:
            return
        pid = os.getpid()
        try:
            if int(os.readlink(name)) == pid:
                return
            tmp = name + (b".%d" % pid if isinstance(name, bytes) else f".{pid}")
            os.symlink(str(pid), tmp)
            os.rename(tmp, name)
        except (OSError, ValueError) as e:
            Logger(namespace="llamaswap").warn("cannot take over the lock {lock}: {reason}",
                                               lock=name, reason=_reason(e, filename=True))

    def _late(self, result: Any) -> None:
        self._pending = None
        if isinstance(result, Failure):
            Logger(namespace="llamaswap").error("cannot listen on {endpoint}: {reason}",
                                                endpoint=self.label, reason=_reason(result.value))
            return
        self.port = result
        self.on_listening(result)

    def startService(self) -> None:
        if self.port is None and self._pending is None and not self.running:
            self.privilegedStartService()
        Service.startService(self)

    def stopService(self) -> Optional[Deferred]:
        Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return maybeDeferred(port.stopListening)
        return None
