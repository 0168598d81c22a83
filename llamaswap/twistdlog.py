"""The twistd log, as twistd writes it, at a fraction of the cost per line.

twistd logs to stdout (``-n``), to ``--logfile`` or to ``twistd.log``, each event as one line
of Twisted's ``textFileLogObserver``: ``<time> [<namespace>#<level>] <text>``. With the access
log copied there (``logToStdout: proxy``, the default) that is one line per request, and
Twisted's formatter spends most of its time rendering the time again for every line (a
timezone object, a ``datetime``, ``strftime``) and parsing the ``{line}`` format string.

:class:`ClassicFormat` writes the same bytes: the time text is made once per second, and an
event that only carries a ``{line}`` (the access log's) is put together directly; any other
event goes through Twisted's own formatter. :func:`observer` is the observer factory the
plugin gives twistd (as its ``--logger``, :func:`use_for`) when none was asked for and the
log is not syslog: it picks the file as twistd would, rotation on ``SIGUSR1`` included.
"""
from __future__ import annotations

import math
import signal
import sys
from typing import Any, Optional

from twisted.logger import FileLogObserver, ILogObserver, formatEventAsClassicLogText, formatTime
from twisted.logger import timeFormatRFC3339
from twisted.python.logfile import LogFile

__all__ = ["ClassicFormat", "is_ours", "observer", "use_for"]


class ClassicFormat:
    """``formatEventAsClassicLogText`` with Twisted's default time format, with the time text
    kept for the second it was made for."""

    def __init__(self) -> None:
        self._second: Optional[int] = None
        self._text = ""

    def time(self, when: Optional[float]) -> str:
        """``twisted.logger.formatTime(when)``: the text changes only with the second."""
        if when is None:
            return "-"
        second = math.floor(when)
        if second != self._second:
            self._text = formatTime(when, timeFormatRFC3339)
            self._second = second
        return self._text

    def __call__(self, event: dict) -> Optional[str]:
        if event.get("log_format") == "{line}" and "log_failure" not in event and "log_system" not in event:
            line = event.get("line")
            level = event.get("log_level")
            if type(line) is str and line and level is not None:
                return (f"{self.time(event.get('log_time'))} [{event.get('log_namespace', '-')}#{level.name}] "
                        f"{line.replace(chr(10), chr(10) + chr(9))}\n")
        return formatEventAsClassicLogText(event, formatTime=self.time)


#: the twistd options :func:`observer` reads, set by :func:`use_for`
_server_options: Any = None


def use_for(server_options: Any) -> bool:
    """Make :func:`observer` twistd's log observer factory (its ``--logger``), unless a
    ``--logger`` or ``--syslog`` was given: called while twistd parses its options (the plugin's
    ``postOptions``), it is read when twistd starts logging.

    :returns: whether it was made so.
    """
    global _server_options
    if server_options.get("logger") or server_options.get("syslog"):
        return False
    _server_options = server_options
    server_options["logger"] = f"{__name__}.observer"  # twistd imports the name it is given
    return True


def is_ours(factory: Any) -> bool:
    """Whether twistd's ``logger`` option is :func:`observer` (by name or once imported)."""
    return factory is observer or factory == f"{__name__}.observer"


def observer() -> ILogObserver:
    """The file twistd would log to (stdout with ``-n`` and no ``--logfile``, or ``--logfile -``;
    else the log file, ``twistd.log`` by default, rotated on ``SIGUSR1``), in :class:`ClassicFormat`."""
    options = _server_options if _server_options is not None else {}
    logfile = options.get("logfile") or ""
    nodaemon = bool(options.get("nodaemon"))
    if logfile == "-":
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")  # as twistd
        out: Any = sys.stdout
    elif nodaemon and not logfile:
        out = sys.stdout
    else:
        out = LogFile.fromFullPath(logfile or "twistd.log")
        _rotate_on_usr1(out)
    return FileLogObserver(out, ClassicFormat())


def _rotate_on_usr1(log_file: LogFile) -> None:
    """As twistd: ``SIGUSR1`` rotates the log file, unless something else handles it."""
    if not signal.getsignal(signal.SIGUSR1):
        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor
            reactor.callFromThread(log_file.rotate)

        signal.signal(signal.SIGUSR1, rotate)
