"""End to end: the real daemon, started the way users start it, in front of real fake upstreams.

Each daemon runs as ``python -c 'from twisted.scripts.twistd import run; run()' -n
--pidfile … --logfile=- llamaswap --config … --listen tcp:0:interface=127.0.0.1
--state-file …`` with ``PYTHONPATH=<repo>`` (tests/daemon.py), and its models run
``tests/fake_llama_server.py``. Tests that only read (routing, errors, listings,
passthrough) share one daemon; tests about lifecycle (swap, ttl, unload, groups,
profiles, shutdown, start failures) get their own. Every daemon is stopped with
SIGTERM, and its process group and recorded children are SIGKILLed as a backstop.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, error_of, fake_cmd, fake_config as config, fake_model as model, \
    in_thread, multipart, open_stream, pid_alive, port_of, sigkill_leaving_children, sse_data, stop_and_clean, \
    wait_until


SHARED = {
    "a": model("a", aliases=["alias-a"], env=["FAKE_MARK=e2e-mark"], name="Model A",
               description="first model", ttl=300),
    "b": model("b", useModelName="upstream-b"),
    "crashy": model("crashy"),
    "hidden": model("hidden", unlisted=True),
    "slow": model("slow", "--load-delay", "0.5"),
    "vendor/m1": model("vendor/m1"),
    "one": model("one", concurrencyLimit=1, unlisted=True),
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One daemon for the tests that do not depend on what else is running."""
    cfg = config(SHARED, maxRequestBody="64KiB")
    d = Daemon(cfg, tmp_path_factory.mktemp("shared"))
    d.cfg = cfg
    d.start()
    yield d
    problems = stop_and_clean(d)
    assert not problems, problems


# -- routing and answers ----------------------------------------------------------------------------

def chat_stream(port: int, model_id: str,
                query: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A streaming chat completion for a fake model, told how to answer by ``query``; returns
    (connection, response) with the body unread."""
    return open_stream(port, "POST", f"/v1/chat/completions?{query}",
                       {"model": model_id, "stream": True, "messages": []})


def first_event(resp: http.client.HTTPResponse) -> bytes:
    """The first line of a 200 SSE response, which must be a ``data:`` line."""
    assert resp.status == 200
    line = resp.readline()
    assert line.startswith(b"data: "), line
    return line


def test_swap_a_to_b(start_daemon):
    """A request for A is answered by A, then one for B by B; only B runs afterwards and A's child is gone."""
    d = start_daemon(config({"a": model("a"), "b": model("b")}))
    status, body = d.chat("a")
    assert status == 200, body
    assert body["responseMessage"] == "from a"
    [running_a] = d.running()
    assert running_a["model"] == "a"
    status, body = d.chat("b")
    assert status == 200, body
    assert body["responseMessage"] == "from b"
    assert d.running_ids() == ["b"]
    assert not pid_alive(running_a["pid"]), "A's child is still alive after the swap"


def test_streaming_arrives_incrementally(shared):
    """SSE chunks are relayed as the upstream writes them, not once it has finished."""
    conn, resp = chat_stream(shared.port, "a", "wait=0.25&chunks=6")
    try:
        assert resp.status == 200
        assert resp.getheader("Content-Type", "").startswith("text/event-stream")
        assert resp.getheader("X-Accel-Buffering") == "no"
        assert resp.getheader("Cache-Control") == "no-cache"
        stamps: list[tuple[float, str]] = []
        while True:
            line = resp.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                stamps.append((time.monotonic(), line[6:].strip().decode()))
    finally:
        conn.close()
    events = [e for _, e in stamps]
    assert events[-1] == "[DONE]", events
    contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:6]]
    assert "".join(contents) == "from a"
    assert json.loads(events[6])["usage"]["completion_tokens"] == 10
    # The upstream spends 6 x 0.25 s between the first chunk and [DONE]; a buffering proxy would deliver
    # everything at once.
    assert stamps[-1][0] - stamps[0][0] > 0.8, stamps


def test_stream_upstream_dies_gives_error_event(shared):
    """An upstream that dies mid-stream yields an upstream_error SSE event and no [DONE] (PROXY-9)."""
    conn, resp = chat_stream(shared.port, "crashy", "die_after=3")
    try:
        assert resp.status == 200
        raw = resp.read()          # PROXY-9: the response is ended cleanly, so no IncompleteRead
    finally:
        conn.close()
    events = sse_data(raw)
    assert b"[DONE]" not in raw
    assert len(events) == 4, events
    error = json.loads(events[-1])["error"]
    assert error["code"] == "upstream_error" and error["type"] == "server_error"
    assert "crashy" in error["message"]


def test_load_waits_for_health_check(shared):
    """A model with a slow load answers once its health check passes, never with its 503 while loading."""
    t0 = time.monotonic()
    status, body = shared.chat("slow")
    assert status == 200, body
    assert body["responseMessage"] == "from slow"
    assert time.monotonic() - t0 >= 0.45


def test_alias_routes_to_model(shared):
    """A request for an alias is served by the aliased model; the body is forwarded unchanged."""
    status, body = shared.chat("alias-a")
    assert status == 200, body
    assert body["responseMessage"] == "from a"
    assert json.loads(body["request_body"])["model"] == "alias-a"
    assert "a" in shared.running_ids()


def test_use_model_name_rewrites_body(shared):
    """useModelName replaces model in the forwarded body, with Content-Length recomputed (RT-8, RT-10)."""
    status, body = shared.chat("b", content="keep me", temperature=0.5)
    assert status == 200, body
    sent = json.loads(body["request_body"])
    assert sent["model"] == "upstream-b"
    assert sent["messages"] == [{"role": "user", "content": "keep me"}] and sent["temperature"] == 0.5
    assert body["h_content_length"] == str(len(body["request_body"].encode("utf-8")))


def test_unknown_model_404(shared):
    """An unknown model gives 404 model_not_found in the OpenAI error envelope."""
    status, body = shared.chat("no-such-model")
    assert error_of((status, body)) == (404, "model_not_found")
    assert body["error"]["message"] == ("model 'no-such-model' not found "
                                        "(5 models are available: GET /v1/models lists them)")
    status, body = shared.chat("alias-b")                           # aliases are suggested; unlisted ids not
    assert body["error"]["message"] == ("model 'alias-b' not found; did you mean 'alias-a'? "
                                        "(5 models are available: GET /v1/models lists them)")
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] is None
    r = shared.request("POST", "/v1/chat/completions", {"model": "no-such-model"},
                       headers={"Origin": "http://example.test"})
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.headers["Access-Control-Allow-Origin"] == "*"          # SEC-8: errors carry it with Origin


def test_missing_model_400(shared):
    """A body without a string model gives 400 missing_model."""
    assert error_of(shared.json("POST", "/v1/chat/completions", {"messages": []})) == (400, "missing_model")
    assert error_of(shared.json("POST", "/v1/chat/completions", {"model": 5})) == (400, "missing_model")
    assert error_of(shared.json("POST", "/v1/chat/completions", {"model": ""})) == (400, "missing_model")


def test_bad_json_400(shared):
    """A body that is not a JSON object gives 400 invalid_json."""
    assert error_of(shared.json("POST", "/v1/chat/completions", "{not json")) == (400, "invalid_json")
    assert error_of(shared.json("POST", "/v1/chat/completions", "[1, 2]")) == (400, "invalid_json")


def test_unknown_path_and_wrong_method(shared):
    """An unknown path gives 404 not_found; a known path with the wrong method 405 with Allow."""
    assert error_of(shared.json("GET", "/no/such/path")) == (404, "not_found")
    r = shared.request("GET", "/v1/chat/completions")
    assert r.status == 405, r
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in r.headers["Allow"]


def test_v1_models_listing(shared):
    """/v1/models lists configured ids sorted, without unlisted ones; /models is the same."""
    status, body = shared.json("GET", "/v1/models", headers={"Origin": "http://example.test"})
    assert status == 200, body
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids == ["a", "b", "crashy", "slow", "vendor/m1"]
    entry = body["data"][0]
    assert entry["object"] == "model" and entry["owned_by"] == "llama-swap"
    assert entry["name"] == "Model A" and entry["description"] == "first model"
    assert entry["status"]["value"] in ("loaded", "loading", "unloaded")
    assert len({m["created"] for m in body["data"]}) == 1
    r = shared.request("GET", "/v1/models", headers={"Origin": "http://example.test"})
    assert r.headers["Access-Control-Allow-Origin"] == "http://example.test"
    assert [m["id"] for m in shared.json("GET", "/models")[1]["data"]] == ids


def test_health(shared):
    """/health answers 200 OK as text."""
    r = shared.request("GET", "/health")
    assert (r.status, r.text) == (200, "OK")
    assert r.headers["Content-Type"].startswith("text/plain")


def test_cors_preflight(shared):
    """OPTIONS is answered by llamaswap with 204 and the CORS headers, never forwarded."""
    before = shared.running_ids()
    r = shared.request("OPTIONS", "/v1/chat/completions",
                       headers={"Origin": "http://example.test", "Access-Control-Request-Method": "POST",
                                "Access-Control-Request-Headers": "Content-Type, X-Foo"})
    assert r.status == 204, r
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert r.headers["Access-Control-Allow-Methods"] == "GET, POST, PUT, PATCH, DELETE, OPTIONS"
    assert r.headers["Access-Control-Allow-Headers"] == "Content-Type, X-Foo"
    assert r.headers["Access-Control-Max-Age"] == "86400"
    r = shared.request("OPTIONS", "/upstream/hidden/x", headers={"Access-Control-Request-Headers": "X-Ok, bad;header"})
    assert r.status == 204
    assert r.headers["Access-Control-Allow-Headers"] == "Content-Type, Authorization, Accept, X-Requested-With"
    assert "hidden" not in shared.running_ids() or "hidden" in before


def test_transcription_model_from_form_field(shared):
    """A multipart transcription is routed by its model form field and the file reaches the upstream."""
    body, ctype = multipart({"model": "a", "language": "en"}, {"file": ("speech.wav", os.urandom(1000))})
    status, data = shared.json("POST", "/v1/audio/transcriptions", body, headers={"Content-Type": ctype})
    assert status == 200, data
    assert data["text"] == "The length of the file is 1000 bytes"
    assert data["model"] == "a" and data["served_by"] == "a"
    assert data["fields"]["language"] == "en"


def test_transcription_model_from_query(shared):
    """A multipart body without a model field is routed by ?model=."""
    body, ctype = multipart({}, {"file": ("speech.wav", b"\0" * 77)})
    status, data = shared.json("POST", "/v1/audio/transcriptions?model=a", body, headers={"Content-Type": ctype})
    assert status == 200, data
    assert data["text"] == "The length of the file is 77 bytes"
    assert data["served_by"] == "a"


def test_transcription_use_model_name_rewrites_field(shared):
    """useModelName replaces the multipart model field, other parts unchanged (RT-9)."""
    body, ctype = multipart({"model": "b"}, {"file": ("speech.wav", b"z" * 500)})
    status, data = shared.json("POST", "/v1/audio/transcriptions", body, headers={"Content-Type": ctype})
    assert status == 200, data
    assert data["model"] == "upstream-b" and data["served_by"] == "b"
    assert data["text"] == "The length of the file is 500 bytes"


def test_concurrency_limit_429(shared):
    """With concurrencyLimit 1, a second request while one is in flight gets 429 with Retry-After: 1."""
    conn, resp = chat_stream(shared.port, "one", "wait=0.3&chunks=4")
    try:
        first_event(resp)
        r = shared.request("POST", "/v1/chat/completions", {"model": "one", "messages": []})
        assert r.status == 429, r
        assert r.headers["Retry-After"] == "1"
        assert r.json()["error"]["code"] == "concurrency_limit"
        resp.read()
    finally:
        conn.close()
    assert wait_until(lambda: shared.chat("one")[0] == 200, 3)


def test_request_too_large_413(shared):
    """A body over maxRequestBody is refused with 413 request_too_large before any model starts."""
    before = shared.running_ids()
    body = json.dumps({"model": "hidden", "messages": [], "pad": "x" * 70000})
    try:
        r = shared.request("POST", "/v1/chat/completions", body)
    except (ConnectionError, http.client.HTTPException) as e:       # refused mid-body: acceptable
        pytest.fail(f"no 413 response: {e!r}")
    assert r.status == 413, r
    assert r.json()["error"]["code"] == "request_too_large"
    assert "hidden" not in shared.running_ids() or "hidden" in before


def test_root_and_logs_redirect_to_ui(shared):
    """GET / answers 302 to /ui/, GET /ui 301 to /ui/, and /logs from a browser 302 to /ui/."""
    r = shared.request("GET", "/")
    assert r.status == 302 and r.headers["Location"].endswith("/ui/"), r
    r = shared.request("GET", "/ui")
    assert r.status == 301 and r.headers["Location"].endswith("/ui/"), r
    r = shared.request("GET", "/logs", headers={"Accept": "text/html,application/xhtml+xml"})
    assert r.status == 302 and r.headers["Location"].endswith("/ui/"), r


# -- /upstream --------------------------------------------------------------------------------------

def test_upstream_env_passthrough(shared):
    """/upstream/<model>/env reaches the child, whose environment has the model's env entries."""
    r = shared.request("GET", "/upstream/a/env")
    assert r.status == 200, r
    assert "FAKE_MARK=e2e-mark\n" in r.text
    assert f"PATH={os.environ['PATH']}\n" in r.text      # env is added to the inherited one (COMPAT-5)


def test_upstream_redirect(shared):
    """/upstream/<model> without a slash redirects to /upstream/<model>/, 301 for GET and 308 for POST."""
    r = shared.request("GET", "/upstream/a?x=1")
    assert r.status == 301, r
    assert r.headers["Location"].endswith("/upstream/a/?x=1")
    r = shared.request("POST", "/upstream/a", b"{}")
    assert r.status == 308, r
    assert r.headers["Location"].endswith("/upstream/a/")


def test_upstream_passthrough_path_query_headers(shared):
    """/upstream forwards method, remaining path, query and headers, with X-Forwarded-* and Host set."""
    r = shared.request("PUT", "/upstream/a/some/deep%20path?q=1&r=two", b"raw body",
                       headers={"X-Custom": "kept", "Host": "front.example:1234"})
    assert r.status == 200, r
    echo = r.json()
    assert echo["method"] == "PUT"
    assert echo["uri"] == "/some/deep%20path?q=1&r=two"
    assert echo["body"] == "raw body"
    h = echo["headers"]
    assert h["x-custom"] == "kept"
    assert h["x-forwarded-for"].split(",")[-1].strip() == "127.0.0.1"
    assert h["x-forwarded-host"] == "front.example:1234"
    assert h["x-forwarded-proto"] == "http"
    assert h["host"] == f"localhost:{port_of(shared.cfg, 'a')}"
    assert shared.request("GET", "/upstream/a/").text == "GET /"


def test_upstream_unknown_model_and_listing(shared):
    """/upstream lists listed models as links; an unknown model under /upstream gives 404 model_not_found."""
    r = shared.request("GET", "/upstream")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/html"), r
    assert 'href="/upstream/a/"' in r.text and 'href="/upstream/hidden/"' not in r.text
    assert error_of(shared.json("GET", "/upstream/nope/x")) == (404, "model_not_found")


def test_upstream_model_id_with_slash(shared):
    """/upstream/<id>/… resolves the longest prefix, so ids containing '/' work, percent-encoded or not (RT-5)."""
    for path in ("/upstream/vendor/m1/info", "/upstream/vendor%2Fm1/info"):
        r = shared.request("GET", path)
        assert r.status == 200, (path, r)
        assert r.json()["model"] == "vendor/m1"


def test_client_disconnect_mid_stream_frees_the_model(shared):
    """A client that leaves during a stream is no longer in flight, and the model serves the next request."""
    conn, resp = chat_stream(shared.port, "a", "wait=0.5&chunks=40")
    try:
        first_event(resp)
        assert [m["inflight"] for m in shared.running() if m["model"] == "a"] == [1]
    finally:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    assert wait_until(lambda: [m["inflight"] for m in shared.running() if m["model"] == "a"] == [0], 3), \
        shared.running()
    assert shared.chat("a")[0] == 200


def test_unload_during_stream_ends_it_with_error_event(start_daemon):
    """Unloading a busy model ends its in-flight SSE response with an upstream_error event (EP-6, PROXY-9)."""
    d = start_daemon(config({"a": model("a")}))
    conn, resp = chat_stream(d.port, "a", "wait=0.5&chunks=40")
    try:
        first = first_event(resp)
        assert d.json("POST", "/api/models/unload/a") == (200, {"msg": "ok"})
        raw = first + resp.read()
    finally:
        conn.close()
    events = sse_data(raw)
    assert b"[DONE]" not in raw
    assert json.loads(events[-1])["error"]["code"] == "upstream_error", events
    assert d.running() == []


def test_unload_during_start_gives_waiters_503(start_daemon):
    """A request waiting on a start that gets unloaded receives 503 model_unloaded (SCHED-10)."""
    d = start_daemon(config({"a": model("a", "--load-delay", "3")}))
    result = in_thread(d.chat, "a")
    assert wait_until(lambda: [m["state"] for m in d.running()] == ["starting"], 5), d.running()
    assert d.json("POST", "/api/models/unload/a") == (200, {"msg": "ok"})
    assert error_of(result(20)) == (503, "model_unloaded")
    assert d.running() == []


def test_shutdown_answers_waiters_503(start_daemon):
    """SIGTERM while a request waits for a start answers it with 503 shutting_down and still exits 0."""
    d = start_daemon(config({"a": model("a", "--load-delay", "5")}))
    result = in_thread(d.chat, "a")
    assert wait_until(lambda: [m["state"] for m in d.running()] == ["starting"], 5), d.running()
    d.record_children()
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert error_of(result(20)) == (503, "shutting_down")
    assert d.wait(10) == 0, d.output()
    assert time.monotonic() - t0 < 4, "shutdown waited for the load instead of aborting it"


# -- management endpoints ---------------------------------------------------------------------------

def test_running_fields(shared):
    """/running reports model, state, cmd, proxy, ttl, pid, name, description, inflight, waiting."""
    status, body = shared.chat("a")
    assert status == 200, body
    [entry] = [m for m in shared.running() if m["model"] == "a"]
    port = port_of(shared.cfg, "a")
    assert entry["state"] == "ready"
    assert "fake_llama_server.py" in entry["cmd"] and f"--port {port}" in entry["cmd"]
    assert entry["proxy"] == f"http://localhost:{port}"
    assert entry["ttl"] == 300
    assert entry["name"] == "Model A" and entry["description"] == "first model"
    assert isinstance(entry["pid"], int) and pid_alive(entry["pid"])
    assert (entry["inflight"], entry["waiting"]) == (0, 0)


def test_load_endpoint(shared):
    """POST /api/models/load/<model> starts the model and answers once it is ready."""
    status, body = shared.json("POST", "/api/models/load/alias-a")
    assert (status, body) == (200, {"msg": "ok", "model": "a", "state": "ready"})
    assert "a" in shared.running_ids()
    assert error_of(shared.json("POST", "/api/models/load/nope")) == (404, "model_not_found")


def test_logs_contain_upstream_output(shared):
    """/logs holds the children's output: the fake's startup line and its access lines."""
    status, body = shared.chat("a")
    assert status == 200, body
    r = shared.request("GET", "/logs")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain"), r
    assert "main: fake llama-server build=0 model='a'" in r.text
    assert "request: POST /v1/chat/completions" in r.text
    # LOG-5 access line from the daemon itself; /health is never access-logged.
    assert re.search(r'Request 127\.0\.0\.1 "POST /v1/chat/completions HTTP/1\.1" 200 \d+ "[^"]*" \d+\.\d{3}s',
                     r.text), r.text[-2000:]
    shared.request("GET", "/health")
    assert '"GET /health ' not in shared.request("GET", "/logs").text


def test_logs_stream_no_history_gets_live_output(shared):
    """/logs/stream/<model>?no-history sends no history, then the model's live output."""
    assert shared.chat("a")[0] == 200
    received = bytearray()
    conn = http.client.HTTPConnection("127.0.0.1", shared.port, timeout=15)
    headers: dict[str, str] = {}

    def read() -> None:
        try:
            conn.request("GET", "/logs/stream/a?no-history")
            resp = conn.getresponse()
            headers.update({k.lower(): v for k, v in resp.getheaders()})
            headers["status"] = str(resp.status)
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    return
                received.extend(chunk)
        except (OSError, http.client.HTTPException, ValueError, AttributeError):
            return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # The subscription starts at some unknown moment: keep making marked requests until one shows up.
        def seen() -> bool:
            shared.request("GET", f"/upstream/a/info?marker=live{time.monotonic_ns()}")
            return b"marker=live" in received
        assert wait_until(seen, 10, interval=0.2), bytes(received)
    finally:
        try:
            conn.sock and conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()
        reader.join(5)
    assert headers.get("status") == "200", headers
    assert headers.get("content-type", "").startswith("text/plain")
    assert headers.get("x-content-type-options") == "nosniff"
    assert headers.get("cache-control") == "no-cache"
    assert b"main: fake llama-server" not in received, "history was sent despite no-history"


def test_version_and_api_models(shared):
    """/api/version gives the version; /api/models lists every model, unlisted included."""
    status, body = shared.json("GET", "/api/version")
    assert status == 200 and re.fullmatch(r"\d+\.\d+\.\d+.*", body["version"]), body
    assert body["version"] in shared.stdout.text()
    status, body = shared.json("GET", "/api/models")
    assert status == 200, body
    assert sorted(m["id"] for m in body) == sorted(SHARED)
    assert {"id", "name", "description", "state", "pid", "ready_since", "last_error", "inflight", "waiting",
            "aliases"} <= set(body[0])


def test_logs_stream_unknown_source(shared):
    """/logs/stream/<unknown> gives 404 not_found."""
    assert error_of(shared.json("GET", "/logs/stream/no-such-source")) == (404, "not_found")


def test_unload_all(start_daemon):
    """GET /unload stops every model and answers 200 OK once the children are gone."""
    cfg = config({"a": model("a"), "b": model("b")},
                 groups={"both": {"swap": False, "members": ["a", "b"]}})
    d = start_daemon(cfg)
    assert d.chat("a")[0] == 200 and d.chat("b")[0] == 200
    pids = [m["pid"] for m in d.running()]
    assert len(pids) == 2
    r = d.request("GET", "/unload")
    assert (r.status, r.text) == (200, "OK")
    assert d.running() == []
    assert not any(pid_alive(p) for p in pids)


def test_unload_one_model(start_daemon):
    """POST /api/models/unload/<model> stops only that model; POST /api/models/unload stops all."""
    cfg = config({"a": model("a", aliases=["first"]), "b": model("b")},
                 groups={"both": {"swap": False, "members": ["a", "b"]}})
    d = start_daemon(cfg)
    assert d.chat("a")[0] == 200 and d.chat("b")[0] == 200
    pid_a = [m["pid"] for m in d.running() if m["model"] == "a"][0]
    assert d.json("POST", "/api/models/unload/first") == (200, {"msg": "ok"})
    assert d.running_ids() == ["b"]
    assert not pid_alive(pid_a)
    assert error_of(d.json("POST", "/api/models/unload/nope")) == (404, "model_not_found")
    assert d.json("POST", "/api/models/unload") == (200, {"msg": "ok"})
    assert d.running() == []


def test_ttl_unload(start_daemon):
    """A model with ttl 2 is unloaded after about two seconds of idleness (PROC-11: ttl ± 1 s)."""
    d = start_daemon(config({"a": model("a", ttl=2)}))
    assert d.chat("a")[0] == 200
    t0 = time.monotonic()
    [entry] = d.running()
    assert entry["ttl"] == 2
    assert wait_until(lambda: d.running() == [], 8, interval=0.2), d.running()
    assert time.monotonic() - t0 >= 0.9
    assert not pid_alive(entry["pid"])
    assert "a: unloading after 2s idle" in d.request("GET", "/logs").text


def test_unload_kills_after_grace_period(start_daemon):
    """A child that ignores SIGTERM is SIGKILLed with its grandchild after unloadTimeout (PROC-9)."""
    d = start_daemon(config({"a": model("a", "--ignore-sigterm", "--fork-child", unloadTimeout=1)}))
    assert d.chat("a")[0] == 200
    [entry] = d.running()
    grandchild = d.request("GET", "/upstream/a/info").json()["grandchild_pid"]
    assert pid_alive(grandchild)
    t0 = time.monotonic()
    assert d.json("POST", "/api/models/unload/a") == (200, {"msg": "ok"})
    assert time.monotonic() - t0 >= 0.9
    assert not pid_alive(entry["pid"]) and not pid_alive(grandchild)


def test_crash_while_ready_restarts_on_next_request(start_daemon):
    """A child that exits while ready goes to stopped, and the next request starts it again (PROC-10)."""
    d = start_daemon(config({"a": model("a", "--exit-after", "1.5")}))
    assert d.chat("a")[0] == 200
    [entry] = d.running()
    assert wait_until(lambda: d.running() == [], 6, interval=0.2)
    assert not pid_alive(entry["pid"])
    assert "a exited unexpectedly (code 1)" in d.request("GET", "/logs").text
    status, body = d.chat("a")
    assert status == 200, body
    assert d.running()[0]["pid"] != entry["pid"]


def test_requests_for_same_model_share_one_load(start_daemon):
    """A B A B arriving together while nothing is loaded give one load of A and one of B (SCHED-7a)."""
    d = start_daemon(config({"a": model("a", "--load-delay", "0.5"), "b": model("b", "--load-delay", "0.5")}))
    results = []
    for m in ("a", "b", "a", "b"):
        results.append((m, in_thread(d.chat, m)))
        time.sleep(0.1)                 # admission order a, b, a, b
    for m, result in results:
        status, body = result(20)
        assert status == 200, body
        assert body["responseMessage"] == f"from {m}"
    logs = d.request("GET", "/logs").text
    assert logs.count("a: stopped -> starting") == 1, logs
    assert logs.count("b: stopped -> starting") == 1, logs


def test_check_endpoint_none_and_upstream_errors_relayed(start_daemon):
    """checkEndpoint none makes a model ready at spawn; the upstream's own 503 is relayed unchanged."""
    d = start_daemon(config({"a": model("a", "--load-delay", "2", checkEndpoint="none")}))
    r = d.request("POST", "/v1/chat/completions", {"model": "a", "messages": []})
    # Ready at once, so the request reaches a server that is still loading: its 503 body, not ours.
    assert r.status in (503, 502), r
    if r.status == 503:
        assert r.json()["error"]["message"] == "Loading model"
    else:       # the child had not bound its port yet: nothing listening
        assert r.json()["error"]["code"] == "upstream_unreachable"
    assert wait_until(lambda: d.chat("a")[0] == 200, 5)


def test_upstream_unreachable_502(start_daemon):
    """A proxy URL where nothing listens gives 502 upstream_unreachable naming the model."""
    cfg = config({"a": model("a", checkEndpoint="none")})
    cfg["models"]["a"]["proxy"] = f"http://127.0.0.1:{cfg['startPort'] + 5}"
    d = start_daemon(cfg)
    status, body = d.chat("a")
    assert error_of((status, body)) == (502, "upstream_unreachable")
    assert "a" in body["error"]["message"]


def test_cmd_stop_runs_with_pid(start_daemon, tmp_path):
    """cmdStop runs instead of SIGTERM, with ${PID} replaced by the child's pid (PROC-9)."""
    marker = tmp_path / "cmdstop.out"
    stop = f"sh -c 'echo stopped ${{PID}} > {marker}; kill -TERM ${{PID}}'"
    d = start_daemon(config({"a": model("a", cmdStop=stop)}))
    assert d.chat("a")[0] == 200
    [entry] = d.running()
    assert d.json("POST", "/api/models/unload/a") == (200, {"msg": "ok"})
    assert marker.read_text().strip() == f"stopped {entry['pid']}"
    assert not pid_alive(entry["pid"])


# -- groups and profiles ----------------------------------------------------------------------------

def test_profile_runs_members_together(start_daemon):
    """P:M requests keep profile members side by side; plain requests follow the group rules."""
    cfg = config({"a": model("a"), "b": model("b"), "c": model("c")}, profiles={"pair": ["a", "b"]})
    d = start_daemon(cfg)
    status, body = d.chat("pair:a")
    assert status == 200, body
    assert body["responseMessage"] == "from a"
    assert json.loads(body["request_body"])["model"] == "a"      # profile prefix stripped (RT-4)
    assert d.chat("pair:b")[1]["responseMessage"] == "from b"
    assert d.running_ids() == ["a", "b"]
    assert d.chat("a")[0] == 200                                  # ready: served without evicting
    assert d.running_ids() == ["a", "b"]
    assert d.chat("c")[1]["responseMessage"] == "from c"          # default group: evicts both
    assert d.running_ids() == ["c"]
    assert d.chat("pair:a")[0] == 200                             # evicts every model not in the profile
    assert d.running_ids() == ["a"]
    assert d.chat("b")[0] == 200                                  # plain request: default group swaps
    assert d.running_ids() == ["b"]
    status, body = d.chat("pair:c")
    assert error_of((status, body)) == (404, "model_not_found")
    assert body["error"]["message"] == "model 'c' is not a member of profile 'pair'"


def test_groups_swap_exclusive_persistent(start_daemon):
    """swap:false members coexist; non-exclusive groups evict nothing; exclusive ones evict all but persistent."""
    cfg = config(
        {"a": model("a"), "b": model("b"), "c": model("c"), "d": model("d"), "e": model("e")},
        groups={
            "together": {"swap": False, "members": ["a", "b"]},
            "side": {"exclusive": False, "members": ["c"]},
            "solo": {"members": ["d"]},
            "keep": {"persistent": True, "exclusive": False, "members": ["e"]},
        })
    d = start_daemon(cfg)
    for m in ("a", "b"):
        assert d.chat(m)[1]["responseMessage"] == f"from {m}"
    assert d.running_ids() == ["a", "b"]
    assert d.chat("e")[0] == 200
    assert d.running_ids() == ["a", "b", "e"]
    assert d.chat("c")[0] == 200
    assert d.running_ids() == ["a", "b", "c", "e"]
    pids = {m["model"]: m["pid"] for m in d.running()}
    assert d.chat("d")[1]["responseMessage"] == "from d"
    assert d.running_ids() == ["d", "e"]
    assert not any(pid_alive(pids[m]) for m in "abc")


def test_group_swap_true_swaps_within_group(start_daemon):
    """Two members of a swap:true group replace each other, leaving a non-exclusive group's model alone."""
    cfg = config({"a": model("a"), "b": model("b"), "c": model("c")},
                 groups={"chat": {"members": ["a", "b"]},
                         "helpers": {"swap": False, "exclusive": False, "members": ["c"]}})
    d = start_daemon(cfg)
    assert d.chat("c")[0] == 200
    assert d.chat("a")[0] == 200
    assert d.running_ids() == ["a"]           # chat is exclusive and helpers is not persistent
    assert d.chat("c")[0] == 200
    assert d.running_ids() == ["a", "c"]      # helpers is not exclusive: a stays
    assert d.chat("b")[0] == 200
    assert d.running_ids() == ["b"]


# -- start failures ---------------------------------------------------------------------------------

def test_start_failure_reports_child_output(start_daemon):
    """A child that exits at start gives 502 upstream_start_failed with its stderr; each request retries."""
    d = start_daemon(config({"bad": model("bad", "--exit-at-start", "1")}))
    status, body = d.chat("bad")
    assert error_of((status, body)) == (502, "upstream_start_failed"), body
    msg = body["error"]["message"]
    assert msg.startswith("failed to start model 'bad': exited with code 1; last output:\n"), msg
    assert "E srv load_model: failed to load model 'bad'" in msg
    first_pid = re.search(r"\(pid (\d+)\)", msg).group(1)
    assert d.running() == []
    assert "bad: starting -> stopped" in d.request("GET", "/logs").text   # PROC-1: exit during start
    status, body = d.chat("bad")                  # PROC-8: no failed state, a fresh start
    assert error_of((status, body)) == (502, "upstream_start_failed")
    second_pid = re.search(r"\(pid (\d+)\)", body["error"]["message"]).group(1)
    assert second_pid != first_pid
    assert f"(pid {first_pid})" not in body["error"]["message"], "tail must come from this attempt only"


def test_start_failure_then_success(start_daemon, tmp_path):
    """After a failed start, the next request starts the model again and succeeds."""
    marker = str(tmp_path / "failed-once")
    d = start_daemon(config({"flaky": model("flaky", "--exit-at-start", "1",
                                            "--exit-at-start-marker", marker)}))
    assert error_of(d.chat("flaky")) == (502, "upstream_start_failed")
    status, body = d.chat("flaky")
    assert status == 200, body
    assert body["responseMessage"] == "from flaky"


def test_missing_binary_start_failure(start_daemon):
    """A cmd whose program does not exist gives 502 upstream_start_failed naming the model."""
    d = start_daemon(config({"ghost": {"cmd": "/nonexistent/llama-server --port ${PORT}"}}))
    status, body = d.chat("ghost")
    assert error_of((status, body)) == (502, "upstream_start_failed")
    assert body["error"]["message"].startswith("failed to start model 'ghost'")


# -- auth, metrics, events --------------------------------------------------------------------------

def test_api_keys(start_daemon):
    """apiKeys from ${env.X}: 401 without a valid key, Bearer/x-api-key/Basic accepted, keys not forwarded."""
    key = "sekret-123"
    cfg = config({"a": model("a")}, apiKeys=["${env.LLAMASWAP_E2E_KEY}"])
    d = start_daemon(cfg, env={"LLAMASWAP_E2E_KEY": key})
    chat = {"model": "a", "messages": []}
    assert d.request("GET", "/health").text == "OK"                        # SEC-4: open
    assert d.request("OPTIONS", "/v1/chat/completions").status == 204
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"},
                    {"Authorization": f"Token {key}"}):
        r = d.request("POST", "/v1/chat/completions", chat, headers=headers)
        assert r.status == 401, (headers, r)
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["WWW-Authenticate"] == 'Basic realm="llamaswap"'
    assert d.request("GET", "/running").status == 401
    assert d.request("GET", "/metrics").status == 401
    basic = "Basic " + base64.b64encode(f"anyone:{key}".encode()).decode()
    assert d.request("GET", "/running", headers={"Authorization": basic}).json() == {"running": []}, \
        "a request that failed auth started a model (EP-17)"
    for headers in ({"Authorization": f"Bearer {key}"}, {"authorization": f"bearer {key}"},
                    {"x-api-key": key}, {"Authorization": basic}):
        r = d.request("POST", "/v1/chat/completions", chat, headers=headers)
        assert r.status == 200, (headers, r)
    r = d.request("GET", "/upstream/a/echo", headers={"Authorization": f"Bearer {key}", "x-api-key": key})
    assert r.status == 200, r
    forwarded = r.json()["headers"]
    assert "authorization" not in forwarded and "x-api-key" not in forwarded        # SEC-6
    assert key not in d.stdout.text() + d.request("GET", "/logs", headers={"x-api-key": key}).text


def _metrics(d: Daemon) -> dict[tuple[str, frozenset], float]:
    r = d.request("GET", "/metrics")
    assert r.status == 200, r
    assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    out = {}
    for line in r.text.splitlines():
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)', line)
        if m and not line.startswith("#"):
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def test_metrics(start_daemon):
    """/metrics counts finished requests, tokens from llama.cpp timings, loads and model state (MET-*)."""
    d = start_daemon(config({"a": model("a"), "b": model("b")}))
    before = _metrics(d)
    assert before[("llamaswap_model_state", frozenset({("model", "a"), ("state", "stopped")}))] == 1
    assert d.chat("a")[0] == 200
    r = d.request("POST", "/v1/chat/completions", {"model": "a", "stream": True, "messages": []})
    assert r.status == 200 and b"[DONE]" in r.body
    m = _metrics(d)
    req = ("llamaswap_requests_total",
           frozenset({("model", "a"), ("endpoint", "/v1/chat/completions"), ("status", "200")}))
    assert m[req] == 2, sorted(k for k in m if k[0] == "llamaswap_requests_total")
    assert m[("llamaswap_tokens_total", frozenset({("model", "a"), ("type", "input")}))] == 50
    assert m[("llamaswap_tokens_total", frozenset({("model", "a"), ("type", "output")}))] == 20
    assert m[("llamaswap_model_load_duration_seconds_count",
              frozenset({("model", "a"), ("outcome", "success")}))] == 1
    assert m[("llamaswap_model_state", frozenset({("model", "a"), ("state", "ready")}))] == 1
    assert m[("llamaswap_model_state", frozenset({("model", "b"), ("state", "ready")}))] == 0
    assert d.chat("b")[0] == 200
    m = _metrics(d)
    assert m[("llamaswap_swaps_total", frozenset({("model", "b")}))] == 1
    assert m[("llamaswap_model_stops_total", frozenset({("model", "a"), ("reason", "swap")}))] == 1


def test_events_snapshot(shared):
    """/api/events starts with logData (proxy), logData (upstream), modelStatus and metrics (EVT-1/2)."""
    conn, resp = open_stream(shared.port, "GET", "/api/events", timeout=10)
    try:
        assert resp.status == 200
        assert resp.getheader("Content-Type", "").startswith("text/event-stream")
        messages = []
        while len(messages) < 4:
            line = resp.readline()
            assert line, "stream ended early"
            if line.startswith(b"data:"):
                messages.append(json.loads(line[5:]))
    finally:
        conn.close()
    assert [m["type"] for m in messages] == ["logData", "logData", "modelStatus", "metrics"]
    assert [json.loads(m["data"])["source"] for m in messages[:2]] == ["proxy", "upstream"]
    status = json.loads(messages[2]["data"])
    assert [s["id"] for s in status] == sorted(SHARED)
    assert {"id", "name", "description", "state", "unlisted", "aliases", "inflight", "waiting"} <= set(status[0])
    assert [s["unlisted"] for s in status if s["id"] == "hidden"] == [True]
    assert isinstance(json.loads(messages[3]["data"]), list)


# -- reload ---------------------------------------------------------------------------------------------

def rewrite_config(d: Daemon, cfg: dict[str, Any] | str) -> None:
    """Replace the daemon's config file atomically (a watcher never sees half a file)."""
    tmp = Path(d.config_path + ".new")
    tmp.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg, indent=1))
    os.replace(tmp, d.config_path)


def test_reload_api_keeps_unchanged_models(start_daemon):
    """POST /api/config/reload adds, changes and keeps models; an unchanged running model keeps its child."""
    cfg = config({"a": model("a"), "b": model("b")})
    d = start_daemon(cfg)
    assert d.chat("a")[0] == 200
    [before] = d.running()
    cfg["models"]["b"] = model("b", respond="b, reloaded")
    cfg["models"]["c"] = model("c")
    rewrite_config(d, cfg)
    status, body = d.json("POST", "/api/config/reload")
    assert (status, body) == (200, {"msg": "ok", "added": ["c"], "removed": [], "changed": ["b"],
                                    "unchanged": ["a"]}), body
    [after] = d.running()
    assert (after["model"], after["pid"], after["state"]) == ("a", before["pid"], "ready")
    assert d.chat("b")[1]["responseMessage"] == "b, reloaded"
    assert d.chat("c")[1]["responseMessage"] == "from c"
    assert "config reloaded: added=[c] removed=[] changed=[b] unchanged=1" in \
        d.request("GET", "/logs").text.replace("'", "")


def test_reload_restarts_changed_running_model(start_daemon):
    """A running model whose cmd changed is restarted with the new config (RLD-3)."""
    cfg = config({"a": model("a")})
    d = start_daemon(cfg)
    assert d.chat("a")[0] == 200
    [before] = d.running()
    cfg["models"]["a"] = model("a", respond="a, version 2")
    rewrite_config(d, cfg)
    assert d.json("POST", "/api/config/reload")[1]["changed"] == ["a"]
    assert wait_until(lambda: [(m["state"], m["pid"] != before["pid"]) for m in d.running()]
                      == [("ready", True)], 10), d.running()
    assert not pid_alive(before["pid"])
    assert d.chat("a")[1]["responseMessage"] == "a, version 2"


def test_reload_invalid_config_keeps_old(start_daemon):
    """An invalid new config is refused with 400 invalid_config listing the errors; the old one stays."""
    cfg = config({"a": model("a")})
    d = start_daemon(cfg)
    rewrite_config(d, {"models": {"a": {"cmd": fake_cmd("a"), "ttl": "soon"}}})
    status, body = d.json("POST", "/api/config/reload")
    assert error_of((status, body)) == (400, "invalid_config")
    assert "models.a.ttl: must be a non-negative integer" in body["error"]["message"]
    assert d.chat("a")[1]["responseMessage"] == "from a"
    assert "config reload failed, keeping previous config" in d.request("GET", "/logs").text


def test_sighup_reload_removes_model(start_daemon):
    """SIGHUP reloads: a removed model disappears from /v1/models and is stopped (RLD-1, RLD-3)."""
    cfg = config({"a": model("a"), "b": model("b")})
    d = start_daemon(cfg)
    assert d.chat("b")[0] == 200
    [running_b] = d.running()
    del cfg["models"]["b"]
    rewrite_config(d, cfg)
    d.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: [m["id"] for m in d.json("GET", "/v1/models")[1]["data"]] == ["a"], 10)
    assert wait_until(lambda: d.running() == [], 5), d.running()
    assert not pid_alive(running_b["pid"])
    assert error_of(d.chat("b")) == (404, "model_not_found")


def test_watch_config_reloads_on_change(start_daemon):
    """--watch-config notices a changed file within a few seconds and reloads it (CLI-4)."""
    cfg = config({"a": model("a")})
    d = start_daemon(cfg, extra_args=["--watch-config"])
    cfg["models"]["a"]["aliases"] = ["watched"]
    time.sleep(1.1)            # a different mtime even on coarse-grained filesystems
    rewrite_config(d, cfg)
    assert wait_until(lambda: d.chat("watched")[0] == 200, 8), d.output()


# -- daemon lifecycle -------------------------------------------------------------------------------

def test_sigterm_stops_daemon_and_all_children(start_daemon):
    """SIGTERM: exit code 0, every child and grandchild gone, state file removed."""
    cfg = config({"a": model("a", "--fork-child"), "b": model("b", "--ignore-sigterm", unloadTimeout=1)},
                 groups={"both": {"swap": False, "members": ["a", "b"]}})
    d = start_daemon(cfg)
    assert d.chat("a")[0] == 200 and d.chat("b")[0] == 200
    running = d.running()
    assert len(running) == 2
    pids = [m["pid"] for m in running]
    grandchild = d.request("GET", "/upstream/a/info").json()["grandchild_pid"]
    with open(d.state_file) as f:
        state = json.load(f)                          # PROC-14: what a restarted daemon would clean up
    assert state["daemon_pid"] == d.proc.pid
    assert sorted((c["model"], c["pid"], c["pgid"]) for c in state["children"]) == \
        sorted((m["model"], m["pid"], m["pid"]) for m in running)
    pids.append(grandchild)
    assert all(pid_alive(p) for p in pids)
    t0 = time.monotonic()
    rc = d.stop(timeout=1 + 5 + 5)
    assert rc == 0, d.output()
    assert time.monotonic() - t0 < 1 + 5 + 1          # CLI-9: within the largest grace period plus 5 s
    left = [p for p in pids if pid_alive(p)]
    assert left == [], f"children left behind: {left}"
    assert not os.path.exists(d.state_file)
    assert not os.path.exists(d.pidfile)


def test_sigterm_idle_daemon_exits_zero(start_daemon):
    """A daemon with nothing running exits 0 on SIGTERM and prints the listening line first."""
    d = start_daemon(config({"a": model("a")}))
    assert re.search(r"llamaswap \S+ listening on tcp:127\.0\.0\.1:\d+", d.stdout.text())
    assert d.stop() == 0, d.output()


def test_config_warnings_do_not_stop_startup(start_daemon):
    """Unknown and unsupported keys are warned about once on the terminal (with -n, in the log
    on stdout), and the daemon still serves (CFG-4)."""
    cfg = config({"a": model("a", colour="blue")}, logRequests=True)
    d = start_daemon(cfg)
    err = d.stdout.text() + d.stderr.text()
    assert err.count("config: unknown key 'models.a.colour' (ignored)") == 1, d.output()
    assert err.count("config: llama-swap key 'logRequests' is not supported by llamaswap (ignored)") == 1, \
        d.output()
    assert d.chat("a")[0] == 200


def test_listen_shorthand(start_daemon):
    """--listen HOST:PORT is llama-swap's shorthand for tcp:PORT:interface=HOST (CLI-3)."""
    d = start_daemon(config({"a": model("a")}), listen="127.0.0.1:0")
    assert d.request("GET", "/health").text == "OK"


def test_startup_usage_errors_exit_1(tmp_path):
    """A taken port, a bad --listen and a missing --config each exit 1 with a message on stderr (CLI-6)."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    cases = {"busy": ["--listen", f"tcp:{port}:interface=127.0.0.1"], "bogus": ["--listen", "no-such-endpoint"]}
    try:
        for name, args in cases.items():
            (tmp_path / name).mkdir()
            d = Daemon(config({"a": model("a")}), tmp_path / name)
            d.listen = args[1]
            d.spawn()
            try:
                rc = d.wait(20)
                assert rc == 1, (name, d.output())
                if name == "busy":      # a listen failure: reported, in the twistd log or on stderr
                    assert "in use" in d.stdout.text() + d.stderr.text(), d.output()
                else:                   # a usage error: on stderr, before daemonizing
                    assert "no-such-endpoint" in d.stderr.text(), d.output()
                    assert "Traceback" not in d.output()
            finally:
                d.kill()
    finally:
        busy.close()
    d = Daemon(config({"a": model("a")}), tmp_path)
    argv = d.argv()
    i = argv.index("--config")
    del argv[i:i + 2]
    proc = subprocess.run(argv, cwd=tmp_path, env=d.env, capture_output=True, timeout=30)
    assert proc.returncode == 1, proc
    assert b"--config" in proc.stderr, proc


def test_bad_config_exits_1_with_paths(tmp_path):
    """An invalid config: exit 1, every error on stderr with its path, no traceback."""
    cfg = {"models": {"a": {"cmd": fake_cmd("a"), "ttl": "300"},
                      "b": {"cmd": fake_cmd("b"), "ttl": -5}}}
    d = Daemon(cfg, tmp_path)
    d.spawn()
    try:
        rc = d.wait(20)
        out = d.output()
        assert rc == 1, out
        err = d.stderr.text()
        assert "models.a.ttl: must be a non-negative integer" in err, out
        assert "models.b.ttl: must be a non-negative integer" in err, out
        assert "Traceback" not in out
        assert not os.path.exists(d.state_file)
    finally:
        d.kill()


def test_missing_config_file_exits_1(tmp_path):
    """A config path that does not exist: exit 1, the path on stderr, no traceback."""
    d = Daemon({}, tmp_path)
    d.config_path = str(Path(tmp_path) / "missing.yaml")
    d.spawn()
    try:
        rc = d.wait(20)
        assert rc == 1, d.output()
        assert "missing.yaml" in d.stderr.text()
        assert "Traceback" not in d.output()
    finally:
        d.kill()


def test_state_file_in_use_refuses_second_daemon(start_daemon, tmp_path):
    """A second daemon given a live daemon's state file exits 1 naming the file and the pid (PROC-14)."""
    first = start_daemon(config({"a": model("a")}))
    second = Daemon(config({"a": model("a")}), tmp_path)
    second.state_file = first.state_file
    second.spawn()
    try:
        rc = second.wait(20)
        assert rc == 1, second.output()
        assert f"state file {first.state_file} is in use by pid {first.proc.pid}" in second.stderr.text()
        assert "Traceback" not in second.output()
    finally:
        second.kill()
    assert first.request("GET", "/health").status == 200


def test_leftover_children_killed_at_next_startup(tmp_path):
    """After the daemon is SIGKILLed, the next daemon on the same state file kills the old process groups."""
    # --ignore-sigterm: the parent-death signal (PROC-2) does not end the leader, so PROC-14 has to.
    cfg = config({"a": model("a", "--fork-child", "--ignore-sigterm")})
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    first = Daemon(cfg, tmp_path / "first")
    second = Daemon(cfg, tmp_path / "second")
    second.state_file = first.state_file
    try:
        first.start()
        child, grandchild = sigkill_leaving_children(first, "a")
        assert pid_alive(grandchild), "nothing killed the grandchild yet: the test would prove nothing"

        second.start()                  # CLI-7: the cleanup runs before the listener binds
        # The SIGKILL has been sent by now; give the kernel a moment to finish the processes off.
        assert wait_until(lambda: not pid_alive(child) and not pid_alive(grandchild), 2), second.output()
        logged = second.stdout.text() + second.request("GET", "/logs").text
        assert any(str(child) in line and "warn" in line.lower() for line in logged.splitlines()), \
            second.output()
        assert second.stop() == 0, second.output()
    finally:
        print(first.output())
        print(second.output())
        first.kill()
        second.kill()


def test_daemon_mode_pidfile(tmp_path):
    """Without -n, twistd daemonizes: the pidfile appears, the daemon serves, and SIGTERM removes the pidfile."""
    cfg = config({"a": model("a")})
    d = Daemon(cfg, tmp_path)
    logfile = tmp_path / "llamaswap.log"
    argv = [a for a in d.argv() if a not in ("-n", "--logfile=-")]
    argv.insert(argv.index("llamaswap"), f"--logfile={logfile}")
    launcher = subprocess.run(argv, cwd=tmp_path, env=d.env, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=30)
    pid = None
    try:
        assert launcher.returncode == 0, launcher
        assert wait_until(lambda: os.path.exists(d.pidfile), 10)
        pid = int(Path(d.pidfile).read_text().strip())
        port = wait_until(lambda: re.search(r"listening on tcp:127\.0\.0\.1:(\d+)",
                                            logfile.read_text() if logfile.exists() else ""), 10)
        assert port, logfile.read_text()
        from tests.daemon import http_request
        assert http_request(int(port.group(1)), "GET", "/health").text == "OK"
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not pid_alive(pid), 15)
        assert not os.path.exists(d.pidfile)
        assert not os.path.exists(d.state_file)
    finally:
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
