"""The llama-swap YAML config: its types, and :func:`load_config`/:func:`parse_config` to read one.

Every key is documented in docs/configuration.rst, generated from the key table in
:mod:`llamaswap.config.keys`. Reading follows CFG-6, one module per stage:

1. :mod:`~llamaswap.config.envsubst`: ``${env.NAME}`` on the raw text (MAC-7);
2. :mod:`~llamaswap.config.yaml12`: a strict YAML 1.2 parse (CFG-1, CFG-2);
3. :mod:`~llamaswap.config.macros`: comment lines out of ``cmd``/``cmdStop``
   (:mod:`~llamaswap.config.cmdline`, CMD-1), macro expansion (MAC-1..4, MAC-6) and ``${PORT}``
   allocation (MAC-5);
4. :mod:`~llamaswap.config.schema`: typed reading with defaults, through
   :class:`~llamaswap.config.reader.Reader`, then the cross-checks (aliases, groups, profiles).

Every problem is *collected* and reported together as ``<path>: <message>`` lines in one
:class:`ConfigError` (CFG-3); warnings (CFG-4) are returned on the :class:`Config` for the daemon
to log. The result is frozen, and every effective value is resolved in it: a model's ``ttl``,
``unload_timeout``, ``send_loading_state`` and ``health_check_timeout`` already include the
top-level defaults.

This package imports nothing from llamaswap but :mod:`llamaswap.errors`, :mod:`llamaswap.matrix`
(pure: the swap matrix that ``routing.router.settings.matrix`` compiles to) and
:mod:`llamaswap.ports` (when :func:`load_config` checks ports).
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterable, Mapping

import attr

from llamaswap.config.cmdline import split_cmd  # re-exported; it imports nothing from this package
from llamaswap.config.access import ApiKey  # it imports nothing from this package at import time
from llamaswap.config.keepalive import KeepAlive  # likewise
from llamaswap.matrix import Matrix

__all__ = [
    "Capabilities", "Config", "ConfigError", "GroupConfig", "ModelConfig", "PeerConfig", "ProfileConfig",
    "SelectorConfig", "Timeouts", "load_config", "parse_config", "parse_size", "split_cmd",
]

DEFAULT_GROUP = "(default)"
DEFAULT_HEALTH_CHECK_TIMEOUT = 120
MIN_HEALTH_CHECK_TIMEOUT = 15
DEFAULT_UNLOAD_TIMEOUT = 10
DEFAULT_CONCURRENCY_LIMIT = 10
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_TO_STDOUT = ("proxy", "upstream", "both", "none")
POLICIES = ("swap-aware", "fifo")
MEMORY_POLICIES = ("cost", "lru")
ROUTERS = ("group", "matrix")
SELECTOR_STRATEGIES = ("pin", "warm", "spillover", "failover")
DEFAULT_UPSTREAM_IGNORE_PATHS = (r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$",)
DEFAULT_SESSION_ID_HEADERS = ("X-Session-ID", "X-Litellm-Session-Id")
#: the ``logTimeFormat`` names (lower case), each one of Go's ``time`` layouts; ``""`` means no timestamp
LOG_TIME_FORMATS = (
    "ansic", "unixdate", "rubydate", "rfc822", "rfc822z", "rfc850", "rfc1123", "rfc1123z", "rfc3339",
    "rfc3339nano", "kitchen", "stamp", "stampmilli", "stampmicro", "stampnano")


class ConfigError(Exception):
    """The config is invalid; ``errors`` holds every problem as a ``<path>: <message>`` line (CFG-3)."""

    def __init__(self, errors: Iterable[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# --------------------------------------------------------------------------------------------
# The types


@attr.s(frozen=True, auto_attribs=True)
class GroupConfig:
    id: str
    swap: bool = True
    exclusive: bool = True
    persistent: bool = False
    members: tuple[str, ...] = ()


@attr.s(frozen=True, auto_attribs=True)
class Timeouts:
    """llama-swap's ``timeouts`` of a model or peer, in seconds; ``0`` means no limit.

    ``connect`` bounds the TCP connect to the upstream, ``response_header`` the wait from the end
    of the request to the response headers, ``idle_conn`` how long an idle pooled connection is
    kept; ``keepalive`` and ``tls_handshake`` are llama-swap's TCP keep-alive period and TLS bound.
    The defaults are llama-swap's (Go's ``http.DefaultTransport``).
    """

    connect: float = 30.0
    keepalive: float = 30.0
    response_header: float = 0.0
    tls_handshake: float = 10.0
    expect_continue: float = 1.0
    idle_conn: float = 90.0


@attr.s(frozen=True, auto_attribs=True)
class Capabilities:
    """llama-swap's ``capabilities`` of a model, listed in ``/v1/models``."""

    input: tuple[str, ...] = ()
    output: tuple[str, ...] = ()
    tools: bool = False
    reranker: bool = False
    context: int = 0

    def empty(self) -> bool:
        return not (self.input or self.output or self.tools or self.reranker or self.context)

    def as_json(self) -> dict[str, Any]:
        """The ``capabilities`` object as llama-swap lists it."""
        return {"in": list(self.input), "out": list(self.output), "tools": self.tools,
                "reranker": self.reranker, "context": self.context}


@attr.s(frozen=True, auto_attribs=True)
class PeerConfig:
    id: str
    proxy: str
    api_key: str = ""
    models: tuple[str, ...] = ()
    strip_params: tuple[str, ...] = ()
    set_params: dict[str, Any] = attr.Factory(dict)
    #: llama-swap's peer defaults differ from a model's in one place: 60 s for the response headers
    timeouts: Timeouts = attr.Factory(lambda: Timeouts(response_header=60.0))


@attr.s(frozen=True, auto_attribs=True)
class ProfileConfig:
    """A profile in llama-swap's mapping form: runtime pins of requested ids.

    ``pins`` maps a requested id to its target (a model id, an alias, a ``setParamsByID`` name, a
    ``<peer>/<model>`` name or a selector id), or to ``None``: the pin disables the id (404).
    """

    name: str
    description: str = ""
    pins: dict[str, str | None] = attr.Factory(dict)


@attr.s(frozen=True, auto_attribs=True)
class SelectorConfig:
    """A virtual model id resolved to one of ``targets`` per request.

    ``targets`` are written as in the config (ids, aliases or peer models). ``strategy`` is
    ``pin`` (the first target), ``warm`` (the first ready target, else one starting, else a cold
    start of the first), ``spillover`` (fill targets in order up to ``spillover`` requests in
    flight each) or ``failover`` (targets in order; a target that failed ``failures`` times in a
    row is skipped for ``cooldown`` seconds). Targets that name no model are already dropped.
    """

    id: str
    strategy: str
    targets: tuple[str, ...]
    spillover: int = 1
    name: str = ""
    description: str = ""
    unlisted: bool = False
    metadata: dict[str, Any] = attr.Factory(dict)
    failures: int = 3
    cooldown: float = 60.0


@attr.s(frozen=True, auto_attribs=True)
class ModelConfig:
    """One model; every field holds the effective value (the top-level default already applied)."""

    id: str
    cmd: str
    argv: tuple[str, ...]
    cmd_stop: str = ""
    cmd_stop_argv: tuple[str, ...] = ()
    proxy: str = ""
    env: tuple[tuple[str, str], ...] = ()
    check_endpoint: str | None = "/health"
    aliases: tuple[str, ...] = ()
    ttl: int = 0
    use_model_name: str = ""
    unlisted: bool = False
    name: str = ""
    description: str = ""
    metadata: dict[str, Any] = attr.Factory(dict)
    concurrency_limit: int = DEFAULT_CONCURRENCY_LIMIT
    strip_params: tuple[str, ...] = ()
    set_params: dict[str, Any] = attr.Factory(dict)
    set_params_by_id: dict[str, dict[str, Any]] = attr.Factory(dict)
    send_loading_state: bool = False
    unload_timeout: int = DEFAULT_UNLOAD_TIMEOUT
    health_check_timeout: int = DEFAULT_HEALTH_CHECK_TIMEOUT
    port: int | None = None
    memory: int | None = None
    timeouts: Timeouts = attr.Factory(Timeouts)
    ignore_websockets: bool = False
    capabilities: Capabilities = attr.Factory(Capabilities)
    #: restart after a crash and the periodic health check (models.<id>.restart, healthInterval, ...)
    keepalive: KeepAlive = attr.Factory(KeepAlive)
    #: keepCache in effect for this model (a ``keepcache.KeepCache`` whose ``dir`` is its
    #: ``--slot-save-path``), else None; ``hooks.beforeStop``/``afterReady``: ``keepcache.Hook`` tuples
    keep_cache: Any = None
    hooks_before_stop: tuple = ()
    hooks_after_ready: tuple = ()

    def env_dict(self) -> dict[str, str]:
        """The model's ``env`` as a dict; later entries win (CFG-34)."""
        return dict(self.env)

    def process_key(self) -> tuple:
        """The effective process config: equal keys mean the running child can be kept on reload."""
        return (self.argv, self.cmd_stop_argv, self.proxy, self.env, self.check_endpoint)


_IMPLICIT_GROUP = GroupConfig(DEFAULT_GROUP, swap=True, exclusive=True, persistent=False, members=())


@attr.s(frozen=True, auto_attribs=True)
class Config:
    """The whole config, every default applied.

    ``groups`` are the active router's groups (top-level ``groups`` or
    ``routing.router.settings.groups``; empty when ``router_use`` is ``"matrix"``); ``matrix`` is
    the compiled swap matrix when ``router_use`` is ``"matrix"``, else None. ``scheduler_priority``
    maps model ids (aliases resolved) to ``routing.scheduler.settings.fifo.priority``; a model not
    listed has priority 0. ``memory_budget`` None means memory accounting is off.

    llama-swap v250's keys (read by :mod:`llamaswap.config.sections` and
    :mod:`llamaswap.config.selection`): ``profiles`` holds the v89 list form, ``pin_profiles`` the
    mapping form; ``selectors`` have only targets that name a model (id, alias or peer model, as
    written); ``preload`` has no selector ids. ``upstream_ignore_paths`` are regular expressions
    (valid for :func:`re.compile`) to search in the path after ``/upstream/<model>``;
    ``log_time_format`` is ``""`` or one of :data:`LOG_TIME_FORMATS`; ``capture_buffer_mb`` 0
    turns captures off; ``session_id_headers`` may be empty (lookup off); ``performance_every`` is
    in seconds (at least 5); ``store_path`` ``""`` means no database.
    """

    source: str = "<config>"
    models: dict[str, ModelConfig] = attr.Factory(dict)
    groups: dict[str, GroupConfig] = attr.Factory(dict)
    profiles: dict[str, tuple[str, ...]] = attr.Factory(dict)
    aliases: dict[str, str] = attr.Factory(dict)
    health_check_timeout: int = DEFAULT_HEALTH_CHECK_TIMEOUT
    log_level: str = "info"
    log_to_stdout: str = "proxy"
    start_port: int = 5800
    global_ttl: int = 0
    unload_timeout: int = DEFAULT_UNLOAD_TIMEOUT
    send_loading_state: bool = False
    include_aliases_in_list: bool = False
    api_keys: tuple[str, ...] = ()
    #: the scope of each key when apiKeys has an entry in mapping form; empty when every entry is a
    #: plain string (each then has full access). ``api_keys`` holds the same keys, in order.
    api_key_scopes: tuple[ApiKey, ...] = ()
    preload: tuple[str, ...] = ()
    max_wait: float = 30.0
    policy: str = "swap-aware"
    max_request_body: int = 2**30
    peers: dict[str, PeerConfig] = attr.Factory(dict)
    memory_budget: int | None = None
    memory_overhead: int = 2**30
    memory_policy: str = "cost"
    router_use: str = "group"
    matrix: Matrix | None = None
    scheduler_priority: dict[str, int] = attr.Factory(dict)
    pin_profiles: dict[str, ProfileConfig] = attr.Factory(dict)
    selectors: dict[str, SelectorConfig] = attr.Factory(dict)
    upstream_ignore_paths: tuple[str, ...] = DEFAULT_UPSTREAM_IGNORE_PATHS
    log_time_format: str = ""
    metrics_max_in_memory: int = 1000
    capture_buffer_mb: int = 5
    session_id_headers: tuple[str, ...] = DEFAULT_SESSION_ID_HEADERS
    performance_disabled: bool = False
    performance_every: float = 5.0
    store_path: str = ""
    #: the top-level ``keepCache`` (a ``keepcache.KeepCache``; ``dir`` is the ``${CACHE_DIR}`` root)
    keep_cache: Any = None
    warnings: tuple[str, ...] = ()
    later_keys: tuple[str, ...] = ()

    def group_of(self, model_id: str) -> GroupConfig:
        """The explicit group holding ``model_id``, else the implicit ``(default)`` group (CFG-51)."""
        for group in self.groups.values():
            if model_id in group.members:
                return group
        return _IMPLICIT_GROUP

    def resolve(self, name: str) -> str | None:
        """RT-2 steps 1-2: a configured id, else the id an alias names, else ``None``."""
        if name in self.models:
            return name
        return self.aliases.get(name)


# --------------------------------------------------------------------------------------------
# Sizes

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: Any) -> int:
    """A byte size: a non-negative int, or a string like ``"12GiB"``/``"512 MB"``/``"1024"``.

    Units ``B, KB, MB, GB, TB`` (powers of 1000) and ``KiB, MiB, GiB, TiB`` (powers of 1024),
    case-insensitive.

    :raises ValueError: for anything else (floats, bools, negative numbers, unknown units).
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"negative size: {value!r}")
        return int(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            number = m.group(1)
            if "." in number:
                return int(float(number) * _SIZE_UNITS[unit])
            return int(number) * _SIZE_UNITS[unit]
    raise ValueError(f"not a size: {value!r}")


# --------------------------------------------------------------------------------------------
# Reading a config


def parse_config(text: str, source: str = "<config>", environ: Mapping[str, str] | None = None,
                 port_in_use: Callable[[int], bool] | None = None) -> Config:
    """Parse and validate a config (CFG-6 order).

    :param text: the YAML text.
    :param source: the file name used in YAML syntax errors and ``Config.source``.
    :param environ: the environment for ``${env.NAME}`` (default ``os.environ``).
    :param port_in_use: ``(port) -> bool``; ``${PORT}`` allocation skips ports it says are
        taken (default: none is).
    :raises ConfigError: listing every problem found.
    """
    # The stages are imported here: they import the types above, and schema loads the key table,
    # which `python -m llamaswap.config.keys` must be the first to load (runpy warns otherwise).
    from llamaswap.config import envsubst, schema, yaml12

    environ = os.environ if environ is None else environ
    text = envsubst.substitute_env(text, source, environ)
    try:
        node = yaml12.compose(text, source)
    except RecursionError:
        raise ConfigError([f"{source}: the YAML is nested too deeply"]) from None
    errors: list[str] = []
    warnings: list[str] = []
    try:
        data = yaml12.build(node, errors, source) if node is not None else None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(errors + [f"{source}: the top level must be a mapping"])
        return schema.read_config(data, source, errors, warnings, port_in_use)
    except RecursionError:
        raise ConfigError([f"{source}: the YAML is nested too deeply"]) from None


def read_config_text(path: str) -> str:
    """The config file at ``path`` as text (UTF-8, a BOM dropped).

    :raises ConfigError: when it cannot be read or is not valid UTF-8, naming the file.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config: {e.strerror or e}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: cannot read config: not valid UTF-8 ({e.reason} at byte {e.start})"]) \
            from None
    return text[1:] if text.startswith("\ufeff") else text


def load_config(path: str, port_in_use: Callable[[int], bool] | None = None) -> Config:
    """Read and parse the config file at ``path``.

    ``${PORT}`` allocation skips ports ``port_in_use`` says are taken; by default, ports
    something on this machine listens on.

    :raises ConfigError: when the file cannot be read or is not valid UTF-8, or is invalid.
    """
    text = read_config_text(path)
    if port_in_use is None:
        from llamaswap.ports import port_in_use
    return parse_config(text, path, port_in_use=port_in_use)


def load_config_sources(config_path: str | None, config_dir: str | None,
                        port_in_use: Callable[[int], bool] | None = None) -> Config:
    """``--config`` and/or ``--config-dir``: one file read by :func:`load_config`, or the file and
    the directory's ``*.yml``/``*.yaml`` files merged as llama-swap merges them
    (:mod:`llamaswap.config.merge`).

    :raises ConfigError: listing every problem, each naming its file.
    """
    if config_dir is None and config_path is not None:
        return load_config(config_path, port_in_use=port_in_use)
    from llamaswap.config.merge import load_sources

    return load_sources(config_path, config_dir, port_in_use=port_in_use)
