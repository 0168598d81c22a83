"""End to end under ``memory.budget``: the real daemon in front of fake upstreams (docs/memory.rst).

Declared needs pack two models within the budget (``/running`` shows the arithmetic), a model
whose estimated need (its ``--model`` file: a sparse GGUF of known size, which the fake upstream
takes for a name) exceeds the budget is refused at once with 503 ``insufficient_memory``, a third
model evicts the least recently used idle one, and /metrics and the needs file beside the state
file follow.
"""
from __future__ import annotations

import json
import os
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import fake_cmd, free_port_range, pid_alive
from tests.test_router_memory import GiB, MiB, write_sparse_gguf


def model(model_id: str, **keys: Any) -> dict[str, Any]:
    return {"cmd": fake_cmd(model_id, respond=f"from {model_id}"), **keys}


def metrics(d: Any) -> dict:
    r = d.request("GET", "/metrics")
    assert r.status == 200, r
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_budget_packing_refusal_eviction_and_metrics(start_daemon, tmp_path):
    big_file = str(tmp_path / "big.gguf")
    write_sparse_gguf(big_file, 5 * GiB)
    cfg = {
        "healthCheckTimeout": 15, "startPort": free_port_range(6), "unloadTimeout": 2,
        "memory": {"budget": "3GiB", "overhead": "256MiB", "policy": "lru"},
        "models": {
            "a": model("a", memory="1GiB"),
            "b": model("b", memory="1GiB"),
            "c": model("c", memory="1536MiB"),
            # the fake upstream takes --model for a name; the estimate reads it as the model file
            "big": {"cmd": fake_cmd(big_file, respond="from big")},
        },
    }
    d = start_daemon(cfg)

    status, body = d.json("GET", "/running")
    assert (status, body) == (200, {"running": [], "memory_budget": 3 * GiB, "memory_used": 0,
                                    "memory_free": 3 * GiB}), body

    # two declared 1 GiB models run together
    assert d.chat("a")[0] == 200
    assert d.chat("b")[0] == 200
    status, body = d.json("GET", "/running")
    assert [m["model"] for m in body["running"]] == ["a", "b"], body
    assert (body["memory_budget"], body["memory_used"], body["memory_free"]) == (3 * GiB, 2 * GiB, GiB)
    for entry in body["running"]:
        assert (entry["memory"], entry["memory_source"]) == (GiB, "declared"), entry
        assert isinstance(entry["load_time"], float) and 0 < entry["load_time"] < 15, entry
    pids = {m["model"]: m["pid"] for m in body["running"]}

    # the estimate (5 GiB file + 256 MiB overhead) is above the budget: refused at once, nothing stopped
    status, body = d.chat("big")
    assert status == 503, body
    assert body["error"]["code"] == "insufficient_memory", body
    assert body["error"]["message"].startswith("model 'big' needs 5.3 GiB (estimated) but memory.budget is 3.0 GiB"), body
    assert d.running_ids() == ["a", "b"]

    # a used again: b is the least recently used, and goes when c (1.5 GiB) does not fit
    assert d.chat("a")[0] == 200
    status, body = d.chat("c")
    assert status == 200 and body["responseMessage"] == "from c", body
    status, body = d.json("GET", "/running")
    assert [m["model"] for m in body["running"]] == ["a", "c"], body
    assert (body["memory_used"], body["memory_free"]) == (GiB + 1536 * MiB, 512 * MiB)
    assert pid_alive(pids["a"]) and not pid_alive(pids["b"])
    logs = d.request("GET", "/logs").text
    assert "evicting 'b' (idle " in logs and "to fit 'c' (needs 1.5 GiB, declared)" in logs, logs[-3000:]

    status, models = d.json("GET", "/api/models")
    by_id = {m["id"]: m for m in models}
    assert (by_id["big"]["memory_source"], by_id["c"]["memory"]) == ("estimated", 1536 * MiB), by_id
    assert by_id["big"]["load_time"] is None and by_id["a"]["load_time"] > 0

    m = metrics(d)
    assert m[("llamaswap_memory_budget_bytes", frozenset())] == 3 * GiB
    assert m[("llamaswap_memory_used_bytes", frozenset())] == GiB + 1536 * MiB
    assert m[("llamaswap_model_memory_bytes", frozenset({("model", "c"), ("source", "declared")}))] == 1536 * MiB
    assert m[("llamaswap_model_memory_bytes", frozenset({("model", "big"), ("source", "estimated")}))] > 5 * GiB
    assert m[("llamaswap_evictions_total", frozenset({("model", "b"), ("reason", "memory")}))] == 1
    assert m[("llamaswap_evictions_total", frozenset({("model", "a"), ("reason", "memory")}))] == 0
    assert m[("llamaswap_model_stops_total", frozenset({("model", "b"), ("reason", "swap")}))] == 1

    # ready models were measured into the needs file beside the state file
    with open(os.path.join(d.workdir, "children.needs.json")) as f:
        needs = json.load(f)["needs"]
    assert any("--model a" in cmd for cmd in needs) and all(v > 0 for v in needs.values()), needs
