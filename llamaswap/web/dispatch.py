"""Model routing: inference requests go to the model their body (or ``?model=``) names,
``/upstream/<model>/<path>`` goes to that model as is.

Both end in ``serve``: admit, wait for the model, forward, relay, release. A name that is
no local model may be a peer's (``peers``). While a request is forwarded it is in flight
(``llamaswap.web.inflight``: listed, cancellable) and, with ``captureBuffer``, captured
(``llamaswap.captures``), as llama-swap does for the same routes.
"""
from __future__ import annotations

import functools
import html
import re
from typing import Any, Callable, Optional
from urllib.parse import parse_qsl, quote, unquote, urlencode

from twisted.web.server import NOT_DONE_YET, Request

import attr

from llamaswap import auth, failover, peers
from llamaswap.errors import LlamaSwapError, MethodNotAllowed, MissingModel, ModelNotFound
from llamaswap.loading import LoadingProgress
from llamaswap.process import State
from llamaswap.proxy import (
    FileSliceProducer, UsageTap, file_size, is_websocket_upgrade, tunnel_websocket, upstream_headers)
from llamaswap.requestbody import apply_filters, find_form_field, multipart_boundary, parse_json_body
from llamaswap.selectors import failover_of
from llamaswap.web.context import RequestRecord, WebContext
from llamaswap.web.inflight import InflightEntry, run_tracked
from llamaswap.web.render import AppResource, async_render, write_error

_POST, _GET = frozenset({b"POST"}), frozenset({b"GET"})

#: llama-swap's model-dispatched routes and the methods each takes: the model comes from the
#: JSON body or multipart form of a POST (else ``?model=``), and from ``?model=`` for a GET.
ROUTE_METHODS: dict[str, frozenset] = {
    **dict.fromkeys((
        "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/v1/reranking",
        "/rerank", "/reranking", "/v1/audio/speech", "/v1/audio/transcriptions",
        "/v1/images/generations", "/v1/images/edits", "/infill", "/completion", "/v1/messages",
        "/v1/messages/count_tokens", "/v1/responses",
        "/sdapi/v1/txt2img", "/sdapi/v1/img2img",  # stable-diffusion.cpp
        "/audioapi/v1/tasks/run",  # audio.cpp's task API: /v1/tasks/run upstream
        # versionless (llama-swap #728): /v/chat/completions is /chat/completions upstream
        "/v/chat/completions", "/v/responses", "/v/completions", "/v/messages",
        "/v/messages/count_tokens", "/v/embeddings", "/v/rerank", "/v/reranking"), _POST),
    "/v1/audio/voices": _POST | _GET,
    "/sdapi/v1/loras": _GET,
    "/props": _GET,  # llama-server's /props of the model ?model= names
}
#: the model-dispatched routes (the route table mounts a ``ModelDispatch`` on each).
INFERENCE_ROUTES = tuple(ROUTE_METHODS)

_ROUTE_PATHS = {route.encode("ascii"): route for route in INFERENCE_ROUTES}
#: prefixes a route loses before it goes upstream
_STRIPPED_PREFIXES = (b"/v/", b"/audioapi/")


class ModelNotLoaded(LlamaSwapError):
    """A request that may not start its model (``upstream.ignorePaths``, an ignored WebSocket)."""

    status, kind, code = 409, "invalid_request_error", "model_not_loaded"


def upstream_path(path: bytes) -> bytes:
    """The path a dispatched request has upstream: ``/v/x`` -> ``/x``, ``/audioapi/x`` -> ``/x``."""
    for prefix in _STRIPPED_PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix) - 1:]
    return path


def is_dispatched(method: bytes, path: str) -> bool:
    """Whether ``method`` to ``path`` is one of llama-swap's model-dispatched requests (what an
    ``/upstream/<model><path>`` request must be to be listed in flight)."""
    return method in ROUTE_METHODS.get(path, ())


def is_captured(method: bytes, path: str) -> bool:
    """Whether such a request is captured (and metered): POST to a model-dispatched route."""
    return method == b"POST" and method in ROUTE_METHODS.get(path, ())


def dispatched_endpoint(path: bytes) -> Optional[str]:
    """The record ``endpoint`` of a model-dispatched path (inference route or ``/upstream/...``)."""
    if path.startswith(b"/upstream/"):
        return "/upstream"
    while path:
        route = _ROUTE_PATHS.get(path)
        if route is not None:
            return route
        path = path.rpartition(b"/")[0]
    return None


def _read_all(request: Request) -> bytes:
    request.content.seek(0)
    data = request.content.read()
    request.content.seek(0)
    return data


def _query_model(request: Request) -> Optional[str]:
    values = request.args.get(b"model")
    if values:
        try:
            return values[0].decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def _rewrite_query(uri: bytes, new_model: str) -> bytes:
    path, sep, query = uri.partition(b"?")
    if not sep:
        return uri
    pairs = [(k, new_model if k == "model" else v)
             for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True)]
    return path + b"?" + urlencode(pairs).encode("latin-1")


def join_url(base: str, path: bytes, query: bytes) -> bytes:
    """base (with optional base path) + path, joined with exactly one '/'."""
    url = base.rstrip("/").encode("utf-8") + b"/" + path.lstrip(b"/")
    return url + (b"?" + query if query else b"")


class _Watch:
    """What follows one forwarded request besides the usage parser: its in-flight entry and its
    capture draft. ``on_headers`` runs once the response's status and headers are relayed."""

    __slots__ = ("app", "request", "entry", "draft")

    def __init__(self, app: WebContext, request: Request, entry: Optional[InflightEntry], draft: Any) -> None:
        self.app, self.request, self.entry, self.draft = app, request, entry, draft

    def on_headers(self) -> None:
        headers = self.request.responseHeaders
        if self.entry is not None:
            self.app.inflight.responded(self.entry, headers)
        if self.draft is not None:
            self.draft.on_response(headers)

    def on_data(self, chunk: bytes) -> None:
        if self.entry is not None:
            self.entry.on_data(chunk)
        if self.draft is not None:
            self.draft.on_data(chunk)


def begin_capture(app: WebContext, request: Request, record: RequestRecord, path: str, route: str,
                  body: Optional[bytes]) -> Any:
    """A capture draft for the request (``record.capture``), or None when captures are off.

    :param path: the path sent upstream (the capture's ``req_path``).
    :param route: the route whose mask applies.
    :param body: the request body as sent upstream, or None when not kept in memory.
    """
    draft = app.captures.draft(record.id, path, route)
    if draft is not None:
        draft.set_request(request.requestHeaders, body)
        record.capture = draft
    return draft


class ModelDispatch(AppResource):
    """A model-dispatched route; the model comes from the body or ``?model=`` (see
    ``ROUTE_METHODS``).

    :param endpoint: the route this instance is mounted at (the record's ``endpoint``, also
        for deeper paths such as ``/v1/chat/completions/x``).
    """

    def __init__(self, app: WebContext, endpoint: str) -> None:
        super().__init__(app)
        self.endpoint = endpoint
        self.methods = ROUTE_METHODS.get(endpoint, _POST)

    def render(self, request: Request):
        request.begin_record(self.endpoint)
        if request.method not in self.methods:
            allowed = sorted(m.decode("ascii") for m in self.methods)
            write_error(request, MethodNotAllowed(allowed + ["OPTIONS"]))
            return NOT_DONE_YET
        return self._render_dispatch(request)

    @async_render
    async def _render_dispatch(self, request: Request) -> None:
        record = request.record
        target = self._prepare(request)
        auth.require_model(request, target.requested, self.app.config)  # 403 model_not_allowed
        selector = failover_of(self.app.config, self.app.router.active_profile, target.requested)
        if selector is not None:
            await self._failover(request, record, target, selector)
            return
        selector_id = self.app.router.rewrite_pin(target.requested)
        if selector_id in self.app.config.selectors:
            record.metadata = {"selector": selector_id}  # llama-swap's activity metadata
        try:
            resolved = self.app.router.resolve(target.requested)
        except ModelNotFound:
            peer = peers.find_peer(self.app.config, self.app.router.rewrite(target.requested))
            if peer is None:
                raise
            await self._to_peer(request, record, target, peer)
            return
        record.model = resolved.model_id
        model = self.app.config.models[resolved.model_id]
        upstream_model = model.use_model_name or (
            resolved.name if resolved.profile or resolved.name != target.requested else None)
        body = target.body_for(model, resolved.name, upstream_model)
        uri = request.uri
        if target.from_query and upstream_model is not None:
            uri = _rewrite_query(uri, upstream_model)
        path, _, query = uri.partition(b"?")
        path = upstream_path(path)
        # loading state only for streamed chat completions of models that ask for it
        loading = model.send_loading_state and target.streaming \
            and request.path == b"/v1/chat/completions"
        draft = self._capture(request, record, path, body)

        async def work(entry: InflightEntry) -> None:
            await serve(self.app, request, record, resolved.model_id, resolved.profile, path, query, body,
                        loading_name=target.requested if loading else None,
                        watch=_Watch(self.app, request, entry, draft))

        await run_tracked(self.app.inflight, request, record, _text(path), work,
                          self.app.config.session_id_headers)

    def _capture(self, request: Request, record: RequestRecord, path: bytes, body: Callable[[], Any]) -> Any:
        if request.method != b"POST" or not self.app.captures.enabled:
            return None
        data = body()
        return begin_capture(self.app, request, record, _text(path), self.endpoint,
                             data if isinstance(data, bytes) else None)

    async def _to_peer(self, request: Request, record: RequestRecord, target: "_DispatchBody",
                       peer: Any) -> None:
        """The peer's own model name, the peer's filters, no scheduling."""
        record.model = peer.label
        body = target.body_for(peers.filters_of(peer.peer), peer.model, peer.model)
        uri = _rewrite_query(request.uri, peer.model) if target.from_query else request.uri
        path, _, query = uri.partition(b"?")
        path = upstream_path(path)
        draft = self._capture(request, record, path, body)

        async def work(entry: InflightEntry) -> None:
            record.serving = True
            try:
                await peers.forward(self.app, request, record, peer, join_url(peer.peer.proxy, path, query),
                                    body, watch=_Watch(self.app, request, entry, draft))
            finally:
                if record.let_go():
                    self.app.emit(record)

        await run_tracked(self.app.inflight, request, record, _text(path), work,
                          self.app.config.session_id_headers)

    async def _failover(self, request: Request, record: RequestRecord, target: "_DispatchBody",
                        selector: Any) -> None:
        """A ``failover`` selector (``llamaswap.failover``): its targets in order, each sent the
        kept body with its own filters and model name; one in-flight entry and one capture (of
        the first body sent) for the whole request. No loading-state output: the response must
        not begin before a target answered."""
        app = self.app
        path = upstream_path(request.uri.partition(b"?")[0])

        async def work(entry: InflightEntry) -> None:
            draft: Any = None

            async def attempt(name: str, more: bool) -> Any:
                nonlocal draft
                forwarder = failover.FailoverForwarder(app.forwarder, name, more)
                via = attr.evolve(app, forwarder=forwarder)  # serve and peers relay through it
                config = app.config
                model_id = config.resolve(name)
                peer = peers.find_peer(config, name) if model_id is None else None
                if model_id is not None:
                    model = config.models[model_id]
                    upstream_model = model.use_model_name or name
                    body = target.body_for(model, name, upstream_model)
                elif peer is not None:
                    upstream_model = peer.model
                    body = target.body_for(peers.filters_of(peer.peer), peer.model, peer.model)
                else:
                    raise ModelNotFound(f"selector '{selector.id}': target '{name}' names no model")
                uri = _rewrite_query(request.uri, upstream_model) if target.from_query else request.uri
                query = uri.partition(b"?")[2]
                entry.model = model_id or peer.label  # in flight: the target being tried
                if draft is None:
                    draft = self._capture(request, record, path, body)
                watch = _Watch(app, request, entry, draft)
                if peer is None:
                    await serve(via, request, record, model_id, None, path, query, body, watch=watch)
                else:
                    record.model = peer.label
                    record.serving = True
                    try:
                        await peers.forward(via, request, record, peer, join_url(peer.peer.proxy, path, query),
                                            body, watch=watch)
                    finally:
                        if record.let_go():
                            app.emit(record)
                return forwarder.verdict(request)

            await failover.run(app.router.failover, selector, attempt, app.log)

        record.model = selector.id  # until a target is tried
        record.metadata = {"selector": selector.id}
        await run_tracked(app.inflight, request, record, _text(path), work, app.config.session_id_headers)

    def _prepare(self, request: Request) -> "_DispatchBody":
        if request.method == b"GET":  # llama-swap reads a GET's model from the query only
            name = _query_model(request)
            if not name:
                raise MissingModel("missing or invalid 'model' query parameter")
            return _JSONDispatchBody(name, True, None)
        boundary = multipart_boundary(request.getHeader(b"content-type") or b"")
        if boundary is not None:
            return _MultipartBody.read(request, boundary, self.app.clock)
        raw = _read_all(request)
        parsed = parse_json_body(raw) if raw.strip() else None
        name = parsed.model if parsed is not None and "model" in parsed.data else None
        from_query = False
        if name is None:
            name = _query_model(request)
            from_query = True
        if not isinstance(name, str) or not name:
            raise MissingModel()
        return _JSONDispatchBody(name, from_query, parsed)


class _DispatchBody:
    requested: str
    from_query: bool
    streaming = False  # the JSON "stream" key is true

    def body_for(self, model: Any, name: str, upstream_model: Optional[str]) -> Callable[[], Any]:
        raise NotImplementedError


class _JSONDispatchBody(_DispatchBody):
    def __init__(self, requested: str, from_query: bool, parsed: Any) -> None:
        self.requested, self.from_query, self.parsed = requested, from_query, parsed
        self.streaming = parsed is not None and parsed.stream

    def body_for(self, model, name, upstream_model):
        if self.parsed is None:
            return lambda: b""
        keep_model = None if self.from_query else upstream_model
        data = apply_filters(self.parsed, model, name, keep_model)
        return lambda: data


class _MultipartBody(_DispatchBody):
    def __init__(self, requested, from_query, fileobj, size, field, clock) -> None:
        self.requested, self.from_query = requested, from_query
        self.fileobj, self.size, self.field, self.clock = fileobj, size, field, clock

    @classmethod
    def read(cls, request: Request, boundary: bytes, clock: Any) -> "_MultipartBody":
        size = file_size(request.content)
        field = find_form_field(request.content, size, boundary, b"model")
        name: Any = None
        from_query = False
        if field is not None:
            try:
                name = field.value.decode("utf-8")
            except UnicodeDecodeError:
                name = None
        else:
            name = _query_model(request)
            from_query = True
        if not isinstance(name, str) or not name:
            raise MissingModel()
        return cls(name, from_query, request.content, size, field, clock)

    def body_for(self, model, name, upstream_model):
        parts: list = [(0, self.size)]
        if not self.from_query and upstream_model is not None and self.field is not None \
                and upstream_model.encode("utf-8") != self.field.value:
            # only the field's value changes; other parts stay byte-identical
            parts = [(0, self.field.start), upstream_model.encode("utf-8"),
                     (self.field.end, self.size - self.field.end)]
        parts = [p for p in parts if isinstance(p, bytes) or p[1] > 0]
        return lambda: FileSliceProducer(self.fileobj, parts, self.clock)


def _text(path: bytes) -> str:
    """A raw (percent-encoded) path as text, decoded as llama-swap's URL paths are."""
    return unquote(path.decode("latin-1"), encoding="utf-8", errors="replace")


async def serve(app: WebContext, request: Request, record: RequestRecord, model_id: str, profile: Optional[str],
                path: bytes, query: bytes, body: Callable[[], Any],
                loading_name: Optional[str] = None, watch: Optional[_Watch] = None) -> None:
    """Admit, wait for the model, forward, relay, release.

    ``record`` (the request's) gets the model, queue wait, stream error and parsed usage
    here; the request emits it when the response ends, or when this returns if later.

    ``loading_name`` (the requested name) asks for loading-state output, given only when
    the route, ``"stream": true`` and the model's ``sendLoadingState`` allow it; it is used
    when the model is not ready at admission and the admission was not refused.

    ``watch`` (the in-flight entry and capture draft) sees the relayed headers and body. The
    model's ``timeouts`` apply to the upstream request.
    """
    router = app.router
    record.model = model_id
    admitted = app.clock.seconds()
    show_loading = loading_name is not None and router.process(model_id).state is not State.READY
    waiting = router.acquire(model_id, profile, priority=auth.priority_of(request))
    progress = None
    if show_loading and not waiting.called:  # a refused admission fires at once: no loading output
        progress = LoadingProgress(app, request, model_id, loading_name, waiting)
        lease = await progress.wait()
        if lease is None:
            return
    else:
        lease = await waiting
    record.queue_wait = max(0.0, getattr(lease, "granted", admitted) - admitted)
    record.serving = True
    tap = UsageTap(app.response_observer_factory)
    on_headers, on_data = _hooks(tap, watch)
    try:
        proc = lease.proc
        url = join_url(proc.model.proxy, path, query)
        strip_auth = bool(app.config.api_keys)
        scheme = b"https" if request.isSecure() else b"http"
        headers = upstream_headers(request, strip_auth, scheme)
        apply_timeouts(proc.http, app.config.models.get(model_id))
        forward = progress.relay if progress is not None else app.forwarder.forward
        result = await forward(
            http=proc.http, request=request, url=url, headers=headers, body=body,
            model_id=model_id, still_ready=lambda: proc.state is State.READY,
            on_headers=on_headers, on_data=on_data)
        record.stream_error = result.error
    finally:
        lease.release()
        record.usage = tap.usage()
        if record.let_go():
            app.emit(record)


def _hooks(tap: UsageTap, watch: Optional[_Watch]) -> tuple[Callable, Callable]:
    """The forwarder's ``on_headers`` and ``on_data``: the usage parser, then the watch.

    Once the headers are in, ``on_data`` calls only the readers there are (the usage parser when
    the response is parsed, the in-flight entry, the capture): nothing else per chunk."""
    readers: list = []

    def on_headers(response: Any) -> None:
        tap.on_headers(response)
        if tap.parser is not None:
            readers.append(tap.parser.feed)
        if watch is not None:
            watch.on_headers()
            if watch.entry is not None:
                readers.append(watch.entry.on_data)
            if watch.draft is not None:
                readers.append(watch.draft.on_data)

    def on_data(chunk: bytes) -> None:
        for read in readers:
            read(chunk)

    return on_headers, on_data


def apply_timeouts(http: Any, config: Any) -> None:
    """Give the treq client a model's or peer's ``timeouts`` (when both support it)."""
    apply = getattr(http, "apply_timeouts", None)
    timeouts = getattr(config, "timeouts", None)
    if apply is not None and timeouts is not None:
        apply(timeouts)


@functools.lru_cache(maxsize=16)
def _compiled(patterns: tuple) -> tuple:
    return tuple(re.compile(p) for p in patterns)


def ignored_path(config: Any, path: str) -> bool:
    """Whether ``upstream.ignorePaths`` matches ``path`` (the part after ``/upstream/<model>``,
    with its ``/``); an expression matches anywhere unless it is anchored, as Go's does."""
    return any(p.search(path) for p in _compiled(tuple(config.upstream_ignore_paths)))


class UpstreamResource(AppResource):
    """``/upstream`` (a listing) and ``/upstream/<model>/<path>`` (passthrough)."""

    def render(self, request: Request):
        raw_path = request.path
        rest = raw_path[len(b"/upstream"):].lstrip(b"/")
        if not rest:
            if request.method not in (b"GET", b"HEAD"):
                write_error(request, MethodNotAllowed(["GET", "OPTIONS"]))
                return NOT_DONE_YET
            return self._listing(request)
        return self._passthrough(request)

    def _listing(self, request: Request) -> bytes:
        config = self.app.config
        links = "\n".join(
            f'<li><a href="/upstream/{quote(mid, safe="/:")}/">{html.escape(mid)}</a></li>'
            for mid in sorted(config.models) if not config.models[mid].unlisted)
        page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>llamaswap upstreams"
                f"</title></head><body><h1>Upstreams</h1><ul>\n{links}\n</ul></body></html>\n")
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return page.encode("utf-8")

    def _find(self, rest: bytes) -> tuple[Any, bytes, bool]:
        """The longest prefix of ``rest`` on segment boundaries that resolves."""
        segments = rest.split(b"/")
        for k in range(len(segments), 0, -1):
            name = unquote(b"/".join(segments[:k]).decode("latin-1"), encoding="utf-8", errors="replace")
            try:
                resolved = self.app.router.resolve(name)
            except ModelNotFound:
                continue
            remainder = b"/".join(segments[k:])
            return resolved, remainder, k == len(segments)
        raise ModelNotFound.named(unquote(segments[0].decode("latin-1")), self.app.config)

    @async_render
    async def _passthrough(self, request: Request) -> None:
        record = request.begin_record("/upstream")
        rest = request.path[len(b"/upstream"):].lstrip(b"/")
        resolved, remainder, exact = self._find(rest)
        _, _, query = request.uri.partition(b"?")
        if exact:
            request.record = None  # a redirect, not a forwarded request
            location = request.path + b"/" + (b"?" + query if query else b"")
            status = 301 if request.method in (b"GET", b"HEAD") else 308
            request.setResponseCode(status)
            request.setHeader(b"location", location)
            request.setHeader(b"content-length", b"0")
            request.finish()
            return
        app = self.app
        record.model = resolved.model_id
        path = b"/" + remainder
        text = _text(path)
        if ignored_path(app.config, text) \
                and app.router.process(resolved.model_id).state is not State.READY:
            # llama-swap: the static files and polling of a model's page never load (or swap) it
            raise ModelNotLoaded(f"model {resolved.model_id} is not loaded; path matches upstream.ignorePaths")
        if is_websocket_upgrade(request):
            await self._websocket(request, resolved, path, query)
            return
        size = file_size(request.content)
        content = request.content
        clock = app.clock
        body = (lambda: b"") if size == 0 else (lambda: FileSliceProducer(content, [(0, size)], clock))
        draft = self._capture(request, record, text, size)
        if not is_dispatched(request.method, text):
            await serve(app, request, record, resolved.model_id, resolved.profile, path, query, body,
                        watch=_Watch(app, request, None, draft) if draft is not None else None)
            return

        async def work(entry: InflightEntry) -> None:
            await serve(app, request, record, resolved.model_id, resolved.profile, path, query, body,
                        watch=_Watch(app, request, entry, draft))

        await run_tracked(app.inflight, request, record, text, work, app.config.session_id_headers)

    def _capture(self, request: Request, record: RequestRecord, path: str, size: int) -> Any:
        """The capture draft of a passthrough request to a model route (its mask is the route's);
        a body bigger than the whole capture buffer is not read, and not captured."""
        app = self.app
        if not is_captured(request.method, path) or not app.captures.enabled or size > app.captures.limit:
            return None
        content = request.content
        content.seek(0)
        data = content.read()
        content.seek(0)
        return begin_capture(app, request, record, path, path, data)

    async def _websocket(self, request: Request, resolved: Any, path: bytes, query: bytes) -> None:
        """A WebSocket through ``/upstream``: admitted like any request (it may start the model and
        keeps it busy while open), unless the model's ``compat.ignoreWebsockets`` is set: then it
        never starts the model (409 when not ready) and counts for nothing (concurrency, TTL,
        swaps), as in llama-swap."""
        app = self.app
        model_id = resolved.model_id
        lease = None
        if app.config.models[model_id].ignore_websockets:
            proc = app.router.process(model_id)
            if proc.state is not State.READY:
                raise ModelNotLoaded(f"model {model_id} is not loaded; ignored websocket requests cannot start it")
        else:
            lease = await app.router.acquire(model_id, resolved.profile, priority=auth.priority_of(request))
            proc = lease.proc
        try:
            scheme = b"https" if request.isSecure() else b"http"
            headers = upstream_headers(request, bool(app.config.api_keys), scheme)
            apply_timeouts(proc.http, app.config.models.get(model_id))
            await tunnel_websocket(app.forwarder.reactor, request, join_url(proc.model.proxy, path, query),
                                   headers, model_id, getattr(proc.http, "endpoints", None))
        finally:
            if lease is not None:
                lease.release()
