"""``${env.NAME}`` substitution on the raw config text, before the YAML is parsed (MAC-7).

References inside YAML comments are left alone, so a commented-out line may name a variable
that is not set. Values are escaped for double-quoted scalars.
"""

from __future__ import annotations

import re
from typing import Mapping

from llamaswap.config import ConfigError

__all__ = ["substitute_env"]

_ENV_REF = re.compile(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}")
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


def substitute_env(text: str, source: str, environ: Mapping[str, str]) -> str:
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
