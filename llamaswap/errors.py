"""Errors that carry their HTTP status and OpenAI error code (SPEC §9).

Deep code raises one of these; the resource layer renders every one of them in one
place as ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import json


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

    @classmethod
    def named(cls, name: str) -> "ModelNotFound":
        return cls(f"model '{name}' not found")


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
