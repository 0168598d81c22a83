"""Config reload against the real daemon (RLD-1..RLD-5, EP-13, CLI-4, CLI-8)."""
from __future__ import annotations

import json
import os
import signal
import threading

from tests.daemon import fake_config as config, fake_model as model, pid_alive, wait_until, write_config


def rewrite(d, cfg) -> None:
    write_config(d.workdir, cfg)


def pid_of(d, model_id):
    for entry in d.running():
        if entry["model"] == model_id:
            return entry["pid"]
    return None


def test_reload_endpoint_keeps_unchanged_restarts_changed(start_daemon):
    """POST /api/config/reload: an unchanged model keeps its pid, a changed one restarts."""
    cfg = config({"a": model("a"), "b": model("b")}, groups={
        "all": {"swap": False, "members": ["a", "b"]}})
    d = start_daemon(cfg)
    assert d.chat("a")[0] == 200 and d.chat("b")[0] == 200
    d.record_children()
    pid_a, pid_b = pid_of(d, "a"), pid_of(d, "b")
    cfg["models"]["b"] = model("b", respond="new b")
    rewrite(d, cfg)
    status, body = d.json("POST", "/api/config/reload")
    assert status == 200, body
    assert body == {"msg": "ok", "added": [], "removed": [], "changed": ["b"], "unchanged": ["a"]}
    assert pid_of(d, "a") == pid_a
    assert wait_until(lambda: pid_of(d, "b") not in (None, pid_b) and
                      {e["model"]: e["state"] for e in d.running()}.get("b") == "ready", 20)
    d.record_children()
    status, body = d.chat("b")
    assert status == 200 and body["responseMessage"] == "new b"
    assert not pid_alive(pid_b)


def test_reload_invalid_config_keeps_old(start_daemon):
    """RLD-2: an invalid file is rejected with every error; the old config keeps serving."""
    cfg = config({"a": model("a")})
    d = start_daemon(cfg)
    bad = dict(cfg, models={"a": dict(model("a"), ttl="soon"), "b": dict(model("b"), aliases=3)})
    rewrite(d, bad)
    status, body = d.json("POST", "/api/config/reload")
    assert status == 400
    assert body["error"]["code"] == "invalid_config"
    assert "models.a.ttl: must be a non-negative integer" in body["error"]["message"]
    assert "models.b.aliases: must be a list of strings" in body["error"]["message"]
    assert d.chat("a")[0] == 200
    d.record_children()
    assert "config reload failed, keeping previous config" in d.request("GET", "/logs").text


def test_sighup_adds_and_removes_models(start_daemon):
    """CLI-8: SIGHUP reloads; a removed model stops and 404s, an added one serves."""
    cfg = config({"a": model("a"), "b": model("b")})
    d = start_daemon(cfg)
    assert d.chat("a")[0] == 200
    d.record_children()
    pid_a = pid_of(d, "a")
    cfg["models"] = {"b": cfg["models"]["b"], "c": model("c")}
    rewrite(d, cfg)
    os.kill(d.proc.pid, signal.SIGHUP)
    assert wait_until(lambda: d.chat("c")[0] == 200, 20)
    d.record_children()
    assert wait_until(lambda: not pid_alive(pid_a), 10)
    status, body = d.chat("a")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert d.request("GET", "/logs/stream/a").status == 404


def test_reload_never_interrupts_inflight_stream(start_daemon):
    """RLD-3: a changed model finishes its in-flight stream before it is restarted."""
    cfg = config({"a": model("a")})
    d = start_daemon(cfg)
    assert d.chat("a")[0] == 200
    d.record_children()
    result = {}

    def stream():
        result["r"] = d.request("POST", "/v1/chat/completions?wait=0.2",
                                {"model": "a", "stream": True, "messages": []})

    t = threading.Thread(target=stream)
    t.start()
    cfg["models"]["a"] = model("a", respond="second")
    rewrite(d, cfg)
    assert wait_until(lambda: d.running() and d.running()[0]["inflight"] == 1, 5)
    status, body = d.json("POST", "/api/config/reload")
    assert status == 200 and body["changed"] == ["a"]
    t.join(30)
    r = result["r"]
    assert r.status == 200
    assert r.body.rstrip().endswith(b"data: [DONE]")
    assert wait_until(lambda: d.chat("a")[1].get("responseMessage") == "second", 20)
    d.record_children()


def test_watch_config_reloads_on_change(start_daemon):
    """CLI-4: --watch-config sees a replaced file (editor-style rename) and reloads."""
    cfg = config({"a": model("a")})
    d = start_daemon(cfg, extra_args=["--watch-config"])
    cfg["models"]["z"] = model("z")
    tmp = os.path.join(d.workdir, "config.yaml.new")
    with open(tmp, "w") as f:
        json.dump(cfg, f)
    os.replace(tmp, d.config_path)
    assert wait_until(lambda: d.chat("z")[0] == 200, 20)
    d.record_children()
