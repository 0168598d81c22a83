"""
llamaswap's own log: the observer behind every llamaswap ``Logger`` (LOG-4, LOG-6, CFG-11, CFG-12).

* :class:`ProxyLogObserver` filters by ``logLevel`` and stores ``[LEVEL] message`` lines in
  the ``proxy`` log source of a ``LogBroadcaster``;
* :class:`TwistdLogCopy` decides, by ``logToStdout``, what also goes to the twistd log: proxy
  events (from the observer) and child output lines (from the broadcaster).

The two share one :class:`TwistdLogCopy`, built first, so that each is built complete::

    copy = TwistdLogCopy(globalLogPublisher, to_stdout=config.log_to_stdout)
    logs = LogBroadcaster(upstream_line_observer=copy.upstream_line)
    proxy_log = ProxyLogObserver(logs, level=config.log_level, copy=copy)

Modules get a logger bound to the observer by constructor injection, never from a
module-level global (pitfall 13)::

    log = make_logger(proxy_log, "llamaswap.router")
    router = ModelRouter(..., log=log)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    eventAsText,
    globalLogPublisher,
)
from zope.interface import implementer

if TYPE_CHECKING:
    from llamaswap.logs import LogBroadcaster

__all__ = [
    "LEVELS",
    "LOG_TO_STDOUT_VALUES",
    "ProxyLogObserver",
    "TwistdLogCopy",
    "format_proxy_line",
    "make_logger",
]

LEVELS = ("debug", "info", "warn", "error")
LOG_TO_STDOUT_VALUES = ("proxy", "upstream", "both", "none")

_LABEL = {LogLevel.debug: "DEBUG", LogLevel.info: "INFO", LogLevel.warn: "WARN", LogLevel.error: "ERROR",
          LogLevel.critical: "ERROR"}


def _log_level(level: str) -> LogLevel:
    """The ``LogLevel`` of a ``logLevel`` setting (any case); the names are Twisted's own."""
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}")
    return LogLevel.levelWithName(level.lower())


def _check_to_stdout(value: str) -> str:
    if value not in LOG_TO_STDOUT_VALUES:
        raise ValueError(f"unknown logToStdout {value!r}; use one of {', '.join(LOG_TO_STDOUT_VALUES)}")
    return value


class TwistdLogCopy:
    """
    What of llamaswap's log also goes to the twistd log, as ``logToStdout`` says (CFG-12, LOG-6).

    :param forward: the twistd log publisher (``globalLogPublisher`` in production).
    :param to_stdout: ``proxy``, ``upstream``, ``both`` or ``none``.
    :raises ValueError: for any other ``to_stdout``.
    """

    def __init__(self, forward: ILogObserver = globalLogPublisher, to_stdout: str = "proxy") -> None:
        self._forward = forward
        self._to_stdout = _check_to_stdout(to_stdout)
        self._upstream_log = Logger(namespace="llamaswap.upstream", observer=forward)

    @property
    def to_stdout(self) -> str:
        return self._to_stdout

    def set_to_stdout(self, value: str) -> None:
        """Change what goes to the twistd log (config reload, CFG-12)."""
        self._to_stdout = _check_to_stdout(value)

    def proxy_event(self, event: dict) -> None:
        """Forward one proxy log event unchanged when ``to_stdout`` is ``proxy`` or ``both``."""
        if self._to_stdout in ("proxy", "both"):
            self._forward(event)

    def upstream_line(self, model_id: str, line: str) -> None:
        """
        Send one line of child output as ``[<id>] <line>`` when ``to_stdout`` is ``upstream``
        or ``both`` (LOG-6): the ``LogBroadcaster``'s ``upstream_line_observer``.
        """
        if self._to_stdout in ("upstream", "both"):
            self._upstream_log.info("[{model}] {line}", model=model_id, line=line)


@implementer(ILogObserver)
class ProxyLogObserver:
    """
    The observer behind every llamaswap ``Logger``.

    Events below the level are dropped by a ``FilteringLogObserver`` with a
    ``LogLevelFilterPredicate``: neither stored nor forwarded (LOG-4).  Like every such
    predicate it also drops events without a level or namespace (a ``Logger`` always sets
    both).  Other events are stored in the ``proxy`` source as ``[LEVEL] <formatted
    message>\\n`` (with the traceback of ``log_failure`` on the following lines) and handed
    to the :class:`TwistdLogCopy` (forwarded unchanged when ``to_stdout`` is ``proxy`` or
    ``both``, LOG-6).

    :param broadcaster: where the ``proxy`` lines go.
    :param forward: the twistd log publisher (``globalLogPublisher`` in production); used
        only when ``copy`` is not given.
    :param level: ``debug``, ``info``, ``warn`` or ``error`` (any case; CFG-11).
    :param to_stdout: ``proxy``, ``upstream``, ``both`` or ``none`` (CFG-12); used only when
        ``copy`` is not given.
    :param copy: the :class:`TwistdLogCopy` shared with the broadcaster's line observer.
    :raises ValueError: for any other ``level`` / ``to_stdout``.
    """

    def __init__(
        self,
        broadcaster: LogBroadcaster,
        forward: ILogObserver = globalLogPublisher,
        level: str = "info",
        to_stdout: str = "proxy",
        copy: Optional[TwistdLogCopy] = None,
    ) -> None:
        self._broadcaster = broadcaster
        self._predicate = LogLevelFilterPredicate(defaultLogLevel=_log_level(level))
        self._filtered = FilteringLogObserver(self._emit, [self._predicate])
        self._copy = copy if copy is not None else TwistdLogCopy(forward, to_stdout)

    @property
    def level(self) -> str:
        return self._predicate.logLevelForNamespace("").name

    @property
    def to_stdout(self) -> str:
        return self._copy.to_stdout

    def set_level(self, level: str) -> None:
        """Change the minimum level (config reload, CFG-11)."""
        self._predicate.setLogLevelForNamespace("", _log_level(level))

    def set_to_stdout(self, value: str) -> None:
        """Change what goes to the twistd log (config reload, CFG-12)."""
        self._copy.set_to_stdout(value)

    def __call__(self, event: dict) -> None:
        self._filtered(event)

    def _emit(self, event: dict) -> None:
        """Store and forward one event that passed the level filter."""
        self._broadcaster.write_proxy(format_proxy_line(event, _LABEL[event["log_level"]]))
        self._copy.proxy_event(event)

    def upstream_line(self, model_id: str, line: str) -> None:
        """:meth:`TwistdLogCopy.upstream_line` of this observer's copy."""
        self._copy.upstream_line(model_id, line)


def format_proxy_line(event: dict, label: str) -> bytes:
    """``[LABEL] message\\n`` in UTF-8, with a failure's traceback after the message (LOG-4)."""
    text = eventAsText(event, includeTraceback=True, includeTimestamp=False, includeSystem=False)
    return f"[{label}] {text.rstrip(chr(10))}\n".encode("utf-8", errors="replace")


def make_logger(observer: ILogObserver, namespace: str) -> Logger:
    """A ``Logger`` whose events go to ``observer`` (the daemon's :class:`ProxyLogObserver`)."""
    return Logger(namespace=namespace, observer=observer)
