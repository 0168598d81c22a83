"""Operating it for real (issue 8) against real daemons and fake upstreams:

* preload at startup (CFG-30, CLI-7): listed models are ready in /running without a request;
  unknown names are a WARN, failures an ERROR, and the daemon keeps serving;
* apiKeys (SEC-*) through the official ``openai`` SDK, the key coming from ``${env.X}``;
* sendLoadingState (RT-12) as the SDK sees it;
* peers (RT-13): two llamaswap daemons on loopback, one forwarding to the other
  (plain, streamed, model list, apiKey injection), then the peer down -> 502 JSON.
"""
from __future__ import annotations

import json
import re
import shlex
import sys

import openai
import pytest

from tests.daemon import Daemon, fake_cmd, free_port_range, http_request, open_stream, wait_until

KEY = "sk-e2e-secret"


# -- preload ----------------------------------------------------------------------------------------

def test_preload_at_startup(tmp_path):
    """CFG-30: 'fast' (by alias) and 'slow' load at boot, in parallel (non-exclusive group);
    'nope' is unknown (WARN, skipped); 'bad' fails (ERROR); nothing stops the daemon."""
    exit3 = " ".join(shlex.quote(a) for a in (sys.executable, "-c", "import sys; sys.exit(3)"))
    cfg = {
        "healthCheckTimeout": 15, "startPort": free_port_range(4), "unloadTimeout": 2,
        "models": {
            "fast": {"cmd": fake_cmd("fast"), "aliases": ["quick"]},
            "slow": {"cmd": fake_cmd("slow", "--load-delay", "0.5")},
            "bad": {"cmd": exit3, "proxy": "http://127.0.0.1:9"},
            "idle": {"cmd": fake_cmd("idle")},
        },
        "groups": {"g": {"swap": False, "exclusive": False, "members": ["fast", "slow", "bad", "idle"]}},
        "hooks": {"on_startup": {"preload": ["quick", "nope", "bad", "slow"]}},
    }
    d = Daemon(cfg, tmp_path)
    d.start()
    try:
        running = wait_until(lambda: sorted(m["model"] for m in d.running() if m["state"] == "ready")
                             == ["fast", "slow"], 15)
        assert running, d.output()
        states = {m["model"]: m["state"] for m in d.running()}
        assert "idle" not in states and "bad" not in states
        out = d.stdout.wait_for(re.compile(rb"preload of 'bad' failed: failed to start model 'bad': "
                                           rb"exited with code 3"), 10)
        assert out, d.output()
        text = d.stdout.text()
        assert re.search(r"\[WARN\].*preload: unknown model 'nope'", text) or "unknown model 'nope'" in text, text
        assert "not implemented yet" not in text
        # the listener came first (CLI-7)
        assert text.index("listening on tcp:127.0.0.1:") < text.index("preloading fast")
        pid = {m["model"]: m["pid"] for m in d.running()}["fast"]
        status, body = d.chat("quick")
        assert status == 200, body
        assert {m["model"]: m["pid"] for m in d.running()}["fast"] == pid  # served by the preloaded child
    finally:
        d.stop_clean()


# -- apiKeys with the openai SDK --------------------------------------------------------------------

@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    cfg = (
        "healthCheckTimeout: 15\n"
        f"startPort: {free_port_range(4)}\n"
        "unloadTimeout: 2\n"
        "apiKeys: [\"${env.LLAMASWAP_E2E_KEY}\", other-key]\n"
        "models:\n"
        f"  gpt-fake:\n    cmd: {json.dumps(fake_cmd('gpt-fake', '--chunks', '3', respond='secured answer'))}\n"
        f"  loader:\n    cmd: {json.dumps(fake_cmd('loader', '--chunks', '2', '--load-delay', '1.3', respond='ab'))}\n"
        "    sendLoadingState: true\n"
    )
    d = Daemon(cfg, tmp_path_factory.mktemp("secured"), env={"LLAMASWAP_E2E_KEY": KEY})
    d.start()
    yield d
    d.stop_clean()


def sdk(daemon: Daemon, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key=key, max_retries=0, timeout=30)


def test_sdk_with_the_right_key(secured):
    """SEC-2 (Bearer, as the SDK sends it): plain and streamed completions and the model list work."""
    with sdk(secured, KEY) as client:
        completion = client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
        assert completion.choices[0].message.content == "secured answer"
        pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
            model="gpt-fake", messages=[{"role": "user", "content": "hi"}], stream=True)
            if c.choices and c.choices[0].delta.content]
        assert "".join(pieces) == "secured answer"
        assert sorted(m.id for m in client.models.list()) == ["gpt-fake", "loader"]
    with sdk(secured, "other-key") as client:
        assert [m.id for m in client.models.list()]


def test_sdk_with_a_wrong_key(secured):
    """SEC-2/ERR-2: a wrong key is openai.AuthenticationError with code invalid_api_key."""
    with sdk(secured, "sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError) as info:
            client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
        assert info.value.code == "invalid_api_key"
        assert info.value.response.headers["www-authenticate"] == 'Basic realm="llamaswap"'
        assert KEY not in info.value.response.text


def test_open_and_protected_over_http(secured):
    """SEC-4: /health open, /running and /logs protected; Basic and x-api-key work too."""
    assert http_request(secured.port, "GET", "/health").status == 200
    assert http_request(secured.port, "OPTIONS", "/running").status == 204
    for path in ("/running", "/logs", "/metrics", "/api/events", "/ui/"):
        r = http_request(secured.port, "GET", path, timeout=10)
        assert r.status == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r)
    import base64
    basic = "Basic " + base64.b64encode(f"me:{KEY}".encode()).decode()
    assert http_request(secured.port, "GET", "/running", headers={"Authorization": basic}).status == 200
    assert http_request(secured.port, "GET", "/running", headers={"x-api-key": "other-key"}).status == 200
    assert KEY not in secured.stdout.text()


def test_loading_state_through_the_sdk(secured):
    """RT-12: while 'loader' starts, the SDK receives reasoning_content progress, then the answer."""
    http_request(secured.port, "POST", "/api/models/unload", headers={"x-api-key": KEY})
    with sdk(secured, KEY) as client:
        reasoning, content = [], []
        for chunk in client.chat.completions.create(
                model="loader", messages=[{"role": "user", "content": "hi"}], stream=True):
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is None:
                continue
            extra = getattr(delta, "model_extra", None) or {}
            if extra.get("reasoning_content"):
                reasoning.append(extra["reasoning_content"])
            if delta.content:
                content.append(delta.content)
    text = "".join(reasoning)
    assert text.startswith("loading model loader\u2026\n"), text
    assert "." in text and re.search(r"\nmodel ready \(\d+\.\d\ds\)\n\n$", text), text
    assert "".join(content) == "ab"


# -- peers: two daemons -----------------------------------------------------------------------------

def test_two_daemons_one_forwards_to_the_other(tmp_path):
    """RT-13 end to end: A lists and forwards B's model (plain and streamed, B's apiKey injected);
    with B down, A answers 502 peer_unreachable as JSON."""
    b_cfg = {
        "healthCheckTimeout": 15, "startPort": free_port_range(2), "unloadTimeout": 2,
        "apiKeys": ["b-key"],
        "models": {"remote-model": {"cmd": fake_cmd("remote-model", "--chunks", "4", respond="from B")}},
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    b = Daemon(b_cfg, tmp_path / "b")
    b.start()
    a = None
    try:
        a_cfg = {
            "healthCheckTimeout": 15, "startPort": free_port_range(2), "unloadTimeout": 2,
            "models": {"local": {"cmd": fake_cmd("local", respond="from A")}},
            "peers": {"b": {"proxy": f"http://127.0.0.1:{b.port}", "apiKey": "b-key",
                            "models": ["remote-model"],
                            "filters": {"setParams": {"temperature": 0.25}}}},
        }
        a = Daemon(a_cfg, tmp_path / "a")
        a.start()
        status, models = a.json("GET", "/v1/models")
        assert status == 200
        assert [m["id"] for m in models["data"]] == ["b/remote-model", "local"], models  # sorted by id
        assert models["data"][0]["meta"] == {"llamaswap": {"type": "peer", "peerID": "b"}}

        for name in ("b/remote-model", "remote-model"):
            status, body = a.chat(name)
            assert status == 200, (body, a.output(), b.output())
            assert body["responseMessage"] == "from B"
            sent = body["request_body"]
            sent = json.loads(sent) if isinstance(sent, str) else sent
            assert sent["model"] == "remote-model" and sent["temperature"] == 0.25, sent
        assert a.running_ids() == []          # A started nothing for a peer model

        with sdk(a, "unused") as client:
            pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
                model="b/remote-model", messages=[{"role": "user", "content": "hi"}], stream=True)
                if c.choices and c.choices[0].delta.content]
        assert "".join(pieces) == "from B" and len(pieces) == 4
        conn, resp = open_stream(a.port, "POST", "/v1/chat/completions",
                                 {"model": "b/remote-model", "stream": True, "messages": []})
        try:
            assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
            raw = resp.read()
        finally:
            conn.close()
        assert raw.rstrip().endswith(b"data: [DONE]"), raw

        b.stop_clean()
        r = a.request("POST", "/v1/chat/completions", {"model": "b/remote-model", "messages": []})
        assert r.status == 502, r
        assert r.headers["Content-Type"] == "application/json"
        assert r.json()["error"]["code"] == "peer_unreachable"
        assert a.chat("local")[0] == 200  # A itself is fine
    finally:
        try:
            if a is not None:
                a.stop_clean()
        finally:
            b.kill()
