"""The HTTP face of llamaswap: the resource tree, access log (LOG-5), errors.

Resources speak HTTP and nothing else: they read bodies, ask the router for a model,
hand the request to the forwarder, and render every ``LlamaSwapError`` as OpenAI-shaped
JSON in one place (``async_render``).
"""
from __future__ import annotations

import functools
import html
import json
import tempfile
import time
from typing import Any, Callable, Optional
from urllib.parse import parse_qsl, quote, unquote, urlencode

from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from llamaswap import __version__, auth, peers
from llamaswap.errors import (
    InvalidAPIKey, LlamaSwapError, MethodNotAllowed, MissingModel, ModelNotFound, NotFound,
    error_body, to_openai_error)
from llamaswap.loading import LoadingProgress
from llamaswap.process import State
from llamaswap.proxy import FileSliceProducer, Forwarder, file_size, upstream_headers
from llamaswap.requestbody import (
    apply_filters, find_form_field, multipart_boundary, parse_json_body)

#: EP-1: the model-dispatched inference routes; the path goes upstream unchanged.
INFERENCE_ROUTES = (
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/v1/reranking",
    "/rerank", "/reranking", "/v1/audio/speech", "/v1/audio/transcriptions",
    "/v1/images/generations", "/v1/images/edits", "/infill", "/completion", "/v1/messages",
    "/v1/messages/count_tokens", "/v1/responses")
#: RT-1 / PROXY-3: bodies bigger than this are spooled to a temporary file.
SPOOL_BYTES = 1024 * 1024
_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"

_CORS_DEFAULT_HEADERS = b"Content-Type, Authorization, Accept, X-Requested-With"
_TOKEN_CHARS = set(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ, ")


class App:
    """What resources need from the rest of the daemon, in one place.

    :param router: the ``ModelRouter`` (its ``config`` is always the current one).
    :param logs: the ``LogBroadcaster``.
    :param forwarder: the ``Forwarder``.
    :param clock: ``IReactorTime``.
    :param started: the daemon start time (``created`` of /v1/models).
    """

    def __init__(self, router: Any, logs: Any, forwarder: Forwarder, clock: Any,
                 log: Optional[Logger] = None, started: Optional[float] = None) -> None:
        self.router = router
        self.logs = logs
        self.forwarder = forwarder
        self.clock = clock
        self.log = log or Logger(namespace="llamaswap.http")
        self.started = int(started if started is not None else time.time())
        #: called with one record per finished model-dispatched request (MET-2, EVT-2):
        #: ``model`` ("" if unresolved), ``endpoint`` (route pattern), ``status`` (sent, 499 when
        #: the client left), ``started``, ``duration``, ``ttfb``, ``queue_wait`` (None when
        #: unknown), ``stream_error``, ``usage`` (see ``metrics.response_parser``).
        self.request_listeners: list[Callable[[dict], None]] = []
        #: ``(status, upstream headers) -> parser | None``; a parser's ``feed(chunk)`` sees
        #: every relayed body chunk and its ``result()`` becomes the record's ``usage`` (MET-3).
        self.response_observer_factory: Optional[Callable[[int, Any], Any]] = None
        self.reload: Optional[Callable[[], dict]] = None  # set by the service (EP-13)

    @property
    def config(self) -> Any:
        return self.router.config

    def begin_record(self, request: Request, endpoint: str) -> dict:
        """Start the record of a model-dispatched request; it is handed to
        ``request_listeners`` when the response ends (``LlamaSwapRequest``)."""
        record = {"model": "", "endpoint": endpoint, "started": self.clock.seconds(), "status": None,
                  "duration": None, "ttfb": None, "queue_wait": None, "stream_error": None,
                  "usage": None}
        request.llamaswap_record = record
        return record

    def finish_record(self, record: dict, status: int, sent: int) -> None:
        """The response of ``record``'s request ended with ``status`` after ``sent`` bytes.

        While ``serve`` still runs (``record["busy"]``: the forwarder finishes the response
        before it returns the stream outcome) the listeners are called when it is done.
        """
        record["status"] = status
        record["duration"] = self.clock.seconds() - record["started"]
        if record["ttfb"] is None and sent and status != 499:
            record["ttfb"] = record["duration"]  # a llamaswap answer: written at once
        if record.get("busy"):
            record["ended"] = True
            return
        self.emit_record(record)

    def emit_record(self, record: dict) -> None:
        for listener in self.request_listeners:
            try:
                listener(record)
            except Exception:
                self.log.failure("request listener failed")


# -- rendering helpers -------------------------------------------------------------------------

def write_json(request: Request, status: int, payload: Any, headers: Optional[dict] = None) -> None:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    _write(request, status, _JSON, body, headers)


def write_text(request: Request, status: int, text: str, headers: Optional[dict] = None) -> None:
    _write(request, status, _TEXT, text.encode("utf-8"), headers)


def _write(request: Request, status: int, ctype: bytes, body: bytes, headers: Optional[dict]) -> None:
    if request._disconnected or request.finished:
        return
    request.setResponseCode(status)
    request.setHeader(b"content-type", ctype)
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def write_error(request: Request, exc: BaseException, log: Optional[Logger] = None,
                failure: Optional[Failure] = None) -> None:
    """ERR-1: one JSON envelope for every error llamaswap generates."""
    if request._disconnected or request.finished:
        return
    if not isinstance(exc, LlamaSwapError) and log is not None:
        log.failure("internal error on {path}", failure, path=request.path.decode("latin-1"))
    if request.startedWriting:
        request.channel.transport.abortConnection()  # headers are out: only abort is honest
        return
    status, headers, body = to_openai_error(exc)
    if request.requestHeaders.hasHeader(b"origin"):
        headers[b"Access-Control-Allow-Origin"] = b"*"
    request.responseHeaders.removeHeader(b"content-length")
    _write(request, status, _JSON, body, headers)


def async_render(method):
    """Run an async ``render_*``; cancel it when the client leaves; map errors to JSON."""

    @functools.wraps(method)
    def render(self, request: Request):
        d = ensureDeferred(method(self, request))
        request.notifyFinish().addErrback(lambda _: d.cancel())

        def _done(_: object) -> None:
            if not request._disconnected and not request.finished:
                request.finish()

        def _failed(f: Failure) -> None:
            if f.check(CancelledError) or request._disconnected:
                return
            write_error(request, f.value, getattr(self, "log", None) or self.app.log, f)

        d.addCallbacks(_done, _failed)
        return NOT_DONE_YET

    return render


class JSONResource(Resource):
    """A resource whose 404/405 are JSON (ERR-1) instead of twisted.web's HTML pages."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return ErrorResource(NotFound(f"not found: {request.path.decode('latin-1')}"))

    def render(self, request: Request):
        if request.method == b"HEAD":
            # twisted's base render_HEAD calls render_GET, which POST-only resources lack
            handler = getattr(self, "render_GET", None)
        else:
            handler = getattr(self, "render_" + request.method.decode("ascii", "replace"), None)
        if handler is None and not any(m.startswith("render_") and m != "render_HEAD" for m in dir(self)):
            # an intermediate node (/v1, /api): not a listed path
            write_error(request, NotFound(f"not found: {request.path.decode('latin-1')}"))
            return NOT_DONE_YET
        if handler is None:
            if request.method == b"HEAD" and hasattr(self, "render_GET"):
                return self.render_GET(request)
            allowed = sorted(m[len("render_"):] for m in dir(self) if m.startswith("render_")
                             and m != "render_HEAD")
            write_error(request, MethodNotAllowed(allowed + ["OPTIONS"]))
            return NOT_DONE_YET
        return handler(request)


class AppResource(JSONResource):
    """A JSON resource that works on the ``App``."""

    isLeaf = True

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app
        self.log = app.log

    def model_from_path(self, request: Request, prefix: bytes) -> str:
        """The model id (or alias, which may contain '/') after ``prefix``; ModelNotFound."""
        rest = request.path[len(prefix):].strip(b"/")
        name = unquote(rest.decode("latin-1"), encoding="utf-8", errors="replace")
        model_id = self.app.config.resolve(name) if name else None
        if model_id is None:
            raise ModelNotFound.named(name, self.app.config)
        return model_id


class ErrorResource(Resource):
    isLeaf = True

    def __init__(self, error: LlamaSwapError) -> None:
        super().__init__()
        self.error = error

    def render(self, request: Request):
        write_error(request, self.error)
        return NOT_DONE_YET


class CorsPreflight(Resource):
    """SEC-8 / EP-16: every OPTIONS request is answered here; never forwarded."""

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


# -- model dispatch (EP-1, EP-4) ----------------------------------------------------------------

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


def _join_url(base: str, path: bytes, query: bytes) -> bytes:
    """PROXY-1: base (with optional base path) + path, joined with exactly one '/'."""
    url = base.rstrip("/").encode("utf-8") + b"/" + path.lstrip(b"/")
    return url + (b"?" + query if query else b"")


class ModelDispatch(AppResource):
    """EP-1: POST inference routes; the model comes from the body or ``?model=`` (RT-1)."""

    def render(self, request: Request):
        # MET-2: the route pattern (a leaf also gets /v1/chat/completions/x); never the raw path.
        self.app.begin_record(request, "/" + b"/".join(request.prepath).decode("latin-1"))
        if request.method != b"POST":
            write_error(request, MethodNotAllowed(["OPTIONS", "POST"]))
            return NOT_DONE_YET
        return self._render_post(request)

    @async_render
    async def _render_post(self, request: Request) -> None:
        record = request.llamaswap_record
        started = record["started"]
        target = self._prepare(request)
        try:
            resolved = self.app.router.resolve(target.requested)
        except ModelNotFound:
            peer = peers.find_peer(self.app.config, target.requested)  # RT-2 step 4
            if peer is None:
                raise
            await self._to_peer(request, target, peer)
            return
        record["model"] = resolved.model_id
        model = self.app.config.models[resolved.model_id]
        upstream_model = model.use_model_name or (resolved.name if resolved.profile else None)
        body = target.body_for(model, resolved.name, upstream_model)
        uri = request.uri
        if target.from_query and upstream_model is not None:
            uri = _rewrite_query(uri, upstream_model)
        path, _, query = uri.partition(b"?")
        # RT-12: loading state only for streamed chat completions of models that ask for it.
        loading = getattr(model, "send_loading_state", False) and target.streaming \
            and request.path == b"/v1/chat/completions"
        await serve(self.app, request, resolved.model_id, resolved.profile, path, query, body,
                    started, endpoint=record["endpoint"],
                    loading_name=target.requested if loading else None)

    async def _to_peer(self, request: Request, target: "_DispatchBody", peer: Any) -> None:
        """RT-13: the peer's own model name, the peer's filters, no scheduling."""
        request.llamaswap_record["model"] = peer.label
        body = target.body_for(peers.filters_of(peer.peer), peer.model, peer.model)
        uri = _rewrite_query(request.uri, peer.model) if target.from_query else request.uri
        path, _, query = uri.partition(b"?")
        await peers.forward(self.app, request, peer, _join_url(peer.peer.proxy, path, query), body)

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
    streaming = False  # RT-1: the JSON "stream" key is true (RT-12)

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
            # RT-9: only the field's value changes; other parts stay byte-identical.
            parts = [(0, self.field.start), upstream_model.encode("utf-8"),
                     (self.field.end, self.size - self.field.end)]
        parts = [p for p in parts if isinstance(p, bytes) or p[1] > 0]
        return lambda: FileSliceProducer(self.fileobj, parts, self.clock)


async def serve(app: App, request: Request, model_id: str, profile: Optional[str], path: bytes,
                query: bytes, body: Callable[[], Any], started: float, endpoint: str,
                loading_name: Optional[str] = None) -> None:
    """Admit, wait for the model, forward, relay, release (the common path of EP-1 and EP-4).

    The request's record (``App.begin_record``) gets the model, queue wait, TTFB, stream
    error and parsed tokens here; it is handed to ``app.request_listeners`` when the
    response ends, whatever ended it (``LlamaSwapRequest._access_log``).

    ``loading_name`` (the requested name) asks for RT-12 loading-state output, given only
    when the route, ``"stream": true`` and the model's ``sendLoadingState`` allow it; it
    is used when the model is not ready at admission and the admission was not refused.
    """
    router = app.router
    record = getattr(request, "llamaswap_record", None)
    if record is None:
        record = app.begin_record(request, endpoint)
        record["started"] = started
    record["model"] = model_id
    admitted = app.clock.seconds()
    show_loading = loading_name is not None and router.process(model_id).state is not State.READY
    waiting = router.acquire(model_id, profile)
    progress = None
    if show_loading and not waiting.called:  # a 429 (SCHED-1) fires at once: no loading output
        progress = LoadingProgress(app, request, model_id, loading_name, waiting)
        lease = await progress.wait()
        if lease is None:
            return
    else:
        lease = await waiting
    record["queue_wait"] = max(0.0, getattr(lease, "granted", admitted) - admitted)
    parser = None
    record["busy"] = True
    try:
        proc = lease.proc
        url = _join_url(proc.model.proxy, path, query)
        strip_auth = bool(app.config.api_keys)
        scheme = b"https" if request.isSecure() else b"http"
        headers = upstream_headers(request, strip_auth, scheme)

        def on_headers(response: Any) -> None:
            nonlocal parser
            factory = app.response_observer_factory
            if factory is not None:
                parser = factory(response.code, response.headers)

        def on_data(chunk: bytes) -> None:
            if record["ttfb"] is None:
                record["ttfb"] = app.clock.seconds() - started
            if parser is not None:
                parser.feed(chunk)

        forward = progress.relay if progress is not None else app.forwarder.forward
        result = await forward(
            http=proc.http, request=request, url=url, headers=headers, body=body,
            model_id=model_id, still_ready=lambda: proc.state is State.READY,
            on_headers=on_headers, on_data=on_data)
        record["stream_error"] = result.error
    finally:
        lease.release()
        if parser is not None:
            record["usage"] = parser.result()
        record["busy"] = False
        if record.pop("ended", False):
            app.emit_record(record)


class UpstreamResource(AppResource):
    """EP-3 (listing) and EP-4 (``/upstream/<model>/<path>`` passthrough, RT-5)."""

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
        """RT-5: the longest prefix of ``rest`` on segment boundaries that resolves."""
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
        started = self.app.begin_record(request, "/upstream")["started"]
        rest = request.path[len(b"/upstream"):].lstrip(b"/")
        resolved, remainder, exact = self._find(rest)
        _, _, query = request.uri.partition(b"?")
        if exact:
            request.llamaswap_record = None  # a redirect, not a forwarded request
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
        await serve(self.app, request, resolved.model_id, resolved.profile, b"/" + remainder, query,
                    body, started, endpoint="/upstream")


# -- management endpoints -----------------------------------------------------------------------

class Health(JSONResource):
    """EP-8: 200 OK whenever the daemon serves; no upstream involved."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", _TEXT)
        return b"OK"


class ModelList(AppResource):
    """EP-2: ``GET /v1/models`` and ``GET /models``."""

    def render_GET(self, request: Request) -> bytes:
        config = self.app.config
        data = []
        for mid in sorted(config.models):
            model = config.models[mid]
            if model.unlisted:
                continue
            entry = self._entry(mid, model)
            data.append(entry)
            if config.include_aliases_in_list:
                for alias in model.aliases:
                    alias_entry = dict(entry, id=alias)
                    alias_entry["meta"] = {"llamaswap": {"type": "alias", "modelID": mid}}
                    data.append(alias_entry)
        data += peers.listing(config, self.app.started)  # RT-13: <peerId>/<model>
        origin = request.getHeader(b"origin")
        if origin:
            request.setHeader(b"access-control-allow-origin", origin)
        request.setHeader(b"content-type", _JSON)
        return json.dumps({"object": "list", "data": data}, ensure_ascii=False,
                          separators=(",", ":")).encode("utf-8")

    def _entry(self, mid: str, model: Any) -> dict:
        entry: dict = {"id": mid, "object": "model", "created": self.app.started, "owned_by": "llama-swap"}
        if model.name:
            entry["name"] = model.name
        if model.description:
            entry["description"] = model.description
        meta = dict(model.metadata) if model.metadata else {}
        if model.aliases:
            meta["aliases"] = list(model.aliases)
        if meta:
            entry["meta"] = {"llamaswap": meta}
        state = self.app.router.process(mid).state
        entry["status"] = {"value": {State.READY: "loaded", State.STARTING: "loading"}.get(state, "unloaded")}
        return entry


class Running(AppResource):
    """EP-5: models that are starting, ready or stopping."""

    def render_GET(self, request: Request) -> bytes:
        router = self.app.router
        running = []
        for proc in sorted(router.processes(), key=lambda p: p.id):
            if proc.state not in (State.STARTING, State.READY, State.STOPPING):
                continue
            inflight, waiting = router.counts(proc.id)
            m = proc.model
            running.append({"model": proc.id, "state": proc.state.value, "cmd": m.cmd, "proxy": m.proxy,
                            "ttl": m.ttl, "name": m.name, "description": m.description, "pid": proc.pid,
                            "inflight": inflight, "waiting": waiting})
        request.setHeader(b"content-type", _JSON)
        return json.dumps({"running": running}, separators=(",", ":")).encode("utf-8")


class ApiModels(AppResource):
    """EP-18: every configured model with its live state."""

    def render_GET(self, request: Request) -> bytes:
        router = self.app.router
        out = []
        for mid in sorted(self.app.config.models):
            proc = router.process(mid)
            inflight, waiting = router.counts(mid)
            m = proc.model
            out.append({"id": mid, "name": m.name, "description": m.description, "state": proc.state.value,
                        "pid": proc.pid, "ready_since": proc.ready_since, "last_error": proc.last_error,
                        "inflight": inflight, "waiting": waiting, "aliases": list(m.aliases),
                        "unlisted": m.unlisted})
        request.setHeader(b"content-type", _JSON)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class Unload(AppResource):
    """EP-6: ``GET|POST /unload`` stops every model, then answers ``OK``."""

    @async_render
    async def render_GET(self, request: Request) -> None:
        await self.app.router.unload()
        write_text(request, 200, "OK")

    render_POST = render_GET


class ApiModelsUnload(AppResource):
    """EP-6: ``POST /api/models/unload[/<model>]``."""

    @async_render
    async def render_POST(self, request: Request) -> None:
        if request.path.rstrip(b"/") != b"/api/models/unload":
            model_id = self.model_from_path(request, b"/api/models/unload")
            await self.app.router.unload([model_id])
        else:
            await self.app.router.unload()
        write_json(request, 200, {"msg": "ok"})


class ApiModelsLoad(AppResource):
    """EP-7: ``POST /api/models/load/<model>`` starts a model through the scheduler."""

    @async_render
    async def render_POST(self, request: Request) -> None:
        model_id = self.model_from_path(request, b"/api/models/load")
        await self.app.router.load(model_id)
        write_json(request, 200, {"msg": "ok", "model": model_id,
                                  "state": self.app.router.process(model_id).state.value})


class ConfigReload(AppResource):
    """EP-13: ``POST /api/config/reload`` answers once the new config is in force."""

    def render_POST(self, request: Request):
        from llamaswap.config import ConfigError
        from llamaswap.errors import InvalidConfig

        if self.app.reload is None:
            write_error(request, NotFound("config reload is not available"))
            return NOT_DONE_YET
        try:
            outcome = self.app.reload()
        except ConfigError as e:
            write_error(request, InvalidConfig("\n".join(e.errors)))
            return NOT_DONE_YET
        write_json(request, 200, {"msg": "ok", **outcome})
        return NOT_DONE_YET


class Version(JSONResource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", _JSON)
        return json.dumps({"version": __version__}).encode("utf-8")


class Logs(AppResource):
    """EP-9: the combined history as text; browsers are sent to the UI."""

    def render_GET(self, request: Request) -> bytes:
        if b"text/html" in (request.getHeader(b"accept") or b""):
            request.redirect(b"/ui/")
            return b""
        request.setHeader(b"content-type", _TEXT)
        return self.app.logs.history("combined")


class LogStream(AppResource):
    """EP-10: ``/logs/stream[/<source>]``: history, then live output."""

    def render_GET(self, request: Request):
        rest = request.path[len(b"/logs/stream"):].strip(b"/")
        name = unquote(rest.decode("latin-1"), encoding="utf-8", errors="replace") if rest else "combined"
        source = name
        if name not in ("combined", "proxy", "upstream"):
            source = self.app.config.resolve(name) or name
        if not self.app.logs.has_source(source):
            write_error(request, NotFound(
                f"unknown log source '{name}'; use 'proxy', 'upstream' or a model id"))
            return NOT_DONE_YET
        request.setHeader(b"content-type", _TEXT)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"x-accel-buffering", b"no")
        request.setHeader(b"cache-control", b"no-cache")
        request.write(b"")  # send headers now: a quiet source must not look like a hung request
        # twisted's parse_qs drops a bare "?no-history"; look at the raw query instead.
        query = request.uri.partition(b"?")[2]
        keys = {unquote(part.split(b"=", 1)[0].decode("latin-1")) for part in query.split(b"&")}
        self.app.logs.subscribe(source, request, history="no-history" not in keys)
        return NOT_DONE_YET


class Redirect(Resource):
    isLeaf = True

    def __init__(self, location: bytes, code: int) -> None:
        super().__init__()
        self.location, self.code = location, code

    def render(self, request: Request) -> bytes:
        request.setResponseCode(self.code)
        request.setHeader(b"location", self.location)
        request.setHeader(b"content-type", _TEXT)
        return b""


class Root(JSONResource):
    """The tree's root: OPTIONS short-circuits to CORS (SEC-8) and API keys are checked
    (SEC-2..5) before any lookup, so a request that fails auth is never parsed (EP-17)."""

    def __init__(self, app: Optional[App] = None) -> None:
        super().__init__()
        self.app = app

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if request.method == b"OPTIONS":
            return CorsPreflight()
        if self.app is not None and not auth.check(request, self.app.config.api_keys):
            endpoint = _dispatched_endpoint(request.path)
            if endpoint is not None:  # MET-2: a 401 on an inference route counts too
                self.app.begin_record(request, endpoint)
            return ErrorResource(InvalidAPIKey())
        if path == b"" and not request.postpath:
            return self  # "GET /" renders the root itself (EP-15 redirect)
        return super().getChildWithDefault(path, request)

    def render_GET(self, request: Request) -> bytes:
        return Redirect(b"/ui/", 302).render(request)


_ROUTE_PATHS = {route.encode("ascii"): route for route in INFERENCE_ROUTES}


def _dispatched_endpoint(path: bytes) -> Optional[str]:
    """The MET-2 ``endpoint`` of a model-dispatched path (EP-1 route or ``/upstream/...``)."""
    if path.startswith(b"/upstream/"):
        return "/upstream"
    while path:
        route = _ROUTE_PATHS.get(path)
        if route is not None:
            return route
        path = path.rpartition(b"/")[0]
    return None


def _put(root: Resource, path: str, leaf: Resource) -> None:
    """Mount ``leaf`` at ``path``, creating JSON-404 intermediate nodes."""
    node = root
    parts = path.strip("/").split("/")
    for part in parts[:-1]:
        key = part.encode("ascii")
        child = node.children.get(key)
        if child is None:
            child = JSONResource()
            node.putChild(key, child)
        node = child
    node.putChild(parts[-1].encode("ascii"), leaf)


def build_root(app: App, extra: Optional[dict[str, Resource]] = None) -> Resource:
    """The resource tree (``extra`` mounts later resources: metrics, UI, events)."""
    root = Root(app)
    dispatch = ModelDispatch(app)
    for route in INFERENCE_ROUTES:
        _put(root, route, dispatch)
    models = ModelList(app)
    _put(root, "/v1/models", models)
    _put(root, "/models", models)
    _put(root, "/upstream", UpstreamResource(app))
    _put(root, "/running", Running(app))
    _put(root, "/unload", Unload(app))
    _put(root, "/api/models/unload", ApiModelsUnload(app))
    _put(root, "/api/models/load", ApiModelsLoad(app))
    api = root.children[b"api"]
    api.children[b"models"].isLeaf = False
    _ApiModelsNode(app).adopt(api)
    _put(root, "/api/version", Version())
    _put(root, "/api/config/reload", ConfigReload(app))
    _put(root, "/health", Health())
    logs = Logs(app)
    logs_node = _LogsNode(logs, LogStream(app))
    root.putChild(b"logs", logs_node)
    root.putChild(b"ui", _UiNode())
    for path, resource in (extra or {}).items():
        _put(root, path, resource)
    return root


class _ApiModelsNode(JSONResource):
    """``/api/models`` renders EP-18 and has the unload/load children."""

    def __init__(self, app: App) -> None:
        super().__init__()
        self.listing = ApiModels(app)

    def adopt(self, api: Resource) -> None:
        old = api.children[b"models"]
        for key, child in old.children.items():
            self.putChild(key, child)
        api.putChild(b"models", self)

    def render_GET(self, request: Request) -> bytes:
        return self.listing.render_GET(request)


class _LogsNode(JSONResource):
    def __init__(self, logs: Logs, stream: LogStream) -> None:
        super().__init__()
        self.logs = logs
        self.putChild(b"stream", stream)

    def render_GET(self, request: Request) -> bytes:
        return self.logs.render_GET(request)


class _UiNode(JSONResource):
    """``/ui`` -> ``/ui/`` (EP-15); the UI itself is mounted by a later phase."""

    def render_GET(self, request: Request) -> bytes:
        return Redirect(b"/ui/", 301).render(request)


# -- the Site: body limits (CFG-28) and the access log (LOG-5) -----------------------------------

class LlamaSwapRequest(Request):
    """Spools large bodies, refuses ones over ``maxRequestBody`` while receiving them, and
    writes one access-log line when the response ends (or 499 when the client left)."""

    # RT-1: multipart bodies are ours to parse (invalid_multipart), not twisted.web's.
    _parsePOSTFormSubmission = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # twisted.web's __init__ sets this on the instance from the Site, hiding the class
        # attribute: without this, every POST paid for an email-package Content-Type parse.
        self._parsePOSTFormSubmission = False
        self._received = 0
        self._refused = False
        self._logged = False
        self._site = None
        self._t0 = time.monotonic()
        self.llamaswap_record: Optional[dict] = None  # set on model-dispatched routes (MET-2)

    def gotLength(self, length: Optional[int]) -> None:
        self._received = 0
        if length is not None and length > self.site_limit():
            self._refuse()
            return
        self.content = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)

    def site_limit(self) -> int:
        return self.channel.site.max_request_body()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.site_limit():
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        """CFG-28: 413 while the body arrives; nothing is started, the connection closes."""
        self._refused = True
        self.content = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        limit = self.site_limit()
        body = error_body("invalid_request_error", "request_too_large",
                          f"request body larger than maxRequestBody ({limit} bytes)")
        transport = self.channel.transport
        # SEC-8: llamaswap's errors carry ACAO * when the request had an Origin.
        cors = b"Access-Control-Allow-Origin: *\r\n" if self.requestHeaders.hasHeader(b"origin") else b""
        transport.write(b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: application/json\r\n"
                        + cors + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        self.channel.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def write(self, data: bytes) -> None:
        record = self.llamaswap_record
        if record is not None and record["ttfb"] is None and data:
            # MET-2: the first body byte sent, whoever writes it (upstream relay, RT-12
            # loading progress, a llamaswap error).
            app = getattr(getattr(self.channel, "site", None), "app", None)
            if app is not None:
                record["ttfb"] = app.clock.seconds() - record["started"]
        super().write(data)

    def finish(self) -> None:
        self._site = getattr(self.channel, "site", None)  # finish() may drop the channel
        super().finish()
        self._access_log(self.code)

    def connectionLost(self, reason: Failure) -> None:
        self._site = getattr(self.channel, "site", None)
        super().connectionLost(reason)
        if not self.finished:
            self._access_log(499)  # ERR-3: a client that left is not an error

    def _access_log(self, status: int) -> None:
        if self._logged or self._refused and status == 499:
            return
        self._logged = True
        site = self._site
        if site is not None and hasattr(site, "access_log"):
            site.access_log(self, status, time.monotonic() - self._t0)
        record, self.llamaswap_record = self.llamaswap_record, None
        if record is not None and site is not None and getattr(site, "app", None) is not None:
            site.app.finish_record(record, status, self.sentLength)


class AccessLogSite(Site):
    """``Site`` with our request class, JSON errors and the LOG-5 access log."""

    requestFactory = LlamaSwapRequest

    def __init__(self, resource: Resource, app: App, reactor: Any, log: Optional[Logger] = None) -> None:
        super().__init__(resource, reactor=reactor)
        self.app = app
        self.alog = log or Logger(namespace="llamaswap.access")
        self.displayTracebacks = False

    def max_request_body(self) -> int:
        return self.app.config.max_request_body

    def log(self, request: Request) -> None:
        pass  # twisted's combined log is replaced by access_log()

    def access_log(self, request: Request, status: int, duration: float) -> None:
        path = request.path or b""
        if path in (b"/health", b"/metrics"):
            return
        headers = request.requestHeaders
        forwarded = headers.getRawHeaders(b"x-forwarded-for")
        real_ip = headers.getRawHeaders(b"x-real-ip")
        if forwarded:
            ip = forwarded[0].split(b",")[0].strip().decode("latin-1")
        elif real_ip:
            ip = real_ip[0].strip().decode("latin-1")
        else:
            ip = getattr(request.getClientAddress(), "host", "") or "-"
        agent = (headers.getRawHeaders(b"user-agent") or [b""])[0].decode("latin-1")
        line = (f'Request {ip} "{request.method.decode("latin-1")} {request.uri.decode("latin-1")} '
                f'{request.clientproto.decode("latin-1")}" {status} {request.sentLength} '
                f'"{agent}" {duration:.3f}s')
        self.alog.info("{line}", line=line)
