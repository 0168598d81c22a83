"""Typed access to one mapping of the config, with its path, collecting errors and warnings.

:class:`Reader` is what every part of :mod:`llamaswap.config.schema` reads keys through: it knows
the path of its mapping for messages (``models.llama.ttl: ...``), asks the key table
(:mod:`llamaswap.config.keys`) which keys are valid there and which values are secrets, and
returns a default when a value is missing or has the wrong type.
"""

from __future__ import annotations

from typing import Any, Iterable

from llamaswap.config import parse_size
from llamaswap.config.keys import children, homes_of, is_secret, join, unsupported_children
from llamaswap.config.yaml12 import got, index_path, is_scalar, key_path, scalar_text
from llamaswap.errors import close_matches, either

__all__ = ["MSG_BOOL", "MSG_INT", "MSG_MAP", "MSG_SIZE", "MSG_STR", "MSG_STRLIST", "Reader", "to_str_list"]

MSG_INT = "must be a non-negative integer"
MSG_STR = "must be a string"
MSG_BOOL = "must be a boolean"
MSG_MAP = "must be a mapping"
MSG_STRLIST = "must be a list of strings"
MSG_SIZE = "must be a size (an integer number of bytes, or a string like '12GiB')"

_BOOL_WORDS = {
    "true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


class Reader:
    """Typed access to one mapping with a path prefix; records errors and warnings.

    ``pattern`` is the path with placeholders (``models.<id>``): it selects the valid keys in
    :mod:`llamaswap.config.keys` and tells which values are secrets. Every read of a key goes
    through :meth:`value`.
    """

    def __init__(self, data: dict, path: str, errors: list[str], warnings: list[str],
                 pattern: str | None = None):
        self.data, self.path, self.errors, self.warnings = data, path, errors, warnings
        self.pattern = path if pattern is None else pattern

    def at(self, key: str) -> str:
        return key_path(self.path, key)

    def value(self, key: str) -> Any:
        return self.data.get(key)

    def sub(self, key: str) -> "Reader":
        """A reader for the mapping at ``key`` (empty when absent or invalid)."""
        return Reader(self.mapping(key), self.at(key), self.errors, self.warnings,
                       join(self.pattern, key))

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.at(key)}: {message}")

    def invalid(self, key: str, message: str, value: Any) -> None:
        """An error about ``value``, which the message shows (shortened) unless it is a secret."""
        secret = is_secret(join(self.pattern, key))
        self.errors.append(f"{self.at(key)}: {message}{got(value, secret)}")

    def has(self, key: str) -> bool:
        return self.value(key) is not None

    def int(self, key: str, default: int | None, allow_minus_one: bool = False) -> int | None:
        value = self.value(key)
        if value is None:
            return default
        if allow_minus_one and isinstance(value, int) and not isinstance(value, bool) and value == -1:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.invalid(key, MSG_INT, value)
            return default
        return int(value)

    def str(self, key: str, default: str = "") -> str:
        value = self.value(key)
        if value is None:
            return default
        if not is_scalar(value):
            self.invalid(key, MSG_STR, value)
            return default
        return value if isinstance(value, str) else scalar_text(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.value(key)
        if value is None:
            return default
        return _to_bool(value, self.at(key), self.errors, default)

    def str_list(self, key: str) -> tuple[str, ...]:
        value = self.value(key)
        if value is None:
            return ()
        return to_str_list(value, self.at(key), self.errors,
                         secret=is_secret(join(self.pattern, key)))

    def mapping(self, key: str) -> dict:
        value = self.value(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.invalid(key, MSG_MAP, value)
            return {}
        return value

    def size(self, key: str, default: int | None) -> int | None:
        value = self.value(key)
        if value is None:
            return default
        try:
            return parse_size(value)
        except ValueError:
            self.invalid(key, MSG_SIZE, value)
            return default

    def unknown_keys(self, internal: frozenset = frozenset()) -> None:
        """Warn about every key the key table does not list here (``internal`` ones excepted)."""
        known = children(self.pattern)
        unsupported = unsupported_children(self.pattern)
        for key in self.data:
            if key in known or key in internal:
                continue
            if key in unsupported:
                self.warnings.append(
                    f"config: llama-swap key '{self.at(key)}' is not supported by llamaswap (ignored)")
            else:
                self.warnings.append(
                    f"config: unknown key '{self.at(key)}' (ignored){_did_you_mean(str(key), known, self.pattern)}")


def _did_you_mean(key: str, known: Iterable[str], pattern: str) -> str:
    """``; did you mean 'ttl'?`` for a close key here, else where the key belongs, else nothing."""
    close = close_matches(key, known)
    if close:
        return f"; did you mean {either(close)}?"
    homes = [h for h in homes_of(key) if h != pattern]
    if homes:
        where = " or ".join("the top level" if h == "" else f"'{h}'" for h in homes)
        return f"; '{key}' belongs under {where}"
    return ""


def _to_bool(value: Any, path: str, errors: list[str], default: bool) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _BOOL_WORDS and (
            value.islower() or value.isupper() or value == value.capitalize()):
        return _BOOL_WORDS[value.lower()]
    errors.append(f"{path}: {MSG_BOOL}{got(value)}")
    return default


def to_str_list(value: Any, path: str, errors: list[str], secret: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list):
        errors.append(f"{path}: {MSG_STRLIST}{got(value, secret)}")
        return ()
    out = []
    for i, item in enumerate(value):
        if item is None or not is_scalar(item):
            errors.append(f"{index_path(path, i)}: {MSG_STR}{got(item, secret)}")
            continue
        out.append(item if isinstance(item, str) else scalar_text(item))
    return tuple(out)
