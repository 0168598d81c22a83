"""``LlamaSwapService``: wires the log broadcaster, the router and the HTTP site together,
and owns the daemon's lifecycle (CLI-7 startup order, CLI-8/9 signals and shutdown).
"""
from __future__ import annotations

import ipaddress
import os
import signal
from typing import TYPE_CHECKING, Any, Optional

from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

from llamaswap import __version__, ports
from llamaswap.errors import ShuttingDown
from llamaswap.events import EventHub, EventsPage
from llamaswap.logs import LogBroadcaster, ProxyLogObserver, make_logger
from llamaswap.metrics import Metrics, MetricsPage, response_parser
from llamaswap.observe import ModelEvent, Removed
from llamaswap.process import UpstreamProcess
from llamaswap.proxy import Forwarder, make_http_client
from llamaswap.router import ModelRouter
from llamaswap.statefile import ChildRegistry, cleanup_leftovers
from llamaswap.web.app import App
from llamaswap.web.site import AccessLogSite
from llamaswap.web.tree import build_root

if TYPE_CHECKING:
    from llamaswap.config import Config, ModelConfig

#: CLI-4: how often --watch-config looks at the file.
WATCH_INTERVAL = 2.0


def _stat_key(path: str) -> Optional[tuple]:
    """(mtime, size, inode) of the resolved target (symlinks followed), or None if missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _display_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else as is."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def startup_warnings(config: Config) -> list:
    """Every config warning of a startup, in order (CFG-4): the service logs them and
    ``make_service`` prints them when the log is not on the terminal."""
    warnings = list(config.warnings)
    warnings += [f"config: '{path}' is not implemented yet (ignored)" for path in config.later_keys]
    if not config.models:
        warnings.append("config: no models configured")
    return warnings


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


class LlamaSwapService(MultiService):
    """The top service: logs first in / last out, router, then the listener.

    :param config: the loaded ``Config``.
    :param reactor: the reactor (process spawning, TCP, time).
    :param listen: the endpoint description (already expanded from shorthands).
    :param state_file: where children are recorded (PROC-14).
    :param listen_label: ``--listen`` as the user wrote it, for error messages.
    :param pidfile: twistd's pidfile, recorded in the state file.
    """

    def __init__(self, config: Config, reactor: Any, listen: str, state_file: str,
                 install_signals: bool = True, config_path: Optional[str] = None,
                 watch_config: bool = False, listen_label: Optional[str] = None,
                 pidfile: Optional[str] = None) -> None:
        super().__init__()
        self.config = config
        self.config_path = config_path or config.source
        # for the startup line; taken now, before twistd may change directory
        self.config_label = _display_path(self.config_path) if config_path else self.config_path
        self.watch_config = watch_config
        self._watch = None
        # taken now, close to when the file was read, so a change made before the
        # watcher's first tick (or even before we listen) is still seen (CLI-4)
        self._watched = _stat_key(self.config_path) if self.config_path else None
        self.reactor = reactor
        self.install_signals = install_signals
        self.logs = LogBroadcaster()
        self.proxy_log = ProxyLogObserver(self.logs, forward=globalLogPublisher,
                                          level=config.log_level, to_stdout=config.log_to_stdout)
        self.logs.upstream_line_observer = self.proxy_log.upstream_line
        self.log = make_logger(self.proxy_log, "llamaswap")
        self.registry = ChildRegistry(state_file, self.log, pidfile=pidfile)
        for model_id in config.models:
            self.logs.add_source(model_id)
        self.router = ModelRouter(config, self._make_process, reactor,
                                  make_logger(self.proxy_log, "llamaswap.router"))
        self.router.observers.add(self._on_model_removed)
        self.app = App(self.router, self.logs, Forwarder(reactor), reactor,
                       make_logger(self.proxy_log, "llamaswap.http"))
        self.app.reload = self.reload
        self._observe(config)
        extra = {"/metrics": MetricsPage(self.metrics.registry), "/api/events": EventsPage(self.events)}
        self.site = AccessLogSite(build_root(self.app, extra), self.app, reactor,
                                  make_logger(self.proxy_log, "llamaswap.access"))
        self.logs.setServiceParent(self)
        self.router.setServiceParent(self)
        self.listener = ListenerService(listen, self.site, reactor, self._listening, label=listen_label)
        self.listener.setServiceParent(self)
        self._stopping = False
        self._bound = False

    def _observe(self, config: Config) -> None:
        """Metrics (MET-*) and the event hub (EVT-*) follow the router, requests and logs."""
        self.metrics = Metrics(config.models)
        self.router.observers.add(self.metrics.observe)
        self.logs.on_dropped = self.metrics.log_bytes_dropped
        self.on_reload = self.metrics.reload
        self.events = EventHub(config.models, self.logs, self.reactor,
                               log=make_logger(self.proxy_log, "llamaswap.events"))
        self.router.observers.add(self.events.observe)
        self.app.response_observer_factory = response_parser
        self.app.request_listeners += [self.metrics.request_finished, self.events.request_finished]

    def _make_process(self, model: ModelConfig) -> UpstreamProcess:
        return UpstreamProcess(
            model=model, reactor=self.reactor, clock=self.reactor, logs=self.logs,
            on_spawn=self.registry.spawned, on_reap=self.registry.reaped, ports=ports.SYSTEM,
            http_factory=make_http_client, log=make_logger(self.proxy_log, "llamaswap.process"))

    # -- startup ----------------------------------------------------------------------------------

    def bind(self) -> None:
        """CLI-7: kill a crashed run's leftover children, then bind the listener.

        ``make_service`` calls this before twistd daemonizes, so that a failure is one line
        on the launching terminal (raises :class:`StartupError`); otherwise
        ``privilegedStartService`` does. Nothing is written yet: a failed start leaves no
        state file.
        """
        if self._bound:
            return
        cleanup_leftovers(self.registry.path, self.log)
        self.registry.remove()  # a dead daemon's record, dealt with: ours is written once we run
        self.listener.bind()
        self._bound = True

    def privilegedStartService(self) -> None:
        self.bind()
        # written after twistd daemonized (the daemon's own pid), before we say we listen
        self.registry.write()
        self._log_config_warnings()
        super().privilegedStartService()  # the listener reports where it listens

    def _log_config_warnings(self) -> None:
        for warning in startup_warnings(self.config):
            self.log.warn("{warning}", warning=warning)

    def ui_url(self, port: Any) -> Optional[str]:
        """Where a browser on this machine finds the UI (UI-1); None for a unix socket."""
        host = port.getHost()
        if getattr(host, "type", "") not in ("TCP", "TCP6"):
            return None
        name = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host.host, host.host)
        if ":" in name:
            name = "[" + name.replace("%", "%25") + "]"
        scheme = "https" if self.listener.description.startswith("ssl:") else "http"
        return f"{scheme}://{name}:{host.port}/ui/"

    def _listening(self, port: Any) -> None:
        # CLI-7: "llamaswap <version> listening on <endpoint>" first: tests and tools parse it.
        n = len(self.config.models)
        fmt = "llamaswap {version} listening on {endpoint}; {count} from {config}"
        fields = dict(version=__version__, endpoint=describe_port(port),
                      count=f"{n} model" if n == 1 else f"{n} models", config=self.config_label)
        ui = self.ui_url(port)
        if ui:
            fmt += "; UI at {ui}"
            fields["ui"] = ui
        self.log.info(fmt, **fields)
        if self.proxy_log.to_stdout not in ("proxy", "both") or self.proxy_log.level not in ("debug", "info"):
            # The twistd log always learns where we listen, whatever logToStdout and logLevel say.
            Logger(namespace="llamaswap").info(fmt, **fields)
        host = port.getHost()
        if getattr(host, "type", "") in ("TCP", "TCP6") and not _is_loopback(host.host) \
                and not self.config.api_keys:
            self.log.warn("listening on {host} without apiKeys: the API is unauthenticated",
                          host=host.host)
        # CLI-7: preload runs after the listener is up (and once the reactor runs).
        self.reactor.callWhenRunning(self._startup_preload)

    def _startup_preload(self) -> None:
        if self.router.config.preload and not self._stopping:
            self.preload(list(self.router.config.preload))

    def preload(self, names: list) -> Deferred:
        """CFG-30: admit every listed model (ids or aliases) to the scheduler at once, in list
        order, like EP-7; unknown names log a WARN and are skipped; a failure logs an ERROR
        and the others go on. Fires (never fails) once every load has ended."""
        config = self.router.config
        ids: list = []
        for name in names:
            model_id = config.resolve(name)
            if model_id is None:
                self.log.warn("preload: unknown model '{name}' (skipped)", name=name)
            elif model_id not in ids:
                ids.append(model_id)
        loads = []
        for model_id in ids:
            self.log.info("preloading {model}", model=model_id)
            d = self.router.load(model_id)
            d.addErrback(self._preload_failed, model_id)
            loads.append(d)
        return DeferredList(loads, consumeErrors=True).addCallback(lambda _: None)

    def _preload_failed(self, failure: Any, model_id: str) -> None:
        error = failure.value
        reason = getattr(error, "message", None) or str(error) or type(error).__name__
        if isinstance(error, ShuttingDown):
            self.log.info("preload of '{model}' abandoned: {reason}", model=model_id, reason=reason)
        else:
            self.log.error("preload of '{model}' failed: {reason}", model=model_id, reason=reason)

    def startService(self) -> None:
        super().startService()
        if self.watch_config:
            self._start_watching()
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
            self.reactor.callFromThread(self._safe_reload)

        signal.signal(signal.SIGTERM, on_stop_signal)
        signal.signal(signal.SIGINT, on_stop_signal)
        signal.signal(signal.SIGHUP, on_hup)

    def reload(self) -> dict:
        """RLD-1..RLD-5: re-read the config file and apply it.

        Returns the RLD-5 outcome; raises ``ConfigError`` (after logging every line) when
        the new file is invalid, and the old config stays in force. Synchronous, so two
        reloads can never interleave (RLD-1).
        """
        from llamaswap.config import ConfigError, load_config

        try:
            new = load_config(self.config_path, port_in_use=self._port_taken_by_others)
        except ConfigError as e:
            self.log.error("config reload failed, keeping previous config:\n{errors}",
                           errors="\n".join(e.errors))
            self._reload_observed("failure")
            raise
        old = self.config
        for model_id in new.models.keys() - old.models.keys():
            self.logs.add_source(model_id)
        outcome = self.router.reconfigure(new)
        self.config = new
        self.proxy_log.set_level(new.log_level)
        self.proxy_log.set_to_stdout(new.log_to_stdout)
        for warning in new.warnings:
            self.log.warn("{warning}", warning=warning)
        self.log.info("config reloaded: added=[{added}] removed=[{removed}] changed=[{changed}] "
                      "unchanged={unchanged}", added=", ".join(outcome["added"]),
                      removed=", ".join(outcome["removed"]), changed=", ".join(outcome["changed"]),
                      unchanged=len(outcome["unchanged"]))
        self._preload_after_reload(old, new, outcome)
        self._reload_observed("success")
        return outcome

    def _port_taken_by_others(self, port: int) -> bool:
        """``${PORT}`` allocation at reload: our own children's ports count as free, so
        unchanged models keep their port (and their running child)."""
        own = set()
        for proc in self.router.processes():
            if proc.state.value in ("starting", "ready", "stopping"):
                own |= ports.claimed_ports(proc.model)
        return port not in own and ports.port_in_use(port)

    def _preload_after_reload(self, old: Config, new: Config, outcome: dict) -> None:
        """CFG-30: preload again when the list changed or a listed model was added/changed."""
        preload = getattr(self, "preload", None)
        if preload is None or not new.preload:
            return
        touched = set(outcome["added"]) | set(outcome["changed"])
        listed = {new.resolve(name) for name in new.preload}
        if tuple(old.preload) != tuple(new.preload) or listed & touched:
            preload(list(new.preload))

    def _reload_observed(self, result: str) -> None:
        listener = getattr(self, "on_reload", None)
        if listener is not None:
            listener(result)

    def _on_model_removed(self, event: ModelEvent) -> None:
        """``IModelObserver``: a model removed by a reload loses its log source."""
        if isinstance(event, Removed) and event.model not in self.config.models:
            self.logs.remove_source(event.model)

    def _safe_reload(self) -> None:
        from llamaswap.config import ConfigError

        try:
            self.reload()
        except ConfigError:
            pass
        except Exception:
            self.log.failure("config reload crashed")

    # -- --watch-config (CLI-4) ---------------------------------------------------------------------

    def _start_watching(self) -> None:
        from twisted.internet.task import LoopingCall

        self._missing_warned = False
        self._watch = LoopingCall(self._check_config_file)
        self._watch.clock = self.reactor
        self._watch.start(WATCH_INTERVAL, now=False)

    def _check_config_file(self) -> None:
        key = _stat_key(self.config_path)
        if key is None:
            if not self._missing_warned:
                self._missing_warned = True
                self.log.warn("config file {path} is missing; keeping the current config",
                              path=self.config_path)
            self._watched = None
            return
        self._missing_warned = False
        if key != self._watched:
            self._watched = key
            self._safe_reload()

    # -- shutdown (CLI-9) ---------------------------------------------------------------------------

    def stopService(self) -> Deferred:
        self._stopping = True
        return ensureDeferred(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        Service.stopService(self)  # not MultiService's: that stops every child at once
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        await maybeDeferred(self.listener.stopService)
        await maybeDeferred(self.router.stopService)  # fires once every child is gone
        peer_pool = getattr(self.app, "peer_pool", None)
        if peer_pool is not None:
            await peer_pool.closeCachedConnections()  # idle keep-alives to peers
        self.events.stopService()  # open /api/events streams end cleanly
        self.registry.remove()
        self.log.info("llamaswap stopped")
        await maybeDeferred(self.logs.stopService)
