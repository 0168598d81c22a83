"""``LlamaSwapService``: wires the log broadcaster, the router and the HTTP site together,
and owns the daemon's lifecycle (SPEC §2: CLI-7 startup order, CLI-8/9 signals and shutdown).
"""
from __future__ import annotations

import signal
from typing import Any, Optional

from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.logger import Logger, globalLogPublisher

from llamaswap import __version__
from llamaswap.logs import LogBroadcaster, ProxyLogObserver, make_logger
from llamaswap.process import UpstreamProcess
from llamaswap.proxy import Forwarder
from llamaswap.resources import AccessLogSite, App, build_root
from llamaswap.router import ModelRouter
from llamaswap.statefile import ChildRegistry, cleanup_leftovers

_LATER_KEY_PHASES = {"apiKeys", "hooks", "sendLoadingState", "peers", "memory"}


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


class ListenerService(Service):
    """Listens on a server endpoint description; a failure raises at startup (CLI-6)."""

    def __init__(self, description: str, factory: Any, reactor: Any, on_listening) -> None:
        self.description = description
        self.factory = factory
        self.reactor = reactor
        self.on_listening = on_listening
        self.port = None

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        endpoint = endpoints.serverFromString(self.reactor, self.description)
        d = endpoint.listen(self.factory)
        result: list = []
        d.addBoth(result.append)
        if result and not isinstance(result[0], Exception) and hasattr(result[0], "getHost"):
            self.port = result[0]
            self.on_listening(self.port)
        elif result:
            result[0].raiseException()
        else:  # an endpoint that binds later (rare): report when it does
            d.addCallback(self._late)

    def _late(self, port: Any) -> None:
        self.port = port
        self.on_listening(port)

    def startService(self) -> None:
        if self.port is None and not self.running:
            self.privilegedStartService()
        Service.startService(self)

    def stopService(self) -> Optional[Deferred]:
        Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return maybeDeferred(port.stopListening)
        return None


class LlamaSwapService(MultiService):
    """The top service: logs first in / last out, router, then the listener.

    :param config: the loaded ``Config``.
    :param reactor: the reactor (process spawning, TCP, time).
    :param listen: the endpoint description (already expanded from shorthands).
    :param state_file: where children are recorded (PROC-14).
    """

    def __init__(self, config: Any, reactor: Any, listen: str, state_file: str,
                 install_signals: bool = True) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.install_signals = install_signals
        self.logs = LogBroadcaster()
        self.proxy_log = ProxyLogObserver(self.logs, forward=globalLogPublisher,
                                          level=config.log_level, to_stdout=config.log_to_stdout)
        self.logs.upstream_line_observer = self.proxy_log.upstream_line
        self.log = make_logger(self.proxy_log, "llamaswap")
        self.registry = ChildRegistry(state_file, self.log)
        for model_id in config.models:
            self.logs.add_source(model_id)
        self.router = ModelRouter(config, self._make_process, reactor,
                                  make_logger(self.proxy_log, "llamaswap.router"))
        self.app = App(self.router, self.logs, Forwarder(reactor), reactor,
                       make_logger(self.proxy_log, "llamaswap.http"))
        self.site = AccessLogSite(build_root(self.app), self.app, reactor,
                                  make_logger(self.proxy_log, "llamaswap.access"))
        self.logs.setServiceParent(self)
        self.router.setServiceParent(self)
        self.listener = ListenerService(listen, self.site, reactor, self._listening)
        self.listener.setServiceParent(self)
        self._stopping = False
        self.startup_warnings: list[str] = []

    def _make_process(self, model: Any) -> UpstreamProcess:
        return UpstreamProcess(
            model=model, reactor=self.reactor, clock=self.reactor, logs=self.logs,
            health_timeout=self.config.health_check_timeout,
            on_spawn=self.registry.spawned, on_reap=self.registry.reaped,
            log=make_logger(self.proxy_log, "llamaswap.process"))

    # -- startup ----------------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        # CLI-7: leftover children of a crashed run die before we listen.
        cleanup_leftovers(self.registry.path, self.log)
        self.registry.write()
        self._log_config_warnings()
        super().privilegedStartService()

    def _log_config_warnings(self) -> None:
        for warning in self.config.warnings:
            self.log.warn("{warning}", warning=warning)
        for warning in self.startup_warnings:
            self.log.warn("{warning}", warning=warning)
        for path in self.config.later_keys:
            self.log.warn("config: '{path}' is not implemented yet (ignored)", path=path)
        if not self.config.models:
            self.log.warn("config: no models configured")

    def _listening(self, port: Any) -> None:
        where = describe_port(port)
        self.log.info("llamaswap {version} listening on {endpoint}", version=__version__, endpoint=where)
        if self.proxy_log.to_stdout not in ("proxy", "both"):
            # The twistd log always learns where we listen, whatever logToStdout says.
            Logger(namespace="llamaswap").info(
                "llamaswap {version} listening on {endpoint}", version=__version__, endpoint=where)
        host = port.getHost()
        if getattr(host, "type", "") in ("TCP", "TCP6") and host.host not in ("127.0.0.1", "::1") \
                and not self.config.api_keys:
            self.log.warn("listening on {host} without apiKeys: the API is unauthenticated",
                          host=host.host)

    def startService(self) -> None:
        super().startService()
        if self.install_signals:
            self.reactor.callWhenRunning(self._install_signal_handlers)

    def _install_signal_handlers(self) -> None:
        """CLI-8/CLI-9: the first TERM/INT stops the reactor (exit 0); later ones are ignored."""
        def on_stop_signal(signum: int, frame: Any) -> None:
            if self._stopping:
                return
            self._stopping = True
            self.reactor.callFromThread(self.reactor.stop)

        def on_hup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.reload)

        signal.signal(signal.SIGTERM, on_stop_signal)
        signal.signal(signal.SIGINT, on_stop_signal)
        signal.signal(signal.SIGHUP, on_hup)

    def reload(self) -> None:
        self.log.warn("config reload (SIGHUP) is not implemented yet; keeping the current config")

    # -- shutdown (CLI-9) ---------------------------------------------------------------------------

    def stopService(self) -> Deferred:
        self._stopping = True
        return ensureDeferred(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        Service.stopService(self)  # not MultiService's: that stops every child at once
        await maybeDeferred(self.listener.stopService)
        await maybeDeferred(self.router.stopService)  # fires once every child is gone
        self.registry.remove()
        self.log.info("llamaswap stopped")
        await maybeDeferred(self.logs.stopService)
