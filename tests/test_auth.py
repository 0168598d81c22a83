"""API keys, in memory (SEC-1..SEC-8, EP-17, ERR-2 ``invalid_api_key``).

The daemon side is the real resource tree behind ``AccessLogSite`` (see test_resources);
``change_config`` swaps in a changed config as a reload does, so SEC-5 shows.
"""
from __future__ import annotations

import base64
import json

from twisted.web.http_headers import Headers

from llamaswap import auth
from tests.factories import make_model
from tests.test_resources import HTTPCase

KEY = "sk-good"
OTHER = "sk-second"


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class AuthHTTPCase(HTTPCase):
    def setUp(self) -> None:
        self.build([make_model(id="a")], api_keys=(KEY, OTHER))

    def assertUnauthorized(self, response, data: bytes) -> str:
        message = self.assertError(response, data, 401, "invalid_api_key", "authentication_error")
        self.assertEqual(response.headers.getRawHeaders(b"www-authenticate"), [b'Basic realm="llamaswap"'])
        return message


class KeySourcesTests(AuthHTTPCase):
    def test_bearer_any_case(self):
        """SEC-2: ``Authorization: Bearer KEY``, scheme case-insensitive."""
        for scheme in (b"Bearer", b"bearer", b"BEARER", b"bEaReR"):
            response, _ = self.call(b"GET", "/v1/models", headers={b"authorization": scheme + b" " + KEY.encode()})
            self.assertEqual(response.code, 200, scheme)

    def test_basic_password_is_the_key(self):
        """SEC-2: ``Authorization: Basic base64(user:KEY)``; the user part is ignored."""
        for user in ("", "anyone", "x:y"):
            response, _ = self.call(b"GET", "/v1/models", headers={b"authorization": basic(user, KEY)})
            # "x:y" puts the split at the first ':' -> password "y:sk-good": wrong
            self.assertEqual(response.code, 401 if ":" in user else 200, user)
        response, data = self.call(b"GET", "/v1/models", headers={b"authorization": basic(KEY, "nope")})
        self.assertUnauthorized(response, data)

    def test_x_api_key(self):
        response, _ = self.call(b"GET", "/v1/models", headers={b"x-api-key": KEY.encode()})
        self.assertEqual(response.code, 200)

    def test_every_configured_key_works(self):
        response, _ = self.call(b"GET", "/v1/models", headers={b"x-api-key": OTHER.encode()})
        self.assertEqual(response.code, 200)

    def test_missing_or_wrong_key_is_401(self):
        """SEC-2/ERR-2: 401 invalid_api_key with WWW-Authenticate: Basic realm="llamaswap"."""
        for headers in ({}, {b"authorization": b"Bearer sk-bad"}, {b"x-api-key": b"sk-bad"},
                        {b"authorization": b"Bearer"}, {b"authorization": b"Bearer " + KEY.encode() + b"x"},
                        {b"authorization": b"Basic !!!notbase64"}, {b"x-api-key": b""}):
            response, data = self.call(b"GET", "/v1/models", headers=headers)
            message = self.assertUnauthorized(response, data)
            self.assertEqual(message, "unauthorized: invalid or missing API key")

    def test_other_scheme_counts_as_absent(self):
        """SEC-2: an Authorization header with another scheme is ignored; x-api-key then applies."""
        response, data = self.call(b"GET", "/v1/models", headers={b"authorization": b"Token " + KEY.encode()})
        self.assertUnauthorized(response, data)
        response, _ = self.call(b"GET", "/v1/models", headers={
            b"authorization": b"Digest abc", b"x-api-key": KEY.encode()})
        self.assertEqual(response.code, 200)

    def test_first_present_source_wins(self):
        """SEC-2: a wrong Bearer key is not rescued by a right x-api-key."""
        response, data = self.call(b"GET", "/v1/models", headers={
            b"authorization": b"Bearer sk-bad", b"x-api-key": KEY.encode()})
        self.assertUnauthorized(response, data)
        response, data = self.call(b"GET", "/v1/models", headers={
            b"authorization": basic("u", "bad"), b"x-api-key": KEY.encode()})
        self.assertUnauthorized(response, data)

    def test_key_never_echoed_or_logged(self):
        """SEC-3: neither the given key nor a configured one appears in the response or the log."""
        response, data = self.call(b"GET", "/v1/models?x=1", headers={b"authorization": b"Bearer sk-guess"})
        self.assertUnauthorized(response, data)
        text = data.decode() + "\n".join(self.access_lines())
        for secret in ("sk-guess", KEY, OTHER):
            self.assertNotIn(secret, text)

    def test_401_carries_cors_origin(self):
        """SEC-8: llamaswap's error responses carry ACAO * when the request had an Origin."""
        response, data = self.call(b"GET", "/running", headers={b"origin": b"http://ui.example"})
        self.assertUnauthorized(response, data)
        self.assertEqual(self.header(response, b"access-control-allow-origin"), b"*")
        response, data = self.call(b"GET", "/running")
        self.assertIsNone(self.header(response, b"access-control-allow-origin"))


class OpenAndProtectedPathsTests(AuthHTTPCase):
    def test_open_paths(self):
        """SEC-4: GET /health, GET / (redirect), GET /ui (redirect) and every OPTIONS need no key."""
        response, data = self.call(b"GET", "/health")
        self.assertEqual((response.code, data), (200, b"OK"))
        response, _ = self.call(b"GET", "/")
        self.assertEqual((response.code, self.header(response, b"location")), (302, b"/ui/"))
        response, _ = self.call(b"GET", "/ui")
        self.assertEqual((response.code, self.header(response, b"location")), (301, b"/ui/"))
        for path in ("/v1/chat/completions", "/running", "/ui/index.html", "/nope", "/metrics"):
            response, _ = self.call(b"OPTIONS", path)
            self.assertEqual(response.code, 204, path)
            self.assertEqual(self.header(response, b"access-control-allow-origin"), b"*")
        self.assertEqual(self.reactor.spawned, [])

    def test_everything_else_is_protected(self):
        """SEC-4/SEC-7: /ui/..., /metrics, /api/events, /logs, /running ... all need the key,
        including paths that would be 404 or 405 (the 401 comes first)."""
        cases = [(b"GET", p) for p in (
            "/v1/models", "/models", "/running", "/ui/", "/ui/index.html", "/metrics", "/api/events",
            "/logs", "/logs/stream", "/logs/stream/a", "/upstream", "/upstream/a/props", "/api/version",
            "/api/models", "/unload", "/nope", "/health/x", "/v1/chat/completions")]
        cases += [(b"POST", p) for p in ("/health", "/", "/ui", "/api/models/load/a", "/api/models/unload",
                                         "/api/config/reload", "/v1/embeddings")]
        cases += [(b"DELETE", "/health"), (b"PUT", "/upstream/a/x")]
        for method, path in cases:
            response, data = self.call(method, path)
            self.assertEqual(response.code, 401, f"{method.decode()} {path}: {data!r}")
            self.assertUnauthorized(response, data)
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(self.router.counts("a"), (0, 0))

    def test_with_key_the_same_paths_behave_normally(self):
        headers = {b"x-api-key": KEY.encode()}
        response, _ = self.call(b"GET", "/running", headers=headers)
        self.assertEqual(response.code, 200)
        response, data = self.call(b"GET", "/nope", headers=headers)
        self.assertError(response, data, 404, "not_found")
        response, data = self.call(b"GET", "/v1/chat/completions", headers=headers)
        self.assertError(response, data, 405, "method_not_allowed")


class ParsingAfterAuthTests(AuthHTTPCase):
    def test_body_not_parsed_on_401(self):
        """EP-17: a request failing auth never has its body parsed, its model resolved or started."""
        for body in (b"{not json", b'{"model":"zz"}', b'{"model":"a"}', b"{}"):
            response, data = self.call(b"POST", "/v1/chat/completions", body,
                                       {b"authorization": b"Bearer wrong"})
            self.assertUnauthorized(response, data)
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual([e for e in self.events if "not found" in str(e.get("log_format", ""))], [])

    def test_authenticated_request_is_parsed(self):
        response, data = self.call(b"POST", "/v1/chat/completions", b"{not json", {b"x-api-key": KEY.encode()})
        self.assertError(response, data, 400, "invalid_json")

    def test_auth_headers_stripped_before_forwarding(self):
        """SEC-6: the client's key never reaches the upstream; other headers do."""
        for headers in ({b"authorization": b"Bearer " + KEY.encode(), b"x-api-key": b"whatever"},
                        {b"authorization": basic("me", KEY)},
                        {b"x-api-key": KEY.encode()}):
            headers = {**headers, b"x-custom": b"c"}
            response, _ = self.call(b"POST", "/v1/chat/completions", b'{"model":"a"}', headers)
            self.assertEqual(response.code, 200)
            up, _ = self.upstream.requests[-1]
            self.assertFalse(up.requestHeaders.hasHeader(b"authorization"))
            self.assertFalse(up.requestHeaders.hasHeader(b"x-api-key"))
            self.assertEqual(up.requestHeaders.getRawHeaders(b"x-custom"), [b"c"])
        response, _ = self.call(b"GET", "/upstream/a/props", headers={b"x-api-key": KEY.encode()})
        self.assertEqual(response.code, 200)
        up, _ = self.upstream.requests[-1]
        self.assertFalse(up.requestHeaders.hasHeader(b"x-api-key"))


class LiveConfigTests(HTTPCase):
    def test_no_keys_no_auth(self):
        """SEC-1: with apiKeys empty nothing requires auth, and client headers are forwarded."""
        self.build([make_model(id="a")])
        for path in ("/v1/models", "/running", "/logs", "/api/version"):
            response, _ = self.call(b"GET", path)
            self.assertEqual(response.code, 200, path)
        self.call(b"POST", "/v1/chat/completions", b'{"model":"a"}', {b"authorization": b"Bearer mine"})
        up, _ = self.upstream.requests[-1]
        self.assertEqual(up.requestHeaders.getRawHeaders(b"authorization"), [b"Bearer mine"])

    def test_keys_read_on_every_request(self):
        """SEC-5: a changed apiKeys (reload) applies to the next request."""
        self.build([make_model(id="a")])
        response, _ = self.call(b"GET", "/running")
        self.assertEqual(response.code, 200)
        self.change_config(api_keys=("new-key",))
        response, data = self.call(b"GET", "/running")
        self.assertEqual(response.code, 401)
        response, _ = self.call(b"GET", "/running", headers={b"authorization": b"Bearer new-key"})
        self.assertEqual(response.code, 200)
        self.change_config(api_keys=())
        response, _ = self.call(b"GET", "/running")
        self.assertEqual(response.code, 200)


class UnitTests(HTTPCase):
    def headers(self, **values: bytes) -> Headers:
        h = Headers()
        for name, value in values.items():
            h.setRawHeaders(name.replace("_", "-"), [value])
        return h

    def test_extract_key(self):
        self.assertEqual(auth.extract_key(self.headers()), None)
        self.assertEqual(auth.extract_key(self.headers(authorization=b"Bearer  k1 ")), b"k1")
        self.assertEqual(auth.extract_key(self.headers(authorization=basic("u", "p:q"))), b"p:q")
        self.assertEqual(auth.extract_key(self.headers(authorization=b"Basic " + base64.b64encode(b"nocolon"))),
                         b"")
        self.assertEqual(auth.extract_key(self.headers(authorization=b"Negotiate x", x_api_key=b"k3")), b"k3")

    def test_compares_against_every_key(self):
        """SEC-3: no early exit: every key is compared even when the first one matches."""
        calls = []
        real = auth.hmac.compare_digest

        def spy(a, b):
            calls.append((a, b))
            return real(a, b)

        self.patch(auth.hmac, "compare_digest", spy)
        self.assertTrue(auth.key_matches(b"k1", ("k1", "k2", "k3")))
        self.assertEqual(len(calls), 3)
        self.assertEqual({len(a) for a, _ in calls} | {len(b) for _, b in calls}, {32})
        calls.clear()
        self.assertFalse(auth.key_matches(b"zz", ("k1", "k2", "k3")))
        self.assertEqual(len(calls), 3)
        self.assertFalse(auth.key_matches(None, ("k1",)))
        self.assertFalse(auth.key_matches(b"", ("k1",)))

    def test_error_shape(self):
        """ERR-1: the 401 body is exactly the OpenAI envelope."""
        self.build([make_model(id="a")], api_keys=("k",))
        response, data = self.call(b"GET", "/v1/models")
        self.assertEqual(json.loads(data), {"error": {
            "message": "unauthorized: invalid or missing API key", "type": "authentication_error",
            "param": None, "code": "invalid_api_key"}})


class CorsOnEveryErrorTests(HTTPCase):
    def test_413_carries_cors_origin(self):
        """SEC-8: even the 413 written while the body arrives carries ACAO * with an Origin."""
        self.build([make_model(id="a")], max_request_body=16)
        body = b'{"model":"a","pad":"' + b"x" * 100 + b'"}'
        response, data = self.call(b"POST", "/v1/chat/completions", body, {b"origin": b"http://ui"})
        self.assertError(response, data, 413, "request_too_large")
        self.assertEqual(self.header(response, b"access-control-allow-origin"), b"*")
        response, data = self.call(b"POST", "/v1/chat/completions", body)
        self.assertError(response, data, 413, "request_too_large")
        self.assertIsNone(self.header(response, b"access-control-allow-origin"))

    def test_errors_of_every_kind_carry_cors_origin(self):
        """SEC-8: 400/404/405/502 from llamaswap with an Origin get ACAO *; proxied ones keep
        the upstream's CORS headers (here: none)."""
        self.build([make_model(id="a")])
        origin = {b"origin": b"http://ui"}
        for method, path, body in ((b"POST", "/v1/chat/completions", b"{"),
                                   (b"POST", "/v1/chat/completions", b'{"model":"zz"}'),
                                   (b"GET", "/nope", b""), (b"GET", "/v1/chat/completions", b"")):
            response, _ = self.call(method, path, body, origin)
            self.assertGreaterEqual(response.code, 400)
            self.assertEqual(self.header(response, b"access-control-allow-origin"), b"*", path)
        self.upstream.reply = (500, {b"content-type": b"text/plain"}, b"boom")
        response, _ = self.call(b"POST", "/v1/chat/completions", b'{"model":"a"}', origin)
        self.assertEqual(response.code, 500)
        self.assertIsNone(self.header(response, b"access-control-allow-origin"))
