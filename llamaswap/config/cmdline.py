"""Command lines (``cmd``, ``cmdStop``): comment lines, continuations, POSIX word splitting.

Pure text functions; nothing here knows about YAML or the config types.
"""

from __future__ import annotations

__all__ = ["split_cmd", "strip_comment_lines"]

_DQ_ESCAPABLE = frozenset('$`"\\\n')


def strip_comment_lines(text: str) -> str:
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
    return _split_words(_join_continuations(strip_comment_lines(text)))
