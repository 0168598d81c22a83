"""API keys (SEC-1..SEC-5): which requests need a key, where the key comes from,
and a constant-time check against every configured key.

Pure functions over a twisted.web request's method, path and headers; the resource tree
calls :func:`check` once per request, before any child lookup (so before any body is
parsed, EP-17), with the keys of the *current* config (SEC-5).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Any, Iterable, Optional

#: SEC-4: (method, path) pairs that never need a key; every OPTIONS is open too.
OPEN = frozenset({
    (b"GET", b"/health"), (b"HEAD", b"/health"),
    (b"GET", b"/"), (b"HEAD", b"/"),
    (b"GET", b"/ui"), (b"HEAD", b"/ui"),
})


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


def key_matches(given: Optional[bytes], keys: Iterable[str]) -> bool:
    """SEC-3: compare in constant time against **every** key (no early exit).

    Both sides are hashed first, so the comparison time does not depend on the keys'
    lengths either.
    """
    probe = _digest(given if given is not None else b"")
    matched = False
    for key in keys:
        same = hmac.compare_digest(probe, _digest(key.encode("utf-8")))
        matched = matched | same
    return matched and given is not None and given != b""


def check(request: Any, keys: Iterable[str]) -> bool:
    """True if ``request`` may proceed: no keys configured (SEC-1), an open path (SEC-4),
    or a matching key (SEC-2/3)."""
    keys = tuple(keys or ())
    if not keys:
        return True
    if is_open(request.method, request.path):
        return True
    return key_matches(extract_key(request.requestHeaders), keys)
