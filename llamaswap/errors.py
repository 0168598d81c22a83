"""Errors that carry their HTTP status and OpenAI error code (ERR-1, ERR-2).

Deep code raises one of these; the resource layer renders every one of them in one
place as ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import difflib
import json
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from llamaswap.config import Config


class LlamaSwapError(Exception):
    """Base class: a failure that has an OpenAI-shaped rendering."""

    status = 500
    kind = "server_error"
    code = "internal_error"
    headers: dict[bytes, bytes] = {}

    def __init__(self, message: str = "internal error") -> None:
        super().__init__(message)
        self.message = message


class InvalidJSON(LlamaSwapError):
    status, kind, code = 400, "invalid_request_error", "invalid_json"


class InvalidMultipart(LlamaSwapError):
    status, kind, code = 400, "invalid_request_error", "invalid_multipart"


class MissingModel(LlamaSwapError):
    status, kind, code = 400, "invalid_request_error", "missing_model"

    def __init__(self, message: str = "missing or invalid 'model' key") -> None:
        super().__init__(message)


class InvalidAPIKey(LlamaSwapError):
    status, kind, code = 401, "authentication_error", "invalid_api_key"
    headers = {b"WWW-Authenticate": b'Basic realm="llamaswap"'}

    def __init__(self, message: str = "unauthorized: invalid or missing API key") -> None:
        super().__init__(message)


class ModelNotFound(LlamaSwapError):
    status, kind, code = 404, "invalid_request_error", "model_not_found"
    _hint: Any = None       # (name, config) until the message is first read

    @classmethod
    def named(cls, name: str, config: Any = None) -> "ModelNotFound":
        """``model '<name>' not found``; given the config, with close names and how many models exist.

        e.g. ``model 'chat-c' not found; did you mean 'chat-a' or 'chat-b'? (4 models are available:
        GET /v1/models lists them)``. The suggestions are worked out only when the message is read
        (``/upstream`` tries many prefixes that are not found before it finds one that is).
        """
        error = cls(f"model '{name}' not found")
        if config is not None:
            error._hint = (name, config)
        return error

    @property
    def message(self) -> str:
        if self._hint is not None:
            name, config = self._hint
            self._hint = None
            self._message = self._message + _not_found_hint(name, config)
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        self._message = value

    def __str__(self) -> str:
        return self.message


def _not_found_hint(name: str, config: Any) -> str:
    candidates, count = requestable_names(config)
    close = close_matches(name, candidates)
    hint = f"; did you mean {either(close)}?" if close else ""
    if count == 0:
        return hint + " (no models are configured)"
    return hint + f" ({count} model{' is' if count == 1 else 's are'} available: GET /v1/models lists them)"


def requestable_names(config: Config) -> tuple[list[str], int]:
    """The names a not-found message may suggest, and the number of models ``/v1/models`` lists.

    Listed models count, with their ids and aliases (``setParamsByID`` names included) as
    candidates; so do peer models, as ``<peerId>/<model>`` and by bare name. Unlisted models stay
    hidden: neither counted nor suggested.
    """
    names: list[str] = []
    count = 0
    for model_id, model in config.models.items():
        if model.unlisted:
            continue
        count += 1
        names.append(model_id)
        names.extend(model.aliases)
    for peer_id, peer in config.peers.items():
        for model in peer.models:
            count += 1
            names += [f"{peer_id}/{model}", model]
    return names, count


def close_matches(word: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """Up to ``n`` of ``candidates`` close to ``word`` (by difflib, ignoring case), best first.

    Only the candidates about as close as the best one are kept (``'cmdStop'`` for ``cmdstop``,
    not ``'cmd'`` too); ``word`` itself is never suggested.
    """
    if len(word) > 200:
        return []
    matcher = difflib.SequenceMatcher()
    matcher.set_seq2(word.lower())
    scored: dict[str, float] = {}
    for candidate in candidates:
        if candidate == word or candidate in scored:
            continue
        matcher.set_seq1(candidate.lower())
        if matcher.real_quick_ratio() >= cutoff and matcher.quick_ratio() >= cutoff:
            ratio = matcher.ratio()
            if ratio >= cutoff:
                scored[candidate] = ratio
    if not scored:
        return []
    best = max(scored.values())
    return sorted((c for c in scored if scored[c] >= best - 0.1), key=lambda c: (-scored[c], c))[:n]


def either(words: list[str]) -> str:
    """``'a'``, ``'a' or 'b'``, ``'a', 'b' or 'c'``."""
    quoted = [f"'{w}'" for w in words]
    if len(quoted) <= 1:
        return "".join(quoted)
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


class NotFound(LlamaSwapError):
    status, kind, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(LlamaSwapError):
    status, kind, code = 405, "invalid_request_error", "method_not_allowed"

    def __init__(self, allowed: list[str]) -> None:
        super().__init__("method not allowed")
        self.headers = {b"Allow": ", ".join(allowed).encode("ascii")}


class RequestTooLarge(LlamaSwapError):
    status, kind, code = 413, "invalid_request_error", "request_too_large"


class ConcurrencyLimit(LlamaSwapError):
    status, kind, code = 429, "rate_limit_error", "concurrency_limit"
    headers = {b"Retry-After": b"1"}


class UpstreamStartFailed(LlamaSwapError):
    status, kind, code = 502, "server_error", "upstream_start_failed"


class UpstreamUnreachable(LlamaSwapError):
    status, kind, code = 502, "server_error", "upstream_unreachable"


class PeerUnreachable(LlamaSwapError):
    status, kind, code = 502, "server_error", "peer_unreachable"


class ModelUnloaded(LlamaSwapError):
    status, kind, code = 503, "server_error", "model_unloaded"


class InsufficientMemory(LlamaSwapError):
    """The model needs more than the whole ``memory.budget``: refused at once, nothing evicted."""

    status, kind, code = 503, "server_error", "insufficient_memory"


class ShuttingDown(LlamaSwapError):
    status, kind, code = 503, "server_error", "shutting_down"

    def __init__(self, message: str = "llamaswap is shutting down") -> None:
        super().__init__(message)


class InvalidConfig(LlamaSwapError):
    status, kind, code = 400, "invalid_request_error", "invalid_config"


def error_body(kind: str, code: str, message: str) -> bytes:
    """The ERR-1 envelope as compact UTF-8 JSON."""
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": code}},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8")


def to_openai_error(exc: BaseException) -> tuple[int, dict[bytes, bytes], bytes]:
    """Map any exception to (status, extra headers, body); unknown ones become 500 internal_error."""
    if isinstance(exc, LlamaSwapError):
        return exc.status, dict(exc.headers), error_body(exc.kind, exc.code, exc.message)
    return 500, {}, error_body("server_error", "internal_error", "internal error")
