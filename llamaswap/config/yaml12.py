"""Reading YAML as YAML 1.2, which is what llama-swap's Go parser reads (CFG-1, CFG-2).

PyYAML implements YAML 1.1: ``yes``/``on`` are booleans, ``010`` is 8, ``12:30`` is 750, and a
duplicate key silently keeps the last value. Here the text is composed into nodes with the
YAML 1.2 core schema's resolvers, then :func:`build` turns the nodes into plain values itself,
reporting duplicate keys, bad scalars and unsupported tags as ``<path>: <message>`` lines.

Numbers keep the text they were written with (:class:`YInt`, :class:`YFloat`), because a key
typed as a string takes a number as written (``useModelName: 010`` is ``"010"``). The helpers
below say how such values read as text, how an error message shows them, and how a path names
where they are.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

from llamaswap.config import ConfigError

__all__ = [
    "YFloat", "YInt", "build", "compose", "got", "index_path", "interpolated_text", "is_scalar", "key_path",
    "plain", "scalar_text", "shown"]


# --------------------------------------------------------------------------------------------
# Paths and values

_NEEDS_BRACKETS = re.compile(r"[.\[\]\s]")


def key_path(path: str, key: Any) -> str:
    """``path.key``, or ``path["key"]`` for keys containing ``.``, ``[``, ``]`` or whitespace (CFG-3)."""
    key = str(key)
    if key == "" or _NEEDS_BRACKETS.search(key):
        escaped = key.replace("\\", "\\\\").replace('"', '\\"')
        return f'{path}["{escaped}"]'
    return f"{path}.{key}" if path else key


def index_path(path: str, i: int) -> str:
    """``path[i]``: the ``i``-th item of the list at ``path``."""
    return f"{path}[{i}]"


class YInt(int):
    """A YAML int that remembers its text as written (CFG-5: ``useModelName: 010`` is ``"010"``)."""
    text: str


class YFloat(float):
    """A YAML float that remembers its text as written."""
    text: str


def plain(value: Any) -> Any:
    """Strip the ``YInt``/``YFloat`` wrappers (metadata and params end up as plain JSON values)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def scalar_text(value: Any) -> str:
    """A scalar as text the way a string-typed key takes it: numbers as written, bools lowercase."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (YInt, YFloat)):
        return value.text
    return interpolated_text(value)


def interpolated_text(value: Any) -> str:
    """MAC-4: a value as text inside a longer string (numbers in shortest decimal form)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        f = float(value)
        if math.isnan(f):
            return "NaN"
        if math.isinf(f):
            return "+Inf" if f > 0 else "-Inf"
        if f == int(f) and abs(f) < 1e21:
            return str(int(f))
        return repr(f)
    return str(value)


def is_scalar(value: Any) -> bool:
    """A string, number or boolean (not null, not a list or mapping)."""
    return isinstance(value, (str, int, float, bool))




_SHOWN_MAX = 40


def got(value: Any, secret: bool = False) -> str:
    """`` (got <value>)``: how an error shows the offending value, at most ~40 characters."""
    if isinstance(value, dict):
        return " (got a mapping)"
    if isinstance(value, list):
        return " (got a list)"
    if secret and value is not None:
        return ""
    return f" (got {shown(value)})"


def shown(value: Any) -> str:
    """A scalar as error messages show it: strings quoted and escaped, everything cut to ~40 characters."""
    if value is None:
        return "null"
    if isinstance(value, str):
        if len(value) <= _SHOWN_MAX - 2:
            return repr(value)
        cut = repr(value[:_SHOWN_MAX - 3])
        return cut[:-1] + "\u2026" + cut[-1]
    text = scalar_text(value)
    return text if len(text) <= _SHOWN_MAX else text[:_SHOWN_MAX - 1] + "\u2026"


# --------------------------------------------------------------------------------------------
# Composing and building


class _CoreResolver(BaseResolver):
    """The YAML 1.2 core schema: only true/false (3 spellings) are bools; ints are decimal."""
    yaml_implicit_resolvers: dict = {}


_CoreResolver.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_CoreResolver.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"))
_CoreResolver.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
_CoreResolver.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])
_CoreResolver.add_implicit_resolver(
    "tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])


class _Composer(Reader, Scanner, Parser, Composer, _CoreResolver):
    """Builds the node graph only; values are constructed by :class:`_Builder` (paths, duplicates)."""

    def __init__(self, stream: str):
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        _CoreResolver.__init__(self)


def compose(text: str, source: str) -> Node | None:
    """The node graph of ``text``, or None for an empty document.

    :raises ConfigError: with ``<source>:<line>:<column>: <problem>`` for a syntax error.
    """
    loader = None
    try:
        loader = _Composer(text)
        return loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "invalid YAML"
        if mark is None:
            raise ConfigError([f"{source}: {problem}"]) from None
        raise ConfigError([f"{source}:{mark.line + 1}:{mark.column + 1}: {problem}"]) from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        col = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise ConfigError([f"{source}:{line}:{col}: special characters are not allowed"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{source}: {e}"]) from None
    finally:
        if loader is not None:
            loader.dispose()


class _Builder:
    """Turns composed nodes into Python values, collecting duplicate keys and bad scalars."""

    def __init__(self, errors: list[str], root: str):
        self.errors = errors
        self.root = root            # the name used for the top level's path (the file name)
        self.memo: dict[int, Any] = {}
        self.active: set[int] = set()

    def build(self, node: Node, path: str) -> Any:
        key = id(node)
        if key in self.memo:
            return self.memo[key]
        if key in self.active:
            self.errors.append(f"{path or self.root}: recursive YAML alias")
            return None
        self.active.add(key)
        try:
            if isinstance(node, ScalarNode):
                value = self.scalar(node, path)
            elif isinstance(node, SequenceNode):
                value = [self.build(child, index_path(path, i)) for i, child in enumerate(node.value)]
            else:
                value = self.mapping(node, path)
        finally:
            self.active.discard(key)
        self.memo[key] = value
        return value

    def scalar(self, node: ScalarNode, path: str) -> Any:
        tag, text = node.tag, node.value
        try:
            if tag == "tag:yaml.org,2002:str":
                return text
            if tag == "tag:yaml.org,2002:null":
                return None
            if tag == "tag:yaml.org,2002:bool":
                word = text.lower()
                if word in ("true", "false"):
                    return word == "true"
                raise ValueError(text)
            if tag == "tag:yaml.org,2002:int":
                v = YInt(_parse_int(text))
                v.text = text
                return v
            if tag == "tag:yaml.org,2002:float":
                v = YFloat(_parse_float(text))
                v.text = text
                return v
        except ValueError:
            self.errors.append(f"{path or self.root}: invalid {tag.rsplit(':', 1)[-1]} '{text}'")
            return text
        if tag == "tag:yaml.org,2002:merge":
            return text
        self.errors.append(f"{path or self.root}: unsupported YAML tag '{tag}'")
        return text

    def mapping(self, node: MappingNode, path: str) -> dict:
        result: dict[str, Any] = {}
        lines: dict[str, int] = {}
        merges: list[Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                merges.append(value_node)
                continue
            if not isinstance(key_node, ScalarNode):
                self.errors.append(f"{path or self.root}: mapping keys must be scalars "
                                   f"(line {key_node.start_mark.line + 1})")
                continue
            k = key_node.value
            line = key_node.start_mark.line + 1
            if k in lines:
                self.errors.append(f"{path or self.root}: duplicate key '{k}' (line {line})")
                continue
            lines[k] = line
            result[k] = self.build(value_node, key_path(path, k))
        for merge in merges:
            sources = merge.value if isinstance(merge, SequenceNode) else [merge]
            for src in sources:
                if not isinstance(src, MappingNode):
                    self.errors.append(f"{path or self.root}: '<<' must merge mappings")
                    continue
                merged = self.build(src, path)
                if isinstance(merged, dict):
                    for k, v in merged.items():
                        result.setdefault(k, v)
        return result


def _parse_int(text: str) -> int:
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)


def _parse_float(text: str) -> float:
    lowered = text.lower()
    if lowered.endswith(".inf"):
        return -math.inf if lowered.startswith("-") else math.inf
    if lowered == ".nan":
        return math.nan
    return float(text)


# --------------------------------------------------------------------------------------------


def build(node: Node, errors: list[str], source: str) -> Any:
    """The plain value of ``node``; problems are appended to ``errors``.

    :param source: the name the top level's path takes in messages (the file name).
    """
    return _Builder(errors, source).build(node, "")
