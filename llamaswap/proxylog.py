"""
llamaswap's own log: the observer behind every llamaswap ``Logger`` (LOG-4, LOG-6, CFG-11, CFG-12).

* :class:`ProxyLogObserver` filters by ``logLevel`` and stores ``[LEVEL] message`` lines in
  the ``proxy`` log source of a ``LogBroadcaster``;
* :class:`TwistdLogCopy` decides, by ``logToStdout``, what also goes to the twistd log: proxy
  events (from the observer) and child output lines (from the broadcaster);
* :func:`format_log_time` prefixes a proxy line with the time as ``logTimeFormat`` names it
  (llama-swap's Go layout names), and :func:`rfc3339nano` writes the timestamps of the JSON
  APIs the way Go encodes a ``time.Time``.

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

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.logger import (
    ILogObserver,
    LogLevel,
    Logger,
    eventAsText,
    globalLogPublisher,
)
from zope.interface import implementer

if TYPE_CHECKING:
    from llamaswap.logs import LogBroadcaster

__all__ = [
    "LEVELS",
    "LOG_TIME_FORMATS",
    "LOG_TO_STDOUT_VALUES",
    "ProxyLogObserver",
    "TwistdLogCopy",
    "format_log_time",
    "format_proxy_line",
    "make_logger",
    "rfc3339nano",
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


# -- time formats ----------------------------------------------------------------------------------
# llama-swap's logTimeFormat names one of Go's time package layout constants (any case, trimmed);
# anything else, "" included, means no timestamp. Go writes English names whatever the locale,
# so the names are spelled out here instead of strftime's %a/%b.

_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _offset(t: datetime, colon: bool) -> str:
    """Go's ``-0700`` (or ``-07:00``)."""
    minutes = int((t.utcoffset() or timedelta(0)).total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}{':' if colon else ''}{minutes:02d}"


def _z_offset(t: datetime) -> str:
    """Go's ``Z07:00``: ``Z`` for a zero offset."""
    return "Z" if not (t.utcoffset() or timedelta(0)) else _offset(t, colon=True)


def _zone(t: datetime) -> str:
    """Go's ``MST``: the zone's abbreviation, else its offset (Python names an unnamed
    fixed zone ``UTC-07:00``; Go writes ``-0700``)."""
    name = t.tzname() or ""
    return name if name and not (name.startswith("UTC") and name != "UTC") else _offset(t, colon=False)


def _day(t: datetime) -> str:
    return _DAYS[t.weekday()][:3]


def _month(t: datetime) -> str:
    return _MONTHS[t.month - 1]


def _clock(t: datetime) -> str:
    return f"{t.hour:02d}:{t.minute:02d}:{t.second:02d}"


def _stamp(t: datetime) -> str:
    """Go's ``Jan _2 15:04:05`` (``_2``: the day padded with a space)."""
    return f"{_month(t)} {t.day:2d} {_clock(t)}"


def _nanos(t: datetime) -> str:
    """Nine fraction digits; Python time stops at microseconds."""
    return f"{t.microsecond:06d}000"


def _rfc3339(t: datetime, nano: bool) -> str:
    fraction = _nanos(t).rstrip("0") if nano else ""
    return (f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{_clock(t)}"
            f"{'.' + fraction if fraction else ''}{_z_offset(t)}")


def _kitchen(t: datetime) -> str:
    return f"{(t.hour % 12) or 12}:{t.minute:02d}{'PM' if t.hour >= 12 else 'AM'}"


#: logTimeFormat name -> how Go's layout of that name writes a local time.
_LAYOUTS: dict[str, Callable[[datetime], str]] = {
    "ansic": lambda t: f"{_day(t)} {_stamp(t)} {t.year:04d}",                       # Mon Jan _2 15:04:05 2006
    "unixdate": lambda t: f"{_day(t)} {_stamp(t)} {_zone(t)} {t.year:04d}",         # ... MST 2006
    "rubydate": lambda t: (f"{_day(t)} {_month(t)} {t.day:02d} {_clock(t)} {_offset(t, False)} "
                           f"{t.year:04d}"),                                       # Mon Jan 02 15:04:05 -0700 2006
    "rfc822": lambda t: f"{t.day:02d} {_month(t)} {t.year % 100:02d} {t:%H:%M} {_zone(t)}",
    "rfc822z": lambda t: f"{t.day:02d} {_month(t)} {t.year % 100:02d} {t:%H:%M} {_offset(t, False)}",
    "rfc850": lambda t: (f"{_DAYS[t.weekday()]}, {t.day:02d}-{_month(t)}-{t.year % 100:02d} {_clock(t)} "
                         f"{_zone(t)}"),                                           # Monday, 02-Jan-06 15:04:05 MST
    "rfc1123": lambda t: f"{_day(t)}, {t.day:02d} {_month(t)} {t.year:04d} {_clock(t)} {_zone(t)}",
    "rfc1123z": lambda t: f"{_day(t)}, {t.day:02d} {_month(t)} {t.year:04d} {_clock(t)} {_offset(t, False)}",
    "rfc3339": lambda t: _rfc3339(t, nano=False),                                  # 2006-01-02T15:04:05Z07:00
    "rfc3339nano": lambda t: _rfc3339(t, nano=True),                               # .999999999: zeros trimmed
    "kitchen": _kitchen,                                                           # 3:04PM
    "stamp": _stamp,
    "stampmilli": lambda t: f"{_stamp(t)}.{t.microsecond // 1000:03d}",
    "stampmicro": lambda t: f"{_stamp(t)}.{t.microsecond:06d}",
    "stampnano": lambda t: f"{_stamp(t)}.{_nanos(t)}",
}

#: every name ``logTimeFormat`` accepts, besides "" (no timestamp).
LOG_TIME_FORMATS = tuple(_LAYOUTS)


def _local(seconds: float, tz: Optional[Any] = None) -> datetime:
    return datetime.fromtimestamp(seconds, tz) if tz is not None else datetime.fromtimestamp(seconds).astimezone()


def format_log_time(name: str, seconds: float, tz: Optional[Any] = None) -> str:
    """``seconds`` (a POSIX time) as the Go layout ``name`` writes it, in local time (or ``tz``).

    :returns: "" when ``name`` is "" or not one of :data:`LOG_TIME_FORMATS` (any case):
        llama-swap then logs no timestamp.
    """
    layout = _LAYOUTS.get(name.strip().lower())
    return layout(_local(seconds, tz)) if layout else ""


def rfc3339nano(seconds: float, tz: Optional[Any] = None) -> str:
    """A time as Go's JSON encoding of ``time.Time`` writes it: RFC 3339, the fraction's
    trailing zeros dropped, ``Z`` for a zero offset; local time unless ``tz`` is given."""
    return _rfc3339(_local(seconds, tz), nano=True)


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

    Events below the level are dropped: neither stored nor forwarded (LOG-4). As Twisted's
    ``LogLevelFilterPredicate`` would (one level for every namespace: the one it is given), it
    also drops events without a level or namespace (a ``Logger`` always sets both); the check
    is made here directly, as it runs for every request's access line.  Other events are stored in the ``proxy`` source as ``[LEVEL] <formatted
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
    :param time_format: ``logTimeFormat``: a Go layout name (:data:`LOG_TIME_FORMATS`) whose
        rendering of the event's time starts each stored line, as llama-swap's proxy log does;
        "" or an unknown name stores no time.
    :raises ValueError: for any other ``level`` / ``to_stdout``.
    """

    def __init__(
        self,
        broadcaster: LogBroadcaster,
        forward: ILogObserver = globalLogPublisher,
        level: str = "info",
        to_stdout: str = "proxy",
        copy: Optional[TwistdLogCopy] = None,
        time_format: str = "",
    ) -> None:
        self._broadcaster = broadcaster
        self.time_format = time_format
        self._level = _log_level(level)
        self._copy = copy if copy is not None else TwistdLogCopy(forward, to_stdout)

    @property
    def level(self) -> str:
        return self._level.name

    @property
    def to_stdout(self) -> str:
        return self._copy.to_stdout

    def set_level(self, level: str) -> None:
        """Change the minimum level (config reload, CFG-11)."""
        self._level = _log_level(level)

    def set_to_stdout(self, value: str) -> None:
        """Change what goes to the twistd log (config reload, CFG-12)."""
        self._copy.set_to_stdout(value)

    def set_time_format(self, value: str) -> None:
        """Change ``logTimeFormat`` (config reload)."""
        self.time_format = value

    def __call__(self, event: dict) -> None:
        level = event.get("log_level")
        if level is None or not event.get("log_namespace") or level < self._level:
            return
        if "log_trace" in event:
            event["log_trace"].append((self, self._emit))
        self._emit(event)

    def _emit(self, event: dict) -> None:
        """Store and forward one event that passed the level filter."""
        self._broadcaster.write_proxy(format_proxy_line(event, _LABEL[event["log_level"]], self.time_format))
        self._copy.proxy_event(event)

    def upstream_line(self, model_id: str, line: str) -> None:
        """:meth:`TwistdLogCopy.upstream_line` of this observer's copy."""
        self._copy.upstream_line(model_id, line)


def format_proxy_line(event: dict, label: str, time_format: str = "") -> bytes:
    """``[LABEL] message\\n`` in UTF-8, with a failure's traceback after the message (LOG-4).

    With a ``time_format`` (``logTimeFormat``), the line starts with the event's ``log_time``
    in that layout and a space, as llama-swap writes ``<time> [LEVEL] message``.
    """
    line = event.get("line")
    if event.get("log_format") == "{line}" and type(line) is str and "log_failure" not in event:
        text = line  # the access log's events (one per request): what eventAsText would give
    else:
        text = eventAsText(event, includeTraceback=True, includeTimestamp=False, includeSystem=False)
    stamp = format_log_time(time_format, event.get("log_time", 0.0)) if time_format else ""
    return f"{stamp + ' ' if stamp else ''}[{label}] {text.rstrip(chr(10))}\n".encode("utf-8", errors="replace")


def make_logger(observer: ILogObserver, namespace: str) -> Logger:
    """A ``Logger`` whose events go to ``observer`` (the daemon's :class:`ProxyLogObserver`)."""
    return Logger(namespace=namespace, observer=observer)
