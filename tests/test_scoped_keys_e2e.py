"""Scoped API keys end to end: the real daemon (tests/daemon.py) with fake upstreams.

One daemon, three keys written in the config as ``${env.X}``: an admin key, ``alice`` (chat
models only, one request at a time) and ``bob`` (the small chat model, priority 1). Checked:
each scope, 403 for a disallowed model and for a management endpoint, the filtered
``/v1/models``, the per-key 429, the key names in ``/metrics`` and the access log, and that
no key appears in anything the daemon writes or serves.
"""
from __future__ import annotations

import json
import re
import time

import pytest

from tests.daemon import Daemon, fake_config, fake_model, open_stream, stop_and_clean

ADMIN, ALICE, BOB = "sk-e2e-admin-7a1c", "sk-e2e-alice-93f0", "sk-e2e-bob-5d2e"


@pytest.fixture
def daemon(tmp_path):
    config = fake_config(
        {"chat-big": fake_model("chat-big", aliases=["gpt-4o"]), "chat-small": fake_model("chat-small"),
         "secret": fake_model("secret")},
        apiKeys=["${env.ADMIN_KEY}",
                 {"key": "${env.ALICE_KEY}", "name": "alice", "models": ["chat-*"], "maxConcurrent": 1},
                 {"key": "${env.BOB_KEY}", "name": "bob", "models": ["chat-small"], "priority": 1}],
        groups={"all": {"swap": False, "exclusive": False, "members": ["chat-big", "chat-small", "secret"]}})
    d = Daemon(config, tmp_path, env={"ADMIN_KEY": ADMIN, "ALICE_KEY": ALICE, "BOB_KEY": BOB}).start()
    yield d
    problems = stop_and_clean(d, strict=True)
    assert not problems, problems


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def chat(d: Daemon, key: str, model: str, **kw):
    return d.json("POST", "/v1/chat/completions", {"model": model, "messages": []}, headers=auth(key), **kw)


def error_code(status_body) -> tuple[int, str]:
    status, body = status_body
    return status, body["error"]["code"]


def test_each_scope_end_to_end(daemon):
    d = daemon
    # each key reaches its models
    assert chat(d, ALICE, "gpt-4o")[0] == 200
    assert chat(d, ALICE, "chat-small")[0] == 200
    assert chat(d, BOB, "chat-small")[0] == 200
    assert chat(d, ADMIN, "secret")[0] == 200
    d.record_children()
    # ... and nothing else: 403 model_not_allowed
    assert error_code(chat(d, ALICE, "secret")) == (403, "model_not_allowed")
    assert error_code(chat(d, BOB, "chat-big")) == (403, "model_not_allowed")
    # management endpoints: 403 admin_required for alice and bob, fine for the admin
    for key in (ALICE, BOB):
        for method, path in (("POST", "/api/models/unload"), ("POST", "/api/models/load/chat-big"),
                             ("GET", "/logs"), ("GET", "/logs/stream/chat-big"), ("POST", "/api/config/reload"),
                             ("GET", "/upstream/chat-small/health")):
            r = d.request(method, path, headers=auth(key))
            assert (r.status, r.json()["error"]["code"]) == (403, "admin_required"), (method, path, r)
    assert d.request("GET", "/logs", headers=auth(ADMIN)).status == 200
    # read-only views stay open
    for key in (ALICE, BOB):
        assert d.request("GET", "/running", headers=auth(key)).status == 200
    status, me = d.json("GET", "/api/me", headers=auth(ALICE))
    assert (status, me["name"], me["admin"], me["models"]) == (200, "alice", False, ["chat-*"])
    # /v1/models lists the key's models only
    listed = {key: sorted(e["id"] for e in d.json("GET", "/v1/models", headers=auth(key))[1]["data"])
              for key in (ADMIN, ALICE, BOB)}
    assert "secret" not in listed[ALICE] and "chat-big" in listed[ALICE] and "chat-small" in listed[ALICE]
    assert listed[BOB] == ["chat-small"]
    assert {"chat-big", "chat-small", "secret"} <= set(listed[ADMIN])
    # unload by the admin works
    assert d.request("POST", "/api/models/unload", headers=auth(ADMIN)).status == 200


def test_per_key_limit_names_in_metrics_and_no_key_anywhere(daemon):
    d = daemon
    # alice holds one slow streamed request; her second request is refused at once, bob's is not
    conn, resp = open_stream(d.port, "POST", "/v1/chat/completions?wait=0.3&chunks=5",
                             {"model": "chat-big", "stream": True, "messages": []}, headers=auth(ALICE))
    try:
        assert resp.status == 200
        refused = d.request("POST", "/v1/chat/completions", {"model": "chat-small", "messages": []},
                            headers=auth(ALICE))
        assert (refused.status, refused.json()["error"]["code"]) == (429, "key_concurrency_limit")
        assert refused.headers["Retry-After"] == "1"
        assert chat(d, BOB, "chat-small")[0] == 200
        body = resp.read()
        assert b"[DONE]" in body
    finally:
        conn.close()
    assert chat(d, ALICE, "chat-small")[0] == 200   # the place is free again
    d.record_children()

    metrics = d.request("GET", "/metrics", headers=auth(ADMIN)).text
    requests = [line for line in metrics.splitlines() if line.startswith("llamaswap_requests_total{")]
    assert any('key="alice"' in line and 'status="429"' in line for line in requests), requests
    assert any('key="alice"' in line and 'status="200"' in line and 'model="chat-big"' in line
               for line in requests), requests
    assert any('key="bob"' in line and 'status="200"' in line for line in requests), requests
    tokens = [line for line in metrics.splitlines() if line.startswith("llamaswap_tokens_total{")]
    assert any('key="alice"' in line and 'model="chat-big"' in line and not line.endswith(" 0.0")
               for line in tokens), tokens

    # the access log names the keys; no key is in the daemon's output, the logs or the metrics
    time.sleep(0.2)
    logs = d.request("GET", "/logs", headers=auth(ADMIN)).text
    access = [line for line in d.stdout.text().splitlines() if re.search(r'"POST /v1/chat/completions', line)]
    assert any(line.endswith(" key=alice") for line in access), access
    assert any(line.endswith(" key=bob") for line in access), access
    everything = d.output() + logs + metrics + json.dumps(d.json("GET", "/api/models", headers=auth(ADMIN))[1])
    for key in (ADMIN, ALICE, BOB):
        assert key not in everything
