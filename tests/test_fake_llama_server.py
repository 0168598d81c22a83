"""The fake upstream (tests/fake_llama_server.py) run as a real process, route by route.

Plain pytest with subprocess + http.client (see tests/daemon.py); every process
is killed by its process group in teardown.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from tests.daemon import FakeServer, free_port, http_request, multipart, open_stream, pid_alive, wait_until


@pytest.fixture
def start_fake():
    """Start fake servers; kill their process groups afterwards."""
    started: list[FakeServer] = []

    def start(*args: str, wait: bool = True) -> FakeServer:
        fake = FakeServer(*args)
        started.append(fake)
        if wait:
            fake.wait_listening()
        return fake

    yield start
    for fake in started:
        fake.close()


@pytest.fixture(scope="module")
def shared_fake():
    """One plain fake (model 'm1', respond 'hello there') for the read-only route tests."""
    fake = FakeServer("--model", "m1", "--respond", "hello there", "--chunks", "4")
    fake.wait_listening()
    yield fake
    fake.close()


def sse_events(body: bytes) -> list[str]:
    return [line[len(b"data: "):].decode() for line in body.split(b"\n") if line.startswith(b"data: ")]


def test_health_ok_and_startup_line(shared_fake):
    """/health answers 200 {"status":"ok"} and the startup line names the model on stderr."""
    r = shared_fake.request("GET", "/health")
    assert (r.status, r.json()) == (200, {"status": "ok"})
    assert "model='m1'" in shared_fake.stderr.text()


def test_load_delay(start_fake):
    """/health (and other routes) answer 503 loading until --load-delay has passed."""
    fake = start_fake("--load-delay", "0.8")
    r = fake.request("GET", "/health")
    assert (r.status, r.json()) == (503, {"status": "loading"})
    assert fake.request("GET", "/env").status == 503
    assert wait_until(lambda: fake.request("GET", "/health").status == 200, 5)


def test_chat_non_stream(shared_fake):
    """Non-streamed chat: the respond text, OpenAI choices, echoed body and Content-Length, usage, timings."""
    body = json.dumps({"model": "asked", "messages": []})
    r = shared_fake.request("POST", "/v1/chat/completions", body)
    assert r.status == 200
    data = r.json()
    assert data["responseMessage"] == "hello there"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "hello there"}
    assert data["model"] == "asked"
    assert data["request_body"] == body
    assert data["h_content_length"] == str(len(body))
    assert data["usage"]["prompt_tokens"] == 25 and data["timings"]["predicted_n"] == 10


def test_chat_stream_default_asdf(start_fake):
    """Without --respond the stream has 10 'asdf' chunks, a usage+timings chunk, then [DONE]."""
    fake = start_fake()
    r = fake.request("POST", "/v1/chat/completions", {"model": "x", "stream": True})
    assert r.headers["content-type"] == "text/event-stream"
    events = sse_events(r.body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"].get("content") for c in chunks[:10]] == ["asdf"] * 10
    assert len(chunks) == 11
    assert chunks[10]["usage"]["completion_tokens"] == 10
    assert chunks[10]["timings"]["predicted_per_second"] == 10


def test_chat_stream_pieces_join_to_respond(shared_fake):
    """With --respond and --chunks 4 the four pieces join to the respond text."""
    r = shared_fake.request("POST", "/v1/chat/completions", {"model": "x", "stream": True})
    chunks = [json.loads(e) for e in sse_events(r.body)[:-1]]
    assert len(chunks) == 5
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "hello there"


def test_chat_stream_wait_is_incremental(shared_fake):
    """?wait=0.2 spaces the chunks out, and the first one arrives before the stream ends."""
    conn, resp = open_stream(shared_fake.port, "POST", "/v1/chat/completions?wait=0.2",
                             {"model": "x", "stream": True})
    try:
        times = []
        while True:
            line = resp.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                times.append(time.monotonic())
        assert len(times) == 6
        assert times[-1] - times[0] > 0.6
    finally:
        conn.close()


def test_chat_stream_die_after(start_fake):
    """?die_after=2 sends two chunks, drops the connection without [DONE], and the process exits."""
    fake = start_fake()
    conn, resp = open_stream(fake.port, "POST", "/v1/chat/completions?die_after=2",
                             {"model": "x", "stream": True})
    body = b""
    try:
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                break
            body += chunk
    except Exception:
        pass   # IncompleteRead: the chunked body was cut short, which is the point
    finally:
        conn.close()
    assert len(sse_events(body)) == 2
    assert b"[DONE]" not in body
    assert fake.wait(5) == 1


def test_echo_routes(shared_fake):
    """The other inference routes echo model and usage."""
    for path in ("/v1/completions", "/completion", "/v1/embeddings", "/v1/rerank", "/infill",
                 "/v1/messages"):
        r = shared_fake.request("POST", path, {"model": "e", "prompt": "p"})
        assert r.status == 200, (path, r)
        data = r.json()
        assert data["model"] == "e" and "usage" in data, path


def test_transcription_multipart(shared_fake):
    """Multipart transcription needs model and file and reports the file length."""
    body, ctype = multipart({"model": "w"}, {"file": ("a.wav", b"x" * 1234)})
    r = shared_fake.request("POST", "/v1/audio/transcriptions", body, headers={"Content-Type": ctype})
    assert r.status == 200, r
    assert r.json()["text"] == "The length of the file is 1234 bytes"
    assert r.json()["model"] == "w"
    body, ctype = multipart({}, {"file": ("a.wav", b"xy")})
    r = shared_fake.request("POST", "/v1/audio/transcriptions?model=q", body, headers={"Content-Type": ctype})
    assert r.json()["model"] == "q"
    body, ctype = multipart({"model": "w"}, {})
    r = shared_fake.request("POST", "/v1/audio/transcriptions", body, headers={"Content-Type": ctype})
    assert r.status == 400


def test_slow_respond(shared_fake):
    """/slow-respond writes the echo text one character at a time."""
    t0 = time.monotonic()
    r = shared_fake.request("GET", "/slow-respond?echo=abcd&delay=0.1")
    assert r.text == "abcd"
    assert time.monotonic() - t0 >= 0.3


def test_env_root_info_models_catch_all(shared_fake):
    """/env lists the environment, / echoes method and path, /info and /v1/models, and a catch-all echo."""
    assert f"PATH={os.environ['PATH']}\n" in shared_fake.request("GET", "/env").text
    assert shared_fake.request("GET", "/").text == "GET /"
    info = shared_fake.request("GET", "/info").json()
    assert info["pid"] == shared_fake.proc.pid and info["pgid"] == shared_fake.proc.pid
    assert shared_fake.request("GET", "/v1/models").json()["data"][0]["id"] == "m1"
    r = shared_fake.request("PUT", "/some/where?a=1&b=two", b"payload", headers={"X-Test": "yes"})
    data = r.json()
    assert (data["method"], data["path"], data["query"]) == ("PUT", "/some/where", {"a": "1", "b": "two"})
    assert data["headers"]["x-test"] == "yes" and data["body"] == "payload"


def test_access_log_on_stderr(shared_fake):
    """Each request gets an access line on stderr."""
    shared_fake.request("GET", "/info?marker=accesslog")
    assert shared_fake.stderr.wait_for(re.compile(rb"request: GET /info\?marker=accesslog 127\.0\.0\.1 200"), 5)


def test_sigterm_exits_zero(start_fake):
    """SIGTERM ends the fake with status 0."""
    fake = start_fake()
    fake.proc.send_signal(signal.SIGTERM)
    assert fake.wait(5) == 0


def test_ignore_sigterm(start_fake):
    """With --ignore-sigterm, SIGTERM is ignored (SIGKILL still works)."""
    fake = start_fake("--ignore-sigterm")
    fake.proc.send_signal(signal.SIGTERM)
    assert fake.wait(0.7) is None
    assert fake.request("GET", "/health").status == 200
    fake.proc.kill()
    assert fake.wait(5) == -signal.SIGKILL


def test_exit_after(start_fake):
    """--exit-after simulates a crash: exit status 1 after the delay."""
    fake = start_fake("--exit-after", "0.3")
    assert fake.wait(5) == 1


def test_exit_at_start(start_fake):
    """--exit-at-start CODE writes a load error to stderr and exits with CODE without listening."""
    fake = start_fake("--exit-at-start", "3", "--model", "broken", wait=False)
    assert fake.wait(5) == 3
    fake.stderr.join(2)
    assert "E srv load_model: failed to load model 'broken'" in fake.stderr.text()
    assert "listening" not in fake.stderr.text()


def test_exit_at_start_marker(start_fake, tmp_path):
    """With --exit-at-start-marker only the first start fails."""
    marker = str(tmp_path / "failed-once")
    first = start_fake("--exit-at-start", "1", "--exit-at-start-marker", marker, wait=False)
    assert first.wait(5) == 1
    second = start_fake("--exit-at-start", "1", "--exit-at-start-marker", marker)
    assert second.request("GET", "/health").status == 200


def test_print_pid_and_fork_child(start_fake):
    """--print-pid prints the pid on stdout; --fork-child leaves a 'sleep' grandchild in the same group."""
    fake = start_fake("--print-pid", "--fork-child")
    assert fake.stdout.wait_for(re.compile(rb"fake_llama_server pid=(\d+)"), 5).group(1) == \
        str(fake.proc.pid).encode()
    grandchild = fake.request("GET", "/info").json()["grandchild_pid"]
    assert grandchild and pid_alive(grandchild)
    assert os.getpgid(grandchild) == fake.proc.pid
    os.killpg(fake.proc.pid, signal.SIGTERM)
    assert fake.wait(5) == 0
    assert wait_until(lambda: not pid_alive(grandchild), 5)


def test_silent(start_fake):
    """--silent writes nothing."""
    port = free_port()
    fake = start_fake("--silent", "--print-pid", "--port", str(port), wait=False)
    assert wait_until(lambda: _health(port), 5)
    http_request(port, "GET", "/info")
    fake.proc.send_signal(signal.SIGTERM)
    assert fake.wait(5) == 0
    fake.stderr.join(2)
    fake.stdout.join(2)
    assert fake.stderr.data == b"" and fake.stdout.data == b""


def _health(port: int) -> bool:
    try:
        return http_request(port, "GET", "/health", timeout=1).status == 200
    except OSError:
        return False
