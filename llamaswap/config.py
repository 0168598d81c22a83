"""Loading and validating the llama-swap YAML config (every key: docs/configuration.rst).

The pipeline follows CFG-6 exactly: ``${env.NAME}`` on the raw text (MAC-7), a strict YAML 1.2
parse (CFG-1, CFG-2), comment-line removal in ``cmd``/``cmdStop`` (CMD-1), macro expansion
(MAC-1..4, MAC-6), ``${PORT}`` allocation (MAC-5), typed validation with defaults, and the
cross-checks (aliases, groups, profiles). Every problem is *collected* and reported together as
``<path>: <message>`` lines in one :class:`ConfigError` (CFG-3); warnings (CFG-4) are returned on
the :class:`Config` for the daemon to log.
"""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from typing import Any, Callable, Iterable, Mapping

import attr
import yaml
from yaml.composer import Composer
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

from llamaswap import configkeys
from llamaswap.errors import close_matches, either

__all__ = [
    "Config", "ConfigError", "GroupConfig", "ModelConfig", "PeerConfig", "load_config", "parse_config",
    "parse_size", "split_cmd",
]

DEFAULT_GROUP = "(default)"
MIN_HEALTH_CHECK_TIMEOUT = 15
DEFAULT_UNLOAD_TIMEOUT = 10
DEFAULT_CONCURRENCY_LIMIT = 10
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_TO_STDOUT = ("proxy", "upstream", "both", "none")
POLICIES = ("swap-aware", "fifo")

# The valid keys at each level come from the key table that docs/configuration.rst is generated from.
_TOP_KEYS = configkeys.children("")
_TOP_UNSUPPORTED = configkeys.unsupported_children("")
_MODEL_KEYS = configkeys.children("models.<id>")
_MODEL_UNSUPPORTED = configkeys.unsupported_children("models.<id>")
_FILTER_KEYS = configkeys.children("models.<id>.filters")
_GROUP_KEYS = configkeys.children("groups.<groupId>")
_PEER_KEYS = configkeys.children("peers.<peerId>")
_PEER_FILTER_KEYS = configkeys.children("peers.<peerId>.filters")

_MACRO_NAME = re.compile(r"^[A-Za-z0-9_-]{1,63}$")
_RESERVED_MACROS = frozenset({"PORT", "MODEL_ID", "PID"})
_LEFTOVER = re.compile(r"\$\{([^}]*)\}")
_ENV_REF = re.compile(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}")
_BOOL_WORDS = {
    "true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

MSG_INT = "must be a non-negative integer"
MSG_STR = "must be a string"
MSG_BOOL = "must be a boolean"
MSG_MAP = "must be a mapping"
MSG_STRLIST = "must be a list of strings"
MSG_SIZE = "must be a size (an integer number of bytes, or a string like '12GiB')"


class ConfigError(Exception):
    """The config is invalid; ``errors`` holds every problem as a ``<path>: <message>`` line (CFG-3)."""

    def __init__(self, errors: Iterable[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# --------------------------------------------------------------------------------------------
# Result types


@attr.s(frozen=True, auto_attribs=True)
class GroupConfig:
    id: str
    swap: bool = True
    exclusive: bool = True
    persistent: bool = False
    members: tuple = ()


@attr.s(frozen=True, auto_attribs=True)
class PeerConfig:
    id: str
    proxy: str
    api_key: str = ""
    models: tuple = ()
    strip_params: tuple = ()
    set_params: Any = attr.Factory(dict)


@attr.s(frozen=True, auto_attribs=True)
class ModelConfig:
    id: str
    cmd: str
    argv: tuple
    cmd_stop: str = ""
    cmd_stop_argv: tuple = ()
    proxy: str = ""
    env: tuple = ()
    check_endpoint: str | None = "/health"
    aliases: tuple = ()
    ttl: int = 0
    use_model_name: str = ""
    unlisted: bool = False
    name: str = ""
    description: str = ""
    metadata: Any = attr.Factory(dict)
    concurrency_limit: int = DEFAULT_CONCURRENCY_LIMIT
    strip_params: tuple = ()
    set_params: Any = attr.Factory(dict)
    set_params_by_id: Any = attr.Factory(dict)
    send_loading_state: bool = False
    unload_timeout: int = DEFAULT_UNLOAD_TIMEOUT
    port: int | None = None
    memory: int | None = None

    def env_dict(self) -> dict[str, str]:
        """The model's ``env`` as a dict; later entries win (CFG-34)."""
        return dict(self.env)

    def process_key(self) -> tuple:
        """The effective process config: equal keys mean the running child can be kept on reload."""
        return (self.argv, self.cmd_stop_argv, self.proxy, self.env, self.check_endpoint)


_IMPLICIT_GROUP = GroupConfig(DEFAULT_GROUP, swap=True, exclusive=True, persistent=False, members=())


@attr.s(frozen=True, auto_attribs=True)
class Config:
    source: str = "<config>"
    models: dict = attr.Factory(dict)
    groups: dict = attr.Factory(dict)
    profiles: dict = attr.Factory(dict)
    aliases: dict = attr.Factory(dict)
    health_check_timeout: int = 120
    log_level: str = "info"
    log_to_stdout: str = "proxy"
    start_port: int = 5800
    global_ttl: int = 0
    unload_timeout: int = DEFAULT_UNLOAD_TIMEOUT
    send_loading_state: bool = False
    include_aliases_in_list: bool = False
    api_keys: tuple = ()
    preload: tuple = ()
    max_wait: float = 30.0
    policy: str = "swap-aware"
    max_request_body: int = 2**30
    peers: dict = attr.Factory(dict)
    memory_budget: int | None = None
    memory_overhead: int = 2**30
    warnings: tuple = ()
    later_keys: tuple = ()

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
# Paths and small helpers


_NEEDS_BRACKETS = re.compile(r"[.\[\]\s]")


def _key(path: str, key: Any) -> str:
    """``path.key``, or ``path["key"]`` for keys containing ``.``, ``[``, ``]`` or whitespace (CFG-3)."""
    key = str(key)
    if key == "" or _NEEDS_BRACKETS.search(key):
        escaped = key.replace("\\", "\\\\").replace('"', '\\"')
        return f'{path}["{escaped}"]'
    return f"{path}.{key}" if path else key


def _idx(path: str, i: int) -> str:
    return f"{path}[{i}]"


class _YInt(int):
    """A YAML int that remembers its text as written (CFG-5: ``useModelName: 010`` is ``"010"``)."""
    text: str


class _YFloat(float):
    text: str


def _plain(value: Any) -> Any:
    """Strip the ``_YInt``/``_YFloat`` wrappers (metadata and params end up as plain JSON values)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _scalar_text(value: Any) -> str:
    """A scalar as text the way a string-typed key takes it: numbers as written, bools lowercase."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = getattr(value, "text", None)
    if text is not None:
        return text
    return _macro_text(value)


def _macro_text(value: Any) -> str:
    """MAC-4: interpolated text of a macro value (numbers in shortest decimal form)."""
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


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool))


# --------------------------------------------------------------------------------------------
# parse_size and split_cmd


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


def _strip_comment_lines(text: str) -> str:
    """CMD-1: drop lines whose first non-blank character is ``#``."""
    return "\n".join(line for line in text.split("\n") if not line.lstrip().startswith("#"))


def _join_continuations(text: str) -> str:
    """CMD-2: a line ending (after trimming) with ``\\`` has that ``\\`` replaced by a space."""
    out = []
    for line in text.split("\n"):
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            line = stripped[:-1] + " "
        out.append(line)
    return "\n".join(out)


_DQ_ESCAPABLE = frozenset('$`"\\\n')


def _split_words(text: str) -> list[str]:
    """CMD-3: POSIX shell word splitting, without any expansion."""
    words: list[str] = []
    cur: list[str] = []
    in_word = False
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\n":
            if in_word:
                words.append("".join(cur))
                cur, in_word = [], False
            i += 1
            continue
        in_word = True
        if c == "\\":
            if i + 1 < n:
                if text[i + 1] != "\n":
                    cur.append(text[i + 1])
                i += 2
            else:
                cur.append("\\")
                i += 1
        elif c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise ValueError("unterminated quote")
            cur.append(text[i + 1:end])
            i = end + 1
        elif c == '"':
            i += 1
            while True:
                if i >= n:
                    raise ValueError("unterminated quote")
                c = text[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and text[i + 1] in _DQ_ESCAPABLE:
                    if text[i + 1] != "\n":
                        cur.append(text[i + 1])
                    i += 2
                    continue
                cur.append(c)
                i += 1
        else:
            cur.append(c)
            i += 1
    if in_word:
        words.append("".join(cur))
    return words


def split_cmd(text: str) -> list[str]:
    """Split a ``cmd``/``cmdStop`` into argv (CMD-1 comment lines, CMD-2 continuations, CMD-3 quoting).

    :raises ValueError: ``"unterminated quote"`` when a quote is not closed.
    """
    return _split_words(_join_continuations(_strip_comment_lines(text)))


# --------------------------------------------------------------------------------------------
# Stage 1: ${env.NAME} on the raw text (MAC-7)


_BLOCK_INDICATOR = re.compile(r"(?:^|[\s:\-?])[|>][0-9+\-]*\s*(?:#.*)?$")


def _comment_spans(text: str) -> list[tuple[int, int]]:
    """Character ranges of YAML comments in ``text`` (a lexer good enough for MAC-7).

    Tracks quoted scalars (which may span lines) and block scalars (``|``/``>``), whose lines
    are content even when they start with ``#`` (those are CMD-1 comment lines, not YAML ones).
    """
    spans: list[tuple[int, int]] = []
    quote: str | None = None
    block_indent: int | None = None     # indentation of the line that opened a block scalar
    pos = 0
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        start = pos
        pos += len(line)
        if block_indent is not None and quote is None:
            stripped = body.lstrip(" ")
            indent = len(body) - len(stripped)
            if stripped.strip() == "" or indent > block_indent:
                continue
            block_indent = None
        i, n = 0, len(body)
        prev = " "
        code_end = n
        while i < n:
            c = body[i]
            if quote == "'":
                if c == "'":
                    if i + 1 < n and body[i + 1] == "'":
                        i += 2
                        continue
                    quote = None
            elif quote == '"':
                if c == "\\":
                    i += 2
                    continue
                if c == '"':
                    quote = None
            elif c == "#" and prev in " \t":
                spans.append((start + i, start + n))
                code_end = i
                break
            elif c in "'\"" and _opens_quote(body, i):
                quote = c
            prev = c
            i += 1
        if quote is None and _BLOCK_INDICATOR.search(body[:code_end].rstrip()):
            block_indent = len(body) - len(body.lstrip(" "))
    return spans


def _opens_quote(body: str, i: int) -> bool:
    """A quote starts a quoted scalar only where a node may start (not inside ``don't``)."""
    before = body[:i].rstrip(" \t")
    return before == "" or before[-1] in ":-[{,?"


def _substitute_env(text: str, source: str, environ: Mapping[str, str]) -> str:
    """MAC-7: replace ``${env.NAME}`` outside YAML comments; values escaped for double quotes."""
    spans = _comment_spans(text)
    errors: list[str] = []

    def in_comment(pos: int) -> bool:
        return any(a <= pos < b for a, b in spans)

    def where(pos: int) -> str:
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        return f"{source}:{line}:{col}"

    def replace(m: re.Match) -> str:
        if in_comment(m.start()):
            return m.group(0)
        name = m.group(1)
        value = environ.get(name)
        if value is None:
            errors.append(f"{where(m.start())}: environment variable '{name}' is not set")
            return m.group(0)
        if any(ch in value for ch in "\n\r\0"):
            errors.append(f"{where(m.start())}: environment variable '{name}' contains a newline, "
                          "carriage return or NUL")
            return m.group(0)
        return value.replace("\\", "\\\\").replace('"', '\\"')

    if "${env." not in text:
        return text
    result = _ENV_REF.sub(replace, text)
    if errors:
        raise ConfigError(errors)
    return result


# --------------------------------------------------------------------------------------------
# Stage 2: strict YAML 1.2 parse


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


def _compose(text: str, source: str) -> Node | None:
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
                value = [self.build(child, _idx(path, i)) for i, child in enumerate(node.value)]
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
                v = _YInt(_parse_int(text))
                v.text = text
                return v
            if tag == "tag:yaml.org,2002:float":
                v = _YFloat(_parse_float(text))
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
            result[k] = self.build(value_node, _key(path, k))
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
# Stage 4/5: macros and ${PORT}


class _Macros:
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
                value = value.replace(ref, _macro_text(macro))
        return value

    def apply_tree(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self.apply_tree(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.apply_tree(v) for v in value]
        return self.apply(value)


def _read_macros(raw: Any, path: str, errors: list[str]) -> list[tuple[str, Any]]:
    """MAC-1: validate a ``macros`` mapping; invalid entries are reported and left out."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        errors.append(f"{path}: {MSG_MAP}{_got(raw)}")
        return []
    items = []
    for name, value in raw.items():
        where = _key(path, name)
        if not _MACRO_NAME.match(name):
            errors.append(f"{where}: invalid macro name (use letters, digits, '_' and '-', up to 63)")
            continue
        if name in _RESERVED_MACROS:
            errors.append(f"{where}: '{name}' is a reserved macro name")
            continue
        if not _is_scalar(value):
            errors.append(f"{where}: must be a scalar (string, number or boolean){_got(value)}")
            continue
        if isinstance(value, str) and "${" + name + "}" in value:
            errors.append(f"{where}: value refers to itself")
            continue
        items.append((name, value))
    return items


def _model_macros(model_id: str, global_items: list[tuple[str, Any]],
                  own: list[tuple[str, Any]]) -> _Macros:
    """MAC-2: ``MODEL_ID``, then globals (overridden in place), then the model's new macros."""
    items = [("MODEL_ID", model_id)] + list(global_items)
    index = {name: i for i, (name, _) in enumerate(items)}
    for name, value in own:
        if name in index:
            items[index[name]] = (name, value)
        else:
            index[name] = len(items)
            items.append((name, value))
    return _Macros(items)


def _check_leftovers(value: Any, path: str, errors: list[str], allow: frozenset = frozenset()) -> None:
    """MAC-6: any ``${x}`` left after expansion is an unknown macro."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_leftovers(v, _key(path, k), errors, allow)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_leftovers(v, _idx(path, i), errors, allow)
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
# Stage 6: typed readers. Each returns the value (or the default) and appends errors.


class _Reader:
    """Typed access to one mapping with a path prefix; records errors and warnings.

    ``pattern`` is the path with placeholders (``models.<id>``): it selects the valid keys in
    :mod:`llamaswap.configkeys` and tells which values are secrets. Every read of a key goes
    through :meth:`value`.
    """

    def __init__(self, data: dict, path: str, errors: list[str], warnings: list[str],
                 pattern: str | None = None):
        self.data, self.path, self.errors, self.warnings = data, path, errors, warnings
        self.pattern = path if pattern is None else pattern

    def at(self, key: str) -> str:
        return _key(self.path, key)

    def value(self, key: str) -> Any:
        return self.data.get(key)

    def sub(self, key: str) -> "_Reader":
        """A reader for the mapping at ``key`` (empty when absent or invalid)."""
        return _Reader(self.mapping(key), self.at(key), self.errors, self.warnings,
                       configkeys.join(self.pattern, key))

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.at(key)}: {message}")

    def invalid(self, key: str, message: str, value: Any) -> None:
        """An error about ``value``, which the message shows (shortened) unless it is a secret."""
        secret = configkeys.is_secret(configkeys.join(self.pattern, key))
        self.errors.append(f"{self.at(key)}: {message}{_got(value, secret)}")

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
        if not _is_scalar(value):
            self.invalid(key, MSG_STR, value)
            return default
        return value if isinstance(value, str) else _scalar_text(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.value(key)
        if value is None:
            return default
        return _to_bool(value, self.at(key), self.errors, default)

    def str_list(self, key: str) -> tuple[str, ...]:
        value = self.value(key)
        if value is None:
            return ()
        return _str_list(value, self.at(key), self.errors,
                         secret=configkeys.is_secret(configkeys.join(self.pattern, key)))

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
        known = configkeys.children(self.pattern)
        unsupported = configkeys.unsupported_children(self.pattern)
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
    homes = [h for h in configkeys.homes_of(key) if h != pattern]
    if homes:
        where = " or ".join("the top level" if h == "" else f"'{h}'" for h in homes)
        return f"; '{key}' belongs under {where}"
    return ""


_SHOWN_MAX = 40


def _got(value: Any, secret: bool = False) -> str:
    """`` (got <value>)``: how an error shows the offending value, at most ~40 characters."""
    if isinstance(value, dict):
        return " (got a mapping)"
    if isinstance(value, list):
        return " (got a list)"
    if secret and value is not None:
        return ""
    return f" (got {_shown(value)})"


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        if len(value) <= _SHOWN_MAX - 2:
            return repr(value)
        cut = repr(value[:_SHOWN_MAX - 3])
        return cut[:-1] + "\u2026" + cut[-1]
    text = _scalar_text(value)
    return text if len(text) <= _SHOWN_MAX else text[:_SHOWN_MAX - 1] + "\u2026"


def _to_bool(value: Any, path: str, errors: list[str], default: bool) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _BOOL_WORDS and (
            value.islower() or value.isupper() or value == value.capitalize()):
        return _BOOL_WORDS[value.lower()]
    errors.append(f"{path}: {MSG_BOOL}{_got(value)}")
    return default


def _str_list(value: Any, path: str, errors: list[str], secret: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list):
        errors.append(f"{path}: {MSG_STRLIST}{_got(value, secret)}")
        return ()
    out = []
    for i, item in enumerate(value):
        if item is None or not _is_scalar(item):
            errors.append(f"{_idx(path, i)}: {MSG_STR}{_got(item, secret)}")
            continue
        out.append(item if isinstance(item, str) else _scalar_text(item))
    return tuple(out)


def _check_url(url: str, path: str, errors: list[str]) -> None:
    try:
        parts = urllib.parse.urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        ok = False
    if not ok:
        errors.append(f"{path}: must be an http or https URL with a host{_got(url)}")


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
            warnings.append(f"config: '{_key(path, k)}' cannot set the protected key 'model' (ignored)")
            continue
        out[k] = _plain(v)
    return out


# --------------------------------------------------------------------------------------------
# The model pipeline


@attr.s(auto_attribs=True)
class _RawModel:
    id: str
    path: str
    data: dict
    macros: _Macros | None = None
    port: int | None = None


def _prepare_model(model_id: str, raw: Any, global_macros: list, errors: list[str]) -> _RawModel | None:
    """Stages 3-4 for one model: comment lines out of cmd/cmdStop, then macro expansion."""
    path = _key("models", model_id)
    if not model_id or any(ord(ch) < 32 or ord(ch) == 127 for ch in model_id):
        errors.append(f"{path}: a model id must be non-empty and contain no control characters")
        return None
    if not isinstance(raw, dict):
        errors.append(f"{path}: {MSG_MAP}{_got(raw)}")
        return None
    data = dict(raw)
    for key in ("cmd", "cmdStop"):
        if isinstance(data.get(key), str):
            data[key] = _strip_comment_lines(data[key])
    raw_reader = _Reader(data, path, errors, [], "models.<id>")
    own = _read_macros(raw_reader.value("macros"), raw_reader.at("macros"), errors)
    macros = _model_macros(model_id, global_macros, own)
    expanded = {}
    for key, value in data.items():
        if key == "macros":
            expanded[key] = value
        elif key == "filters" and isinstance(value, dict):
            expanded[key] = _expand_filters(value, macros)
        else:
            expanded[key] = macros.apply_tree(value)
    if expanded.get("proxy") is None:
        expanded["proxy"] = "http://localhost:${PORT}"
        expanded["__default_proxy"] = True
    return _RawModel(model_id, path, expanded, macros)


def _expand_filters(filters: dict, macros: _Macros) -> dict:
    out = {}
    for key, value in filters.items():
        if key == "setParamsByID" and isinstance(value, dict):
            by_id = {}
            for name, params in value.items():
                new_name = macros.apply(name)
                by_id[new_name if isinstance(new_name, str) else _macro_text(new_name)] = \
                    macros.apply_tree(params)
            out[key] = by_id
        else:
            out[key] = macros.apply_tree(value)
    return out


def _nothing_in_use(port: int) -> bool:
    return False


def _assign_ports(models: list[_RawModel], start_port: int,
                  port_in_use: Callable[[int], bool] = _nothing_in_use) -> None:
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
            port_macro = _Macros([("PORT", port - 1)])
            data = {}
            for key, value in model.data.items():
                if key == "macros":
                    data[key] = value
                elif key == "filters" and isinstance(value, dict):
                    data[key] = _expand_filters(value, port_macro)
                else:
                    data[key] = port_macro.apply_tree(value)
            model.data = data


def _check_model_leftovers(model: _RawModel, errors: list[str]) -> None:
    for key, value in model.data.items():
        if key in ("macros", "__default_proxy"):
            continue
        where = _key(model.path, key)
        if key == "proxy" and model.port is None and isinstance(value, str) and "${PORT}" in value:
            if isinstance(model.data.get("cmd"), str):    # else the cmd error says it all
                errors.append(f"{where}: proxy uses ${{PORT}} but cmd does not")
            continue
        if key == "filters" and isinstance(value, dict):
            for fkey, fvalue in value.items():
                fpath = _key(where, fkey)
                if fkey == "setParamsByID" and isinstance(fvalue, dict):
                    for name, params in fvalue.items():
                        before = len(errors)
                        _check_leftovers(name, _key(fpath, name), errors)
                        if len(errors) == before:
                            _check_leftovers(params, _key(fpath, name), errors)
                else:
                    _check_leftovers(fvalue, fpath, errors)
            continue
        allow = frozenset({"PID"}) if key == "cmdStop" else frozenset()
        _check_leftovers(value, where, errors, allow)


def _build_model(model: _RawModel, top: dict, errors: list[str], warnings: list[str]) -> ModelConfig | None:
    """Stage 6 for one model: typed validation and defaults."""
    before = len(errors)
    r = _Reader(model.data, model.path, errors, warnings, "models.<id>")
    r.unknown_keys(frozenset({"__default_proxy"}))

    cmd, argv = _read_cmd(r, "cmd", required=True)
    cmd_stop, cmd_stop_argv = _read_cmd(r, "cmdStop", required=False)

    proxy = r.str("proxy").strip()
    if "${" not in proxy and not any(e.startswith(r.at("proxy") + ":") for e in errors[before:]):
        _check_url(proxy, r.at("proxy"), errors)

    env = []
    for i, entry in enumerate(r.str_list("env")):
        key, sep, value = entry.partition("=")
        if not sep or not key:
            errors.append(f"{_idx(r.at('env'), i)}: must be KEY=VALUE with a non-empty KEY")
            continue
        env.append((key, value))

    check = r.str("checkEndpoint", "/health").strip()
    check_endpoint: str | None
    if check == "none":
        check_endpoint = None
    else:
        check_endpoint = check if check.startswith("/") else "/" + check

    ttl = r.int("ttl", None, allow_minus_one=True)
    concurrency = r.int("concurrencyLimit", 0) or DEFAULT_CONCURRENCY_LIMIT
    unload = r.int("unloadTimeout", 0) or top["unload_timeout"]
    metadata = r.mapping("metadata")
    strip, set_params, by_id = _read_filters(r, warnings)
    memory = r.size("memory", None)
    aliases = r.str_list("aliases")
    for i, alias in enumerate(aliases):
        if not alias:
            errors.append(f"{_idx(r.at('aliases'), i)}: must not be empty")

    use_model_name = r.str("useModelName")
    unlisted = r.bool("unlisted", False)
    name = r.str("name").strip()
    description = r.str("description").strip()
    send_loading_state = r.bool("sendLoadingState", top["send_loading_state"])
    if len(errors) > before:
        return None
    return ModelConfig(
        id=model.id, cmd=cmd, argv=argv, cmd_stop=cmd_stop, cmd_stop_argv=cmd_stop_argv, proxy=proxy,
        env=tuple(env), check_endpoint=check_endpoint, aliases=aliases,
        ttl=top["global_ttl"] if ttl is None else ttl,
        use_model_name=use_model_name, unlisted=unlisted, name=name, description=description,
        metadata=_plain(metadata), concurrency_limit=concurrency, strip_params=strip, set_params=set_params,
        set_params_by_id=by_id, send_loading_state=send_loading_state,
        unload_timeout=unload, port=model.port, memory=memory)


def _read_cmd(r: _Reader, key: str, required: bool) -> tuple[str, tuple]:
    value = r.value(key)
    if value is None:
        if required:
            r.error(key, "is required")
        return "", ()
    if not _is_scalar(value):
        r.invalid(key, MSG_STR, value)
        return "", ()
    text = value if isinstance(value, str) else _scalar_text(value)
    try:
        argv = tuple(split_cmd(text))
    except ValueError as e:
        r.error(key, str(e))
        return text, ()
    if not argv:
        r.error(key, "must not be empty")
    return text, argv


def _read_filters(r: _Reader, warnings: list[str]) -> tuple[tuple, dict, dict]:
    f = r.sub("filters")
    f.unknown_keys()
    if f.has("stripParams") and f.has("strip_params"):
        f.error("strip_params", "cannot be used together with stripParams")
    strip_key = "stripParams" if f.has("stripParams") or not f.has("strip_params") else "strip_params"
    strip = _strip_params(f.str(strip_key), f.at(strip_key), warnings)
    set_params = _set_params(f.mapping("setParams"), f.at("setParams"), warnings)
    by_id = {}
    for name, params in f.mapping("setParamsByID").items():
        where = _key(f.at("setParamsByID"), name)
        if not isinstance(params, dict):
            r.errors.append(f"{where}: {MSG_MAP}{_got(params)}")
            continue
        by_id[name] = _set_params(params, where, warnings)
    return strip, set_params, by_id


# --------------------------------------------------------------------------------------------
# Top level


def _read_top(data: dict, errors: list[str], warnings: list[str]) -> dict:
    r = _Reader(data, "", errors, warnings)
    top: dict[str, Any] = {}
    hct = r.int("healthCheckTimeout", 120)
    if hct < MIN_HEALTH_CHECK_TIMEOUT:
        warnings.append(f"config: healthCheckTimeout {hct} is below {MIN_HEALTH_CHECK_TIMEOUT}; "
                        f"using {MIN_HEALTH_CHECK_TIMEOUT}")
        hct = MIN_HEALTH_CHECK_TIMEOUT
    top["health_check_timeout"] = hct
    level = r.str("logLevel", "info")
    if level.lower() not in LOG_LEVELS:
        warnings.append(f"config: logLevel '{level}' is not one of debug, info, warn, error; using info")
        level = "info"
    top["log_level"] = level.lower()
    to_stdout = r.str("logToStdout", "proxy")
    if to_stdout not in LOG_TO_STDOUT:
        r.invalid("logToStdout", "must be one of proxy, upstream, both, none", r.value("logToStdout"))
        to_stdout = "proxy"
    top["log_to_stdout"] = to_stdout
    port = r.int("startPort", 5800)
    if not 1 <= port <= 65535:
        r.invalid("startPort", "must be an integer from 1 to 65535", port)
        port = 5800
    top["start_port"] = port
    top["global_ttl"] = r.int("globalTTL", 0)
    top["unload_timeout"] = r.int("unloadTimeout", 0) or DEFAULT_UNLOAD_TIMEOUT
    top["send_loading_state"] = r.bool("sendLoadingState", False)
    top["include_aliases_in_list"] = r.bool("includeAliasesInList", False)
    keys = r.str_list("apiKeys")
    raw_keys = r.value("apiKeys")
    for i, item in enumerate(raw_keys if isinstance(raw_keys, list) else ()):
        key = _scalar_text(item) if item is not None and _is_scalar(item) else None
        if key is not None and (not key or any(ch.isspace() for ch in key)):
            errors.append(f"{_idx('apiKeys', i)}: must be non-empty and contain no whitespace")
    top["api_keys"] = keys
    top["max_request_body"] = r.size("maxRequestBody", 2**30)
    _read_scheduler(r, top)
    _read_hooks(r, top)
    _read_memory(r, top)
    return top


def _read_scheduler(r: _Reader, top: dict) -> None:
    s = r.sub("scheduler")
    s.unknown_keys()
    max_wait = s.value("maxWait")
    top["max_wait"] = 30.0
    if max_wait is not None:
        if isinstance(max_wait, bool) or not isinstance(max_wait, (int, float)) \
                or not max_wait >= 0 or math.isinf(max_wait):
            s.invalid("maxWait", "must be a non-negative number", max_wait)
        else:
            top["max_wait"] = float(max_wait)
    policy = s.str("policy", "swap-aware")
    if policy not in POLICIES:
        s.invalid("policy", "must be 'swap-aware' or 'fifo'", s.value("policy"))
        policy = "swap-aware"
    top["policy"] = policy


def _read_hooks(r: _Reader, top: dict) -> None:
    h = r.sub("hooks")
    h.unknown_keys()
    s = h.sub("on_startup")
    s.unknown_keys()
    top["preload"] = s.str_list("preload")


def _read_memory(r: _Reader, top: dict) -> None:
    m = r.sub("memory")
    m.unknown_keys()
    top["memory_budget"] = m.size("budget", None)
    top["memory_overhead"] = m.size("overhead", 2**30)


def _read_peers(data: dict, errors: list[str], warnings: list[str]) -> dict[str, PeerConfig]:
    peers = {}
    r = _Reader(data, "", errors, warnings)
    for peer_id, raw in r.mapping("peers").items():
        path = _key("peers", peer_id)
        if not isinstance(raw, dict):
            errors.append(f"{path}: {MSG_MAP}{_got(raw)}")
            continue
        before = len(errors)
        p = _Reader(raw, path, errors, warnings, "peers.<peerId>")
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
        if len(errors) == before:
            peers[peer_id] = PeerConfig(peer_id, proxy, p.str("apiKey"), models, strip, set_params)
    return peers


def _read_groups(data: dict, models: Mapping[str, Any], errors: list[str],
                 warnings: list[str]) -> dict[str, GroupConfig]:
    groups: dict[str, GroupConfig] = {}
    owner: dict[str, str] = {}
    r = _Reader(data, "", errors, warnings)
    for gid, raw in r.mapping("groups").items():
        path = _key("groups", gid)
        if not isinstance(raw, dict):
            errors.append(f"{path}: {MSG_MAP}{_got(raw)}")
            continue
        g = _Reader(raw, path, errors, warnings, "groups.<groupId>")
        g.unknown_keys()
        members = []
        for i, member in enumerate(g.str_list("members")):
            where = _idx(g.at("members"), i)
            if member not in models:
                errors.append(f"{where}: unknown model '{member}'")
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


def _read_profiles(data: dict, resolve: Callable[[str], str | None], errors: list[str],
                   warnings: list[str]) -> dict[str, tuple[str, ...]]:
    profiles: dict[str, tuple[str, ...]] = {}
    r = _Reader(data, "", errors, warnings)
    for name, raw in r.mapping("profiles").items():
        path = _key("profiles", name)
        if isinstance(raw, dict):
            warnings.append(f"config: llama-swap key '{path}' is not supported by llamaswap (ignored)")
            continue
        if not name or ":" in name:
            errors.append(f"{path}: a profile name must be non-empty and must not contain ':'")
            continue
        ids: list[str] = []
        for i, entry in enumerate(_str_list(raw, path, errors)):
            model_id = resolve(entry)
            if model_id is None:
                errors.append(f"{_idx(path, i)}: unknown model '{entry}'")
            elif model_id not in ids:
                ids.append(model_id)
        profiles[name] = tuple(ids)
    return profiles


def _collect_aliases(built: dict[str, ModelConfig], all_ids: Iterable[str],
                     errors: list[str]) -> tuple[dict[str, str], dict[str, ModelConfig]]:
    """CFG-35/CFG-46: aliases (and setParamsByID names) are unique and never equal an id."""
    ids = set(all_ids)
    owners: dict[str, str] = {}
    result: dict[str, ModelConfig] = {}
    for model_id, model in built.items():
        path = _key("models", model_id)
        names = [(a, _idx(_key(path, "aliases"), i)) for i, a in enumerate(model.aliases)]
        by_id_path = _key(_key(path, "filters"), "setParamsByID")
        names += [(n, _key(by_id_path, n)) for n in model.set_params_by_id if n != model_id]
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
    for row in configkeys.KEYS:
        parent = configkeys.find(row.parent)
        if row.status == configkeys.NOT_IMPLEMENTED and not (
                parent is not None and parent.status == configkeys.NOT_IMPLEMENTED):
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
            yield from _present(child, rest, _key(path, name))
    elif head in node:
        yield from _present(node[head], rest, _key(path, head))


def parse_config(text: str, source: str = "<config>", environ: Mapping[str, str] | None = None,
                 port_in_use: Callable[[int], bool] = _nothing_in_use) -> Config:
    """Parse and validate a config (CFG-6 order).

    :param text: the YAML text.
    :param source: the file name used in YAML syntax errors and ``Config.source``.
    :param environ: the environment for ``${env.NAME}`` (default ``os.environ``).
    :param port_in_use: ``(port) -> bool``; ``${PORT}`` allocation skips ports it says are
        taken (default: none is).
    :raises ConfigError: listing every problem found.
    """
    environ = os.environ if environ is None else environ
    text = _substitute_env(text, source, environ)
    try:
        node = _compose(text, source)
    except RecursionError:
        raise ConfigError([f"{source}: the YAML is nested too deeply"]) from None
    errors: list[str] = []
    warnings: list[str] = []
    try:
        data = _Builder(errors, source).build(node, "") if node is not None else None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(errors + [f"{source}: the top level must be a mapping"])
        return _validate(data, source, errors, warnings, port_in_use)
    except RecursionError:
        raise ConfigError([f"{source}: the YAML is nested too deeply"]) from None


def _validate(data: dict, source: str, errors: list[str], warnings: list[str],
              port_in_use: Callable[[int], bool] = _nothing_in_use) -> Config:
    global_macros = _read_macros(_Reader(data, "", errors, warnings).value("macros"), "macros", errors)
    macros = _Macros(global_macros)
    top_data = {k: (v if k in ("models", "macros") else macros.apply_tree(v)) for k, v in data.items()}
    for key, value in top_data.items():
        if key in _TOP_KEYS and key not in ("models", "macros"):
            _check_leftovers(value, _key("", key), errors)

    top_reader = _Reader(top_data, "", errors, warnings)
    top_reader.unknown_keys()
    top = _read_top(top_data, errors, warnings)

    raw_models = top_reader.mapping("models")
    prepared = [m for m in (_prepare_model(mid, raw, global_macros, errors) for mid, raw in raw_models.items())
                if m is not None]
    _assign_ports(prepared, top["start_port"], port_in_use)
    built: dict[str, ModelConfig] = {}
    for model in prepared:
        before = len(errors)
        _check_model_leftovers(model, errors)
        if len(errors) > before:
            _build_model(model, top, errors, warnings)      # still report its type errors
            continue
        cfg = _build_model(model, top, errors, warnings)
        if cfg is not None:
            if top["memory_budget"] is not None and cfg.memory is not None and cfg.memory > top["memory_budget"]:
                errors.append(f"{_key(model.path, 'memory')}: larger than memory.budget"
                              f"{_got(model.data.get('memory'))}")
            built[model.id] = cfg

    aliases, built = _collect_aliases(built, raw_models.keys(), errors)

    def resolve(name: str) -> str | None:
        if name in raw_models:
            return name
        return aliases.get(name)

    groups = _read_groups(top_data, raw_models, errors, warnings)
    profiles = _read_profiles(top_data, resolve, errors, warnings)
    peers = _read_peers(top_data, errors, warnings)
    if errors:
        raise ConfigError(_dedupe(errors))
    return Config(
        source=source, models=built, groups=groups, profiles=profiles, aliases=aliases, peers=peers,
        warnings=tuple(_dedupe(warnings)), later_keys=_later_keys(data), **top)


def _dedupe(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))


def load_config(path: str, port_in_use: Callable[[int], bool] | None = None) -> Config:
    """Read and parse the config file at ``path``.

    ``${PORT}`` allocation skips ports ``port_in_use`` says are taken; by default, ports
    something on this machine listens on.

    :raises ConfigError: when the file cannot be read or is not valid UTF-8, or is invalid.
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
    if text.startswith("\ufeff"):
        text = text[1:]
    if port_in_use is None:
        from llamaswap.ports import port_in_use
    return parse_config(text, path, port_in_use=port_in_use)
