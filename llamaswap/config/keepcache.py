"""``keepCache`` and a model's ``hooks``: what they mean, read into frozen types.

``keepCache`` (top level: the default; per model: that model's own) asks llamaswap to save
llama-server's slots (its KV cache) before a planned stop and to restore them at the next start of
the same command (:mod:`llamaswap.kvcache` does that). It is a boolean or a mapping
``{enabled, dir, maxBytes, saveTimeout, restoreTimeout}``.

Each model gets a ``${CACHE_DIR}`` macro: ``<dir>/<model>``, where ``<dir>`` is the model's own
``keepCache.dir``, else the top-level ``keepCache.dir``, else the daemon's cache root (beside its
state file: ``children.json`` -> ``children.kvcache``). The user writes
``--slot-save-path ${CACHE_DIR}`` in ``cmd``; nothing is added to a command behind their back.

* A model that sets ``keepCache`` itself (to anything but false) needs ``--slot-save-path`` in its
  ``cmd``: without it the config is invalid.
* The top-level default applies only to the models whose ``cmd`` has ``--slot-save-path``, so a
  whisper or vLLM model beside them is no error.
* A model's effective :class:`KeepCache` has ``dir`` set to its ``--slot-save-path``: the directory
  where llama-server really writes the files.

``hooks.beforeStop`` and ``hooks.afterReady`` of a model are lists of HTTP calls (:class:`Hook`)
made to the model's own ``proxy`` URL (:mod:`llamaswap.hooks`).

This module imports only the config package's own modules.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Iterable

import attr

from llamaswap.config.macros import Macros, RawModel
from llamaswap.config.reader import MSG_MAP, Reader
from llamaswap.config.yaml12 import got, index_path, is_scalar, key_path, plain

__all__ = [
    "DEFAULT_MAX_BYTES", "DEFAULT_RESTORE_TIMEOUT", "DEFAULT_SAVE_TIMEOUT", "HOOK_METHODS", "Hook", "KeepCache",
    "assign_cache_dirs", "cache_root_for", "default_cache_root", "model_dir_name", "read_global", "read_model",
    "rebase_cache_root", "slot_save_path"]

DEFAULT_MAX_BYTES = 4 * 2**30
DEFAULT_SAVE_TIMEOUT = 10.0
DEFAULT_RESTORE_TIMEOUT = 30.0
DEFAULT_HOOK_TIMEOUT = 10.0
HOOK_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_HOOK_KEYS = ("method", "path", "body", "timeout")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
_SLOT_SAVE_PATH = re.compile(r"--slot-save-path(?:=|\s+)(\S+)")


@attr.s(frozen=True, auto_attribs=True)
class KeepCache:
    """``keepCache`` settings.

    On :class:`~llamaswap.config.Config` (the top-level default) ``dir`` is the root under which
    each model's ``${CACHE_DIR}`` lies. On a :class:`~llamaswap.config.ModelConfig` (present only
    when saving and restoring are in effect for it) ``dir`` is the model's own directory: the
    ``--slot-save-path`` of its command.

    :ivar max_bytes: the model's files are pruned, oldest first, down to this many bytes.
    :ivar save_timeout: seconds the saves at a stop may take, in all.
    :ivar restore_timeout: seconds the restores at a start may take, in all.
    """

    enabled: bool = True
    dir: str = ""
    max_bytes: int = DEFAULT_MAX_BYTES
    save_timeout: float = DEFAULT_SAVE_TIMEOUT
    restore_timeout: float = DEFAULT_RESTORE_TIMEOUT


@attr.s(frozen=True, auto_attribs=True)
class Hook:
    """One HTTP call of ``hooks.beforeStop`` or ``hooks.afterReady``.

    :ivar path: appended to the model's ``proxy`` URL (it starts with ``/`` and may carry a query).
    :ivar body: sent as JSON when not None.
    :ivar timeout: seconds the call may take, answer included.
    """

    method: str
    path: str
    body: Any = None
    timeout: float = DEFAULT_HOOK_TIMEOUT


# --------------------------------------------------------------------------------------------
# Directories


def cache_root_for(state_file: str) -> str:
    """The cache root beside the daemon's state file: ``children.json`` -> ``children.kvcache``."""
    return (state_file[:-5] if state_file.endswith(".json") else state_file) + ".kvcache"


def default_cache_root() -> str:
    """The cache root of a daemon started without ``--pidfile`` or ``--state-file``.

    It follows ``llamaswap.statefile.default_state_file(None)`` (which this package cannot
    import): ``$XDG_RUNTIME_DIR/llamaswap/children.kvcache``, else
    ``/tmp/llamaswap-<uid>/children.kvcache``.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = os.path.join(runtime, "llamaswap") if runtime else f"/tmp/llamaswap-{os.getuid()}"
    return cache_root_for(os.path.join(base, "children.json"))


def model_dir_name(model_id: str) -> str:
    """A directory name for ``model_id``: the id itself when it is a safe file name, else the id
    with unsafe characters replaced and a short hash of the id appended (ids may hold ``/``)."""
    if _SAFE_NAME.match(model_id):
        return model_id
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_id).lstrip(".") or "model"
    return f"{safe}-{hashlib.sha256(model_id.encode('utf-8')).hexdigest()[:8]}"


def slot_save_path(argv: Iterable[str]) -> str | None:
    """The value of ``--slot-save-path`` in a command (the last one wins), or None.

    Also found inside one argument, for commands run through ``sh -c '...'``.
    """
    argv = list(argv)
    found = None
    for i, arg in enumerate(argv):
        if arg == "--slot-save-path" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--slot-save-path="):
            found = arg.partition("=")[2]
        elif "--slot-save-path" in arg:
            matches = _SLOT_SAVE_PATH.findall(arg)
            if matches:
                found = matches[-1].strip("'\"")
    return found


def rebase_cache_root(config: Any, root: str) -> Any:
    """``config`` with the default cache root replaced by ``root`` (the daemon's, beside its
    state file) wherever ``${CACHE_DIR}`` put it.

    The config is read before the daemon knows its state file (and by code that has none), so
    ``${CACHE_DIR}`` is expanded under :func:`default_cache_root`; the daemon then moves it under
    its own root. A config whose top-level ``keepCache.dir`` was set is returned unchanged.
    """
    default = config.keep_cache.dir if config.keep_cache is not None else None
    if default != default_cache_root() or root == default:
        return config
    old, new = default.rstrip("/") + "/", root.rstrip("/") + "/"

    def moved(value: Any) -> Any:
        if isinstance(value, str):
            if value == old[:-1]:
                return new[:-1]
            if value.startswith(old):
                return new + value[len(old):]
            for before in (" ", "=", "'", '"'):
                value = value.replace(before + old, before + new)
            return value
        if isinstance(value, tuple):
            return tuple(moved(v) for v in value)
        if isinstance(value, list):
            return [moved(v) for v in value]
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        if attr.has(type(value)):
            return attr.evolve(value, **{getattr(f, "alias", None) or f.name.lstrip("_"):
                                         moved(getattr(value, f.name))
                                         for f in attr.fields(type(value)) if f.init})
        return value

    models = {mid: moved(model) for mid, model in config.models.items()}
    return attr.evolve(config, models=models, keep_cache=attr.evolve(config.keep_cache, dir=root))


def _absolute_dir(value: str) -> str | None:
    path = os.path.expanduser(value.strip())
    return os.path.normpath(path) if os.path.isabs(path) else None


def assign_cache_dirs(models: list[RawModel], default: KeepCache | None) -> None:
    """Expand ``${CACHE_DIR}`` in every value of each model (its own ``macros`` excepted):
    ``<model's keepCache.dir, else default.dir>/<model_dir_name(id)>``.

    A relative ``keepCache.dir`` is reported by :func:`read_model`; here it falls back to the
    default, so no second message names it.
    """
    default = default or _off()
    for model in models:
        root = default.dir
        own = model.data.get("keepCache")
        if isinstance(own, dict) and isinstance(own.get("dir"), str) and own["dir"].strip():
            root = _absolute_dir(own["dir"]) or root
        macros = Macros([("CACHE_DIR", os.path.join(root, model_dir_name(model.id)))])
        model.data = {k: (v if k == "macros" else macros.apply_tree(v)) for k, v in model.data.items()}


# --------------------------------------------------------------------------------------------
# keepCache


def _off() -> KeepCache:
    return KeepCache(enabled=False, dir=default_cache_root())


def read_global(r: Reader, cache_root: str | None) -> KeepCache:
    """The top-level ``keepCache`` (disabled when absent); its ``dir`` is the cache root:
    ``keepCache.dir``, else ``cache_root``, else :func:`default_cache_root`."""
    root = KeepCache(dir=cache_root or default_cache_root())
    written = _read(r, "keepCache", root)
    return written if written is not None else attr.evolve(root, enabled=False)


def read_model(r: Reader, default: KeepCache | None, argv: tuple[str, ...]) -> dict[str, Any]:
    """One model's ``keep_cache``, ``hooks_before_stop`` and ``hooks_after_ready`` (ModelConfig
    fields), read from the model's reader ``r``; ``default`` is the top-level ``keepCache``."""
    keep_cache = _effective(r, default or _off(), argv)
    hooks = r.sub("hooks")
    hooks.unknown_keys()
    return {"keep_cache": keep_cache,
            "hooks_before_stop": _read_hooks(hooks, "beforeStop"),
            "hooks_after_ready": _read_hooks(hooks, "afterReady")}


def _effective(r: Reader, default: KeepCache, argv: tuple[str, ...]) -> KeepCache | None:
    before = len(r.errors)
    own = _read(r, "keepCache", attr.evolve(default, enabled=True))
    path = slot_save_path(argv)
    if len(r.errors) > before:
        return None  # its own mistakes are reported; nothing more about it
    if own is not None:
        if not own.enabled:
            return None
        if path is None:
            r.error("keepCache", f"needs --slot-save-path in {r.at('cmd')} "
                                 "(add '--slot-save-path ${CACHE_DIR}' to it)")
            return None
        chosen = own
    elif default.enabled and path is not None:
        chosen = default
    else:
        return None
    directory = _absolute_dir(path)
    if directory is None:
        r.error("cmd", f"--slot-save-path must be an absolute path when keepCache is on{got(path)}")
        return None
    return attr.evolve(chosen, dir=directory)


def _read(r: Reader, key: str, base: KeepCache) -> KeepCache | None:
    """``keepCache`` at ``key`` of ``r`` over ``base`` (a mapping overrides the fields it sets);
    None when absent or invalid."""
    value = r.value(key)
    if value is None:
        return None
    if isinstance(value, (bool, str)):
        before = len(r.errors)
        enabled = r.bool(key, False)
        return attr.evolve(base, enabled=enabled) if len(r.errors) == before else None
    if not isinstance(value, dict):
        r.invalid(key, "must be a boolean or a mapping", value)
        return None
    s = r.sub(key)
    s.unknown_keys()
    directory = base.dir
    if s.has("dir"):
        text = s.str("dir")
        if text.strip():
            directory = _absolute_dir(text) or directory
            if _absolute_dir(text) is None:
                s.invalid("dir", "must be an absolute path", s.value("dir"))
    max_bytes = s.size("maxBytes", base.max_bytes)
    if s.has("maxBytes") and max_bytes == 0:
        s.invalid("maxBytes", "must be more than 0", s.value("maxBytes"))
        max_bytes = base.max_bytes
    return KeepCache(enabled=s.bool("enabled", True), dir=directory, max_bytes=max_bytes,
                     save_timeout=_seconds(s, "saveTimeout", base.save_timeout),
                     restore_timeout=_seconds(s, "restoreTimeout", base.restore_timeout))


def _seconds(r: Reader, key: str, default: float) -> float:
    value = r.value(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        r.invalid(key, "must be a positive number of seconds", value)
        return default
    return float(value)


# --------------------------------------------------------------------------------------------
# hooks.beforeStop / hooks.afterReady


def _read_hooks(h: Reader, key: str) -> tuple[Hook, ...]:
    value = h.value(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        h.invalid(key, "must be a list of HTTP calls ({method, path, body, timeout})", value)
        return ()
    hooks = []
    for i, item in enumerate(value):
        where = index_path(h.at(key), i)
        if not isinstance(item, dict):
            h.errors.append(f"{where}: {MSG_MAP} with method, path, body and timeout{got(item)}")
            continue
        hook = _read_hook(_CallReader(item, where, h.errors, h.warnings))
        if hook is not None:
            hooks.append(hook)
    return tuple(hooks)


class _CallReader(Reader):
    """Typed access to one call of a hooks list: its keys (``_HOOK_KEYS``) are list items' keys, not
    rows of the key table (which documents them in the list's own row)."""

    def value(self, key: str) -> Any:
        return self.data.get(key)


def _read_hook(c: Reader) -> Hook | None:
    before = len(c.errors)
    for name in c.data:
        if name not in _HOOK_KEYS:
            c.warnings.append(f"config: unknown key '{key_path(c.path, name)}' (ignored)")
    method = c.str("method", "POST").strip().upper()
    if method not in HOOK_METHODS:
        c.invalid("method", "must be one of " + ", ".join(HOOK_METHODS), c.value("method"))
    path = c.str("path").strip()
    if not c.has("path"):
        c.error("path", "is required")
    elif not path.startswith("/") and is_scalar(c.value("path")):
        c.invalid("path", "must start with '/'", c.value("path"))
    timeout = _seconds(c, "timeout", DEFAULT_HOOK_TIMEOUT)
    body = plain(c.value("body"))
    if len(c.errors) > before:
        return None
    return Hook(method, path, body, timeout)
