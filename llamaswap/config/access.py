"""``apiKeys``: plain keys and scoped keys, read into :class:`ApiKey` values.

An entry of ``apiKeys`` is either a string (a key with full access, admin included) or a
mapping naming what the key may do::

    apiKeys:
      - "${env.ADMIN_KEY}"                     # full access
      - key: "${env.ALICE_KEY}"
        name: alice                            # shown in the access log and /metrics
        models: ["chat-*", chat]               # globs of ids, aliases, profiles, selectors
        admin: false                           # management endpoints, /logs, /upstream
        maxConcurrent: 2                       # requests in flight at once (0: no limit)
        priority: 0                            # order among waiting requests

The key itself is a secret: no message here ever shows it. This module imports nothing from
llamaswap at import time (``llamaswap.config`` imports it for the type); the reader's helpers
are imported when a config is read.
"""
from __future__ import annotations

from typing import Any, Optional

import attr

__all__ = ["ApiKey", "ENTRY_KEYS", "read_api_keys"]

#: the keys of an ``apiKeys`` entry in mapping form
ENTRY_KEYS = ("key", "name", "models", "admin", "maxConcurrent", "priority")


@attr.s(frozen=True, auto_attribs=True)
class ApiKey:
    """One API key and its scope.

    :ivar key: the secret itself; compared in constant time, never logged or shown.
    :ivar name: what logs and metrics call the key (``key<N>`` for the N-th entry by default).
    :ivar models: glob patterns (``fnmatch``, case-sensitive) of the model ids, aliases,
        profiles and selectors the key may use; ``("*",)`` is everything.
    :ivar admin: may call the management endpoints; ``None`` when not written: then the key is
        an admin only if no entry of ``apiKeys`` sets ``admin`` (a plain string entry counts as
        ``admin: true``).
    :ivar max_concurrent: requests of this key in flight at once; 0 means no limit.
    :ivar priority: among waiting requests, a higher priority is served first.
    """

    key: str = attr.ib(repr=False)  # the key never shows, not even in a traceback
    name: str = attr.ib()
    models: tuple[str, ...] = ("*",)
    admin: Optional[bool] = None
    max_concurrent: int = 0
    priority: int = 0


def read_api_keys(r: Any) -> tuple[tuple[str, ...], tuple[ApiKey, ...]]:
    """``apiKeys`` of the top-level ``Reader`` ``r``: ``(key strings, scopes)``.

    ``scopes`` is empty when every entry is a plain string (every key has full access, and the
    metrics keep their labels); otherwise it holds one :class:`ApiKey` per entry, in order.
    Problems are collected in ``r.errors``/``r.warnings``; invalid entries are left out.
    """
    from llamaswap.config.yaml12 import index_path

    raw = r.value("apiKeys")
    if raw is None:
        return (), ()
    if not isinstance(raw, list):
        r.invalid("apiKeys", "must be a list of strings", raw)
        return (), ()
    entries: list[tuple[str, ApiKey]] = []
    scoped = False
    for i, item in enumerate(raw):
        where = index_path("apiKeys", i)
        if isinstance(item, dict):
            scoped = True
            entry = _read_entry(r, item, where, i)
        else:
            entry = _read_plain(r, item, where, i)
        if entry is not None:
            entries.append((where, entry))
    _check_unique(r, entries)
    keys = tuple(e.key for _, e in entries)
    return keys, (tuple(e for _, e in entries) if scoped else ())


def _read_plain(r: Any, item: Any, where: str, i: int) -> Optional[ApiKey]:
    from llamaswap.config.reader import MSG_STR
    from llamaswap.config.yaml12 import got, is_scalar, scalar_text

    if item is None or not is_scalar(item):
        r.errors.append(f"{where}: {MSG_STR} or a mapping{got(item, True)}")
        return None
    key = scalar_text(item)
    if not _valid_key(key):
        r.errors.append(f"{where}: must be non-empty and contain no whitespace")
        return None
    return ApiKey(key, f"key{i + 1}", admin=True)


def _read_entry(r: Any, item: dict, where: str, i: int) -> Optional[ApiKey]:
    """One mapping entry; None when it has an error (each error is collected).

    Its keys are read from the mapping directly: an entry is a list item, so its keys are
    documented in the ``apiKeys`` row of the key table rather than as rows of their own.
    """
    from llamaswap.config.reader import MSG_INT, MSG_STR, to_str_list
    from llamaswap.config.yaml12 import got, is_scalar, key_path, scalar_text

    errors = r.errors
    before = len(errors)
    _warn_unknown(r, item, where)

    def text(name: str, secret: bool = False) -> Optional[str]:
        value = item.get(name)
        if value is None:
            return None
        if not is_scalar(value):
            errors.append(f"{key_path(where, name)}: {MSG_STR}{got(value, secret)}")
            return None
        return value if isinstance(value, str) else scalar_text(value)

    key = text("key", secret=True)
    if key is None and item.get("key") is None:
        errors.append(f"{key_path(where, 'key')}: is required")
    elif key is not None and not _valid_key(key):
        errors.append(f"{key_path(where, 'key')}: must be non-empty and contain no whitespace")
    name = text("name")
    name = f"key{i + 1}" if name is None else name.strip()
    if not name or any(ch.isspace() or ord(ch) < 32 for ch in name):
        errors.append(f"{key_path(where, 'name')}: must be non-empty and contain no whitespace"
                      f"{got(item.get('name'))}")
    models: tuple[str, ...] = ("*",)
    globs = item.get("models")
    if isinstance(globs, str):
        globs = [globs]  # one glob written without brackets
    if globs is not None:
        models = tuple(g.strip() for g in to_str_list(globs, key_path(where, "models"), errors))
        if not globs:
            errors.append(f"{key_path(where, 'models')}: must not be empty (leave it out for every model)")
        elif any(not g for g in models):
            errors.append(f"{key_path(where, 'models')}: a pattern must not be empty")
    admin = _flag(item.get("admin"), key_path(where, "admin"), errors)
    limit = item.get("maxConcurrent", 0)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        errors.append(f"{key_path(where, 'maxConcurrent')}: {MSG_INT}{got(limit)}")
        limit = 0
    priority = item.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        errors.append(f"{key_path(where, 'priority')}: must be an integer{got(priority)}")
        priority = 0
    if len(errors) > before:
        return None
    return ApiKey(key or "", name, models, admin, int(limit), int(priority))


def _flag(value: Any, path: str, errors: list[str]) -> Optional[bool]:
    """``admin``: a boolean, read as every boolean key is (``yes``/``no``/``on``/``off`` too), or None."""
    from llamaswap.config.reader import _to_bool

    return None if value is None else _to_bool(value, path, errors, None)  # type: ignore[arg-type]


def _warn_unknown(r: Any, item: dict, where: str) -> None:
    from llamaswap.config.yaml12 import key_path
    from llamaswap.errors import close_matches, either

    for name in item:
        if name in ENTRY_KEYS:
            continue
        close = close_matches(str(name), ENTRY_KEYS)
        hint = f"; did you mean {either(close)}?" if close else ""
        r.warnings.append(f"config: unknown key '{key_path(where, name)}' (ignored){hint}")


def _valid_key(key: str) -> bool:
    return bool(key) and not any(ch.isspace() for ch in key)


def _check_unique(r: Any, entries: list[tuple[str, ApiKey]]) -> None:
    """Two entries with one key would make the key's scope ambiguous; two with one name would
    mix their counts in the metrics and the log."""
    from llamaswap.config.yaml12 import shown

    keys: dict[str, str] = {}
    names: dict[str, str] = {}
    for where, entry in entries:
        if entry.key in keys:
            r.errors.append(f"{where}: the same key as {keys[entry.key]} (each key may be listed once)")
        keys.setdefault(entry.key, where)
        if entry.name in names:
            r.errors.append(f"{where}: name {shown(entry.name)} is already used by {names[entry.name]}")
        names.setdefault(entry.name, where)
