"""twistd entry point: ``twistd [options] llamaswap --config PATH [--listen ENDPOINT]``.

This is the one module that imports the global reactor, and only inside
``make_service``. Startup errors (bad config, bad ``--listen``, state file in use) are
written to stderr and exit with status 1 *before* twistd daemonizes (CLI-6); twistd
would print a ``UsageError`` on stdout with the whole usage text instead.
"""
from __future__ import annotations

import gc
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
        ["config", "c", None, "YAML configuration file (llama-swap format). Required."],
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
        ["watch-config", None, "Reload the config when the file changes (polled every 2 s)."],
    ]

    def opt_version(self) -> None:
        """Print llamaswap's version and exit."""
        print(f"llamaswap {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        from llamaswap.config import ConfigError, load_config
        from llamaswap.statefile import StateFileInUse, check_not_in_use, default_state_file

        if self["config"] is None:
            _fail(["llamaswap: --config is required (twistd llamaswap --config config.yaml)"])
        try:
            self["listen"] = expand_listen(self["listen"])
        except usage.UsageError as e:
            _fail([f"llamaswap: {e}"])
        path = os.path.abspath(self["config"])  # CLI-2: resolved once, before twistd may chdir
        self["config"] = path
        try:
            self["loaded_config"] = load_config(path)
        except ConfigError as e:
            _fail([f"llamaswap: invalid config {path}:"] + [f"  {line}" for line in e.errors])
        for warning in self["loaded_config"].warnings:
            sys.stderr.write(f"WARN {warning}\n")
        pidfile = self._pidfile()
        state = self["state-file"] or default_state_file(pidfile)
        self["state-file"] = os.path.abspath(state)
        try:
            check_not_in_use(self["state-file"])
        except StateFileInUse as e:
            _fail([f"llamaswap: {e}"])

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
    """Build the service tree for twistd (or a test passing its own reactor)."""
    daemon = reactor is None
    if reactor is None:
        from twisted.internet import reactor  # the project's only global-reactor import
    from llamaswap.service import LlamaSwapService

    service = LlamaSwapService(options["loaded_config"], reactor, options["listen"], options["state-file"],
                               config_path=options["config"], watch_config=bool(options["watch-config"]))
    if daemon:
        # Modules, config and the service tree live as long as the daemon: move them out of
        # the collector's generations, so the full collections that request garbage triggers
        # no longer walk them (multi-millisecond pauses in the middle of streams).
        gc.collect()
        gc.freeze()
    return service


makeService = make_service  # the name twistd looks up
