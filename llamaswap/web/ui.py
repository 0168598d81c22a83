"""The web UI's static files under ``/ui/``.

The files live in the package (``llamaswap/ui/``, package data): plain HTML, JS and CSS,
no build step, nothing fetched from elsewhere at run time. ``/ui`` redirects to ``/ui/``
with 301; ``/ui/`` is ``index.html``. Only plain file names directly in the folder with a
known extension are served; anything else is a JSON 404, never twisted.web's HTML pages.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llamaswap.errors import MethodNotAllowed
from llamaswap.web.render import NOT_FOUND, Redirect, write_error

with warnings.catch_warnings():
    # its own HTML error pages, built at import, are deprecated; ours replace them
    warnings.simplefilter("ignore", DeprecationWarning)
    from twisted.web import static

__all__ = ["UI_DIR", "UiFiles"]

UI_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ui")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class UiFiles(static.File):
    """``GET /ui`` (301 to ``/ui/``) and ``GET /ui/<file>``, read at request time so an
    edited file shows on reload; answers carry ``Last-Modified`` and honour conditional and
    range requests, as ``static.File`` does."""

    contentTypes = {
        ".html": "text/html; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".svg": "image/svg+xml",
        ".png": "image/png",
        ".ico": "image/x-icon",
        ".json": "application/json",
    }
    contentEncodings: dict = {}  # "x.js.gz" is not x.js sent gzipped
    indexNames = ["index.html"]
    childNotFound = NOT_FOUND
    forbidden = NOT_FOUND

    def __init__(self, path: str = UI_DIR, *args: Any, **kwargs: Any) -> None:
        super().__init__(path, *args, **kwargs)

    def getChild(self, path: bytes, request: Any) -> Resource:
        if path:
            name = path.decode("utf-8", "replace")
            if not _NAME.match(name) or os.path.splitext(name)[1].lower() not in self.contentTypes:
                return NOT_FOUND
        return super().getChild(path, request)

    def directoryListing(self) -> Resource:
        return NOT_FOUND

    def render(self, request: Any):
        if request.method not in (b"GET", b"HEAD"):
            write_error(request, MethodNotAllowed(["GET", "OPTIONS"]))
            return NOT_DONE_YET
        return super().render(request)

    def render_GET(self, request: Any):
        if not self.isdir():
            request.setHeader(b"cache-control", b"no-cache")
            request.setHeader(b"x-content-type-options", b"nosniff")
        return super().render_GET(request)

    render_HEAD = render_GET

    def makeProducer(self, request: Any, fileForReading: Any) -> static.StaticProducer:
        if request.getHeader(b"range") is None:
            self._setContentHeaders(request)
            request.setResponseCode(200)
            return _WholeFile(request, fileForReading)
        return super().makeProducer(request, fileForReading)

    def redirect(self, request: Any) -> bytes:
        return Redirect(b"/" + b"/".join(request.prepath) + b"/", 301).render(request)


class _WholeFile(static.StaticProducer):
    """Writes a (small) UI file at once: no pull producer driven by the global cooperator."""

    def start(self) -> None:
        try:
            data = self.fileObject.read()
        finally:
            self.fileObject.close()
        self.request.write(data)
        self.request.finish()
        self.request = None
