"""Scoped API keys, in memory: the apiKeys mapping form, each scope over HTTP, the per-key limit,
the key's name in the access log and the metrics, and priority among waiting requests on a Clock.

The daemon side is the real resource tree behind ``AccessLogSite`` (tests/test_resources.py's
``HTTPCase``); the end-to-end tests are in test_scoped_keys_e2e.py.
"""
from __future__ import annotations

import json

import attr
from treq.testing import RequestTraversalAgent
from twisted.trial.unittest import SynchronousTestCase

from llamaswap import auth
from llamaswap.config import ConfigError, parse_config
from llamaswap.config.access import ApiKey
from llamaswap.events import EventHub, EventsPage
from llamaswap.metrics import Metrics
from llamaswap.web.context import RequestRecord
from llamaswap.web.site import AccessLogSite
from llamaswap.web.tree import build_root
from tests.factories import make_config, make_model
from tests.fakes import capture_logger
from tests.test_events import FakeEventRequest
from tests.test_resources import HTTPCase
from tests.test_router import RouterCase, m

ROOT = ApiKey("sk-root-0123", "root", admin=True)
ALICE = ApiKey("sk-alice-4567", "alice", models=("chat-*",), admin=False, max_concurrent=1)
BOB = ApiKey("sk-bob-89ab", "bob", models=("chat-small", "coder"), admin=False, priority=5)
SCOPES = (ROOT, ALICE, BOB)
SECRETS = tuple(k.key for k in SCOPES)


def bearer(key: ApiKey) -> dict:
    return {b"authorization": b"Bearer " + key.key.encode()}


def chat(model: str) -> bytes:
    return json.dumps({"model": model, "messages": []}).encode()


# -- the config --------------------------------------------------------------------------------------

P = "cmd: srv --port ${PORT}"


def test_mapping_entries_are_read_with_their_defaults():
    """A mapping entry gets name key<N>, every model, admin unset, no limit and priority 0 unless
    written; plain strings are full-access keys; api_keys keeps every key string, in order."""
    c = parse_config('apiKeys:\n  - sk-plain\n  - {key: sk-a}\n  - key: sk-b\n    name: bob\n'
                     '    models: ["chat-*", coder]\n    admin: false\n    maxConcurrent: 2\n    priority: -3\n'
                     '  - {key: sk-c, models: "one-*", admin: yes}\n')
    assert c.api_keys == ("sk-plain", "sk-a", "sk-b", "sk-c")
    assert c.api_key_scopes == (
        ApiKey("sk-plain", "key1", ("*",), True), ApiKey("sk-a", "key2"),
        ApiKey("sk-b", "bob", ("chat-*", "coder"), False, 2, -3), ApiKey("sk-c", "key4", ("one-*",), True))


def test_plain_keys_only_leave_scopes_empty():
    """Without a mapping entry nothing changes: every key has full access, metrics keep their labels."""
    c = parse_config("apiKeys: [k1, k2]\n")
    assert c.api_keys == ("k1", "k2") and c.api_key_scopes == ()
    assert auth.scopes_of(c) == (ApiKey("k1", "key1", admin=True), ApiKey("k2", "key2", admin=True))


def test_mapping_entry_mistakes_are_reported_without_the_key():
    """Every mistake at once, each naming its path; the key itself is never shown."""
    try:
        parse_config("apiKeys:\n  - {name: x}\n  - {key: 'sk secret'}\n  - {key: sk-1, models: [], admin: maybe}\n"
                     "  - {key: sk-2, maxConcurrent: -1, priority: high, name: ''}\n  - {key: [sk-3]}\n"
                     "  - ~\n  - {key: sk-4, name: twin}\n  - {key: sk-4, name: twin}\n"
                     f"models:\n  a:\n    {P}\n")
    except ConfigError as e:
        errors = e.errors
    else:
        raise AssertionError("no error")
    assert errors == [
        "apiKeys[0].key: is required",
        "apiKeys[1].key: must be non-empty and contain no whitespace",
        "apiKeys[2].models: must not be empty (leave it out for every model)",
        "apiKeys[2].admin: must be a boolean (got 'maybe')",
        "apiKeys[3].name: must be non-empty and contain no whitespace (got '')",
        "apiKeys[3].maxConcurrent: must be a non-negative integer (got -1)",
        "apiKeys[3].priority: must be an integer (got 'high')",
        "apiKeys[4].key: must be a string (got a list)",
        "apiKeys[5]: must be a string or a mapping (got null)",
        "apiKeys[7]: the same key as apiKeys[6] (each key may be listed once)",
        "apiKeys[7]: name 'twin' is already used by apiKeys[6]",
    ]
    assert not any("secret" in e or "sk-" in e for e in errors)


def test_unknown_entry_key_warns_with_a_suggestion():
    c = parse_config("apiKeys: [{key: sk-1, model: [a]}]\n")
    assert c.warnings == ("config: unknown key 'apiKeys[0].model' (ignored); did you mean 'models'?",)


def test_key_never_in_repr():
    """A traceback or a debug print of a config never shows a key."""
    c = parse_config("apiKeys: [{key: sk-hidden-1, name: n}]\n")
    assert "sk-hidden-1" not in repr(c.api_key_scopes)


# -- scopes, as pure functions --------------------------------------------------------------------------

class ScopeUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.config = make_config([make_model(id="chat-big", aliases=("gpt-4o",)), make_model(id="chat-small"),
                                   make_model(id="secret"), make_model(id="coder")],
                                  profiles={"team": ("chat-small", "secret")},
                                  api_keys=SECRETS, api_key_scopes=SCOPES)

    def test_globs_match_any_name_of_a_model(self):
        """A glob matches the name asked for, or the model's id or another alias of it."""
        c = self.config
        for name in ("chat-big", "gpt-4o", "chat-small", "chat-anything", "team:chat-small"):
            self.assertTrue(auth.may_use(ALICE, name, c), name)
        for name in ("secret", "coder", "team:secret", "nope", "CHAT-big"):
            self.assertFalse(auth.may_use(ALICE, name, c), name)
        self.assertTrue(auth.may_use(ROOT, "anything", c))
        self.assertTrue(auth.may_use(None, "anything", c))  # no keys configured
        self.assertTrue(auth.may_use(ApiKey("k", "p", ("team",)), "team:secret", c))  # by its profile

    def test_admin_rules(self):
        """admin decides when any entry sets it; otherwise every key is an admin."""
        c = self.config
        self.assertEqual([auth.is_admin(k, c) for k in SCOPES], [True, False, False])
        unset = (ApiKey("a", "a", ("x",)), ApiKey("b", "b"))
        c2 = attr.evolve(c, api_keys=("a", "b"), api_key_scopes=unset)
        self.assertEqual([auth.is_admin(k, c2) for k in unset], [True, True])
        self.assertTrue(auth.is_admin(None, make_config([])))      # no keys: no auth
        self.assertFalse(auth.is_admin(None, c))                   # keys, but none given

    def test_admin_only_paths(self):
        for path in (b"/unload", b"/api/models/unload", b"/api/models/unload/a", b"/api/models/load/a",
                     b"/api/config/reload", b"/logs", b"/logs/stream", b"/logs/stream/a", b"/upstream",
                     b"/upstream/a/props", b"/api/inflight/7/cancel", b"/api/captures/7",
                     b"/api/profiles/active"):
            self.assertTrue(auth.admin_only(b"POST", path), path)
        self.assertTrue(auth.admin_only(b"GET", b"/api/inflight"))  # everyone's requests, with headers
        self.assertTrue(auth.admin_only(b"PUT", b"/api/profiles/active"))
        self.assertFalse(auth.admin_only(b"GET", b"/api/profiles/active"))
        self.assertFalse(auth.admin_only(b"GET", b"/api/profiles"))
        for path in (b"/running", b"/api/models", b"/v1/models", b"/api/events", b"/api/me", b"/logsx",
                     b"/v1/chat/completions", b"/api/inflightx", b"/metrics", b"/ui/"):
            self.assertFalse(auth.admin_only(b"GET", path), path)

    def test_find_key_compares_every_key(self):
        """SEC-3: the key is found by comparing the digests of every configured key, match or not."""
        calls = []
        real = auth.hmac.compare_digest

        def spy(a, b):
            calls.append((a, b))
            return real(a, b)

        self.patch(auth.hmac, "compare_digest", spy)
        self.assertIs(auth.find_key(ROOT.key.encode(), SCOPES), ROOT)
        self.assertEqual(len(calls), 3)
        self.assertIsNone(auth.find_key(b"sk-root", SCOPES))
        self.assertIsNone(auth.find_key(b"", SCOPES))
        self.assertIsNone(auth.find_key(None, SCOPES))

    def test_key_limits(self):
        limits = auth.KeyLimits()
        limits.admit(ALICE)
        error = self.assertRaises(auth.KeyConcurrencyLimit, limits.admit, ALICE)
        self.assertEqual(error.message, "too many requests in flight for API key 'alice' (limit 1)")
        for _ in range(5):
            limits.admit(BOB)  # no limit
        limits.release(ALICE)
        limits.admit(ALICE)
        self.assertEqual((limits.inflight("alice"), limits.inflight("bob")), (1, 5))


# -- over HTTP ---------------------------------------------------------------------------------------------

class ScopedHTTPCase(HTTPCase):
    def setUp(self) -> None:
        self.records: list = []
        self.build([make_model(id="chat-big", aliases=("gpt-4o",)), make_model(id="chat-small"),
                    make_model(id="secret"), make_model(id="coder")],
                   api_keys=SECRETS, api_key_scopes=SCOPES, include_aliases_in_list=True)
        self.rewire(request_listeners=[self.records.append])

    def forbidden(self, response, data: bytes, code: str) -> str:
        return self.assertError(response, data, 403, code, "permission_error")


class ModelScopeTests(ScopedHTTPCase):
    def test_each_key_uses_its_models(self):
        """A key reaches the models its globs allow, by id or alias; the admin key reaches all."""
        for key, model in ((ALICE, "chat-big"), (ALICE, "gpt-4o"), (ALICE, "chat-small"), (BOB, "chat-small"),
                           (BOB, "coder"), (ROOT, "secret"), (ROOT, "chat-big")):
            response, data = self.call(b"POST", "/v1/chat/completions", chat(model), bearer(key))
            self.assertEqual(response.code, 200, (key.name, model, data))

    def test_other_models_are_403_model_not_allowed(self):
        """A model outside the key's globs (or none at all) is 403 model_not_allowed: nothing is
        started or forwarded, and the answer does not tell whether the model exists."""
        for key, model in ((ALICE, "secret"), (ALICE, "coder"), (BOB, "chat-big"), (BOB, "gpt-4o"),
                           (ALICE, "no-such-model")):
            response, data = self.call(b"POST", "/v1/chat/completions", chat(model), bearer(key))
            message = self.forbidden(response, data, "model_not_allowed")
            self.assertEqual(message, f"this API key may not use model '{model}'")
            self.assertNotIn(key.key, data.decode())
        response, data = self.call(b"POST", "/v1/embeddings?model=secret", b"", bearer(ALICE))
        self.forbidden(response, data, "model_not_allowed")
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual({(r.status, r.key) for r in self.records}, {(403, "alice"), (403, "bob")})

    def test_models_list_shows_the_key_s_models_only(self):
        """/v1/models (and /models) lists what the key may use, aliases included."""
        def listed(key):
            response, body = self.call_json(b"GET", "/v1/models", headers=bearer(key))
            self.assertEqual(response.code, 200)
            return sorted(e["id"] for e in body["data"])

        self.assertEqual(listed(ALICE), ["chat-big", "chat-small", "gpt-4o"])
        self.assertEqual(listed(BOB), ["chat-small", "coder"])
        self.assertEqual(listed(ROOT), ["chat-big", "chat-small", "coder", "gpt-4o", "secret"])
        _, body = self.call_json(b"GET", "/models", headers=bearer(BOB))
        self.assertEqual(sorted(e["id"] for e in body["data"]), ["chat-small", "coder"])


class AdminScopeTests(ScopedHTTPCase):
    ADMIN_ONLY = [(b"POST", "/api/models/unload"), (b"POST", "/api/models/unload/chat-big"),
                  (b"POST", "/api/models/load/chat-big"), (b"GET", "/unload"), (b"POST", "/unload"),
                  (b"POST", "/api/config/reload"), (b"GET", "/logs"), (b"GET", "/logs/stream"),
                  (b"GET", "/logs/stream/chat-big"), (b"GET", "/upstream"), (b"GET", "/upstream/chat-big/props"),
                  (b"POST", "/api/inflight/1/cancel"), (b"GET", "/api/captures/1"),
                  (b"PUT", "/api/profiles/active")]

    def test_management_endpoints_are_403_for_other_keys(self):
        """Unload, load, config reload, in-flight cancel, /logs*, /upstream and captures: 403
        admin_required, before anything is looked up or started."""
        for key in (ALICE, BOB):
            for method, path in self.ADMIN_ONLY:
                response, data = self.call(method, path, headers=bearer(key))
                self.forbidden(response, data, "admin_required")
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual(self.upstream.requests, [])

    def test_admin_key_reaches_them(self):
        self.assertEqual(self.call(b"POST", "/api/models/load/chat-big", headers=bearer(ROOT))[0].code, 200)
        self.assertEqual(self.call(b"GET", "/logs", headers=bearer(ROOT))[0].code, 200)
        self.assertEqual(self.call(b"GET", "/upstream", headers=bearer(ROOT))[0].code, 200)
        self.assertEqual(self.call(b"POST", "/api/models/unload", headers=bearer(ROOT))[0].code, 200)

    def test_read_only_endpoints_stay_open_to_every_key(self):
        for path in ("/running", "/api/models", "/api/version", "/api/me", "/v1/models"):
            self.assertEqual(self.call(b"GET", path, headers=bearer(ALICE))[0].code, 200, path)

    def test_no_admin_set_means_every_key_is_admin(self):
        """As before scopes: when no entry sets admin, a model-limited key still manages."""
        limited = ApiKey("sk-l", "limited", models=("chat-*",))
        self.change_config(api_keys=("sk-l",), api_key_scopes=(limited,))
        self.assertEqual(self.call(b"GET", "/logs", headers=bearer(limited))[0].code, 200)
        response, data = self.call(b"POST", "/v1/chat/completions", chat("secret"), bearer(limited))
        self.forbidden(response, data, "model_not_allowed")

    def test_a_plain_key_is_an_admin_and_makes_unset_ones_not(self):
        limited = ApiKey("sk-l", "limited", models=("chat-*",))
        plain = ApiKey("sk-p", "key1", admin=True)
        self.change_config(api_keys=("sk-p", "sk-l"), api_key_scopes=(plain, limited))
        self.assertEqual(self.call(b"GET", "/logs", headers=bearer(plain))[0].code, 200)
        response, data = self.call(b"GET", "/logs", headers=bearer(limited))
        self.forbidden(response, data, "admin_required")

    def test_api_me_shows_the_scope_never_the_key(self):
        """GET /api/me: name, admin, models, limit, priority; the key is not in it."""
        for key, admin in ((ALICE, False), (BOB, False), (ROOT, True)):
            response, body = self.call_json(b"GET", "/api/me", headers=bearer(key))
            self.assertEqual(body, {"name": key.name, "admin": admin, "models": list(key.models),
                                    "max_concurrent": key.max_concurrent, "priority": key.priority,
                                    "keys_required": True})
            self.assertNotIn(key.key, json.dumps(body))
        self.change_config(api_keys=(), api_key_scopes=())
        _, body = self.call_json(b"GET", "/api/me")
        self.assertEqual(body, {"name": None, "admin": True, "models": ["*"], "max_concurrent": 0,
                                "priority": 0, "keys_required": False})

    def test_keys_apply_on_the_next_request(self):
        """SEC-5: a reload that narrows a key applies at once."""
        self.assertEqual(self.call(b"POST", "/v1/chat/completions", chat("coder"), bearer(BOB))[0].code, 200)
        narrower = attr.evolve(BOB, models=("chat-small",))
        self.change_config(api_key_scopes=(ROOT, ALICE, narrower))
        response, data = self.call(b"POST", "/v1/chat/completions", chat("coder"), bearer(BOB))
        self.forbidden(response, data, "model_not_allowed")


class KeyConcurrencyTests(ScopedHTTPCase):
    def test_per_key_limit_is_429_with_retry_after(self):
        """maxConcurrent: above it 429 key_concurrency_limit with Retry-After; other keys go on; a
        finished request frees its place."""
        self.upstream.hold = True
        first = self.request(b"POST", "/v1/chat/completions", chat("chat-big"), bearer(ALICE))
        self.assertEqual(len(self.upstream.requests), 1)
        response, data = self.call(b"POST", "/v1/chat/completions", chat("chat-small"), bearer(ALICE))
        message = self.assertError(response, data, 429, "key_concurrency_limit", "rate_limit_error")
        self.assertEqual(message, "too many requests in flight for API key 'alice' (limit 1)")
        self.assertEqual(self.header(response, b"retry-after"), b"1")
        self.assertEqual(len(self.upstream.requests), 1)  # never forwarded
        # another key is not limited by alice's requests
        other = self.request(b"POST", "/v1/chat/completions", chat("chat-big"), bearer(ROOT))
        self.assertEqual(len(self.upstream.requests), 2)
        for up, _ in self.upstream.requests:
            up.write(b'{"ok":true}')
            up.finish()
        self.flush()
        self.assertEqual(self.successResultOf(first).code, 200)
        self.assertEqual(self.successResultOf(other).code, 200)
        self.upstream.hold = False
        response, _ = self.call(b"POST", "/v1/chat/completions", chat("chat-small"), bearer(ALICE))
        self.assertEqual(response.code, 200)
        self.assertIn((429, "alice"), [(r.status, r.key) for r in self.records])

    def test_client_leaving_frees_its_place(self):
        """A request whose client went away no longer counts against the key."""
        from tests.fakes import drop_clients
        self.upstream.hold = True
        gone = self.request(b"POST", "/v1/chat/completions", chat("chat-big"), bearer(ALICE))
        drop_clients(self.agent)
        self.failureResultOf(gone)
        self.upstream.hold = False
        response, _ = self.call(b"POST", "/v1/chat/completions", chat("chat-big"), bearer(ALICE))
        self.assertEqual(response.code, 200)


class KeyNameTests(ScopedHTTPCase):
    def test_access_log_names_the_key_never_the_key(self):
        self.call(b"POST", "/v1/chat/completions", chat("chat-big"), bearer(ALICE))
        self.call(b"GET", "/running", headers={b"x-api-key": BOB.key.encode()})
        self.call(b"GET", "/running", headers={b"authorization": b"Bearer sk-wrong"})
        lines = self.access_lines()
        self.assertTrue(lines[0].endswith(" key=alice"), lines[0])
        self.assertTrue(lines[1].endswith(" key=bob"), lines[1])
        self.assertNotIn("key=", lines[2])  # refused: no key
        text = "\n".join(lines) + "\n".join(str(e) for e in self.events)
        for secret in (*SECRETS, "sk-wrong"):
            self.assertNotIn(secret, text)

    def test_plain_keys_keep_the_access_log_line(self):
        """Without scoped keys the access log line is unchanged."""
        self.change_config(api_keys=("sk-plain",), api_key_scopes=())
        self.call(b"GET", "/running", headers={b"x-api-key": b"sk-plain"})
        self.assertNotIn("key=", self.access_lines()[-1])

    def test_events_without_logs_for_keys_that_are_no_admin_s(self):
        """/api/events still works for every key, but only an admin's stream carries logData."""
        hub = EventHub(self.config.models, self.logs, self.reactor, log=capture_logger(self.events))
        self.addCleanup(hub.stopService)
        root = build_root(self.app, {"/api/events": EventsPage(hub)})
        self.agent = RequestTraversalAgent(root)
        self.agent._serverFactory = AccessLogSite(root, self.app, reactor=self.agent._memoryReactor,
                                                  log=capture_logger(self.access))
        streams = {}
        for key in (ROOT, ALICE):
            response = self.successResultOf(self.request(b"GET", "/api/events", headers=bearer(key)))
            self.assertEqual(response.code, 200)
            streams[key.name] = self.collect(response)
        self.logs.write_proxy(b"[INFO] a prompt maybe\n")
        self.flush()
        kinds = {}
        for name, collect in streams.items():
            fake = FakeEventRequest()
            fake.data = collect.data
            kinds[name] = [t for t, _ in fake.messages()]
        self.assertEqual(kinds["root"], ["logData", "logData", "modelStatus", "metrics", "profileChanged",
                                         "inflight", "logData"])
        self.assertEqual(kinds["alice"], ["modelStatus", "metrics", "profileChanged"])
        self.assertNotIn(b"prompt", streams["alice"].data)
        from tests.fakes import drop_clients
        drop_clients(self.agent)
        self.assertEqual(hub.client_count(), 0)


class MetricsKeyLabelTests(SynchronousTestCase):
    def record(self, key: str, status: int = 200) -> RequestRecord:
        r = RequestRecord(endpoint="/v1/chat/completions", started=0.0, model="a", key=key)
        r.status, r.duration = status, 0.5
        r.usage = {"input": 3, "output": 4, "cached": None, "prompt_per_second": None, "tokens_per_second": None}
        return r

    def lines(self, metrics: Metrics, name: str) -> list[str]:
        return [line for line in metrics.exposition().decode().splitlines() if line.startswith(name + "{")]

    def test_key_label_on_requests_and_tokens(self):
        """With scoped keys, requests and tokens are counted per key name (zero series per key)."""
        metrics = Metrics(["a"], key_names=["alice", "bob"])
        metrics.request_finished(self.record("alice"))
        refused = self.record("alice", 403)
        refused.usage = None
        metrics.request_finished(refused)
        requests = self.lines(metrics, "llamaswap_requests_total")
        self.assertIn('llamaswap_requests_total{endpoint="/v1/chat/completions",key="alice",model="a",'
                      'status="200"} 1.0', requests)
        self.assertIn('llamaswap_requests_total{endpoint="/v1/chat/completions",key="alice",model="a",'
                      'status="403"} 1.0', requests)
        tokens = self.lines(metrics, "llamaswap_tokens_total")
        self.assertIn('llamaswap_tokens_total{key="alice",model="a",type="output"} 4.0', tokens)
        self.assertIn('llamaswap_tokens_total{key="bob",model="a",type="output"} 0.0', tokens)

    def test_key_less_deployment_keeps_its_labels(self):
        metrics = Metrics(["a"])
        metrics.request_finished(self.record(""))
        text = metrics.exposition().decode()
        self.assertNotIn("key=", text)
        self.assertIn('llamaswap_tokens_total{model="a",type="output"} 4.0', text)

    def test_reload_turns_the_label_on_and_off(self):
        metrics = Metrics(["a"])
        metrics.set_key_names(["alice"])
        metrics.request_finished(self.record("alice"))
        self.assertIn('key="alice"', "\n".join(self.lines(metrics, "llamaswap_requests_total")))
        metrics.set_key_names(["carol"])  # alice removed: her series go, carol's zero series come
        self.assertFalse(any('"alice"' in line for line in self.lines(metrics, "llamaswap_tokens_total")))
        self.assertTrue(any('"carol"' in line for line in self.lines(metrics, "llamaswap_tokens_total")))
        metrics.set_key_names(None)
        self.assertNotIn("key=", metrics.exposition().decode())
        metrics.remove_model("a")
        self.assertEqual(self.lines(metrics, "llamaswap_tokens_total"), [])


# -- priority among waiting requests, on a Clock -------------------------------------------------------

class KeyPriorityTests(RouterCase):
    """Three models of one swapping group: x runs and is busy; a and b wait for it."""

    def setUp(self) -> None:
        self.build([m("x"), m("a"), m("b")])
        x = self.router.acquire("x")
        self.ready("x")
        self.busy = self.successResultOf(x)

    def test_higher_priority_key_starts_first(self):
        """b's request came later but its key has the higher priority: b starts before a."""
        a = self.router.acquire("a", priority=0)
        b = self.router.acquire("b", priority=5)
        self.busy.release()
        self.settle()
        self.assertEqual(self.spawned_ids(), ["x", "b"])
        self.ready("b")
        lease = self.successResultOf(b)
        self.assertNoResult(a)
        lease.release()
        self.settle()
        self.assertEqual(self.spawned_ids(), ["x", "b", "a"])
        self.ready("a")
        self.successResultOf(a).release()

    def test_same_priority_keeps_arrival_order(self):
        a = self.router.acquire("a", priority=2)
        self.router.acquire("b", priority=2)
        self.busy.release()
        self.settle()
        self.assertEqual(self.spawned_ids(), ["x", "a"])
        self.ready("a")
        self.successResultOf(a).release()

    def test_max_wait_still_bounds_every_wait(self):
        """A request that has waited scheduler.maxWait goes before a higher-priority one that has not."""
        a = self.router.acquire("a", priority=0)
        self.reactor.advance(self.config.max_wait)
        self.router.acquire("b", priority=9)
        self.busy.release()
        self.settle()
        self.assertEqual(self.spawned_ids(), ["x", "a"])
        self.ready("a")
        self.successResultOf(a).release()
