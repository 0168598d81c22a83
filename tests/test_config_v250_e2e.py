"""llama-swap v250's own config.example.yaml, run: the real daemon (``twistd -n llamaswap``) on the
example prepared as tests/test_config_v250.py prepares it, every command the fake upstream,
driven over HTTP as a client would.

Two more changes are made here, to the prepared text only, because the example's values cannot
work on a shared test machine:

* ``gpt-oss-120b`` runs its server on ``${PORT}`` (the fake upstream's ``--port``), but the
  example's ``proxy: http://127.0.0.1:8999`` names a fixed port its real command would have
  used; the proxy becomes ``http://127.0.0.1:${PORT}``;
* ``startPort: 10001`` becomes a free port range, so parallel tests do not collide.

The example's peers point at a LAN address and at openrouter.ai: they are listed, but no test
requests one of their models, so the daemon never contacts them.
"""
from __future__ import annotations

import json
import time
from typing import Any

import pytest

from llamaswap.captures import REDACTED
from tests.daemon import Daemon, open_stream, stop_and_clean, free_port_range, wait_until
from tests.test_config_v250 import EXAMPLE_ENV, prepared_example

KEY = "sk-hunter2"
AUTH = {"Authorization": f"Bearer {KEY}"}
LOCAL_LISTED = {"gpt-oss-120b", "docker-llama"}
SELECTORS = {"coding-model": ("warm", ["gpt-oss-120b"]), "llm-plan": ("pin", ["gpt-oss-120b", "z-ai/glm-4.7"]),
             "llama": ("spillover", ["docker-llama"])}
PEER_MODELS = {"llama-swap-peer/model_a", "llama-swap-peer/model_b", "llama-swap-peer/embeddings/model_c",
               "openrouter/meta-llama/llama-3.1-8b-instruct", "openrouter/qwen/qwen3-235b-a22b-2507",
               "openrouter/deepseek/deepseek-v3.2", "openrouter/z-ai/glm-4.7",
               "openrouter/moonshotai/kimi-k2-0905", "openrouter/minimax/minimax-m2.1"}


def example_for_the_daemon() -> tuple[str, dict[str, str]]:
    """The prepared example, with the two changes the module docstring names."""
    text, environ = prepared_example()
    fixed_proxy = "    proxy: http://127.0.0.1:8999\n"
    assert text.count(fixed_proxy) == 1 and text.count("\nstartPort: 10001\n") == 1
    text = text.replace(fixed_proxy, "    proxy: http://127.0.0.1:${PORT}\n")
    text = text.replace("\nstartPort: 10001\n", f"\nstartPort: {free_port_range(4)}\n")
    return text, environ


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    text, environ = example_for_the_daemon()
    d = Daemon(text, tmp_path_factory.mktemp("v250-example"), env=environ)
    d.start()
    d.running_at_start = d.json("GET", "/running", headers=AUTH)
    d.served = []  # the model that answered each successful model request, in order
    yield d
    problems = stop_and_clean(d)
    assert not problems, problems


def chat(d: Daemon, model: str, headers: dict | None = None, **extra: Any) -> tuple[int, Any]:
    """A non-streamed chat completion with the admin key; a 200 is counted in ``d.served``."""
    status, body = d.json("POST", "/v1/chat/completions",
                          {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra},
                          headers=AUTH if headers is None else headers)
    if status == 200:
        d.served.append(body["served_by"])
    return status, body


def served_by(d: Daemon, model: str) -> str:
    status, body = chat(d, model)
    assert status == 200, (model, body, d.output())
    return body["served_by"]


def listing(d: Daemon) -> dict[str, dict]:
    status, body = d.json("GET", "/v1/models", headers=AUTH)
    assert status == 200, body
    return {m["id"]: m for m in body["data"]}


def read_events(resp: Any, until: Any, timeout: float = 10) -> list[tuple[str, Any]]:
    """``(type, data)`` of the /api/events messages read until ``until(type, data)`` is true."""
    deadline = time.monotonic() + timeout
    out = []
    while time.monotonic() < deadline:
        line = resp.readline()
        assert line, f"/api/events ended early after {out}"
        if line.startswith(b"data:"):
            message = json.loads(line[len(b"data:"):])
            out.append((message["type"], json.loads(message["data"])))
            if until(*out[-1]):
                return out
    raise AssertionError(f"/api/events: not seen in {timeout} s; got {out}")


def test_every_key_is_read_and_nothing_starts(daemon):
    """No key of the example is "not supported"; the preload names a selector, so nothing runs."""
    out = daemon.output()
    assert "not supported" not in out and "unknown key" not in out
    assert "'hooks.on_startup.preload' names selector 'llama', which cannot be preloaded" in out
    assert daemon.running_at_start == (200, {"running": []})


def test_api_keys(daemon):
    """apiKeys: the literal keys and the two from ${env.API_KEY_1/2} work; none or another is 401."""
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"x-api-key": "sk-or-test"}):
        status, body = chat(daemon, "gpt-oss-120b", headers=headers)
        assert (status, body["error"]["code"]) == (401, "invalid_api_key"), body
        status, body = daemon.json("GET", "/v1/models", headers=headers)
        assert status == 401, body
    keys = ["sk-hunter2", "sk-gyCPiKUcIfPlaM4OSMZekkprgijPx6+OsmQs8Rsg0xZ9qpy6gKWsIKqHOk+cgXVx",
            EXAMPLE_ENV["API_KEY_1"], EXAMPLE_ENV["API_KEY_2"]]
    for i, key in enumerate(keys):
        headers = {"Authorization": f"Bearer {key}"} if i % 2 == 0 else {"x-api-key": key}
        status, body = chat(daemon, "gpt-oss-120b", headers=headers)
        assert status == 200 and body["served_by"] == "gpt-oss-120b", (key, body)


def test_models_listing(daemon):
    """/v1/models: the listed models, the selectors and the peers' models, each with status and
    meta; no unlisted model, no alias (includeAliasesInList: false)."""
    models = listing(daemon)
    assert set(models) == LOCAL_LISTED | set(SELECTORS) | PEER_MODELS
    for entry in models.values():
        assert entry["status"]["value"] in ("loaded", "unloaded", "loading"), entry
        assert entry["meta"]["llamaswap"]["type"] in ("model", "selector", "peer"), entry
    for selector, (strategy, targets) in SELECTORS.items():
        meta = models[selector]["meta"]["llamaswap"]
        assert (meta["type"], meta["strategy"], meta["targets"]) == ("selector", strategy, targets)
    assert models["llama"]["meta"]["llamaswap"]["spillover"] == 4
    assert (models["coding-model"]["name"], models["coding-model"]["meta"]["llamaswap"]["purpose"]) == \
        ("Coding Model", "coding")
    assert models["openrouter/z-ai/glm-4.7"]["meta"] == {"llamaswap": {"type": "peer", "peerID": "openrouter"}}
    gpt = models["gpt-oss-120b"]
    assert (gpt["name"], gpt["description"], gpt["context_length"]) == \
        ("gpt-oss 120B", "A thinking model from OpenAI", 32000)
    assert gpt["capabilities"]["function_calling"] is True
    meta = gpt["meta"]["llamaswap"]
    assert (meta["temperature"], meta["an_obj"]["c"]) == (0.7, [0.7, False, "model: gpt-oss-120b"])

    # the metadata's ${PORT} is the port the model's server listens on
    assert served_by(daemon, "gpt-oss-120b") == "gpt-oss-120b"
    status, info = daemon.json("GET", "/upstream/gpt-oss-120b/info", headers=AUTH)
    assert status == 200 and info["port"] == meta["port"], (info, meta)
    models = listing(daemon)
    assert models["gpt-oss-120b"]["status"] == {"value": "loaded"}
    assert models["coding-model"]["status"] == {"value": "loaded"}  # warm: its target is ready


def test_plain_model_with_the_examples_filters(daemon):
    """gpt-oss-120b's useModelName, stripParams/setParams, setParamsByID and env reach the server."""
    status, body = chat(daemon, "gpt-oss-120b", temperature=0.1, top_k=5)
    assert status == 200 and body["choices"][0]["message"]["content"] == "hi", body
    sent = json.loads(body["request_body"])
    assert sent == {"model": "openai/gpt-oss-120B", "messages": [{"role": "user", "content": "hi"}],
                    "temperature": 0.7, "top_p": 0.9, "chat_template_kwargs": {"reasoning_effort": "medium"}}
    status, body = chat(daemon, "gpt-oss-120b:high")
    assert json.loads(body["request_body"])["chat_template_kwargs"] == {"reasoning_effort": "high"}
    status, body = chat(daemon, "gpt-4o-mini")  # the alias
    assert status == 200 and body["served_by"] == "gpt-oss-120b", body
    env = daemon.request("GET", "/upstream/gpt-oss-120b/env", headers=AUTH)
    assert env.status == 200 and "CUDA_VISIBLE_DEVICES=0,1,2" in env.text.splitlines(), env
    assert served_by(daemon, "unlisted-model") == "unlisted-model"


def test_selectors(daemon):
    """Each of the example's selectors is served by its target; /upstream refuses a selector."""
    assert served_by(daemon, "llama") == "docker-llama"
    assert served_by(daemon, "coding-model") == "gpt-oss-120b"
    assert served_by(daemon, "llm-plan") == "gpt-oss-120b"  # pin: the first target
    status, body = daemon.json("GET", "/upstream/llama/health", headers=AUTH)
    assert (status, body["error"]["code"]) == (404, "model_not_found"), body


def test_profile_pins(daemon):
    """PUT /api/profiles/active: coding; its pins apply, GET /api/profiles and /api/events say so."""
    conn, events = open_stream(daemon.port, "GET", "/api/events", headers=AUTH, timeout=10)
    try:
        read_events(events, lambda kind, data: kind == "inflight")  # the snapshot's last message
        status, body = daemon.json("PUT", "/api/profiles/active", {"name": "coding"}, headers=AUTH)
        assert (status, body) == (200, {"active": "coding"})
        read_events(events, lambda kind, data: (kind, data) == ("profileChanged", {"active": "coding"}))
    finally:
        conn.close()
    try:
        status, body = daemon.json("GET", "/api/profiles", headers=AUTH)
        assert (status, body) == (200, {"active": "coding", "profiles": [
            {"id": "coding", "description": "Coding-focused model routing",
             "pins": {"llm-code": "gpt-oss-120b", "llm-plan": "qwen-unlisted", "image-gen": ""}}]})
        assert served_by(daemon, "llm-code") == "gpt-oss-120b"
        for model in ("image-gen", "llm-plan"):  # disabled; pinned to a model the example lacks
            status, body = chat(daemon, model)
            assert (status, body["error"]["code"]) == (404, "model_not_found"), body
        models = listing(daemon)
        assert models["llm-code"]["meta"] == {"llamaswap": {"type": "profile"}}
        assert "image-gen" not in models
    finally:
        status, body = daemon.json("PUT", "/api/profiles/active", {"name": None}, headers=AUTH)
        assert (status, body) == (200, {"active": None})


def test_inflight_and_activity(daemon):
    """A streamed request is listed by /api/inflight while it runs and sent on /api/events
    (upsert, then remove); /api/metrics/activity lists every request answered so far."""
    conn, events = open_stream(daemon.port, "GET", "/api/events", headers=AUTH, timeout=10)
    try:
        snapshot = read_events(events, lambda kind, data: kind == "inflight")
        assert snapshot[-1][1] == {"operation": "snapshot", "requests": []}
        chat_conn, stream = open_stream(daemon.port, "POST", "/v1/chat/completions?wait=0.1",
                                        {"model": "gpt-oss-120b", "stream": True,
                                         "messages": [{"role": "user", "content": "hi"}]},
                                        headers={**AUTH, "X-Session-ID": "session-7"}, timeout=10)
        try:
            assert stream.status == 200
            status, body = daemon.json("GET", "/api/inflight", headers=AUTH)
            assert status == 200 and body["operation"] == "snapshot", body
            [entry] = body["requests"]
            assert (entry["model"], entry["req_path"], entry["method"], entry["session_id"]) == \
                ("gpt-oss-120b", "/v1/chat/completions", "POST", "session-7")
            assert entry["req_headers"]["Authorization"] == REDACTED
            assert KEY not in json.dumps(body)
            assert b"data: [DONE]" in stream.read()
        finally:
            chat_conn.close()
        daemon.served.append("gpt-oss-120b")
        seen = read_events(events, lambda kind, data: kind == "inflight" and data["operation"] == "remove")
    finally:
        conn.close()
    updates = [data for kind, data in seen if kind == "inflight"]
    assert updates[0]["operation"] == "upsert" and updates[0]["request"]["id"] == entry["id"]
    assert updates[-1] == {"operation": "remove", "id": entry["id"]}
    assert updates[-2]["request"]["resp_bytes"] > 0  # the bytes relayed, as they went
    assert wait_until(lambda: daemon.json("GET", "/api/inflight", headers=AUTH)[1]["requests"] == [], 5)

    rows = activity_rows(daemon)
    chats = [row for row in rows if row["req_path"] == "/v1/chat/completions"]
    assert [row["model"] for row in chats] == daemon.served, (chats, daemon.served)
    assert all(row["resp_status_code"] == 200 and row["tokens"]["input_tokens"] == 25 for row in chats)
    streamed = next(row for row in rows if str(row["id"]) == entry["id"])
    assert streamed["tokens"]["output_tokens"] == 10 and streamed["duration_ms"] >= 900


def activity_rows(d: Daemon) -> list[dict]:
    """Every row of /api/metrics/activity, oldest first."""
    status, activity = d.json("GET", "/api/metrics/activity?limit=100", headers=AUTH)
    assert status == 200 and activity["total"] == len(activity["data"]), activity
    return sorted(activity["data"], key=lambda row: row["id"])


def test_activity_rows_as_llama_swap_records_them(daemon):
    """llama-swap records a POST to a model-dispatched path only (the GET /upstream/<model>/info
    above is none), with the request's path, the response's content type and the selector."""
    assert served_by(daemon, "coding-model") == "gpt-oss-120b"
    rows = activity_rows(daemon)
    assert [row for row in rows if row["req_path"].startswith("/upstream")] == []
    assert {row["resp_content_type"] for row in rows} <= {"application/json; charset=utf-8", "text/event-stream"}
    assert rows[-1].get("metadata") == {"selector": "coding-model"}
