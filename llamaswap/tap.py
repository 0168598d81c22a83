"""twistd entry point: ``twistd [options] llamaswap --config PATH [--config-dir DIR] [--listen ENDPOINT]``.

This is the one module that imports the global reactor, and only inside
``make_service``. Startup errors are written to stderr and exit with status 1 *before*
twistd daemonizes (CLI-6), so they reach the launching terminal whole: twistd would print
a ``UsageError`` on stdout with the whole usage text, and a daemon's own startup errors
come back through a 100-byte status pipe, cut short. Options are checked in
``postOptions`` (bad config: one line per error; bad ``--listen``; state file or pidfile
in use); ``make_service`` then binds the listener (port in use, permission denied, bad
endpoint) and prints the config warnings when the log is not on this terminal.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Optional

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import getPlugins
from twisted.python import usage

from llamaswap import __version__

#: Endpoint types twistd knows without plugins (CLI-3); plugin parsers are added at runtime.
_BUILTIN_ENDPOINTS = {"tcp", "tcp6", "unix", "ssl", "systemd"}
_HOST_PORT = re.compile(r"^(?P<host>[^\[\]:]*):(?P<port>\d{1,5})$")
_V6_PORT = re.compile(r"^\[(?P<host>[0-9A-Fa-f:.%a-zA-Z]+)\]:(?P<port>\d{1,5})$")


def _known_endpoint_types() -> set[str]:
    kinds = set(_BUILTIN_ENDPOINTS)
    for parser in getPlugins(IStreamServerEndpointStringParser):
        kinds.add(parser.prefix)
    return kinds


def expand_listen(value: str) -> str:
    """CLI-3: an endpoint description, or llama-swap's ``:PORT``/``HOST:PORT``/``[V6]:PORT``."""
    kind = value.split(":", 1)[0]
    if ":" in value and kind in _known_endpoint_types():
        return value
    m = _V6_PORT.match(value)
    if m and int(m.group("port")) <= 65535:
        host = m.group("host").replace(":", "\\:")
        return f"tcp6:{m.group('port')}:interface={host}"
    m = _HOST_PORT.match(value)
    if m and int(m.group("port")) <= 65535:
        if not m.group("host"):
            return f"tcp:{m.group('port')}"
        return f"tcp:{m.group('port')}:interface={m.group('host')}"
    raise usage.UsageError(
        f"--listen: '{value}' is neither a Twisted endpoint description (e.g. tcp:8080:interface=127.0.0.1)"
        " nor one of :PORT, HOST:PORT, [V6ADDR]:PORT")


def _plain_listen(value: str) -> bool:
    """Whether ``--listen`` surely needs no TLS: llama-swap's ``:PORT`` forms, or a ``tcp``,
    ``tcp6``, ``unix`` or ``systemd`` endpoint (any other kind may, as ``ssl`` does)."""
    kind = value.split(":", 1)[0]
    if ":" in value and kind in ("tcp", "tcp6", "unix", "systemd"):
        return True
    if _V6_PORT.match(value):
        return True
    m = _HOST_PORT.match(value)
    # a bare word before the port may be an endpoint kind from a plugin ("tls:8443"): not sure
    return bool(m) and (not m.group("host") or "." in m.group("host") or m.group("host") == "localhost")


def _log_on_terminal(options: Any) -> bool:
    """True when twistd logs to this terminal: ``-n`` with no log file, syslog or --logger."""
    parent = getattr(options, "parent", None)
    if parent is None:
        return False
    from llamaswap.twistdlog import is_ours

    get = parent.get
    logger = get("logger")
    return bool(get("nodaemon") or get("debug")) and not get("syslog") and (not logger or is_ours(logger)) \
        and get("logfile") in (None, "", "-")


def warnings_for_stderr(options: Any) -> list[str]:
    """The startup config warnings that must be printed on stderr: each one is seen once.

    In the foreground twistd logs to this terminal, and the service logs every warning
    (CFG-4); printing them too would show each twice. As a daemon (or with a log file, or
    with a config whose log leaves WARNs out) the log is elsewhere: print them before
    twistd forks.
    """
    from llamaswap.service import startup_warnings

    config = options["loaded_config"]
    logged = config.log_to_stdout in ("proxy", "both") and config.log_level in ("debug", "info", "warn")
    if logged and _log_on_terminal(options):
        return []
    return startup_warnings(config)


def _pidfile_in_use(pidfile: Optional[str]) -> Optional[int]:
    """The live pid in twistd's pidfile, else None (twistd itself removes a stale one)."""
    if not pidfile:
        return None
    try:
        with open(pidfile, encoding="ascii") as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def _here(path: str) -> str:
    return " from this directory" if os.path.dirname(path) == os.getcwd() else ""


def _in_use_message(error: Any, pidfile: Optional[str], state_given: bool) -> str:
    """PROC-14's message, then who is running and which flag starts a second daemon."""
    from llamaswap.statefile import default_state_file

    other = error.pidfile or (pidfile if pidfile and error.path == default_state_file(pidfile) else None)
    held = f"{_here(other)} (pidfile {other})" if other else ""
    flag = "another --state-file PATH" if state_given else "--pidfile OTHER.pid (or --state-file PATH)"
    return f"llamaswap: {error}: another llamaswap is running{held}; stop it, or start this one with {flag}"


def _fail(lines: list[str]) -> None:
    sys.stderr.write("".join(line + "\n" for line in lines))
    sys.stderr.flush()
    raise SystemExit(1)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve many local LLM servers (llama.cpp's llama-server, vLLM, whisper.cpp, ...) "
        "behind one OpenAI-compatible endpoint, starting and swapping them on demand. "
        "Reads a llama-swap config.yaml unchanged.")
    optParameters = [
        ["config", "c", None,
         "YAML configuration file (llama-swap format). Required unless --config-dir is given."],
        ["config-dir", None, None,
         "Directory of *.yaml/*.yml config files, merged in file-name order after --config (if any). "
         "An entry (model, group, peer, ...) may be defined in one file only."],
        ["listen", "l", "tcp:8080",
         "Endpoint to listen on: a Twisted endpoint description (tcp:8080:interface=127.0.0.1, "
         "unix:/run/llamaswap.sock, ssl:8443:privateKey=k.pem:certKey=c.pem, systemd:domain=INET:index=0) "
         "or llama-swap's :PORT, HOST:PORT, [V6ADDR]:PORT."],
        ["state-file", None, None,
         "Where child process groups are recorded so a crashed run's children are killed at the "
         "next start. Default: <pidfile>.children.json, else $XDG_RUNTIME_DIR/llamaswap/children.json, "
         "else /tmp/llamaswap-<uid>/children.json."],
    ]
    optFlags = [
        ["watch-config", None, "Reload the config when the file (or a file in --config-dir) changes, "
                               "is added or removed (polled every 2 s)."],
    ]

    def opt_version(self) -> None:
        """Print llamaswap's version and exit."""
        print(f"llamaswap {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        from llamaswap.config import ConfigError, load_config_sources
        from llamaswap.config.merge import sources_label
        from llamaswap.statefile import StateFileInUse, check_not_in_use, default_state_file

        if self["config"] is None and self["config-dir"] is None:
            _fail(["llamaswap: --config is required, unless --config-dir is given "
                   "(twistd llamaswap --config config.yaml)"])
        self["listen_label"] = self["listen"]
        if self.parent is not None:
            # twistd's log, formatted at a fraction of Twisted's cost per line (llamaswap.twistdlog)
            from llamaswap import twistdlog
            twistdlog.use_for(self.parent)
        if self.parent is not None and _plain_listen(self["listen"]):
            # twistd: load the TLS stack only if a connection needs it (llamaswap.tls)
            from llamaswap import tls
            tls.defer()
        try:
            self["listen"] = expand_listen(self["listen"])
        except usage.UsageError as e:
            _fail([f"llamaswap: {e}"])
        # CLI-2: resolved once, before twistd may chdir
        path = self["config"] = os.path.abspath(self["config"]) if self["config"] is not None else None
        directory = self["config-dir"] = os.path.abspath(self["config-dir"]) if self["config-dir"] else None
        try:
            self["loaded_config"] = load_config_sources(path, directory)
        except ConfigError as e:
            _fail([f"llamaswap: invalid config {sources_label(path, directory)}:"]
                  + [f"  {line}" for line in e.errors])
        # the checks twistd would make later (its pidfile), or that need the terminal (CLI-7)
        pidfile = self["pidfile"] = self._pidfile()
        state_given = self["state-file"] is not None
        state = self["state-file"] or default_state_file(pidfile)
        self["state-file"] = os.path.abspath(state)
        try:
            check_not_in_use(self["state-file"])
        except StateFileInUse as e:
            _fail([_in_use_message(e, pidfile, state_given)])
        pid = _pidfile_in_use(pidfile)
        if pid is not None:
            _fail([f"llamaswap: pidfile {pidfile} is in use by pid {pid}: another twistd is running"
                   f"{_here(pidfile)}; stop it, or start this one with --pidfile OTHER.pid"])

    def _pidfile(self) -> Optional[str]:
        parent = getattr(self, "parent", None)
        if parent is None:
            return None
        try:
            pidfile = parent["pidfile"]
        except KeyError:
            return None
        return os.path.abspath(pidfile) if pidfile else None


def make_service(options: Any, reactor: Any = None):
    """Build the service tree for twistd (or a test passing its own reactor), and bind the
    listener: twistd calls this before it daemonizes, so a failure is one line on stderr
    with exit status 1, and no pidfile or state file is written (CLI-6)."""
    if reactor is None:
        from twisted.internet import reactor  # the project's only global-reactor import
    from llamaswap.service import LlamaSwapService, StartupError

    service = LlamaSwapService(options["loaded_config"], reactor, options["listen"], options["state-file"],
                               config_path=options["config"], watch_config=bool(options["watch-config"]),
                               config_dir=options.get("config-dir"),
                               listen_label=options.get("listen_label"), pidfile=options.get("pidfile"))
    try:
        service.bind()
    except StartupError as e:
        _fail([f"llamaswap: {e}"])
    for warning in warnings_for_stderr(options):
        sys.stderr.write(f"WARN {warning}\n")
    sys.stderr.flush()
    # once it runs, the service freezes startup's objects and tunes the collector (runtime.settle)
    return service


makeService = make_service  # the name twistd looks up
