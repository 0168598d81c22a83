"""Macros (MAC-1..MAC-4, MAC-6) and ``${PORT}`` allocation (MAC-5).

Global ``macros`` apply to every value of the file; a model's own ``macros`` and ``${MODEL_ID}``
apply to that model's values. Macros are applied in reverse declaration order, so a macro may
use the ones declared before it. After expansion, the models whose ``cmd`` uses ``${PORT}`` get
consecutive ports from ``startPort``, and any ``${...}`` left is an unknown macro.

The functions here work on the raw values the YAML builder produced; the typed reading comes
after (:mod:`llamaswap.config.schema`).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import attr

from llamaswap.config.cmdline import strip_comment_lines
from llamaswap.config.yaml12 import got, index_path, interpolated_text, is_scalar, key_path

__all__ = [
    "Macros", "RawModel", "assign_ports", "check_leftovers", "check_model_leftovers", "expand_model",
    "model_macros", "nothing_in_use", "read_macros"]

_MACRO_NAME = re.compile(r"^[A-Za-z0-9_-]{1,63}$")
_RESERVED_MACROS = frozenset({"PORT", "MODEL_ID", "PID", "CACHE_DIR"})  # CACHE_DIR: config.keepcache
_LEFTOVER = re.compile(r"\$\{([^}]*)\}")


class Macros:
    """An ordered macro list applied in reverse declaration order (MAC-3, MAC-4)."""

    def __init__(self, items: list[tuple[str, Any]]):
        self.items = items

    def apply(self, value: Any) -> Any:
        if not isinstance(value, str) or "${" not in value:
            return value
        for name, macro in reversed(self.items):
            if not isinstance(value, str):
                break
            ref = "${" + name + "}"
            if ref not in value:
                continue
            if value == ref:
                value = macro
            else:
                value = value.replace(ref, interpolated_text(macro))
        return value

    def apply_tree(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self.apply_tree(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.apply_tree(v) for v in value]
        return self.apply(value)


def read_macros(raw: dict, path: str, errors: list[str]) -> list[tuple[str, Any]]:
    """MAC-1: the valid entries of the ``macros`` mapping at ``path``; the others are reported."""
    items = []
    for name, value in raw.items():
        where = key_path(path, name)
        if not _MACRO_NAME.match(name):
            errors.append(f"{where}: invalid macro name (use letters, digits, '_' and '-', up to 63)")
            continue
        if name in _RESERVED_MACROS:
            errors.append(f"{where}: '{name}' is a reserved macro name")
            continue
        if not is_scalar(value):
            errors.append(f"{where}: must be a scalar (string, number or boolean){got(value)}")
            continue
        if isinstance(value, str) and "${" + name + "}" in value:
            errors.append(f"{where}: value refers to itself")
            continue
        items.append((name, value))
    return items


def model_macros(model_id: str, global_items: list[tuple[str, Any]],
                 own: list[tuple[str, Any]]) -> Macros:
    """MAC-2: ``MODEL_ID``, then globals (overridden in place), then the model's new macros."""
    items = [("MODEL_ID", model_id)] + list(global_items)
    index = {name: i for i, (name, _) in enumerate(items)}
    for name, value in own:
        if name in index:
            items[index[name]] = (name, value)
        else:
            index[name] = len(items)
            items.append((name, value))
    return Macros(items)


def check_leftovers(value: Any, path: str, errors: list[str], allow: frozenset = frozenset()) -> None:
    """MAC-6: any ``${x}`` left after expansion is an unknown macro."""
    if isinstance(value, dict):
        for k, v in value.items():
            check_leftovers(v, key_path(path, k), errors, allow)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_leftovers(v, index_path(path, i), errors, allow)
    elif isinstance(value, str):
        for m in _LEFTOVER.finditer(value):
            if m.group(1) in allow:
                continue
            if m.group(1) == "PID":
                errors.append(f"{path}: '${{PID}}' is only allowed in cmdStop")
            else:
                errors.append(f"{path}: unknown macro '{m.group(0)}'")
            break


# --------------------------------------------------------------------------------------------
# Models: expansion and ${PORT}


@attr.s(auto_attribs=True)
class RawModel:
    """One model's values after macro expansion, before typed reading; ``port`` once assigned."""

    id: str
    path: str
    data: dict
    macros: Macros | None = None
    port: int | None = None


def _apply(data: dict, macros: Macros) -> dict:
    """``macros`` applied to every value of one model's mapping; its own ``macros`` are kept
    as written and ``filters`` get their own walk (:func:`_expand_filters`)."""
    expanded = {}
    for key, value in data.items():
        if key == "macros":
            expanded[key] = value
        elif key == "filters" and isinstance(value, dict):
            expanded[key] = _expand_filters(value, macros)
        else:
            expanded[key] = macros.apply_tree(value)
    return expanded


def expand_model(model_id: str, path: str, raw: dict, macros: Macros) -> RawModel:
    """Comment lines out of ``cmd``/``cmdStop`` (CMD-1), then the model's macros applied.

    A model without ``proxy`` gets ``http://localhost:${PORT}``, marked ``__default_proxy``.
    """
    data = dict(raw)
    for key in ("cmd", "cmdStop"):
        if isinstance(data.get(key), str):
            data[key] = strip_comment_lines(data[key])
    expanded = _apply(data, macros)
    if expanded.get("proxy") is None:
        expanded["proxy"] = "http://localhost:${PORT}"
        expanded["__default_proxy"] = True
    return RawModel(model_id, path, expanded, macros)


def _expand_filters(filters: dict, macros: Macros) -> dict:
    out = {}
    for key, value in filters.items():
        if key == "setParamsByID" and isinstance(value, dict):
            by_id = {}
            for name, params in value.items():
                new_name = macros.apply(name)
                by_id[new_name if isinstance(new_name, str) else interpolated_text(new_name)] = \
                    macros.apply_tree(params)
            out[key] = by_id
        else:
            out[key] = macros.apply_tree(value)
    return out


def nothing_in_use(port: int) -> bool:
    """The default ``port_in_use``: every port is free."""
    return False


def assign_ports(models: list[RawModel], start_port: int,
                  port_in_use: Callable[[int], bool] = nothing_in_use) -> None:
    """MAC-5: models whose cmd has ``${PORT}``, in code-point order of id, get consecutive
    ports from ``start_port``; a port ``port_in_use`` says is taken is skipped."""
    port = start_port
    for model in sorted(models, key=lambda m: m.id):
        cmd = model.data.get("cmd")
        if isinstance(cmd, str) and "${PORT}" in cmd:
            while port < 65535 and port_in_use(port):
                port += 1
            model.port = port
            port += 1
            model.data = _apply(model.data, Macros([("PORT", port - 1)]))


def check_model_leftovers(model: RawModel, errors: list[str]) -> None:
    """MAC-6 for one model: every ``${...}`` left is an error (``${PID}`` only in ``cmdStop``)."""
    for key, value in model.data.items():
        if key in ("macros", "__default_proxy"):
            continue
        where = key_path(model.path, key)
        if key == "proxy" and model.port is None and isinstance(value, str) and "${PORT}" in value:
            if isinstance(model.data.get("cmd"), str):    # else the cmd error says it all
                errors.append(f"{where}: proxy uses ${{PORT}} but cmd does not")
            continue
        if key == "filters" and isinstance(value, dict):
            for fkey, fvalue in value.items():
                fpath = key_path(where, fkey)
                if fkey == "setParamsByID" and isinstance(fvalue, dict):
                    for name, params in fvalue.items():
                        before = len(errors)
                        check_leftovers(name, key_path(fpath, name), errors)
                        if len(errors) == before:
                            check_leftovers(params, key_path(fpath, name), errors)
                else:
                    check_leftovers(fvalue, fpath, errors)
            continue
        allow = frozenset({"PID"}) if key == "cmdStop" else frozenset()
        check_leftovers(value, where, errors, allow)
