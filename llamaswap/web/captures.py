"""``GET /api/captures/<id>``: the capture of a request (``llamaswap.captures``), by activity id."""
from __future__ import annotations

import json

from twisted.web.server import NOT_DONE_YET, Request

from llamaswap.errors import LlamaSwapError, NotFound
from llamaswap.web.render import JSON_TYPE, AppResource, write_error

__all__ = ["CapturePage", "InvalidCaptureId"]


class InvalidCaptureId(LlamaSwapError):
    status, kind, code = 400, "invalid_request_error", "bad_request"


class CapturePage(AppResource):
    """``GET /api/captures/<id>``: llama-swap's ``ReqRespCapture`` JSON; 404 when it is not kept
    (never captured, dropped from the ring, or ``captureBuffer: 0``); 400 for an id that is no
    integer."""

    def render_GET(self, request: Request):
        rest = [p for p in request.postpath if p]
        if len(rest) != 1:
            write_error(request, NotFound(f"not found: {request.path.decode('latin-1')}"))
            return NOT_DONE_YET
        try:
            request_id = int(rest[0].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            write_error(request, InvalidCaptureId("invalid capture ID"))
            return NOT_DONE_YET
        capture = self.app.captures.get(request_id)
        if capture is None:
            write_error(request, NotFound("capture not found"))
            return NOT_DONE_YET
        request.setHeader(b"content-type", JSON_TYPE)
        return json.dumps(capture, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
