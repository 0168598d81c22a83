"""End to end with the real llama.cpp llama-server (issue 4): the daemon as users run it, on examples/demo.yaml.

Each test starts ``twistd -n llamaswap`` (tests/daemon.py) on the bundled demo config, with the
launcher run as ``<this python> -m llamaswap.demo.llama_server`` (the demo names the installed console
script) and ports from a free range. Children are real llama-server processes on the tiny models.
Every process the daemon starts carries a marker in its environment; after each test none may be
left (any that is gets killed and fails the test).

Skipped only when no llama-server binary can be found.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import sys
import time
from pathlib import Path

import pytest

from llamaswap.demo.tinymodels import ensure_models
from tests.daemon import Daemon, free_port_range, open_stream, pid_alive, wait_until
from tests.real_llama import (
    ANSWER_A,
    ANSWER_B,
    MARKER_VAR,
    TaggedDaemons,
    requires_llama_server,
    tagged_processes,
)

pytestmark = requires_llama_server

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.yaml"
LAUNCHER = f"{shlex.quote(sys.executable)} -m llamaswap.demo.llama_server"
CHAT_MODELS = ("chat-a", "chat-b")


def demo_config(start_port: int, unload_timeout: int | None = None) -> str:
    """examples/demo.yaml as text, run through this interpreter and on ``start_port``."""
    text = DEMO.read_text()
    replacements = [(r"(?m)^  server: llamaswap-llama-server$", f"  server: {LAUNCHER}"),
                    (r"(?m)^startPort: 5800$", f"startPort: {start_port}")]
    if unload_timeout is not None:
        replacements.append((r"(?m)^unloadTimeout: \d+$", f"unloadTimeout: {unload_timeout}"))
    for pattern, value in replacements:
        text, n = re.subn(pattern, value, text)
        assert n == 1, f"demo.yaml no longer has {pattern!r}"
    return text


@pytest.fixture(scope="module", autouse=True)
def tiny_models():
    """Generate the tiny models (or find them in the cache) before any daemon needs them."""
    return ensure_models()


@pytest.fixture
def start_daemon(tmp_path):
    """Start daemons; afterwards stop them and check that no process they started is left."""
    tagged = TaggedDaemons()

    def start(config: str | dict | None = None, **kw) -> Daemon:
        workdir = tmp_path / f"daemon{len(tagged.daemons)}"
        workdir.mkdir()
        return tagged.start(config if config is not None else demo_config(free_port_range(4), **kw), workdir)

    yield start
    tagged.close()


def chat_body(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def read_sse(resp, timeout: float = 120) -> list[tuple[float, str]]:
    """Read an SSE body line by line as it arrives; return (arrival time, line) for every non-empty line."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = resp.readline()
        if not line:
            break
        line = line.rstrip(b"\r\n")
        if line:
            lines.append((time.monotonic(), line.decode("utf-8")))
    return lines


def data_events(lines: list[tuple[float, str]]) -> list[tuple[float, str]]:
    return [(t, line[len("data: "):]) for t, line in lines if line.startswith("data: ")]


def running_chat_models(daemon: Daemon) -> list[str]:
    return [m["model"] for m in daemon.running() if m["model"] in CHAT_MODELS]


def test_swap_chat_a_b_a(start_daemon):
    """chat-a, chat-b, chat-a: each answer comes from the right model, and one chat model runs at a time."""
    daemon = start_daemon()
    pids = []
    for model, answer in (("chat-a", ANSWER_A), ("chat-b", ANSWER_B), ("chat-a", ANSWER_A)):
        status, body = daemon.chat(model)
        assert status == 200, (model, body, daemon.output())
        assert body["choices"][0]["message"]["content"] == answer
        assert body["model"] == model                     # --alias ${MODEL_ID} in the demo
        running = {m["model"]: m for m in daemon.running()}
        assert [m for m in running if m in CHAT_MODELS] == [model]
        assert running[model]["state"] == "ready"
        pids.append(running[model]["pid"])
    assert len(set(pids)) == 3, "each swap starts a fresh llama-server"
    assert not pid_alive(pids[0]) and not pid_alive(pids[1])
    # an alias reaches the same model without a swap
    status, body = daemon.chat("gpt-4o-mini")
    assert (status, body["choices"][0]["message"]["content"]) == (200, ANSWER_A)
    assert running_chat_models(daemon) == ["chat-a"]
    # the children's output is in the logs
    logs = daemon.request("GET", "/logs").text
    assert "llama_server: listening on http://127.0.0.1:" in logs


def stream_once(daemon: Daemon, max_tokens: int) -> tuple[list[tuple[float, dict]], dict]:
    """One long stream (ignore_eos): (arrival time, chunk) of every token event, and the last JSON chunk."""
    conn, resp = open_stream(daemon.port, "POST", "/v1/chat/completions",
                             chat_body("chat-a", stream=True, ignore_eos=True, max_tokens=max_tokens), timeout=120)
    try:
        assert resp.status == 200
        assert resp.getheader("Content-Type", "").startswith("text/event-stream")
        events = data_events(read_sse(resp))
    finally:
        conn.close()
    assert events[-1][1] == "[DONE]"
    chunks = [(t, json.loads(e)) for t, e in events[:-1]]
    content = [(t, c) for t, c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    return content, chunks[-1][1]


def test_streaming_tokens_arrive_spread_out(start_daemon):
    """A stream arrives one token at a time, spread over the generation; final timings and [DONE] unchanged."""
    daemon = start_daemon()
    tokens = 400     # ~0.2 s on an idle machine; a loaded one can be 100 times slower
    spreads = []
    for _attempt in range(3):
        content, last = stream_once(daemon, tokens)
        assert last["choices"][0]["finish_reason"] == "length"
        timings = last["timings"]
        assert timings["predicted_n"] == tokens
        assert len(content) == tokens, "one SSE event per token"
        text = "".join(c["choices"][0]["delta"]["content"] for _, c in content)
        assert text.startswith(ANSWER_A + ANSWER_A)
        # Not one burst: the token events arrive over a good part of the time llama-server spent
        # generating, in several separate reads. llama-server itself sometimes sends a whole short
        # generation at once when its HTTP thread gets no CPU (2 cores, 2 busy generation threads),
        # so a burst is retried; a proxy that buffers fails every attempt.
        span = content[-1][0] - content[0][0]
        generation = timings["predicted_ms"] / 1000
        reads = len({round(t, 3) for t, _ in content})
        spreads.append(f"{span:.3f}s of {generation:.3f}s in {reads} reads")
        if span >= 0.3 * generation and reads >= 3:
            break
    else:
        pytest.fail("token events arrived in one burst every time: " + "; ".join(spreads))


def test_stream_include_usage(start_daemon):
    """stream_options.include_usage: a final usage+timings event after the finish event, then [DONE]."""
    daemon = start_daemon()
    conn, resp = open_stream(daemon.port, "POST", "/v1/chat/completions",
                             chat_body("chat-b", stream=True, stream_options={"include_usage": True}))
    try:
        assert resp.status == 200
        events = [e for _, e in data_events(read_sse(resp))]
    finally:
        conn.close()
    assert events[-1] == "[DONE]"
    usage_event, finish_event = json.loads(events[-2]), json.loads(events[-3])
    assert finish_event["choices"][0]["finish_reason"] == "stop"
    assert usage_event["choices"] == []
    assert usage_event["usage"]["completion_tokens"] == 10
    assert usage_event["timings"]["predicted_n"] == 10
    text = "".join((json.loads(e)["choices"] or [{}])[0].get("delta", {}).get("content") or "" for e in events[:-1])
    assert text == ANSWER_B


def test_embeddings_and_rerank_beside_chat(start_daemon):
    """Embeddings and rerank run beside a chat model (persistent group) and survive a chat swap."""
    daemon = start_daemon()
    assert daemon.chat("chat-a")[0] == 200
    status, body = daemon.json("POST", "/v1/embeddings", {"model": "embed", "input": ["hello world", "goodbye"]})
    assert status == 200, body
    assert [len(d["embedding"]) for d in body["data"]] == [64, 64]
    status, body = daemon.json("POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"})
    assert (status, len(body["data"])) == (200, 1)
    status, body = daemon.json("POST", "/v1/rerank", {"model": "rerank", "query": "What is a panda?",
                                                      "documents": ["hi", "The giant panda is a bear", "it is"]})
    assert status == 200, body
    assert sorted(r["index"] for r in body["results"]) == [0, 1, 2]
    before = {m["model"]: m for m in daemon.running()}
    assert sorted(before) == ["chat-a", "embed", "rerank"]
    assert {m["state"] for m in before.values()} == {"ready"}

    assert daemon.chat("chat-b")[0] == 200
    after = {m["model"]: m for m in daemon.running()}
    assert sorted(after) == ["chat-b", "embed", "rerank"]
    assert after["embed"]["pid"] == before["embed"]["pid"], "the swap must not restart the persistent group"
    assert after["rerank"]["pid"] == before["rerank"]["pid"]
    status, body = daemon.json("POST", "/v1/rerank", {"model": "rerank", "query": "q", "documents": ["a", "b"]})
    assert status == 200, body


def test_upstream_health_and_props(start_daemon):
    """/upstream/chat-a/health and /upstream/chat-a/props reach llama-server itself."""
    daemon = start_daemon()
    r = daemon.request("GET", "/upstream/chat-a/health")
    assert (r.status, r.json()) == (200, {"status": "ok"})
    r = daemon.request("GET", "/upstream/chat-a/props")
    assert r.status == 200, r
    props = r.json()
    assert props["model_alias"] == "chat-a"
    assert props["model_path"].endswith("tiny-chat-a.gguf")
    assert running_chat_models(daemon) == ["chat-a"]


def start_long_stream(daemon: Daemon, model: str = "chat-a"):
    """Start a long stream (about 4000 tokens, ~2 s) and read until its first token arrived."""
    conn, resp = open_stream(daemon.port, "POST", "/v1/chat/completions",
                             chat_body(model, stream=True, ignore_eos=True, max_tokens=4000))
    assert resp.status == 200
    first = b""
    while b'"content":"' not in first:
        first = resp.readline()
        assert first, "stream ended before its first token"
    return conn, resp


def test_unload_while_streaming_kills_after_grace(start_daemon):
    """Unloading a model mid-stream SIGKILLs llama-server after the grace period and leaves no process."""
    daemon = start_daemon(unload_timeout=1)
    marker = {MARKER_VAR: daemon.env[MARKER_VAR]}
    times = []
    # After SIGTERM mid-stream llama-server usually lingers ~30 s, but now and then it exits at once
    # (measured directly, without llamaswap); retry until the SIGKILL path is really taken.
    for _attempt in range(5):
        conn, resp = start_long_stream(daemon)
        try:
            (model,) = daemon.running()
            t0 = time.monotonic()
            r = daemon.request("POST", "/api/models/unload/chat-a", timeout=20)
            elapsed = time.monotonic() - t0
            assert r.status == 200, r
            assert elapsed < 8, f"unload took {elapsed:.2f}s with a 1 s grace period"
            assert not pid_alive(model["pid"])
            assert daemon.running() == []
            assert not tagged_processes(marker, exclude={daemon.proc.pid})
            rest = b"".join(line.encode() + b"\n" for _, line in read_sse(resp, timeout=10))
        finally:
            conn.close()
        assert b"data: [DONE]" not in rest, "a cut stream must not look complete"
        times.append(f"{elapsed:.2f}s")
        if elapsed >= 0.9:       # it lingered and was killed at the end of the grace period
            break
    else:
        pytest.skip("llama-server exited at once on SIGTERM every time (" + ", ".join(times) + "): "
                    "the SIGKILL path was not exercised")
    # the model starts again on the next request
    assert daemon.chat("chat-a")[0] == 200


def test_shutdown_while_streaming(start_daemon):
    """SIGTERM to the daemon mid-stream: it exits 0 within grace + 5 s, and no llama-server is left."""
    daemon = start_daemon(unload_timeout=1)
    conn, resp = start_long_stream(daemon)
    try:
        (model,) = daemon.running()
        t0 = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        rc = daemon.wait(15)
        elapsed = time.monotonic() - t0
    finally:
        conn.close()
    assert rc == 0, daemon.output()
    assert elapsed < 8, f"shutdown took {elapsed:.2f}s"   # CLI-9: grace (1 s) + 5 s, plus slack for a busy machine
    assert not pid_alive(model["pid"])
    marker = {MARKER_VAR: daemon.env[MARKER_VAR]}
    assert wait_until(lambda: not tagged_processes(marker), timeout=2)


def test_wrong_gguf_path_gives_502_with_llama_server_error(start_daemon, tmp_path):
    """A model whose GGUF file is missing fails to start: 502 JSON carrying llama-server's own error line."""
    missing = tmp_path / "no-such-model.gguf"
    config = {
        "startPort": free_port_range(1),
        "models": {"broken": {
            "cmd": f"{LAUNCHER} -m {missing} --host 127.0.0.1 --port ${{PORT}}",
            "proxy": "http://127.0.0.1:${PORT}",
        }},
    }
    daemon = start_daemon(config)
    r = daemon.request("POST", "/v1/chat/completions", chat_body("broken"))
    assert r.status == 502, r
    assert r.headers.get("Content-Type", "").startswith("application/json")
    error = r.json()["error"]
    assert error["code"] == "upstream_start_failed"
    assert "failed to start model 'broken'" in error["message"]
    assert "exited with code 1" in error["message"]
    assert f"failed to load model, '{missing}'" in error["message"]          # llama-server's "E srv load_model" line
    assert daemon.running() == []


def test_openai_sdk(start_daemon):
    """The official openai SDK against llamaswap in front of llama-server: non-stream, stream, embeddings."""
    openai = pytest.importorskip("openai")
    daemon = start_daemon()
    client = openai.OpenAI(base_url=daemon.url("/v1"), api_key="not-needed", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "hi"}]

    reply = client.chat.completions.create(model="chat-a", messages=messages)
    assert reply.choices[0].message.content == ANSWER_A
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 10

    stream = client.chat.completions.create(model="chat-b", messages=messages, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER_B
    assert chunks[-1].usage.completion_tokens == 10
    assert running_chat_models(daemon) == ["chat-b"]

    emb = client.embeddings.create(model="embed", input=["hello", "world"])
    assert [len(d.embedding) for d in emb.data] == [64, 64]

    models = {m.id for m in client.models.list()}
    assert models >= {"chat-a", "chat-b", "embed", "rerank"}
