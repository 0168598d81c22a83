"""The management endpoints: health, model lists, running models, load and unload, config
reload, version and the logs."""
from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

from twisted.web.server import NOT_DONE_YET, Request

from llamaswap import __version__, peers
from llamaswap.errors import NotFound
from llamaswap.process import State
from llamaswap.web.render import (
    JSON_TYPE, TEXT_TYPE, AppResource, JSONResource, async_render, write_error, write_json, write_text)


def _json(payload: Any, ensure_ascii: bool = True) -> bytes:
    return json.dumps(payload, ensure_ascii=ensure_ascii, separators=(",", ":")).encode("utf-8")


class Health(JSONResource):
    """200 OK whenever the daemon serves; no upstream involved."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", TEXT_TYPE)
        return b"OK"


class ModelList(AppResource):
    """``GET /v1/models`` and ``GET /models``."""

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
        data += peers.listing(config, self.app.started)  # <peerId>/<model>
        origin = request.getHeader(b"origin")
        if origin:
            request.setHeader(b"access-control-allow-origin", origin)
        request.setHeader(b"content-type", JSON_TYPE)
        return _json({"object": "list", "data": data}, ensure_ascii=False)

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


def _memory_fields(router: Any, model_id: str) -> dict:
    """``memory`` (bytes or null), ``memory_source`` (declared|measured|estimated|unknown) and
    ``load_time`` (the average measured load, seconds, or null) of a model."""
    need, source = router.memory_need(model_id)
    return {"memory": need, "memory_source": source, "load_time": router.load_time(model_id)}


class Running(AppResource):
    """Models that are starting, ready or stopping.

    With ``memory.budget`` set, each entry also has ``memory``, ``memory_source`` and
    ``load_time``, and the answer ``memory_budget``, ``memory_used`` (the needs of the models
    listed, summed) and ``memory_free`` (budget - used, at least 0)."""

    def render_GET(self, request: Request) -> bytes:
        router = self.app.router
        budget = self.app.config.memory_budget
        running = []
        for proc in sorted(router.processes(), key=lambda p: p.id):
            if proc.state not in (State.STARTING, State.READY, State.STOPPING):
                continue
            inflight, waiting = router.counts(proc.id)
            m = proc.model
            entry = {"model": proc.id, "state": proc.state.value, "cmd": m.cmd, "proxy": m.proxy,
                     "ttl": m.ttl, "name": m.name, "description": m.description, "pid": proc.pid,
                     "inflight": inflight, "waiting": waiting}
            if budget is not None:
                entry.update(_memory_fields(router, proc.id))
            running.append(entry)
        body: dict = {"running": running}
        if budget is not None:
            used = router.memory_used()
            body.update(memory_budget=budget, memory_used=used, memory_free=max(0, budget - used))
        request.setHeader(b"content-type", JSON_TYPE)
        return _json(body)


class ApiModels(AppResource):
    """``GET /api/models``: every configured model with its live state."""

    isLeaf = False  # /api/models/load and /api/models/unload are its own routes

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
                        "unlisted": m.unlisted, **_memory_fields(router, mid)})
        request.setHeader(b"content-type", JSON_TYPE)
        return _json(out, ensure_ascii=False)


class Unload(AppResource):
    """``GET|POST /unload`` stops every model, then answers ``OK``."""

    @async_render
    async def render_GET(self, request: Request) -> None:
        await self.app.router.unload()
        write_text(request, 200, "OK")

    render_POST = render_GET


class ApiModelsUnload(AppResource):
    """``POST /api/models/unload[/<model>]``."""

    @async_render
    async def render_POST(self, request: Request) -> None:
        if request.path.rstrip(b"/") != b"/api/models/unload":
            model_id = self.model_from_path(request, b"/api/models/unload")
            await self.app.router.unload([model_id])
        else:
            await self.app.router.unload()
        write_json(request, 200, {"msg": "ok"})


class ApiModelsLoad(AppResource):
    """``POST /api/models/load/<model>`` starts a model through the scheduler."""

    @async_render
    async def render_POST(self, request: Request) -> None:
        model_id = self.model_from_path(request, b"/api/models/load")
        await self.app.router.load(model_id)
        write_json(request, 200, {"msg": "ok", "model": model_id,
                                  "state": self.app.router.process(model_id).state.value})


class ConfigReload(AppResource):
    """``POST /api/config/reload`` answers once the new config is in force."""

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
        request.setHeader(b"content-type", JSON_TYPE)
        return json.dumps({"version": __version__}).encode("utf-8")


class Logs(AppResource):
    """``GET /logs``: the combined history as text; browsers are sent to the UI."""

    isLeaf = False  # /logs/stream is its own route; anything else below is a 404

    def render_GET(self, request: Request) -> bytes:
        if b"text/html" in (request.getHeader(b"accept") or b""):
            request.redirect(b"/ui/")
            return b""
        request.setHeader(b"content-type", TEXT_TYPE)
        return self.app.logs.history("combined")


class LogStream(AppResource):
    """``/logs/stream[/<source>]``: history, then live output."""

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
        request.setHeader(b"content-type", TEXT_TYPE)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"x-accel-buffering", b"no")
        request.setHeader(b"cache-control", b"no-cache")
        request.write(b"")  # send headers now: a quiet source must not look like a hung request
        # twisted's parse_qs drops a bare "?no-history"; look at the raw query instead.
        query = request.uri.partition(b"?")[2]
        keys = {unquote(part.split(b"=", 1)[0].decode("latin-1")) for part in query.split(b"&")}
        self.app.logs.subscribe(source, request, history="no-history" not in keys)
        return NOT_DONE_YET
