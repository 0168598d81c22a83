"""The self-contained keys llama-swap added after v200, read with llama-swap v250's defaults and checks.

Per model and per peer: ``timeouts``; per model: ``compat.ignoreWebsockets`` and
``capabilities``. Top level: ``upstream.ignorePaths``, ``logTimeFormat``, ``metricsMaxInMemory``,
``captureBuffer``, ``store.path``, ``ui.activity.session_id`` and ``performance``.

Each reader takes the :class:`~llamaswap.config.reader.Reader` of the mapping that holds the
key, so problems are collected as ``<path>: <message>`` lines like every other key.
"""

from __future__ import annotations

import math
import re
from typing import Any

import attr

from llamaswap.config import (
    DEFAULT_SESSION_ID_HEADERS, DEFAULT_UPSTREAM_IGNORE_PATHS, LOG_TIME_FORMATS, Capabilities, Timeouts)
from llamaswap.config.reader import Reader
from llamaswap.config.yaml12 import got, index_path

__all__ = [
    "MODALITIES", "MODEL_TIMEOUTS", "PEER_TIMEOUTS", "parse_go_duration", "read_capabilities",
    "read_ignore_websockets", "read_top_level", "read_timeouts"]

#: llama-swap's defaults: Go's ``http.DefaultTransport`` for models; a peer waits 60 s for headers
MODEL_TIMEOUTS = Timeouts()
PEER_TIMEOUTS = Timeouts(response_header=60.0)
#: ``timeouts`` key -> ``Timeouts`` field
_TIMEOUT_FIELDS = (("connect", "connect"), ("keepalive", "keepalive"), ("responseHeader", "response_header"),
                   ("tlsHandshake", "tls_handshake"), ("expectContinue", "expect_continue"),
                   ("idleConn", "idle_conn"))
MODALITIES = ("text", "audio", "image")
MIN_PERFORMANCE_EVERY = 5.0
DEFAULT_PERFORMANCE_EVERY = 5.0


# --------------------------------------------------------------------------------------------
# Per model and per peer


def read_timeouts(owner: Reader, defaults: Timeouts) -> Timeouts:
    """``<owner>.timeouts``: integer seconds, ``0`` for no limit; unset keys keep ``defaults``."""
    t = owner.sub("timeouts")
    t.unknown_keys()
    values = {field: t.int(key, None) for key, field in _TIMEOUT_FIELDS}
    return attr.evolve(defaults, **{k: float(v) for k, v in values.items() if v is not None})


def read_ignore_websockets(model: Reader) -> bool:
    """``compat.ignoreWebsockets`` of a model."""
    compat = model.sub("compat")
    compat.unknown_keys()
    return compat.bool("ignoreWebsockets", False)


def read_capabilities(model: Reader) -> Capabilities:
    """``capabilities`` of a model; ``in``/``out`` entries must be ``text``, ``audio`` or ``image``."""
    c = model.sub("capabilities")
    c.unknown_keys()
    modalities = {}
    for key in ("in", "out"):
        kept = []
        for i, value in enumerate(c.str_list(key)):
            if value not in MODALITIES:
                c.errors.append(f"{index_path(c.at(key), i)}: must be one of text, audio, image{got(value)}")
            else:
                kept.append(value)
        modalities[key] = tuple(kept)
    return Capabilities(input=modalities["in"], output=modalities["out"], tools=c.bool("tools", False),
                        reranker=c.bool("reranker", False), context=c.int("context", 0) or 0)


# --------------------------------------------------------------------------------------------
# Top level


def read_top_level(r: Reader) -> dict[str, Any]:
    """The top-level keys of this module, as keyword arguments of :class:`~llamaswap.config.Config`."""
    return dict(
        upstream_ignore_paths=_read_ignore_paths(r.sub("upstream")),
        log_time_format=_read_log_time_format(r),
        metrics_max_in_memory=r.int("metricsMaxInMemory", 1000),
        capture_buffer_mb=r.int("captureBuffer", 5),
        store_path=_read_store(r),
        session_id_headers=_read_session_id(r.sub("ui")),
        **_read_performance(r.sub("performance")))


def _read_ignore_paths(upstream: Reader) -> tuple[str, ...]:
    """``upstream.ignorePaths``: regular expressions, each compiled now; none given means the default."""
    upstream.unknown_keys()
    patterns = []
    for i, pattern in enumerate(upstream.str_list("ignorePaths")):
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as e:
            upstream.errors.append(f"{index_path(upstream.at('ignorePaths'), i)}: invalid regular expression: "
                                   f"{e}{got(pattern)}")
            continue
        patterns.append(pattern)
    return tuple(patterns) or DEFAULT_UPSTREAM_IGNORE_PATHS


def _read_log_time_format(r: Reader) -> str:
    """``logTimeFormat``: one of Go's layout names, in any case; anything else means no timestamp."""
    value = r.str("logTimeFormat").strip()
    if value.lower() in LOG_TIME_FORMATS or not value:
        return value.lower()
    r.warnings.append(f"config: logTimeFormat '{value}' is not one of {', '.join(LOG_TIME_FORMATS)}; "
                      f"log lines get no timestamp")
    return ""


def _read_store(r: Reader) -> str:
    """``store.path``; ``store`` without a path is an error, as in llama-swap."""
    store = r.sub("store")
    store.unknown_keys()
    path = store.str("path").strip()
    if r.has("store") and isinstance(r.value("store"), dict) and not path:
        store.error("path", "must not be empty when store is set")
    return path


def _read_session_id(ui: Reader) -> tuple[str, ...]:
    """``ui.activity.session_id``: trimmed, empty ones dropped, case-insensitive duplicates dropped.

    ``[]`` turns the lookup off; an absent key keeps llama-swap's default headers.
    """
    ui.unknown_keys()
    activity = ui.sub("activity")
    activity.unknown_keys()
    if not activity.has("session_id"):
        return DEFAULT_SESSION_ID_HEADERS
    headers: list[str] = []
    for name in activity.str_list("session_id"):
        name = name.strip()
        if name and name.lower() not in (h.lower() for h in headers):
            headers.append(name)
    return tuple(headers)


def _read_performance(p: Reader) -> dict[str, Any]:
    """``performance``: ``disabled``, and ``every`` as a Go duration of at least 5 s."""
    p.unknown_keys()
    every = DEFAULT_PERFORMANCE_EVERY
    value = p.value("every")
    if value is not None:
        seconds = _duration_seconds(value)
        if seconds is None:
            p.invalid("every", "must be a duration like '15s' or '1m30s'", value)
        elif seconds == 0:
            pass                                    # llama-swap: 0 means the default
        elif seconds < MIN_PERFORMANCE_EVERY:
            hint = f"; a bare number is nanoseconds, write '{value}s'" if isinstance(value, int) else ""
            p.errors.append(f"{p.at('every')}: must be at least 5s{got(value)}{hint}")
        else:
            every = seconds
    return dict(performance_disabled=p.bool("disabled", False), performance_every=every)


def _duration_seconds(value: Any) -> float | None:
    """A YAML value as llama-swap reads a ``time.Duration``: a Go duration string, or an integer of
    nanoseconds. None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value / 1e9
    if isinstance(value, str):
        try:
            return parse_go_duration(value)
        except ValueError:
            return None
    return None


_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
             "h": 3600.0}
_GO_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Go's ``time.ParseDuration``, in seconds: ``"15s"``, ``"1h30m"``, ``"1.5m"``, ``"-2s"``, ``"0"``.

    :raises ValueError: for anything else (a missing unit, an unknown unit, spaces).
    """
    rest = text
    sign = 1.0
    if rest[:1] in "+-" and rest:
        sign = -1.0 if rest[0] == "-" else 1.0
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(f"invalid duration {text!r}")
    total = 0.0
    while rest:
        m = _GO_PART.match(rest)
        if not m or m.group(1) in ("", "."):
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        rest = rest[m.end():]
    if math.isinf(total):
        raise ValueError(f"invalid duration {text!r}")
    return sign * total
