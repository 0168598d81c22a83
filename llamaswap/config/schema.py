"""What each key means: raw YAML values in, a frozen :class:`~llamaswap.config.Config` out.

Keys are read through :class:`~llamaswap.config.reader.Reader`, which returns the value (or its
default) and *collects* problems as ``<path>: <message>`` lines (CFG-3) and warnings (CFG-4), so
that one run reports every mistake. Then come the cross-checks: aliases, groups, then selectors
and profiles (:mod:`~llamaswap.config.selection`). llama-swap v250's self-contained keys
(timeouts, capabilities, upstream, ui, performance, ...) are read by
:mod:`~llamaswap.config.sections`.

Effective values are resolved here, once: a model's ``ttl``, ``unloadTimeout``,
``sendLoadingState`` and ``healthCheckTimeout`` fall back to the top-level settings, so the rest
of llamaswap reads a model's own fields only.

Size (~600 lines): one reader function per config section, in the order of the file, so that a
key's meaning is found beside its neighbours; the key table itself is in ``config.keys``.
"""

from __future__ import annotations

import math
import urllib.parse
from typing import Any, Callable, Iterable, Mapping

import attr

from llamaswap.config import (
    DEFAULT_CONCURRENCY_LIMIT, DEFAULT_HEALTH_CHECK_TIMEOUT, DEFAULT_UNLOAD_TIMEOUT, LOG_LEVELS,
    LOG_TO_STDOUT, MEMORY_POLICIES, MIN_HEALTH_CHECK_TIMEOUT, POLICIES, ROUTERS, Config, ConfigError,
    GroupConfig, ModelConfig, PeerConfig)
from llamaswap.config.access import read_api_keys
from llamaswap.config.cmdline import split_cmd
from llamaswap.config.keepalive import with_keepalive
from llamaswap.config.keepcache import assign_cache_dirs
from llamaswap.config.keepcache import read_global as read_keepcache_global
from llamaswap.config.keepcache import read_model as read_keepcache_model
from llamaswap.config.keys import KEYS, NOT_IMPLEMENTED, children, find
from llamaswap.config.macros import (
    Macros, RawModel, assign_ports, check_leftovers, check_model_leftovers, expand_model, model_macros,
    nothing_in_use, read_macros)
from llamaswap.config.reader import MSG_MAP, MSG_STR, Reader
from llamaswap.config.sections import (
    MODEL_TIMEOUTS, PEER_TIMEOUTS, read_capabilities, read_ignore_websockets, read_timeouts, read_top_level)
from llamaswap.config.selection import Names, drop_selector_preloads, read_profiles, read_selectors
from llamaswap.config.yaml12 import got, index_path, is_scalar, key_path, plain, scalar_text, shown
from llamaswap.matrix import Matrix, parse_matrix

__all__ = ["read_config"]


# --------------------------------------------------------------------------------------------
# Values shared by models and peers


def _check_url(url: str, path: str, errors: list[str]) -> None:
    try:
        parts = urllib.parse.urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        ok = False
    if not ok:
        errors.append(f"{path}: must be an http or https URL with a host{got(url)}")


def _strip_params(text: str, path: str, warnings: list[str]) -> tuple[str, ...]:
    """RT-9: split on ``,``, trim, drop empties; ``model`` is protected (WARN, dropped)."""
    keys = []
    for part in text.split(","):
        part = part.strip()
        if not part or part in keys:
            continue
        if part == "model":
            warnings.append(f"config: '{path}' cannot strip the protected key 'model' (ignored)")
            continue
        keys.append(part)
    return tuple(keys)


def _set_params(value: dict, path: str, warnings: list[str]) -> dict:
    """RT-9: ``model`` cannot be set (WARN, dropped); values become plain JSON values."""
    out = {}
    for k, v in value.items():
        if k == "model":
            warnings.append(f"config: '{key_path(path, k)}' cannot set the protected key 'model' (ignored)")
            continue
        out[k] = plain(v)
    return out


# --------------------------------------------------------------------------------------------
# Models


def _prepare_model(model_id: str, raw: Any, global_macros: list[tuple[str, Any]],
                   errors: list[str]) -> RawModel | None:
    """A model's id and mapping checked, its own macros read, and every macro applied."""
    path = key_path("models", model_id)
    if not model_id or any(ord(ch) < 32 or ord(ch) == 127 for ch in model_id):
        errors.append(f"{path}: a model id must be non-empty and contain no control characters")
        return None
    if not isinstance(raw, dict):
        errors.append(f"{path}: {MSG_MAP}{got(raw)}")
        return None
    r = Reader(raw, path, errors, [], "models.<id>")
    own = read_macros(r.mapping("macros"), r.at("macros"), errors)
    return expand_model(model_id, path, raw, model_macros(model_id, global_macros, own))


def _read_model(model: RawModel, settings: Config, errors: list[str],
                warnings: list[str]) -> ModelConfig | None:
    """One model's typed values; unset ones take the top-level ``settings`` (effective values)."""
    before = len(errors)
    r = Reader(model.data, model.path, errors, warnings, "models.<id>")
    r.unknown_keys(frozenset({"__default_proxy"}))
    cmd, argv = _read_cmd(r, "cmd", required=True)
    cmd_stop, cmd_stop_argv = _read_cmd(r, "cmdStop", required=False)
    proxy = r.str("proxy").strip()
    if "${" not in proxy and not any(e.startswith(r.at("proxy") + ":") for e in errors[before:]):
        _check_url(proxy, r.at("proxy"), errors)
    env = _read_env(r)
    check_endpoint = _read_check_endpoint(r)
    ttl = r.int("ttl", None, allow_minus_one=True)
    concurrency = r.int("concurrencyLimit", 0) or DEFAULT_CONCURRENCY_LIMIT
    unload = r.int("unloadTimeout", 0) or settings.unload_timeout
    metadata = r.mapping("metadata")
    strip, set_params, by_id = _read_filters(r, warnings)
    memory = r.size("memory", None)
    aliases = r.str_list("aliases")
    for i, alias in enumerate(aliases):
        if not alias:
            errors.append(f"{index_path(r.at('aliases'), i)}: must not be empty")
    use_model_name = r.str("useModelName")
    unlisted = r.bool("unlisted", False)
    name = r.str("name").strip()
    description = r.str("description").strip()
    send_loading_state = r.bool("sendLoadingState", settings.send_loading_state)
    kv = read_keepcache_model(r, settings.keep_cache, argv)  # keepCache, hooks.beforeStop/afterReady
    v250 = dict(timeouts=read_timeouts(r, MODEL_TIMEOUTS), ignore_websockets=read_ignore_websockets(r),
                capabilities=read_capabilities(r))
    if len(errors) > before:
        return None
    return ModelConfig(
        id=model.id, cmd=cmd, argv=argv, cmd_stop=cmd_stop, cmd_stop_argv=cmd_stop_argv, proxy=proxy,
        env=env, check_endpoint=check_endpoint, aliases=aliases,
        ttl=settings.global_ttl if ttl is None else ttl,
        use_model_name=use_model_name, unlisted=unlisted, name=name, description=description,
        metadata=plain(metadata), concurrency_limit=concurrency, strip_params=strip, set_params=set_params,
        set_params_by_id=by_id, send_loading_state=send_loading_state, unload_timeout=unload,
        health_check_timeout=settings.health_check_timeout, port=model.port, memory=memory, **kv, **v250)


def _read_env(r: Reader) -> tuple[tuple[str, str], ...]:
    env = []
    for i, entry in enumerate(r.str_list("env")):
        key, sep, value = entry.partition("=")
        if not sep or not key:
            r.errors.append(f"{index_path(r.at('env'), i)}: must be KEY=VALUE with a non-empty KEY")
            continue
        env.append((key, value))
    return tuple(env)


def _read_check_endpoint(r: Reader) -> str | None:
    """``none`` turns the check off (None); a missing leading ``/`` is added."""
    check = r.str("checkEndpoint", "/health").strip()
    if check == "none":
        return None
    return check if check.startswith("/") else "/" + check


def _read_cmd(r: Reader, key: str, required: bool) -> tuple[str, tuple]:
    value = r.value(key)
    if value is None:
        if required:
            r.error(key, "is required")
        return "", ()
    if not is_scalar(value):
        r.invalid(key, MSG_STR, value)
        return "", ()
    text = value if isinstance(value, str) else scalar_text(value)
    try:
        argv = tuple(split_cmd(text))
    except ValueError as e:
        r.error(key, str(e))
        return text, ()
    if not argv:
        r.error(key, "must not be empty")
    return text, argv


def _read_filters(r: Reader, warnings: list[str]) -> tuple[tuple, dict, dict]:
    f = r.sub("filters")
    f.unknown_keys()
    if f.has("stripParams") and f.has("strip_params"):
        f.error("strip_params", "cannot be used together with stripParams")
    strip_key = "stripParams" if f.has("stripParams") or not f.has("strip_params") else "strip_params"
    strip = _strip_params(f.str(strip_key), f.at(strip_key), warnings)
    set_params = _set_params(f.mapping("setParams"), f.at("setParams"), warnings)
    by_id = {}
    for name, params in f.mapping("setParamsByID").items():
        where = key_path(f.at("setParamsByID"), name)
        if not isinstance(params, dict):
            r.errors.append(f"{where}: {MSG_MAP}{got(params)}")
            continue
        by_id[name] = _set_params(params, where, warnings)
    return strip, set_params, by_id


# --------------------------------------------------------------------------------------------
# Top level


def _read_settings(data: dict, source: str, errors: list[str], warnings: list[str]) -> Config:
    """The top-level settings, as a ``Config`` without models yet (they take their defaults from it)."""
    r = Reader(data, "", errors, warnings)
    health_check_timeout = _read_health_check_timeout(r)
    log_level = _read_log_level(r)
    log_to_stdout = r.str("logToStdout", "proxy")
    if log_to_stdout not in LOG_TO_STDOUT:
        r.invalid("logToStdout", "must be one of proxy, upstream, both, none", r.value("logToStdout"))
        log_to_stdout = "proxy"
    start_port = r.int("startPort", 5800)
    if not 1 <= start_port <= 65535:
        r.invalid("startPort", "must be an integer from 1 to 65535", start_port)
        start_port = 5800
    global_ttl = r.int("globalTTL", 0)
    unload_timeout = r.int("unloadTimeout", 0) or DEFAULT_UNLOAD_TIMEOUT
    send_loading_state = r.bool("sendLoadingState", False)
    include_aliases_in_list = r.bool("includeAliasesInList", False)
    api_keys, api_key_scopes = read_api_keys(r)
    max_request_body = r.size("maxRequestBody", 2**30)
    max_wait, policy = _read_scheduler(r.sub("scheduler"))
    preload = _read_preload(r.sub("hooks"))
    memory_budget, memory_overhead, memory_policy = _read_memory(r.sub("memory"))
    return Config(
        **read_top_level(r),  # upstream, logTimeFormat, metricsMaxInMemory, captureBuffer, store, ui, ...
        source=source, health_check_timeout=health_check_timeout, log_level=log_level,
        log_to_stdout=log_to_stdout, start_port=start_port, global_ttl=global_ttl,
        unload_timeout=unload_timeout, send_loading_state=send_loading_state,
        include_aliases_in_list=include_aliases_in_list, api_keys=api_keys, api_key_scopes=api_key_scopes,
        preload=preload,
        max_wait=max_wait, policy=policy, max_request_body=max_request_body, memory_budget=memory_budget,
        memory_overhead=memory_overhead, memory_policy=memory_policy)


def _read_health_check_timeout(r: Reader) -> int:
    value = r.int("healthCheckTimeout", DEFAULT_HEALTH_CHECK_TIMEOUT)
    if value < MIN_HEALTH_CHECK_TIMEOUT:
        r.warnings.append(f"config: healthCheckTimeout {value} is below {MIN_HEALTH_CHECK_TIMEOUT}; "
                          f"using {MIN_HEALTH_CHECK_TIMEOUT}")
        return MIN_HEALTH_CHECK_TIMEOUT
    return value


def _read_log_level(r: Reader) -> str:
    level = r.str("logLevel", "info")
    if level.lower() not in LOG_LEVELS:
        r.warnings.append(f"config: logLevel '{level}' is not one of debug, info, warn, error; using info")
        return "info"
    return level.lower()


def _read_scheduler(s: Reader) -> tuple[float, str]:
    """``scheduler``: ``(max_wait, policy)``."""
    s.unknown_keys()
    max_wait = 30.0
    value = s.value("maxWait")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not value >= 0 or math.isinf(value):
            s.invalid("maxWait", "must be a non-negative number", value)
        else:
            max_wait = float(value)
    policy = s.str("policy", "swap-aware")
    if policy not in POLICIES:
        s.invalid("policy", "must be 'swap-aware' or 'fifo'", s.value("policy"))
        policy = "swap-aware"
    return max_wait, policy


def _read_preload(hooks: Reader) -> tuple[str, ...]:
    """``hooks.on_startup.preload``."""
    hooks.unknown_keys()
    on_startup = hooks.sub("on_startup")
    on_startup.unknown_keys()
    return on_startup.str_list("preload")


def _read_memory(m: Reader) -> tuple[int | None, int, str]:
    """``memory``: ``(budget, overhead, policy)``."""
    m.unknown_keys()
    budget = m.size("budget", None)
    overhead = m.size("overhead", 2**30)
    policy = m.str("policy", "cost")
    if policy not in MEMORY_POLICIES:
        m.invalid("policy", "must be 'cost' or 'lru'", m.value("policy"))
        policy = "cost"
    return budget, overhead, policy


def _read_peers(data: dict, errors: list[str], warnings: list[str]) -> dict[str, PeerConfig]:
    peers = {}
    r = Reader(data, "", errors, warnings)
    for peer_id, raw in r.mapping("peers").items():
        path = key_path("peers", peer_id)
        if not isinstance(raw, dict):
            errors.append(f"{path}: {MSG_MAP}{got(raw)}")
            continue
        before = len(errors)
        p = Reader(raw, path, errors, warnings, "peers.<peerId>")
        p.unknown_keys()
        proxy = p.str("proxy").strip()
        if not p.has("proxy"):
            p.error("proxy", "is required")
        elif not any(e.startswith(p.at("proxy") + ":") for e in errors[before:]):
            _check_url(proxy, p.at("proxy"), errors)
        models = p.str_list("models")
        if p.has("models") and not models and isinstance(raw.get("models"), list):
            p.error("models", "must not be empty")
        elif not p.has("models"):
            p.error("models", "is required")
        f = p.sub("filters")
        f.unknown_keys()
        strip = _strip_params(f.str("stripParams"), f.at("stripParams"), warnings)
        set_params = _set_params(f.mapping("setParams"), f.at("setParams"), warnings)
        timeouts = read_timeouts(p, PEER_TIMEOUTS)
        if len(errors) == before:
            peers[peer_id] = PeerConfig(peer_id, proxy, p.str("apiKey"), models, strip, set_params, timeouts)
    return peers


def _read_groups(raw_groups: dict, path: str, models: Mapping[str, Any], errors: list[str],
                 warnings: list[str]) -> dict[str, GroupConfig]:
    """The groups mapping at ``path`` (top-level ``groups`` or ``routing.router.settings.groups``)."""
    groups: dict[str, GroupConfig] = {}
    owner: dict[str, str] = {}
    for gid, raw in raw_groups.items():
        group_path = key_path(path, gid)
        if not isinstance(raw, dict):
            errors.append(f"{group_path}: {MSG_MAP}{got(raw)}")
            continue
        g = Reader(raw, group_path, errors, warnings, "groups.<groupId>")
        g.unknown_keys()
        members = []
        for i, member in enumerate(g.str_list("members")):
            where = index_path(g.at("members"), i)
            if member not in models:      # llama-swap does not check members: its example names others
                warnings.append(f"config: '{where}' names unknown model '{member}' (ignored)")
            elif member in members:
                errors.append(f"{where}: model '{member}' is listed twice")
            elif member in owner:
                errors.append(f"{where}: model '{member}' is already in group '{owner[member]}'")
            else:
                owner[member] = gid
                members.append(member)
        groups[gid] = GroupConfig(gid, g.bool("swap", True), g.bool("exclusive", True),
                                  g.bool("persistent", False), tuple(members))
    return groups


#: the key table's path of a matrix's keys (the legacy top-level ``matrix`` has the same keys)
_MATRIX = "routing.router.settings.matrix"


def _read_matrix(r: Reader, key: str, model_ids: Iterable[str]) -> Matrix | None:
    """The swap matrix at ``key`` of ``r`` (None when absent or invalid; errors are collected)."""
    value = r.value(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        r.invalid(key, MSG_MAP, value)
        return None
    m = Reader(value, r.at(key), r.errors, r.warnings, _MATRIX)
    m.unknown_keys()
    known = children(_MATRIX)
    matrix, problems = parse_matrix({k: m.value(k) for k in value if k in known}, r.at(key), model_ids)
    r.errors.extend(problems)
    return matrix


def _read_router(top: Reader, router: Reader, models: Mapping[str, Any]
                 ) -> tuple[str, dict[str, GroupConfig], Matrix | None]:
    """``(router_use, groups, matrix)``: the active router, as llama-swap's load.go chooses it.

    Either the legacy top-level ``groups``/``matrix`` or the ``routing.router`` block, never both;
    ``routing.router.use`` (``group`` by default) picks ``settings.groups`` or ``settings.matrix``
    (which ``matrix`` requires); top-level ``groups`` and ``matrix`` exclude each other. As in
    llama-swap, only the settings of the router in use are checked (its example config has
    settings for both); the other's unknown keys still warn.
    """
    router.unknown_keys()
    settings = router.sub("settings")
    settings.unknown_keys()
    use = router.str("use")
    if use and use not in ROUTERS:
        router.invalid("use", "must be 'group' or 'matrix'", router.value("use"))
    legacy_groups = top.mapping("groups")
    groups = _read_groups(legacy_groups, "groups", models, top.errors, top.warnings)
    matrix = _read_matrix(top, "matrix", models)
    new_groups = settings.mapping("groups")
    legacy = [key for key, present in (("groups", bool(legacy_groups)), ("matrix", top.has("matrix")))
              if present]
    if legacy and (use or new_groups or settings.has("matrix")):
        for key in legacy:
            top.error(key, f"cannot be used together with routing.router (move it to "
                           f"routing.router.settings.{key})")
        return "group", {}, None
    if legacy:
        if len(legacy) == 2:
            top.error("matrix", "cannot be used together with groups")
        return ("matrix", {}, matrix) if top.has("matrix") else ("group", groups, None)
    if use == "matrix":
        _lint_inactive(settings, "groups")
        if not settings.has("matrix"):
            settings.error("matrix", "is required when routing.router.use is 'matrix'")
        return "matrix", {}, _read_matrix(settings, "matrix", models)
    _lint_inactive(settings, "matrix")
    return "group", _read_groups(new_groups, settings.at("groups"), models, top.errors, top.warnings), None


def _lint_inactive(settings: Reader, key: str) -> None:
    """``settings.<key>`` of the router not in use: llama-swap ignores its values (a value that is
    not a mapping is still an error, as there); unknown keys warn."""
    value = settings.mapping(key)
    if key == "matrix":
        Reader(value, settings.at(key), settings.errors, settings.warnings, _MATRIX).unknown_keys()
        return
    for gid, raw in value.items():
        if isinstance(raw, dict):
            Reader(raw, key_path(settings.at(key), gid), settings.errors, settings.warnings,
                   "groups.<groupId>").unknown_keys()


def _read_priority(scheduler: Reader, resolve: Callable[[str], str | None]) -> dict[str, int]:
    """``routing.scheduler``: its one scheduler, ``fifo``, and the priorities by model id."""
    scheduler.unknown_keys()
    use = scheduler.str("use")
    if use not in ("", "fifo"):
        scheduler.invalid("use", "must be 'fifo'", scheduler.value("use"))
    settings = scheduler.sub("settings")
    settings.unknown_keys()
    fifo = settings.sub("fifo")
    fifo.unknown_keys()
    priority: dict[str, int] = {}
    given_as: dict[str, str] = {}
    for name, value in fifo.mapping("priority").items():
        where = key_path(fifo.at("priority"), name)
        model_id = resolve(name)
        if isinstance(value, bool) or not isinstance(value, int):
            fifo.errors.append(f"{where}: must be an integer{got(value)}")
        elif model_id is None:        # llama-swap rejects it, but its own example names models it lacks
            fifo.warnings.append(f"config: '{where}' names unknown model '{name}' (ignored)")
        elif model_id in priority:
            fifo.errors.append(f"{where}: model '{model_id}' already has a priority (as '{given_as[model_id]}')")
        else:
            priority[model_id], given_as[model_id] = int(value), name
    return priority


def _collect_aliases(built: dict[str, ModelConfig], all_ids: Iterable[str],
                     errors: list[str]) -> tuple[dict[str, str], dict[str, ModelConfig]]:
    """CFG-35/CFG-46: aliases (and setParamsByID names) are unique and never equal an id."""
    ids = set(all_ids)
    owners: dict[str, str] = {}
    result: dict[str, ModelConfig] = {}
    for model_id, model in built.items():
        path = key_path("models", model_id)
        names = [(a, index_path(key_path(path, "aliases"), i)) for i, a in enumerate(model.aliases)]
        by_id_path = key_path(key_path(path, "filters"), "setParamsByID")
        names += [(n, key_path(by_id_path, n)) for n in model.set_params_by_id if n != model_id]
        mine: list[str] = []
        for alias, where in names:
            if alias in mine and where.startswith(by_id_path):
                continue                       # a setParamsByID entry for one of its own aliases
            if alias in ids:
                errors.append(f"{where}: alias '{alias}' already used by model '{alias}'")
            elif alias in owners:
                errors.append(f"{where}: alias '{alias}' already used by model '{owners[alias]}'")
            else:
                owners[alias] = model_id
                mine.append(alias)
        result[model_id] = attr.evolve(model, aliases=tuple(mine))
    return owners, result


def _later_keys(data: dict) -> tuple[str, ...]:
    """The keys present that are read and validated but not implemented yet (the daemon warns).

    They are the key table's "not implemented yet" rows (outermost ones only: ``memory``, not
    ``memory.budget`` as well).
    """
    rows = []
    for row in KEYS:
        parent = find(row.parent)
        if row.status == NOT_IMPLEMENTED and not (
                parent is not None and parent.status == NOT_IMPLEMENTED):
            rows.append(row)
    keys: list[str] = []
    for row in sorted(rows, key=lambda k: k.path.count(".")):
        keys.extend(_present(data, row.path.split("."), ""))
    return tuple(keys)


def _present(node: Any, parts: list[str], path: str) -> Iterable[str]:
    """The concrete paths in ``node`` matching ``parts`` (``<...>`` matches any key)."""
    if not parts:
        yield path
        return
    if not isinstance(node, dict):
        return
    head, rest = parts[0], parts[1:]
    if head.startswith("<"):
        for name, child in node.items():
            yield from _present(child, rest, key_path(path, name))
    elif head in node:
        yield from _present(node[head], rest, key_path(path, head))


def read_config(data: dict, source: str, errors: list[str], warnings: list[str],
                port_in_use: Callable[[int], bool] | None = None) -> Config:
    """The ``Config`` of the built YAML ``data``: macros, ``${PORT}``, typed reading, cross-checks.

    :param port_in_use: ``(port) -> bool``; ``${PORT}`` allocation skips the ports it says are
        taken (default: none is).
    :raises ConfigError: listing every problem found (``errors`` may already hold YAML ones).
    """
    global_macros = read_macros(Reader(data, "", errors, warnings).mapping("macros"), "macros", errors)
    macros = Macros(global_macros)
    top_data = {k: (v if k in ("models", "macros") else macros.apply_tree(v)) for k, v in data.items()}
    top_keys = children("")
    for key, value in top_data.items():
        if key in top_keys and key not in ("models", "macros"):
            check_leftovers(value, key_path("", key), errors)

    top_reader = Reader(top_data, "", errors, warnings)
    top_reader.unknown_keys()
    settings = _read_settings(top_data, source, errors, warnings)
    settings = attr.evolve(settings, keep_cache=read_keepcache_global(top_reader, None))
    raw_models = top_reader.mapping("models")
    failed: dict[str, ModelConfig] = {}
    models = _read_models(raw_models, global_macros, settings, port_in_use or nothing_in_use, errors,
                          warnings, _memory_budget_as_written(top_data), failed)
    # A model with mistakes still claims its aliases, so a clash with them is reported too.
    claimed = {mid: models.get(mid) or failed[mid] for mid in raw_models if mid in models or mid in failed}
    aliases, claimed = _collect_aliases(claimed, raw_models.keys(), errors)
    models = {mid: model for mid, model in claimed.items() if mid not in failed}

    def resolve(name: str) -> str | None:
        if name in raw_models:
            return name
        return aliases.get(name)

    routing = top_reader.sub("routing")
    routing.unknown_keys()
    router_use, groups, matrix = _read_router(top_reader, routing.sub("router"), raw_models)
    priority = _read_priority(routing.sub("scheduler"), resolve)
    peers = _read_peers(top_data, errors, warnings)
    names = Names(frozenset(raw_models), aliases, peers)
    selectors = read_selectors(top_reader, names, groups, matrix, settings.memory_budget is not None)
    profiles, pin_profiles = read_profiles(top_reader, names, selectors)
    preload = drop_selector_preloads(settings.preload, selectors, warnings)
    if errors:
        raise ConfigError(_dedupe(errors))
    return attr.evolve(
        settings, models=models, groups=groups, profiles=profiles, aliases=aliases, peers=peers,
        router_use=router_use, matrix=matrix, scheduler_priority=priority, pin_profiles=pin_profiles,
        selectors=selectors, preload=preload, warnings=tuple(_dedupe(warnings)), later_keys=_later_keys(data))


def _memory_budget_as_written(data: dict) -> Any:
    memory = data.get("memory")
    return memory.get("budget") if isinstance(memory, dict) else None


def _read_models(raw_models: dict, global_macros: list[tuple[str, Any]], settings: Config,
                 port_in_use: Callable[[int], bool], errors: list[str],
                 warnings: list[str], budget_raw: Any = None,
                 failed: dict[str, ModelConfig] | None = None) -> dict[str, ModelConfig]:
    """Every valid model, in file order: macros, then ``${PORT}``, then typed reading.

    A model's ``memory`` may not exceed ``memory.budget`` (``budget_raw``: the budget as written).
    Each model with mistakes goes to ``failed``, with only the names it claims (:func:`_claims`).
    """
    prepared = [m for m in (_prepare_model(mid, raw, global_macros, errors) for mid, raw in raw_models.items())
                if m is not None]
    assign_cache_dirs(prepared, settings.keep_cache)  # ${CACHE_DIR}
    assign_ports(prepared, settings.start_port, port_in_use)
    models: dict[str, ModelConfig] = {}
    for model in prepared:
        before = len(errors)
        check_model_leftovers(model, errors)
        if len(errors) > before:
            _read_model(model, settings, errors, warnings)      # still report its type errors
            _claims(model, failed)
            continue
        cfg = _read_model(model, settings, errors, warnings)
        cfg = with_keepalive(cfg, model, errors, warnings)
        if cfg is None:
            _claims(model, failed)
            continue
        budget = settings.memory_budget
        if budget is not None and cfg.memory is not None and cfg.memory > budget:
            errors.append(f"{key_path(model.path, 'memory')}: must not exceed memory.budget {shown(budget_raw)}"
                          f"{got(model.data.get('memory'))}")
        models[model.id] = cfg
    return models


def _claims(model: RawModel, failed: dict[str, ModelConfig] | None) -> None:
    """Record in ``failed`` a model that has mistakes, with only the names it claims (its aliases
    and ``setParamsByID`` names, read again quietly: their own mistakes are reported already)."""
    if failed is None:
        return
    r = Reader(model.data, model.path, [], [], "models.<id>")
    by_id = r.sub("filters").mapping("setParamsByID")
    failed[model.id] = ModelConfig(
        id=model.id, cmd="", argv=(), aliases=tuple(a for a in r.str_list("aliases") if a),
        set_params_by_id={name: {} for name, params in by_id.items() if isinstance(params, dict)})


def _dedupe(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))
