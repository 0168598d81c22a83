"""Runtime profiles (llama-swap's ``profiles.<name>: {description, pins}``) over HTTP, and the
``/upstream`` passthrough that refuses selectors.

* ``GET /api/profiles``: ``{"active": <name or null>, "profiles": [{"id", "description",
  "pins"}, ...]}``, profiles sorted by name; a pin to nothing is listed as ``""``.
* ``PUT /api/profiles/active`` with ``{"name": "<profile>"}`` activates a profile,
  ``{"name": null}`` (or ``""``) deactivates; the answer is ``{"active": <name or null>}``.

The active profile lives in the router (``ModelRouter.active_profile``), which applies its pins.
A change is published to the router's observers as ``llamaswap.events.ProfileChanged``, so
``/api/events`` sends llama-swap's ``profileChanged``.
"""
from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

from twisted.web.server import NOT_DONE_YET, Request

from llamaswap.errors import InvalidJSON, LlamaSwapError, ModelNotFound
from llamaswap.events import ProfileChanged
from llamaswap.web.dispatch import UpstreamResource
from llamaswap.web.render import JSON_TYPE, AppResource, write_error, write_json

__all__ = ["ActiveProfile", "Profiles", "UpstreamPassthrough", "routes"]


class BadProfileRequest(LlamaSwapError):
    """A ``PUT /api/profiles/active`` body that names no profile the right way."""

    status, kind, code = 400, "invalid_request_error", "invalid_profile_request"


def _active(router: Any) -> dict:
    return {"active": router.active_profile}


class Profiles(AppResource):
    """``GET /api/profiles``: every pin profile and which one is active."""

    isLeaf = False  # /api/profiles/active is its own route; anything else below is a 404

    def render_GET(self, request: Request) -> bytes:
        config = self.app.config
        profiles = [{"id": name, "description": profile.description,
                     "pins": {pin: target or "" for pin, target in profile.pins.items()}}
                    for name, profile in sorted(config.pin_profiles.items())]
        request.setHeader(b"content-type", JSON_TYPE)
        return json.dumps({**_active(self.app.router), "profiles": profiles},
                          ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class ActiveProfile(AppResource):
    """``PUT /api/profiles/active``: ``{"name": "<profile>"}`` or ``{"name": null}``."""

    def render_PUT(self, request: Request):
        try:
            name = _requested_profile(request)
            router = self.app.router
            changed = router.set_active_profile(name)
        except LlamaSwapError as e:
            write_error(request, e)
            return NOT_DONE_YET
        if changed:
            router.observers.publish(ProfileChanged(router.active_profile))
        write_json(request, 200, _active(self.app.router))
        return NOT_DONE_YET


def _requested_profile(request: Request) -> Any:
    request.content.seek(0)
    raw = request.content.read()
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise InvalidJSON(f"invalid JSON in request body: {e}") from None
    if not isinstance(body, dict):
        raise BadProfileRequest('the body must be a JSON object: {"name": "<profile>"} or {"name": null}')
    if "name" not in body:
        raise BadProfileRequest('profile name is required: {"name": "<profile>"} activates a profile, '
                                '{"name": null} deactivates')
    name = body["name"]
    if name is not None and not isinstance(name, str):
        raise BadProfileRequest("profile name must be a string or null")
    return name


class UpstreamPassthrough(UpstreamResource):
    """``/upstream/<model>/<path>`` with selector ids refused (a selector picks a model per
    inference request; a passthrough path names one model). The active profile's pins apply
    as for every request."""

    def _find(self, rest: bytes) -> tuple[Any, bytes, bool]:
        """The longest prefix of ``rest`` on segment boundaries that resolves; a selector there
        is a 404 that names its targets."""
        router = self.app.router
        segments = rest.split(b"/")
        for k in range(len(segments), 0, -1):
            name = unquote(b"/".join(segments[:k]).decode("latin-1"), encoding="utf-8", errors="replace")
            try:
                resolved = router.resolve(name, selectors=False)
            except ModelNotFound:
                selector = self._selector(name)
                if selector is not None:
                    raise ModelNotFound(
                        f"'{name}' is a selector, which /upstream does not take; use one of its targets "
                        f"({', '.join(selector.targets)})") from None
                continue
            return resolved, b"/".join(segments[k:]), k == len(segments)
        raise ModelNotFound.named(unquote(segments[0].decode("latin-1")), router.config)

    def _selector(self, name: str) -> Any:
        try:
            concrete = self.app.router.rewrite(name, selectors=False)
        except ModelNotFound:
            return None
        return self.app.config.selectors.get(concrete)


def routes(app: Any) -> dict:
    """This module's entries of the route table (``llamaswap.web.tree.routes``); its
    ``/upstream`` replaces the plain passthrough."""
    return {"/api/profiles": Profiles(app), "/api/profiles/active": ActiveProfile(app),
            "/upstream": UpstreamPassthrough(app)}
