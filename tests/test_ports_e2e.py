"""End to end: a foreign process never answers for a model.

Two real daemons share a ``startPort``. The second one's ``${PORT}`` allocation skips the
ports the first one's children hold, so its model answers with its own voice; its model on
a fixed port that the first daemon's child holds fails with a 502 naming the port and the
holder, and the first daemon's child is never asked. A port taken after the config was
loaded fails the same way.
"""
from __future__ import annotations

from typing import Any

from tests.daemon import FakeServer, fake_cmd, free_port_range

HEALTH_TIMEOUT = 15


def model(model_id: str, port: str = "${PORT}", **keys: Any) -> dict[str, Any]:
    """A fake upstream answering ``from <id>``; a fixed ``port`` also sets the proxy."""
    entry = {"cmd": fake_cmd(model_id, respond=f"from {model_id}", port=port), **keys}
    if port != "${PORT}":
        entry["proxy"] = f"http://127.0.0.1:{port}"
    return entry


def config(start_port: int, models: dict[str, Any]) -> dict[str, Any]:
    return {"healthCheckTimeout": HEALTH_TIMEOUT, "startPort": start_port, "unloadTimeout": 2,
            "groups": {"all": {"swap": False, "members": list(models)}}, "models": models}


def start_failure(d, model_id: str) -> str:
    status, body = d.chat(model_id)
    assert status == 502, (status, body)
    assert body["error"]["code"] == "upstream_start_failed", body
    return body["error"]["message"]


def test_second_daemon_never_gets_the_first_daemons_answer(start_daemon):
    base = free_port_range(6)
    first = start_daemon(config(base, {"a": model("a"), "f": model("f", port=str(base + 1))}))
    for model_id in ("a", "f"):
        status, body = first.chat(model_id)
        assert (status, body["responseMessage"]) == (200, f"from {model_id}"), body
    pid_a = {m["model"]: m["pid"] for m in first.running()}["a"]

    # Same startPort: base and base+1 are held by the first daemon's children, so c gets base+2.
    second = start_daemon(config(base, {"c": model("c"), "x": model("x", port=str(base))}))
    status, body = second.chat("c")
    assert (status, body["responseMessage"]) == (200, "from c"), body
    [entry] = second.running()
    assert entry["proxy"] == f"http://localhost:{base + 2}"

    # x's fixed port is held by the first daemon's a: a 502 naming port and holder, at once.
    message = start_failure(second, "x")
    assert message.startswith(f"failed to start model 'x': port {base} is already in use by pid {pid_a} ("), message
    assert "fake_llama_server.py" in message
    assert "from a" not in message
    assert [m["model"] for m in second.running()] == ["c"]

    # The first daemon's a was never disturbed.
    status, body = first.chat("a")
    assert (status, body["responseMessage"]) == (200, "from a"), body
    assert {m["model"]: m["pid"] for m in first.running()}["a"] == pid_a


def test_port_taken_after_allocation(start_daemon):
    base = free_port_range(3)
    d = start_daemon(config(base, {"late": model("late")}))   # late gets base: free at load time
    intruder = FakeServer("--model", "intruder", "--respond", "from intruder", port=base)
    try:
        intruder.wait_listening()
        message = start_failure(d, "late")
        assert message.startswith(
            f"failed to start model 'late': port {base} is already in use by pid {intruder.proc.pid} ("), message
        assert d.running() == []
    finally:
        intruder.close()
    status, body = d.chat("late")       # the port is free again: the model starts normally
    assert (status, body["responseMessage"]) == (200, "from late"), body
