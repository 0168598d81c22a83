"""End to end with the real llama.cpp llama-server: memory.budget on the tiny models.

The daemon runs as users run it (tests/daemon.py, ``twistd -n llamaswap``) with three real
``llama-server`` children (chat-a, chat-b, embed) in no group, so that only the budget decides
which of them run together. No model declares ``memory``: needs are the estimate from the GGUF
header at first, then what the model was measured to use (its process group's RSS), which is
kept in a file beside the daemon's state file and so survives a restart.

The tiny models' numbers (measured here): the estimates are about 6 MiB for a chat model and
3 MiB for embed (weights plus KV cache, ``memory.overhead: 0``); once loaded, llama-server uses
about 31-33 MiB (chat) and 27-31 MiB (embed) of RSS. Since RSS depends on the build and the
machine, the eviction test first runs every model once to have them measured, then picks a
budget from those numbers that holds any two of the three but not all three.

Every process the daemons start carries a marker in its environment; after each test none may be
left (any that is gets killed and fails the test). Skipped only when no llama-server binary can
be found.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest

from llamaswap.demo.tinymodels import ensure_models, model_path
from llamaswap.footprint import needbook_path, try_estimate
from tests.daemon import Daemon, free_port_range, pid_alive, wait_until
from tests.real_llama import ANSWER_A, ANSWER_B, TaggedDaemons, requires_llama_server

pytestmark = requires_llama_server

LAUNCHER = f"{shlex.quote(sys.executable)} -m llamaswap.demo.llama_server"
MiB = 2**20
MODELS = {"chat-a": "", "chat-b": "", "embed": " --embeddings --pooling mean"}


@pytest.fixture(scope="module", autouse=True)
def tiny_models():
    """Generate the tiny models (or find them in the cache) before any daemon needs them."""
    return ensure_models()


def model_cmd(name: str) -> str:
    # ``-m <file>`` rather than the launcher's ``--tiny NAME``: the estimate reads the last ``-m``
    # of the command, and ``python -m llamaswap.demo.llama_server`` has one of its own.
    model = shlex.quote(str(model_path(name)))
    return f"{LAUNCHER} -m {model} --host 127.0.0.1 --port ${{PORT}} --alias {name}{MODELS[name]}"


def memory_config(start_port: int, budget: int | str) -> dict:
    """chat-a, chat-b and embed in no group, under ``memory.budget`` with no overhead and the
    reload-cost policy (with ``policy: lru`` the eviction test fails: chat-a goes instead)."""
    return {
        "healthCheckTimeout": 60, "unloadTimeout": 5, "startPort": start_port,
        "memory": {"budget": budget, "overhead": 0, "policy": "cost"},
        "models": {name: {"cmd": model_cmd(name), "proxy": "http://127.0.0.1:${PORT}"} for name in MODELS},
    }


@pytest.fixture
def start_daemon(tmp_path):
    """Start daemons in a named directory under tmp_path: the same name means the same state file
    (and need book), as a restart of the same installation. Afterwards stop them all and check
    that no process they started is left."""
    tagged = TaggedDaemons()

    def start(config: dict, name: str = "state") -> Daemon:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        return tagged.start(config, workdir)

    yield start
    tagged.close()


def use(daemon: Daemon, name: str) -> None:
    """One request that the model answers itself."""
    if name == "embed":
        status, body = daemon.json("POST", "/v1/embeddings", {"model": "embed", "input": ["hello world"]})
        assert status == 200, (body, daemon.output())
        assert len(body["data"][0]["embedding"]) == 64
        return
    status, body = daemon.chat(name)
    assert status == 200, (body, daemon.output())
    assert body["choices"][0]["message"]["content"] == {"chat-a": ANSWER_A, "chat-b": ANSWER_B}[name]


def running(daemon: Daemon) -> dict:
    """GET /running: the whole body (budget fields included); records the children's pids."""
    status, body = daemon.json("GET", "/running")
    assert status == 200, body
    daemon.record_children(body["running"])
    return body


def api_models(daemon: Daemon) -> dict[str, dict]:
    status, body = daemon.json("GET", "/api/models")
    assert status == 200, body
    return {m["id"]: m for m in body}


def wait_measured(daemon: Daemon, names, timeout: float = 30) -> dict[str, dict]:
    """Wait until /running shows every one of ``names`` with a measured need; their entries."""
    seen: dict[str, dict] = {}

    def measured() -> bool:
        entries = {m["model"]: m for m in running(daemon)["running"]}
        seen.clear()
        seen.update(entries)
        return all(entries.get(n, {}).get("memory_source") == "measured" for n in names)

    assert wait_until(measured, timeout=timeout, interval=0.2), f"not all of {names} measured: {seen}\n{daemon.output()}"
    return {n: seen[n] for n in names}


def stop(daemon: Daemon) -> None:
    pids = set(daemon.child_pids)
    rc = daemon.stop()
    assert rc == 0, daemon.output()
    assert not [p for p in pids if pid_alive(p)], "a model outlived the daemon"


def test_measured_need_survives_restart(start_daemon):
    """A model's need is its estimate until it has run; once it is up, the measured need replaces
    it, and after a restart (same state file) the model is shown with its measured need before
    it is started again."""
    port = free_port_range(len(MODELS))
    config = memory_config(port, "1GiB")
    daemon = start_daemon(config)

    before = api_models(daemon)
    for name in MODELS:
        assert before[name]["state"] == "stopped"
        assert before[name]["memory_source"] == "estimated", before[name]
    argv = shlex.split(model_cmd("chat-a").replace("${PORT}", str(port)))
    estimate = try_estimate(argv, overhead=0)
    assert estimate, estimate
    assert before["chat-a"]["memory"] == estimate.total          # weights + KV cache, about 6 MiB
    idle = running(daemon)
    assert (idle["memory_budget"], idle["memory_used"], idle["memory_free"]) == (2**30, 0, 2**30)

    use(daemon, "chat-a")
    entry = wait_measured(daemon, ["chat-a"])["chat-a"]
    measured = entry["memory"]
    # llama-server's own RSS (binary, libraries, buffers) is well above the tiny model's weights
    assert 8 * MiB < measured < 1024 * MiB, entry
    assert entry["load_time"] and entry["load_time"] > 0, entry
    body = running(daemon)
    assert body["memory_used"] == sum(m["memory"] for m in body["running"])
    assert body["memory_free"] == 2**30 - body["memory_used"]
    models = api_models(daemon)
    assert models["chat-a"]["memory_source"] == "measured"
    assert models["chat-b"]["memory_source"] == "estimated"      # never started

    stop(daemon)
    book = Path(needbook_path(daemon.state_file))
    assert book.is_file(), sorted(os.listdir(daemon.workdir))
    json.loads(book.read_text())

    again = start_daemon(config)                                   # same directory, same state file
    after = api_models(again)
    assert after["chat-a"]["state"] == "stopped"
    assert after["chat-a"]["memory_source"] == "measured", after["chat-a"]
    assert after["chat-a"]["memory"] >= measured
    assert after["chat-b"]["memory_source"] == "estimated"
    assert running(again)["running"] == []
    use(again, "chat-a")
    assert api_models(again)["chat-a"]["memory_source"] == "measured"


def test_third_model_evicts_the_cheaper_one(start_daemon):
    """With a budget that holds two of the three models: chat-a has been asked for often and embed
    once (most recently), so starting chat-b stops embed, the one that is cheaper to reload
    (load time × demand), not chat-a, the least recently used."""
    port = free_port_range(len(MODELS))

    # 1. Have every model measured (a generous budget: all three run together), then stop.
    first = start_daemon(memory_config(port, "1GiB"))
    for name in MODELS:
        use(first, name)
    needs = {name: m["memory"] for name, m in wait_measured(first, list(MODELS)).items()}
    assert sorted(m["model"] for m in running(first)["running"]) == sorted(MODELS)
    stop(first)

    # 2. A budget for any two but not all three: the total less half the smallest need. Half the
    # smallest need (about 14 MiB) is room for the needs to grow a little while the test runs.
    total, smallest = sum(needs.values()), min(needs.values())
    budget = total - smallest // 2
    pairs = [total - n for n in needs.values()]
    assert max(pairs) <= budget < total, (needs, budget)

    daemon = start_daemon(memory_config(port, budget))
    models = api_models(daemon)
    assert {n: models[n]["memory_source"] for n in MODELS} == dict.fromkeys(MODELS, "measured"), models

    for _ in range(10):
        use(daemon, "chat-a")
    use(daemon, "embed")                      # the most recently used model
    body = running(daemon)
    resident = {m["model"]: m for m in body["running"]}
    assert sorted(resident) == ["chat-a", "embed"], body
    assert body["memory_used"] <= budget

    use(daemon, "chat-b")                     # does not fit beside both: one of them goes
    body = running(daemon)
    after = {m["model"]: m for m in body["running"]}
    assert sorted(after) == ["chat-a", "chat-b"], (body, daemon.output())
    assert after["chat-a"]["pid"] == resident["chat-a"]["pid"], "chat-a must not have been restarted"
    assert not pid_alive(resident["embed"]["pid"])
    assert body["memory_used"] <= body["memory_budget"] == budget
    logs = daemon.request("GET", "/logs").text
    assert "evicting 'embed'" in logs and "to fit 'chat-b'" in logs, logs[-3000:]
    assert "evicting 'chat-a'" not in logs
