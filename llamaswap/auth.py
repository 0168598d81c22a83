"""API keys (SEC-1..SEC-5) and what each key may do.

Pure functions over a twisted.web request's method, path and headers, and the config: which
requests need a key, where the key comes from, which configured key it is (a constant-time
lookup over every key), and the key's scope:

* ``models``: glob patterns of the model ids, aliases, profiles and selectors the key may use
  (:func:`may_use`); any other model gets 403 ``model_not_allowed``;
* ``admin``: only admin keys reach the management endpoints (:func:`admin_only`): unload, load,
  config reload, in-flight cancel, ``/logs*``, ``/upstream``; ``/api/events`` is served to the
  others without log output. When no key sets ``admin``, every key is an admin;
* ``maxConcurrent``: :class:`KeyLimits` counts each key's model-dispatched requests in flight;
* ``priority``: :func:`priority_of`, handed to the router with each request.

The resource tree calls :func:`identify` once per request, before any child lookup (so before
any body is parsed, EP-17), with the *current* config (SEC-5), and keeps the key on the request
(``request.api_key``). A key is never logged, shown or forwarded: only its ``name`` is.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from fnmatch import fnmatchcase
from typing import Any, Iterable, Optional

from llamaswap.config.access import ApiKey
from llamaswap.errors import LlamaSwapError

__all__ = [
    "AdminRequired", "KeyConcurrencyLimit", "KeyLimits", "ModelNotAllowed", "OPEN", "admin_only",
    "extract_key", "find_key", "identify", "is_admin", "is_open", "key_matches", "may_use",
    "priority_of", "require_model", "scope_json", "scopes_of"]

#: SEC-4: (method, path) pairs that never need a key; every OPTIONS is open too.
OPEN = frozenset({
    (b"GET", b"/health"), (b"HEAD", b"/health"),
    (b"GET", b"/"), (b"HEAD", b"/"),
    (b"GET", b"/ui"), (b"HEAD", b"/ui"),
})

#: paths (and everything below them) only admin keys may use: they stop or start models for
#: everyone, change the config, or show other people's prompts (logs, captures, the upstream
#: servers' own pages).
ADMIN_PREFIXES = (b"/unload", b"/api/models/unload", b"/api/models/load", b"/api/config/reload",
                  b"/logs", b"/upstream", b"/api/captures", b"/api/inflight")


class ModelNotAllowed(LlamaSwapError):
    """The request's key may not use the model it asked for."""

    status, kind, code = 403, "permission_error", "model_not_allowed"


class AdminRequired(LlamaSwapError):
    """A management endpoint, asked for with a key that is no admin's."""

    status, kind, code = 403, "permission_error", "admin_required"


class KeyConcurrencyLimit(LlamaSwapError):
    """The key has ``maxConcurrent`` requests in flight already."""

    status, kind, code = 429, "rate_limit_error", "key_concurrency_limit"
    headers = {b"Retry-After": b"1"}


def is_open(method: bytes, path: bytes) -> bool:
    """SEC-4: ``GET /health``, ``GET /``, ``GET /ui`` (redirect) and every ``OPTIONS``."""
    return method == b"OPTIONS" or (method, path) in OPEN


def extract_key(headers: Any) -> Optional[bytes]:
    """SEC-2: the client's key, from the first of Basic (password), Bearer, ``x-api-key``.

    ``headers`` is a ``twisted.web.http_headers.Headers``. An ``Authorization`` header with
    any other scheme counts as absent. A malformed Basic credential gives ``b""`` (present,
    matches nothing).
    """
    for value in headers.getRawHeaders(b"authorization", []):
        scheme, _, rest = value.strip().partition(b" ")
        scheme = scheme.lower()
        if scheme == b"basic":
            try:
                decoded = base64.b64decode(rest.strip(), validate=True)
            except (binascii.Error, ValueError):
                return b""
            _user, sep, password = decoded.partition(b":")
            return password if sep else b""
        if scheme == b"bearer":
            return rest.strip()
    for value in headers.getRawHeaders(b"x-api-key", []):
        return value.strip()
    return None


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def find_key(given: Optional[bytes], scopes: Iterable[ApiKey]) -> Optional[ApiKey]:
    """SEC-3: the configured key ``given`` is, compared in constant time against **every** key
    (no early exit); None when it is none of them, empty or absent.

    Both sides are hashed first, so the comparison time does not depend on the keys' lengths
    either.
    """
    probe = _digest(given if given is not None else b"")
    found: Optional[ApiKey] = None
    for scope in scopes:
        same = hmac.compare_digest(probe, _digest(scope.key.encode("utf-8")))
        if same and found is None:
            found = scope
    if not given:
        return None
    return found


def key_matches(given: Optional[bytes], keys: Iterable[str]) -> bool:
    """SEC-3: ``given`` is one of ``keys`` (see :func:`find_key`)."""
    return find_key(given, (ApiKey(k, "") for k in keys)) is not None


def scopes_of(config: Any) -> tuple[ApiKey, ...]:
    """Every configured key with its scope: ``config.api_key_scopes`` when apiKeys has a
    mapping entry, else each plain key with full access."""
    if config.api_key_scopes:
        return config.api_key_scopes
    return tuple(ApiKey(k, f"key{i + 1}", admin=True) for i, k in enumerate(config.api_keys))


def identify(request: Any, config: Any) -> tuple[bool, Optional[ApiKey]]:
    """``(may proceed, the request's key)``: no keys configured (SEC-1) or an open path (SEC-4)
    proceed without a key; otherwise only a configured key (SEC-2/3) does."""
    if not config.api_keys or is_open(request.method, request.path):
        return True, None
    key = find_key(extract_key(request.requestHeaders), scopes_of(config))
    return key is not None, key


# -- the key's scope ---------------------------------------------------------------------------

def is_admin(key: Optional[ApiKey], config: Any) -> bool:
    """Whether ``key`` may use the management endpoints; without keys configured, everyone may.

    A key's ``admin`` decides when any entry sets it (a plain string entry counts as set);
    otherwise every key is an admin, as before scopes existed.
    """
    if key is None:
        return not config.api_keys
    if any(k.admin is not None for k in scopes_of(config)):
        return bool(key.admin)
    return True


def admin_only(method: bytes, path: bytes) -> bool:
    """The management endpoints: unload, load, config reload, the in-flight list (it shows
    everyone's requests and their headers) and cancel, ``/logs*``, ``/upstream``, captures, and
    activating a profile."""
    for prefix in ADMIN_PREFIXES:
        if path == prefix or path.startswith(prefix + b"/"):
            return True
    if path.rstrip(b"/") == b"/api/profiles/active" and method not in (b"GET", b"HEAD"):
        return True  # activating a profile changes what everyone's requests reach
    return False


def _names(name: str, config: Any) -> set[str]:
    """What a requested name stands for: itself; for a model id or alias, the model's id and
    every alias; for ``<profile>:<model>``, the profile and that model's names too."""
    names = {name}
    model_id = config.resolve(name)
    if model_id is None and ":" in name:
        profile, member = name.split(":", 1)
        if profile in config.profiles or profile in getattr(config, "pin_profiles", {}):
            names.add(profile)
        model_id = config.resolve(member)
    if model_id is not None and model_id in config.models:
        names.add(model_id)
        names.update(config.models[model_id].aliases)
    return names


def may_use(key: Optional[ApiKey], name: str, config: Any) -> bool:
    """Whether ``key`` may use the model (id, alias, profile or selector) ``name``.

    A glob matches the name as requested, or any other name of the same model: a key allowed
    ``llama-*`` may also use ``llama-8b``'s alias ``gpt-4o-mini``. A selector is matched by its
    own id only, whatever its targets.
    """
    if key is None or "*" in key.models:
        return True
    names = _names(name, config)
    return any(fnmatchcase(n, glob) for n in names for glob in key.models)


def require_model(request: Any, name: str, config: Any) -> None:
    """Raise :class:`ModelNotAllowed` unless the request's key may use ``name``."""
    key = getattr(request, "api_key", None)
    if not may_use(key, name, config):
        raise ModelNotAllowed(f"this API key may not use model '{name}'")


def priority_of(request: Any) -> int:
    """The priority of the request's key among waiting requests (0 without a key)."""
    key = getattr(request, "api_key", None)
    return key.priority if key is not None else 0


def scope_json(key: Optional[ApiKey], config: Any) -> dict:
    """What ``GET /api/me`` shows of the request's key: never the key itself."""
    if key is None:
        return {"name": None, "admin": is_admin(None, config), "models": ["*"], "max_concurrent": 0,
                "priority": 0, "keys_required": bool(config.api_keys)}
    return {"name": key.name, "admin": is_admin(key, config), "models": list(key.models),
            "max_concurrent": key.max_concurrent, "priority": key.priority, "keys_required": True}


class KeyLimits:
    """Each key's model-dispatched requests in flight, for ``maxConcurrent``.

    Counted by key name (unique in a config), so a reload that keeps a key keeps its count.
    """

    def __init__(self) -> None:
        self._inflight: dict[str, int] = {}

    def inflight(self, name: str) -> int:
        return self._inflight.get(name, 0)

    def admit(self, key: ApiKey) -> None:
        """Count one more request of ``key``; raise :class:`KeyConcurrencyLimit` (429) at its limit."""
        n = self._inflight.get(key.name, 0)
        if key.max_concurrent and n >= key.max_concurrent:
            raise KeyConcurrencyLimit(
                f"too many requests in flight for API key '{key.name}' (limit {key.max_concurrent})")
        self._inflight[key.name] = n + 1

    def release(self, key: ApiKey) -> None:
        n = self._inflight.get(key.name, 0) - 1
        if n > 0:
            self._inflight[key.name] = n
        else:
            self._inflight.pop(key.name, None)
