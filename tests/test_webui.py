"""The web UI's static files (UI-1, EP-15), through the in-memory site."""
from __future__ import annotations

import re
from pathlib import Path

from treq.testing import RequestTraversalAgent

from llamaswap.web.site import AccessLogSite
from llamaswap.web.tree import build_root
from llamaswap.web.ui import UI_DIR, UiFiles
from tests.factories import make_model
from tests.fakes import capture_logger
from tests.test_resources import HTTPCase


class UiFilesTests(HTTPCase):
    def setUp(self) -> None:
        self.build([make_model(id="a")])  # the tree mounts the UI itself

    def mount(self, directory: str) -> None:
        """Serve ``directory`` as the UI instead of the package's."""
        root = build_root(self.app, {"/ui": UiFiles(directory)})
        self.agent = RequestTraversalAgent(root)
        self.site = AccessLogSite(root, self.app, reactor=self.agent._memoryReactor,
                                  log=capture_logger(self.access))
        self.agent._serverFactory = self.site

    def test_redirects(self):
        """EP-15: / is 302 to /ui/, /ui is 301 to /ui/."""
        response, _ = self.call(b"GET", "/")
        self.assertEqual((response.code, self.header(response, b"location")), (302, b"/ui/"))
        response, _ = self.call(b"GET", "/ui")
        self.assertEqual((response.code, self.header(response, b"location")), (301, b"/ui/"))

    def test_index_and_assets(self):
        """UI-1: index.html at /ui/, its script and style with their types."""
        response, body = self.call(b"GET", "/ui/")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, b"content-type"), b"text/html; charset=utf-8")
        self.assertIn(b"<title>llamaswap</title>", body)
        for name, ctype in (("app.js", b"text/javascript; charset=utf-8"),
                            ("style.css", b"text/css; charset=utf-8"),
                            ("index.html", b"text/html; charset=utf-8")):
            response, data = self.call(b"GET", "/ui/" + name)
            self.assertEqual((response.code, self.header(response, b"content-type")), (200, ctype), name)
            self.assertEqual(data, (Path(UI_DIR) / name).read_bytes())

    def test_no_external_resources(self):
        """UI-1: nothing is loaded from another origin (no CDN)."""
        for path in Path(UI_DIR).iterdir():
            text = path.read_text()
            self.assertIsNone(re.search(r"(src|href)=\"(https?:)?//", text), path)
            self.assertNotIn("@import url(http", text)
            self.assertIsNone(re.search(r"fetch\(\s*[\"'`]https?:", text), path)

    def test_unknown_files_are_json_404(self):
        """EP-15/ERR-1: unknown files, sub-paths and traversal attempts are JSON 404s."""
        for path in ("/ui/nope.js", "/ui/a/b.js", "/ui/..%2Fresources.py", "/ui/.hidden.css",
                     "/ui/app.py"):
            response, data = self.call(b"GET", path)
            self.assertError(response, data, 404, "not_found")

    def test_wrong_method(self):
        response, data = self.call(b"POST", "/ui/")
        self.assertError(response, data, 405, "method_not_allowed")
        response, data = self.call(b"PUT", "/ui/app.js")
        self.assertError(response, data, 405, "method_not_allowed")

    def test_headers(self):
        """Files are revalidated on every load and never sniffed; HEAD has the headers only."""
        response, data = self.call(b"GET", "/ui/app.js")
        self.assertEqual(self.header(response, b"cache-control"), b"no-cache")
        self.assertEqual(self.header(response, b"x-content-type-options"), b"nosniff")
        self.assertEqual(response.length, len(data))
        last_modified = self.header(response, b"last-modified")
        self.assertIsNotNone(last_modified)
        response, data = self.call(b"HEAD", "/ui/style.css")
        self.assertEqual((response.code, data), (200, b""))
        self.assertEqual(self.header(response, b"content-type"), b"text/css; charset=utf-8")
        response, data = self.call(b"GET", "/ui/app.js", headers={b"if-modified-since": last_modified})
        self.assertEqual((response.code, data), (304, b""))

    def test_files_read_at_request_time(self):
        """An edited file shows on the next load; folders and unknown types are not served."""
        directory = Path(self.mktemp())
        (directory / "sub").mkdir(parents=True)
        (directory / "sub" / "x.js").write_text("x")
        (directory / "notes.txt").write_text("private")
        (directory / "app.js").write_text("one")
        self.mount(str(directory))
        self.assertEqual(self.call(b"GET", "/ui/app.js")[1], b"one")
        (directory / "app.js").write_text("two!")
        self.assertEqual(self.call(b"GET", "/ui/app.js")[1], b"two!")
        for path in ("/ui/", "/ui/sub", "/ui/sub/", "/ui/sub/x.js", "/ui/notes.txt", "/ui/app.js/x"):
            response, data = self.call(b"GET", path)
            self.assertError(response, data, 404, "not_found")
