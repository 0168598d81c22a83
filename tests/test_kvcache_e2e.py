"""keepCache end to end with the real llama.cpp llama-server on the tiny chat models (issue 15).

Ask chat-a a conversation of about 2,000 tokens, swap to chat-b, come back to chat-a with the
conversation plus one new turn. With keepCache, chat-a's answer says the prompt came from the
restored cache (``timings.cache_n`` about 2,000, ``prompt_n`` small); without it, llama-server
evaluates the whole prompt again. Also checked: ``/running``, ``/api/models``, ``/metrics``, one log
line per save and restore, the files beside the state file, and their deletion when a reload
removes the model.

Skipped only when no llama-server binary can be found (like the other real-server tests).
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from llamaswap.demo.tinymodels import ensure_models
from tests.daemon import free_port_range, wait_until
from tests.real_llama import ANSWER_A, ANSWER_B, TaggedDaemons, requires_llama_server

pytestmark = requires_llama_server

LAUNCHER = f"{shlex.quote(sys.executable)} -m llamaswap.demo.llama_server"


@pytest.fixture(scope="module", autouse=True)
def tiny_models():
    return ensure_models()


@pytest.fixture
def daemons():
    """Daemons whose children are all gone (checked) at the end of the test."""
    tagged = TaggedDaemons()
    yield tagged
    tagged.close()


def start(daemons: TaggedDaemons, text: str, workdir: Path):
    workdir.mkdir()
    return daemons.start(text, workdir)


def config(keep_cache: bool, models: tuple[str, ...] = ("chat-a", "chat-b")) -> str:
    """chat-a (with --slot-save-path) and chat-b swap each other out (one model at a time)."""
    lines = [
        "healthCheckTimeout: 60",
        "unloadTimeout: 5",
        f"startPort: {free_port_range(4)}",
        f"keepCache: {'true' if keep_cache else 'false'}",
        "macros:",
        f"  server: {LAUNCHER}",
        "  listen: --host 127.0.0.1 --port ${PORT} --alias ${MODEL_ID}",
        "models:",
    ]
    if "chat-a" in models:
        lines += ["  chat-a:", "    cmd: ${server} --tiny chat-a ${listen} --slot-save-path ${CACHE_DIR}",
                  "    proxy: http://127.0.0.1:${PORT}"]
    if "chat-b" in models:
        lines += ["  chat-b:", "    cmd: ${server} --tiny chat-b ${listen}", "    proxy: http://127.0.0.1:${PORT}"]
    return "\n".join(lines) + "\n"


def conversation() -> list[dict]:
    """About 2,000 tokens: five user turns of ~400 tokens, each answered by chat-a."""
    messages: list[dict] = [{"role": "system", "content": "You are a tiny test model."}]
    for turn in range(5):
        words = " ".join(f"turn{turn}word{i}" for i in range(78))
        messages += [{"role": "user", "content": words}, {"role": "assistant", "content": ANSWER_A}]
    return messages[:-1]  # ends with the last user turn


def ask(daemon, model: str, messages: list[dict]) -> dict:
    status, body = daemon.json("POST", "/v1/chat/completions", {"model": model, "messages": messages}, timeout=120)
    assert status == 200, (body, daemon.output()[-3000:])
    return body


def swap_back(daemon) -> tuple[dict, dict]:
    """chat-a (the conversation), chat-b, chat-a again (conversation + answer + one new turn)."""
    messages = conversation()
    first = ask(daemon, "chat-a", messages)
    assert first["choices"][0]["message"]["content"] == ANSWER_A
    assert ask(daemon, "chat-b", [{"role": "user", "content": "hi"}])["choices"][0]["message"]["content"] == ANSWER_B
    messages += [{"role": "assistant", "content": ANSWER_A}, {"role": "user", "content": "And one more thing?"}]
    again = ask(daemon, "chat-a", messages)
    assert again["choices"][0]["message"]["content"] == ANSWER_A
    return first["timings"], again["timings"]


def metric(daemon, name: str, model: str) -> float:
    text = daemon.request("GET", "/metrics").text
    for line in text.splitlines():
        if line.startswith(f'{name}{{model="{model}"}} '):
            return float(line.split()[-1])
    raise AssertionError(f"{name} for {model} not in /metrics")


def test_swap_back_hits_the_restored_cache(daemons, tmp_path):
    """With keepCache, the swap-back prompt comes from the restored KV cache: cache_n is about the
    whole conversation and prompt_n is small."""
    daemon = start(daemons, config(keep_cache=True), tmp_path / "kv")
    cold, back = swap_back(daemon)
    context = cold["prompt_n"] + cold["cache_n"]
    assert 1800 <= context <= 2600, cold
    assert back["cache_n"] >= context - 5, (cold, back)
    assert back["prompt_n"] <= 0.05 * context, (cold, back)

    running = {m["model"]: m for m in daemon.running()}
    assert running["chat-a"]["kv_restored_tokens"] >= context - 5
    assert "kv_restored_tokens" not in {k for m in running.values() if m["model"] == "chat-b" for k in m}
    models = {m["id"]: m for m in daemon.json("GET", "/api/models")[1]}
    saved = models["chat-a"]["kv_saved_bytes"]
    assert saved and saved > 0
    assert metric(daemon, "llamaswap_kv_saved_bytes_total", "chat-a") == saved
    assert metric(daemon, "llamaswap_kv_restored_tokens_total", "chat-a") >= context - 5
    assert metric(daemon, "llamaswap_kv_save_duration_seconds_count", "chat-a") == 1
    assert metric(daemon, "llamaswap_kv_restore_duration_seconds_count", "chat-a") == 1
    output = daemon.output()
    assert output.count("chat-a: saved KV cache:") == 1, output[-3000:]
    assert output.count("chat-a: restored KV cache:") == 1, output[-3000:]
    assert ".bin" not in output

    directory = Path(daemon.state_file[:-len(".json")] + ".kvcache") / "chat-a"
    files = sorted(directory.glob("kv-*.bin"))
    assert files and sum(f.stat().st_size for f in files) == saved
    # a reload that removes chat-a deletes its files once it has stopped
    Path(daemon.config_path).write_text(config(keep_cache=True, models=("chat-b",)))
    status, body = daemon.json("POST", "/api/config/reload")
    assert status == 200 and body["removed"] == ["chat-a"], body
    wait_until(lambda: not directory.exists(), 20)
    assert "chat-a: removed from the config; deleted its" in daemon.output()


def test_without_keepcache_the_prompt_is_evaluated_again(daemons, tmp_path):
    """Without keepCache the swapped-back chat-a evaluates the whole conversation again."""
    daemon = start(daemons, config(keep_cache=False), tmp_path / "cold")
    cold, back = swap_back(daemon)
    context = cold["prompt_n"] + cold["cache_n"]
    assert back["cache_n"] == 0, back
    assert back["prompt_n"] >= context, (cold, back)
    assert "kv_restored_tokens" not in daemon.json("GET", "/api/models")[1][0]
    assert "KV cache" not in daemon.output()
