"""The management endpoints: health, model lists, running models, load and unload, config
reload, version and the logs."""
from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

from twisted.web.server import NOT_DONE_YET, Request

from llamaswap import __version__
from llamaswap.errors import NotFound
from llamaswap.auth import may_use, scope_json
from llamaswap.process import State
from llamaswap.selectors import selector_status
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
    """``GET /v1/models`` and ``GET /models``, shaped as llama-swap HEAD lists them.

    Every listed model, alias (with ``includeAliasesInList``), peer model, selector and pin of
    the active profile (one that names no model, alias, peer model or selector) gets one entry;
    all of them are sorted by id together. Each entry has ``status.value`` (``loaded``,
    ``loading`` or ``unloaded``) and, when there is something to say, ``meta.llamaswap``: the
    entry's ``metadata`` plus its ``type`` (``model``, ``alias``, ``peer``, ``selector`` or
    ``profile``) and what that type adds. A model's ``capabilities`` become the
    ``architecture``, ``capabilities``, ``supported_parameters`` and ``context_length`` fields
    (and ``meta.n_ctx``).
    """

    def render_GET(self, request: Request) -> bytes:
        config = self.app.config
        router = self.app.router
        data: list[dict] = []
        taken: set[str] = set()  # every requestable name: pins that shadow one are not listed
        for mid, model in config.models.items():
            taken.add(mid)
            taken.update(model.aliases)
            if model.unlisted:
                continue
            status = _status(router.target_state(mid))
            internal: dict = {"type": "model"}
            if model.aliases:
                internal["aliases"] = list(model.aliases)
            data.append(self._entry(mid, model.name, model.description, model.metadata, model.capabilities,
                                    status, internal))
            if config.include_aliases_in_list:
                for alias in model.aliases:
                    if alias.strip():
                        data.append(self._entry(alias, model.name, model.description, model.metadata,
                                                model.capabilities, status, {"type": "alias", "modelID": mid}))
        for peer_id, peer in config.peers.items():
            for name in peer.models:
                fqn = f"{peer_id}/{name}"
                taken.add(fqn)
                taken.add(name)
                data.append(self._entry(fqn, f"{peer_id}: {name}", "", None, None, "unloaded",
                                        {"type": "peer", "peerID": peer_id}))
        for sid, selector in config.selectors.items():
            taken.add(sid)
            if selector.unlisted:
                continue
            status = selector_status(selector, (router.target_state(t) for t in selector.targets))
            internal = {"type": "selector", "strategy": selector.strategy, "targets": list(selector.targets)}
            if selector.strategy == "spillover":
                internal["spillover"] = selector.spillover
            data.append(self._entry(sid, selector.name, selector.description, selector.metadata, None,
                                    status, internal))
        profile = config.pin_profiles.get(router.active_profile) if router.active_profile else None
        if profile is not None:
            for pin, target in profile.pins.items():
                if target and pin not in taken:
                    data.append(self._entry(pin, "", "", None, None, "unloaded", {"type": "profile"}))
        key = getattr(request, "api_key", None)
        data = [e for e in data if may_use(key, e["id"], config)]  # a scoped key sees its models only
        data.sort(key=lambda e: e["id"])
        origin = request.getHeader(b"origin")
        if origin:
            request.setHeader(b"access-control-allow-origin", origin)
        request.setHeader(b"content-type", JSON_TYPE)
        return _json({"object": "list", "data": data}, ensure_ascii=False)

    def _entry(self, entry_id: str, name: str, description: str, metadata: Any, caps: Any, status: str,
               internal: dict) -> dict:
        entry: dict = {"id": entry_id, "object": "model", "created": self.app.started, "owned_by": "llama-swap"}
        if name.strip():
            entry["name"] = name.strip()
        if description.strip():
            entry["description"] = description.strip()
        metadata = dict(metadata or {})
        context = 0
        if caps is not None and not caps.empty():
            entry.update(_capability_fields(caps))
            context = caps.context
            metadata = {k: v for k, v in metadata.items() if k not in _CAPABILITY_FIELDS}
        llamaswap = {**metadata, **internal}
        meta: dict = {}
        if llamaswap:
            meta["llamaswap"] = llamaswap
        if context > 0:
            meta["n_ctx"] = context
        if meta:
            entry["meta"] = meta
        entry["status"] = {"value": status}
        return entry


#: the top-level fields ``capabilities`` produce; ``metadata`` keys of these names are dropped
_CAPABILITY_FIELDS = ("architecture", "capabilities", "supported_parameters", "context_length")


def _status(state: Any) -> str:
    # as llama-swap: a model that is starting already counts as loaded
    return "loaded" if state in ("ready", "starting") else "unloaded"


def _capability_fields(caps: Any) -> dict:
    """A model's ``capabilities`` as llama-swap lists them: ``architecture`` (modalities),
    ``capabilities`` (flags), ``supported_parameters`` and ``context_length``."""
    fields: dict = {}
    has_in, has_out = bool(caps.input), bool(caps.output)
    arch: dict = {}
    if has_in:
        arch["input_modalities"] = list(caps.input)
    if has_out:
        arch["output_modalities"] = list(caps.output)
    if has_in and has_out:
        arch["modality"] = "+".join(caps.input) + "->" + "+".join(caps.output)
    if arch:
        fields["architecture"] = arch
    flags: dict = {}
    if "image" in caps.input:
        flags["vision"] = True
    if has_in and has_out:
        for wanted_in, wanted_out, flag in (("audio", "text", "audio_transcriptions"),
                                            ("text", "audio", "audio_speech"),
                                            ("text", "image", "image_generation"),
                                            ("image", "image", "image_to_image")):
            if wanted_in in caps.input and wanted_out in caps.output:
                flags[flag] = True
    params = None
    if caps.tools:
        flags["function_calling"] = True
        params = ["tools", "tool_choice"]
    if caps.reranker:
        flags["reranker"] = True
    if flags:  # an empty object is left out, as llama-swap does
        fields["capabilities"] = flags
    if params:
        fields["supported_parameters"] = params
    if caps.context > 0:
        fields["context_length"] = caps.context
    return fields


def _memory_fields(router: Any, model_id: str) -> dict:
    """``memory`` (bytes or null), ``memory_source`` (declared|measured|estimated|unknown) and
    ``load_time`` (the average measured load, seconds, or null) of a model."""
    need, source = router.memory_need(model_id)
    return {"memory": need, "memory_source": source, "load_time": router.load_time(model_id)}


def _kv_fields(proc: Any) -> dict:
    """``kv_saved_bytes`` (written by the model's last save before a stop) and
    ``kv_restored_tokens`` (restored at its last start; 0 for a cold start), null until they
    happened; only for models with keepCache in effect (llamaswap.kvcache)."""
    stats_of = getattr(proc.lifecycle, "stats", None)
    if proc.model.keep_cache is None or stats_of is None:
        return {}
    stats = stats_of(proc.id)
    return {"kv_saved_bytes": stats.saved_bytes if stats else None,
            "kv_restored_tokens": stats.restored_tokens if stats else None}


class Running(AppResource):
    """Models that are starting, ready or stopping.

    With ``memory.budget`` set, each entry also has ``memory``, ``memory_source`` and
    ``load_time``, and the answer ``memory_budget``, ``memory_used`` (the needs of the models
    listed, summed) and ``memory_free`` (budget - used, at least 0). With failover selectors
    configured, ``selectors`` lists each one's targets with their circuit breakers."""

    def render_GET(self, request: Request) -> bytes:
        router = self.app.router
        budget = self.app.config.memory_budget
        running = []
        for proc in sorted(router.processes(), key=lambda p: p.id):
            failed = router.failed.get(proc.id) if proc.state is State.STOPPED else None
            if proc.state not in (State.STARTING, State.READY, State.STOPPING) and failed is None:
                continue
            inflight, waiting = router.counts(proc.id)
            m = proc.model
            entry = {"model": proc.id, "state": proc.state.value, "cmd": m.cmd, "proxy": m.proxy,
                     "ttl": m.ttl, "name": m.name, "description": m.description, "pid": proc.pid,
                     "inflight": inflight, "waiting": waiting}
            if failed is not None:  # the keep-alive supervisor gave up on it (llamaswap.keepalive)
                entry.update(state="failed", reason=failed)
            if budget is not None:
                entry.update(_memory_fields(router, proc.id))
            entry.update(_kv_fields(proc))
            running.append(entry)
        body: dict = {"running": running}
        if budget is not None:
            used = router.memory_used()
            body.update(memory_budget=budget, memory_used=used, memory_free=max(0, budget - used))
        breakers = getattr(router, "failover", None)
        selectors = breakers.snapshot() if breakers is not None else []
        if selectors:  # failover selectors and their targets' circuit breakers (llamaswap.failover)
            body["selectors"] = selectors
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
                        "unlisted": m.unlisted, **_memory_fields(router, mid), **_kv_fields(proc)})
            if proc.state is State.STOPPED and mid in router.failed:  # llamaswap.keepalive gave up
                out[-1].update(state="failed", reason=router.failed[mid])
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


class Me(AppResource):
    """``GET /api/me``: the scope of the request's API key (never the key itself), so that the
    web UI shows only what the key may do."""

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", JSON_TYPE)
        return _json(scope_json(getattr(request, "api_key", None), self.app.config), ensure_ascii=False)
