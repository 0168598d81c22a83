"""Which resource answers which path: one table, read by the root.

``routes(app)`` is the table. A resource answers its path and, when it is a leaf
(``isLeaf``), every path below it; ``static.File`` (the UI) resolves what lies below it
itself. The longest listed prefix of a request's path wins; a path no listed prefix
covers is a JSON 404.

The root checks API keys before it looks anything up, so a request that fails
authentication is never parsed, and answers every ``OPTIONS`` request itself (CORS).
"""
from __future__ import annotations

from typing import Any, Optional

from twisted.web.resource import Resource
from twisted.web.server import Request

from llamaswap import auth
from llamaswap.errors import InvalidAPIKey
from llamaswap.web.context import WebContext
from llamaswap.web.dispatch import INFERENCE_ROUTES, ModelDispatch, UpstreamResource, dispatched_endpoint
from llamaswap.web.manage import (
    ApiModels, ApiModelsLoad, ApiModelsUnload, ConfigReload, Health, LogStream, Logs, ModelList, Running,
    Unload, Version)
from llamaswap.web.manage import Me
from llamaswap.web.profiles import routes as profile_routes
from llamaswap.web.inflight import routes as inflight_routes
from llamaswap.web.render import NOT_FOUND, ErrorResource, JSONResource, Redirect

_CORS_DEFAULT_HEADERS = b"Content-Type, Authorization, Accept, X-Requested-With"
_TOKEN_CHARS = set(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ, ")


def routes(app: WebContext) -> dict[str, Resource]:
    """The path -> resource table of the daemon."""
    table: dict[str, Resource] = {route: ModelDispatch(app, route) for route in INFERENCE_ROUTES}
    models = ModelList(app)
    table.update({
        "/v1/models": models,
        "/models": models,
        "/upstream": UpstreamResource(app),
        "/running": Running(app),
        "/unload": Unload(app),
        "/api/models": ApiModels(app),
        "/api/models/unload": ApiModelsUnload(app),
        "/api/models/load": ApiModelsLoad(app),
        "/api/version": Version(),
        "/api/me": Me(app),
        "/api/config/reload": ConfigReload(app),
        "/health": Health(),
        "/logs": Logs(app),
        "/logs/stream": LogStream(app),
        "/ui": _LazyUi(),
    })
    table.update(profile_routes(app))  # /api/profiles*, and /upstream refusing selectors
    table.update(inflight_routes(app))  # /api/inflight (list, cancel), /api/captures/<id>
    return table


class _LazyUi(Resource):
    """``llamaswap.web.ui.UiFiles``, made at the first request under ``/ui``: the UI's file
    serving (twisted.web.static, ~0.5 MB) is loaded only if someone opens the UI."""

    def __init__(self) -> None:
        super().__init__()
        self._files: Optional[Resource] = None

    def _real(self) -> Resource:
        if self._files is None:
            from llamaswap.web.ui import UiFiles
            self._files = UiFiles()
        return self._files

    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:
        return self._real().getChildWithDefault(path, request)

    def render(self, request: Any) -> Any:
        return self._real().render(request)


def build_root(app: WebContext, extra: Optional[dict[str, Resource]] = None) -> "Root":
    """The root over ``routes(app)``; ``extra`` adds or replaces entries (metrics, events)."""
    table = routes(app)
    table.update(extra or {})
    return Root(app, table)


class _Node:
    """One path segment of the table: the resource listed there (if any) and what lies below."""

    __slots__ = ("resource", "children")

    def __init__(self) -> None:
        self.resource: Optional[Resource] = None
        self.children: dict[bytes, _Node] = {}


class CorsPreflight(Resource):
    """Every OPTIONS request is answered here; never forwarded."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        asked = request.getHeader(b"access-control-request-headers")
        if asked and all(c in _TOKEN_CHARS for c in asked):
            allow_headers = asked
        else:
            allow_headers = _CORS_DEFAULT_HEADERS
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-origin", b"*")
        request.setHeader(b"access-control-allow-methods", b"GET, POST, PUT, PATCH, DELETE, OPTIONS")
        request.setHeader(b"access-control-allow-headers", allow_headers)
        request.setHeader(b"access-control-max-age", b"86400")
        return b""


_CORS = CorsPreflight()
_TO_UI = Redirect(b"/ui/", 302)


class Root(JSONResource):
    """The tree's root: CORS, API keys, then the table.

    :param table: path -> resource (``routes``); paths are ``/``-separated, unquoted.
    """

    def __init__(self, app: WebContext, table: dict[str, Resource]) -> None:
        super().__init__()
        self.app = app
        self._key_limits = auth.KeyLimits()  # each scoped key's requests in flight (maxConcurrent)
        self._table = _Node()
        for path, resource in table.items():
            node = self._table
            for segment in path.strip("/").split("/"):
                node = node.children.setdefault(segment.encode("utf-8"), _Node())
            node.resource = resource

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if request.method == b"OPTIONS":
            return _CORS
        config = self.app.config
        allowed, key = auth.identify(request, config)
        if not allowed:
            endpoint = dispatched_endpoint(request.path)
            if endpoint is not None:  # a 401 on an inference route is counted too
                request.begin_record(endpoint)
            return ErrorResource(InvalidAPIKey())
        request.api_key, request.admin = key, auth.is_admin(key, config)
        refused = self._refuse(request, key)
        if refused is not None:
            return ErrorResource(refused)
        if path == b"" and not request.postpath:
            return self  # "GET /" renders the root itself: to the UI
        return self._lookup(path, request)

    def _refuse(self, request: Request, key: Optional[auth.ApiKey]) -> Optional[auth.LlamaSwapError]:
        """What the key's scope forbids here: a management endpoint for a key that is no
        admin's (403), or one request more than the key's ``maxConcurrent`` (429)."""
        if not request.admin and auth.admin_only(request.method, request.path):
            return auth.AdminRequired("this API key may not use this endpoint (an admin key is needed)")
        endpoint = dispatched_endpoint(request.path)
        if key is None or endpoint is None or not key.max_concurrent:
            return None
        try:
            self._key_limits.admit(key)
        except auth.KeyConcurrencyLimit as e:
            request.begin_record(endpoint)  # counted, with the key's name
            return e
        request.notifyFinish().addBoth(lambda _: self._key_limits.release(key))
        return None

    def _lookup(self, path: bytes, request: Request) -> Resource:
        """The resource of the longest listed prefix; its segments move to ``prepath``."""
        node = self._table.children.get(path)
        if node is None:
            return NOT_FOUND
        postpath = request.postpath
        found, depth = node.resource, 0
        i = 0
        while i < len(postpath):
            node = node.children.get(postpath[i])
            if node is None:
                break
            i += 1
            if node.resource is not None:
                found, depth = node.resource, i
        if found is None:
            return NOT_FOUND  # a listed path's parent (/v1, /api) is not listed itself
        prepath = request.prepath
        while depth:
            prepath.append(postpath.pop(0))
            depth -= 1
        return found

    def render_GET(self, request: Request) -> bytes:
        return _TO_UI.render(request)
