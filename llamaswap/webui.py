"""The web UI's static files under ``/ui/`` (UI-1, EP-15).

The files live in the package (``llamaswap/ui/``, package data): plain HTML, JS and CSS,
no build step, nothing fetched from elsewhere at run time (UI-1). ``/ui`` redirects to
``/ui/`` with 301; ``/ui/`` is ``index.html``; an unknown file is a JSON 404 (ERR-1).
"""
from __future__ import annotations

import os
import re
from typing import Any

from twisted.web.server import NOT_DONE_YET

from llamaswap.errors import NotFound
from llamaswap.resources import JSONResource, Redirect, write_error

__all__ = ["UI_DIR", "UiFiles"]

UI_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ui")
_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".ico": b"image/x-icon",
    ".json": b"application/json",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class UiFiles(JSONResource):
    """``GET /ui`` (301 to ``/ui/``) and ``GET /ui/<file>``.

    Only plain file names directly in the UI folder are served (no ``..``, no sub-folders),
    read at request time so an edited file shows on reload.
    """

    isLeaf = True

    def __init__(self, directory: str = UI_DIR) -> None:
        super().__init__()
        self.directory = directory

    def render_GET(self, request: Any):
        if not request.postpath:
            return Redirect(b"/ui/", 301).render(request)
        name = b"/".join(request.postpath).decode("utf-8", "replace") or "index.html"
        ext = os.path.splitext(name)[1].lower()
        path = os.path.join(self.directory, name)
        if not _NAME.match(name) or ext not in _TYPES or not os.path.isfile(path):
            write_error(request, NotFound(f"not found: {request.path.decode('latin-1')}"))
            return NOT_DONE_YET
        with open(path, "rb") as f:
            body = f.read()
        request.setHeader(b"content-type", _TYPES[ext])
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return body
