"""The composition root: ``LlamaSwapService`` builds every part of the daemon, each one
complete through its constructor, and owns the daemon's lifecycle (CLI-7 startup order,
CLI-8/9 signals and shutdown, RLD-* reloads, CFG-30 preload).

The parts are built in dependency order (what reports comes before what it reports on),
and the long-lived ones are child services, added in the order they must start::

    LlamaSwapService (SequentialMultiService)
    ├─ LogBroadcaster       log rings and /logs streams: first in, last out
    ├─ StateFileService     children.json: written once the daemon runs, removed at the end
    ├─ EventHub             /api/events clients, ended cleanly at shutdown
    ├─ ActivityLog          /api/metrics/*: pending activity written to store.path before it stops
    ├─ PerformanceMonitor   /api/performance samples (absent with performance.disabled)
    ├─ HTTPPools            per-child upstream pools: idle connections closed
    ├─ PeerPool             the peers' client and pool: idle connections closed
    ├─ ModelRouter          the models; its stop waits until every child is gone
    ├─ ListenerService      the socket: the first to stop, so nothing new comes in
    └─ ConfigWatcher        --watch-config only (ConfigDirWatcher too with --config-dir)

The web layer needs ``reload`` from this service, and the listener tells it when it
listens: those two cycles are closed by handing bound methods to the constructors.
"""
from __future__ import annotations

import ipaddress
import os
import signal
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred
from twisted.logger import Logger, globalLogPublisher

from llamaswap import __version__, ports, runtime
from llamaswap.activity import ActivityLog
from llamaswap.captures import CaptureBuffer
from llamaswap.errors import ShuttingDown
from llamaswap.events import EventHub, EventsPage
from llamaswap.config.keepcache import cache_root_for, rebase_cache_root
from llamaswap.footprint import NeedBook, needbook_path
from llamaswap.kvcache import KvCache
from llamaswap.listener import ListenerService, StartupError, describe_port
from llamaswap.keepalive import KeepAlive
from llamaswap.logs import LogBroadcaster
from llamaswap.failover import BreakerCollector
from llamaswap.metrics import Metrics, MetricsPage, response_parser
from llamaswap.observe import ModelEvent, Removed
from llamaswap.pacing import Pacer
from llamaswap.peers import PeerPool
from llamaswap.performance import make_performance_monitor
from llamaswap.pools import HTTPPools
from llamaswap.process import UpstreamProcess
from llamaswap.proxy import Forwarder
from llamaswap.proxylog import ProxyLogObserver, TwistdLogCopy, make_logger
from llamaswap.router import ModelRouter
from llamaswap.statefile import ChildRegistry, cleanup_leftovers
from llamaswap.watch import ConfigDirWatcher, ConfigWatcher
from llamaswap.web.activity import activity_pages
from llamaswap.web.context import WebContext
from llamaswap.web.site import AccessLogSite
from llamaswap.web.tree import build_root

if TYPE_CHECKING:
    from llamaswap.config import Config, ModelConfig

__all__ = ["LlamaSwapService", "SequentialMultiService", "StartupError", "StateFileService",
           "startup_warnings"]


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


class SequentialMultiService(MultiService):
    """A ``MultiService`` whose children stop one at a time, the last added first.

    ``MultiService`` starts its children in order and stops them in reverse order, but all
    at once: it asks every child to stop, then waits for all of them. The daemon needs
    each stop to be over before the next begins: the listener must have stopped accepting
    before the router stops the models, every child must be gone before the pools that
    served it are closed, and the log must still record while all of that happens. So the
    next child's ``stopService`` is called only once the previous one's Deferred fired.
    A child whose stop fails is logged, and the others still stop.
    """

    log = Logger(namespace="llamaswap")

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return ensureDeferred(self._stop_children())

    async def _stop_children(self) -> None:
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("stopping {service} failed", service=type(child).__name__)


class StateFileService(Service):
    """The children state file (PROC-14) over the daemon's life.

    Written in ``privilegedStartService``, that is after twistd daemonized (so it records
    the daemon's own pid) and before the listener says where it listens. Removed when the
    daemon stops: this child stops right before the log, after every model, connection and
    stream is gone, so "llamaswap stopped" is logged here.
    """

    name = "state-file"

    def __init__(self, registry: ChildRegistry, log: Logger) -> None:
        self._registry = registry
        self._log = log

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._registry.write()

    def stopService(self) -> None:
        super().stopService()
        self._registry.remove()
        self._log.info("llamaswap stopped")


class LlamaSwapService(SequentialMultiService):
    """The daemon: builds every part (see the module docstring for the tree) and runs it.

    :param config: the loaded ``Config``.
    :param reactor: the reactor (process spawning, TCP, time).
    :param listen: the endpoint description (already expanded from shorthands).
    :param state_file: where children are recorded (PROC-14); measured memory needs are
        kept beside it.
    :param install_signals: take over SIGTERM, SIGINT and SIGHUP once the reactor runs.
    :param config_path: the config file, for reloads (default: ``config.source``).
    :param watch_config: reload when the file changes (CLI-4).
    :param listen_label: ``--listen`` as the user wrote it, for error messages.
    :param pidfile: twistd's pidfile, recorded in the state file.
    :param config_dir: ``--config-dir``: its config files are merged after ``config_path`` (if
        any) at every reload, and ``watch_config`` watches it too.
    """

    def __init__(self, config: Config, reactor: Any, listen: str, state_file: str,
                 install_signals: bool = True, config_path: Optional[str] = None,
                 watch_config: bool = False, listen_label: Optional[str] = None,
                 pidfile: Optional[str] = None, config_dir: Optional[str] = None) -> None:
        super().__init__()
        self._cache_root = cache_root_for(state_file)  # keepCache: ${CACHE_DIR} beside the state file
        config = rebase_cache_root(config, self._cache_root)
        self.config = config
        self.config_dir = config_dir
        self.config_path = config_path or (None if config_dir else config.source)
        # for the startup line; taken now, before twistd may change directory
        self.config_label = _display_path(self.config_path) if config_path else self.config_path
        if config_dir:
            from llamaswap.config.merge import sources_label
            self.config_label = sources_label(self.config_label, _display_path(config_dir))
        self.reactor = reactor
        self.install_signals = install_signals
        self._stopping = False
        self._bound = False

        # what observes comes first: everything built below reports to it
        self.metrics = Metrics(config.models, key_names=[k.name for k in config.api_key_scopes] or None)
        stdout_copy = TwistdLogCopy(globalLogPublisher, to_stdout=config.log_to_stdout)
        self.logs = LogBroadcaster(on_dropped=self.metrics.log_bytes_dropped,
                                   upstream_line_observer=stdout_copy.upstream_line)
        for model_id in config.models:
            self.logs.add_source(model_id)
        self.proxy_log = ProxyLogObserver(self.logs, level=config.log_level, copy=stdout_copy,
                                          time_format=config.log_time_format)
        self.log = make_logger(self.proxy_log, "llamaswap")
        self.events = EventHub(config.models, self.logs, reactor,
                               log=make_logger(self.proxy_log, "llamaswap.events"))
        # request activity (memory or store.path) and host samples for /api/metrics/*, /api/performance
        # request/response captures (captureBuffer, read at each capture): /api/captures, has_capture
        self.captures = CaptureBuffer(lambda: self.config.capture_buffer_mb)
        self.activity = ActivityLog(reactor, make_logger(self.proxy_log, "llamaswap.activity"),
                                    store_path=config.store_path, max_in_memory=config.metrics_max_in_memory,
                                    has_capture=self.captures.has)
        self.performance = make_performance_monitor(reactor, config.performance_disabled, config.performance_every,
                                                    make_logger(self.proxy_log, "llamaswap.performance"))

        # the models: what each child needs, then the router that builds them
        self.registry = ChildRegistry(state_file, self.log, pidfile=pidfile)
        # measured memory needs, beside the state file (children.json -> children.needs.json)
        self.needs = NeedBook.load(needbook_path(state_file))
        if self.needs.last_error:
            self.log.warn("{error}; measured memory needs start afresh", error=self.needs.last_error)
        self.pools = HTTPPools()
        # keepCache and hooks (llamaswap.kvcache): every process's lifecycle around starts and stops
        self.kv = KvCache(reactor, make_logger(self.proxy_log, "llamaswap.kvcache"), config.models,
                          on_saved=self.metrics.kv_saved, on_restored=self.metrics.kv_restored)
        self.router = ModelRouter(config, self._make_process, reactor,
                                  make_logger(self.proxy_log, "llamaswap.router"), needs=self.needs)
        self.router.observers.add(self._on_model_removed, queue=False)
        self.router.observers.add(self.metrics.observe)
        self.router.observers.add(self.events.observe)
        self.metrics.registry.register(BreakerCollector(self.router.failover))  # failover selectors
        # restart: on-failure and healthInterval (llamaswap.keepalive); it observes the router too
        self.keepalive = KeepAlive(self.router, reactor, self.logs,
                                   make_logger(self.proxy_log, "llamaswap.keepalive"))
        self.router.observers.add(self.kv.observe, queue=False)  # a removed model's saved KV cache is deleted

        # the web side: one context for every resource, the site, the socket
        self.peers = PeerPool(reactor)
        web = WebContext(self.router, self.logs, Forwarder(reactor), reactor,
                         log=make_logger(self.proxy_log, "llamaswap.http"), reload=self.reload,
                         request_listeners=(self.metrics.request_finished, self.events.request_finished,
                                            self.activity.request_finished),
                         request_ids=self.activity.next_id,
                         response_observer_factory=response_parser, peer_http=self.peers.http,
                         captures=self.captures)
        extra = {"/metrics": MetricsPage(self.metrics.registry), "/api/events": EventsPage(self.events)}
        extra.update(activity_pages(self.activity, self.performance,
                                    make_logger(self.proxy_log, "llamaswap.http")))
        self.site = AccessLogSite(build_root(web, extra), web, reactor,
                                  make_logger(self.proxy_log, "llamaswap.access"), pacer=Pacer(reactor))
        self.listener = ListenerService(listen, self.site, reactor, self._listening, label=listen_label)

        children = [self.logs, StateFileService(self.registry, self.log), self.events, self.activity,
                    *([self.performance] if self.performance else []), self.pools,
                    self.peers, self.router, self.keepalive, self.listener]
        if watch_config and self.config_path:
            children.append(ConfigWatcher(self.config_path, reactor, self._safe_reload, self.log))
        if watch_config and config_dir:
            children.append(ConfigDirWatcher(config_dir, reactor, self._safe_reload, self.log))
        for child in children:
            child.setServiceParent(self)

    def _make_process(self, model: ModelConfig, on_transition: Callable) -> UpstreamProcess:
        return UpstreamProcess(
            model=model, reactor=self.reactor, clock=self.reactor, logs=self.logs, on_transition=on_transition,
            on_spawn=self.registry.spawned, on_reap=self.registry.reaped, ports=ports.SYSTEM,
            http_factory=self.pools.for_child, lifecycle=self.kv,
            log=make_logger(self.proxy_log, "llamaswap.process"))

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
        self.activity.open()  # an unusable store.path is a StartupError naming it
        self.listener.bind()
        self._bound = True

    def privilegedStartService(self) -> None:
        self.bind()
        self._log_config_warnings()
        # children in order: the state file is written (after twistd daemonized: the
        # daemon's own pid), then the listener reports where it listens
        super().privilegedStartService()

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
        if self.install_signals:
            self.reactor.callWhenRunning(self._install_signal_handlers)
            # the daemon owns the process: tune it once startup's objects all exist
            self.reactor.callWhenRunning(runtime.settle)

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
        from llamaswap.config import ConfigError, load_config_sources

        try:
            new = load_config_sources(self.config_path, self.config_dir, port_in_use=self._port_taken_by_others)
        except ConfigError as e:
            self.log.error("config reload failed, keeping previous config:\n{errors}",
                           errors="\n".join(e.errors))
            self.metrics.reload("failure")
            raise
        new = rebase_cache_root(new, self._cache_root)
        old = self.config
        for model_id in new.models.keys() - old.models.keys():
            self.logs.add_source(model_id)
        outcome = self.router.reconfigure(new)
        self.config = new
        self.proxy_log.set_level(new.log_level)
        self.proxy_log.set_to_stdout(new.log_to_stdout)
        self.metrics.set_key_names([k.name for k in new.api_key_scopes] or None)
        self.proxy_log.set_time_format(new.log_time_format)
        self.activity.reconfigure(new.store_path, new.metrics_max_in_memory)
        if self.performance is not None:
            self.performance.reconfigure(new.performance_disabled, new.performance_every)
        for warning in new.warnings:
            self.log.warn("{warning}", warning=warning)
        self.log.info("config reloaded: added=[{added}] removed=[{removed}] changed=[{changed}] "
                      "unchanged={unchanged}", added=", ".join(outcome["added"]),
                      removed=", ".join(outcome["removed"]), changed=", ".join(outcome["changed"]),
                      unchanged=len(outcome["unchanged"]))
        self._preload_after_reload(old, new, outcome)
        self.metrics.reload("success")
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
        if not new.preload:
            return
        touched = set(outcome["added"]) | set(outcome["changed"])
        listed = {new.resolve(name) for name in new.preload}
        if tuple(old.preload) != tuple(new.preload) or listed & touched:
            self.preload(list(new.preload))

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

    # -- shutdown (CLI-9) ---------------------------------------------------------------------------

    def stopService(self) -> Deferred:
        """Stop the children one by one, the last added first (see the module docstring)."""
        self._stopping = True
        return super().stopService()
