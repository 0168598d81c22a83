"""Model routing: inference requests go to the model their body (or ``?model=``) names,
``/upstream/<model>/<path>`` goes to that model as is.

Both end in ``serve``: admit, wait for the model, forward, relay, release. A name that is
no local model may be a peer's (``peers``).
"""
from __future__ import annotations

import html
from typing import Any, Callable, Optional
from urllib.parse import parse_qsl, quote, unquote, urlencode

from twisted.web.server import NOT_DONE_YET, Request

from llamaswap import peers
from llamaswap.errors import MethodNotAllowed, MissingModel, ModelNotFound
from llamaswap.loading import LoadingProgress
from llamaswap.process import State
from llamaswap.proxy import FileSliceProducer, UsageTap, file_size, upstream_headers
from llamaswap.requestbody import apply_filters, find_form_field, multipart_boundary, parse_json_body
from llamaswap.web.context import RequestRecord, WebContext
from llamaswap.web.render import AppResource, async_render, write_error

#: the model-dispatched inference routes; the path goes upstream unchanged.
INFERENCE_ROUTES = (
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/v1/reranking",
    "/rerank", "/reranking", "/v1/audio/speech", "/v1/audio/transcriptions",
    "/v1/images/generations", "/v1/images/edits", "/infill", "/completion", "/v1/messages",
    "/v1/messages/count_tokens", "/v1/responses")

_ROUTE_PATHS = {route.encode("ascii"): route for route in INFERENCE_ROUTES}


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


class ModelDispatch(AppResource):
    """POST to an inference route; the model comes from the body or ``?model=``.

    :param endpoint: the route this instance is mounted at (the record's ``endpoint``, also
        for deeper paths such as ``/v1/chat/completions/x``).
    """

    def __init__(self, app: WebContext, endpoint: str) -> None:
        super().__init__(app)
        self.endpoint = endpoint

    def render(self, request: Request):
        request.begin_record(self.endpoint)
        if request.method != b"POST":
            write_error(request, MethodNotAllowed(["OPTIONS", "POST"]))
            return NOT_DONE_YET
        return self._render_post(request)

    @async_render
    async def _render_post(self, request: Request) -> None:
        record = request.record
        target = self._prepare(request)
        try:
            resolved = self.app.router.resolve(target.requested)
        except ModelNotFound:
            peer = peers.find_peer(self.app.config, target.requested)
            if peer is None:
                raise
            await self._to_peer(request, record, target, peer)
            return
        record.model = resolved.model_id
        model = self.app.config.models[resolved.model_id]
        upstream_model = model.use_model_name or (resolved.name if resolved.profile else None)
        body = target.body_for(model, resolved.name, upstream_model)
        uri = request.uri
        if target.from_query and upstream_model is not None:
            uri = _rewrite_query(uri, upstream_model)
        path, _, query = uri.partition(b"?")
        # loading state only for streamed chat completions of models that ask for it
        loading = model.send_loading_state and target.streaming \
            and request.path == b"/v1/chat/completions"
        await serve(self.app, request, record, resolved.model_id, resolved.profile, path, query, body,
                    loading_name=target.requested if loading else None)

    async def _to_peer(self, request: Request, record: RequestRecord, target: "_DispatchBody",
                       peer: Any) -> None:
        """The peer's own model name, the peer's filters, no scheduling."""
        record.model = peer.label
        body = target.body_for(peers.filters_of(peer.peer), peer.model, peer.model)
        uri = _rewrite_query(request.uri, peer.model) if target.from_query else request.uri
        path, _, query = uri.partition(b"?")
        record.serving = True
        try:
            await peers.forward(self.app, request, record, peer, join_url(peer.peer.proxy, path, query),
                                body)
        finally:
            if record.let_go():
                self.app.emit(record)

    def _prepare(self, request: Request) -> "_DispatchBody":
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


async def serve(app: WebContext, request: Request, record: RequestRecord, model_id: str, profile: Optional[str],
                path: bytes, query: bytes, body: Callable[[], Any],
                loading_name: Optional[str] = None) -> None:
    """Admit, wait for the model, forward, relay, release.

    ``record`` (the request's) gets the model, queue wait, stream error and parsed usage
    here; the request emits it when the response ends, or when this returns if later.

    ``loading_name`` (the requested name) asks for loading-state output, given only when
    the route, ``"stream": true`` and the model's ``sendLoadingState`` allow it; it is used
    when the model is not ready at admission and the admission was not refused.
    """
    router = app.router
    record.model = model_id
    admitted = app.clock.seconds()
    show_loading = loading_name is not None and router.process(model_id).state is not State.READY
    waiting = router.acquire(model_id, profile)
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
    try:
        proc = lease.proc
        url = join_url(proc.model.proxy, path, query)
        strip_auth = bool(app.config.api_keys)
        scheme = b"https" if request.isSecure() else b"http"
        headers = upstream_headers(request, strip_auth, scheme)
        forward = progress.relay if progress is not None else app.forwarder.forward
        result = await forward(
            http=proc.http, request=request, url=url, headers=headers, body=body,
            model_id=model_id, still_ready=lambda: proc.state is State.READY,
            on_headers=tap.on_headers, on_data=tap.on_data)
        record.stream_error = result.error
    finally:
        lease.release()
        record.usage = tap.usage()
        if record.let_go():
            app.emit(record)


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
        size = file_size(request.content)
        content = request.content
        clock = self.app.clock
        body = (lambda: b"") if size == 0 else (lambda: FileSliceProducer(content, [(0, size)], clock))
        await serve(self.app, request, record, resolved.model_id, resolved.profile, b"/" + remainder,
                    query, body)
