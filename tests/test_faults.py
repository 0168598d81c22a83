"""Fault tolerance, end to end (issue 5, faults 1-13; PROC-*, SCHED-*, PROXY-7/8/9, CLI-5..9).

Each test runs the real daemon (``twistd -n llamaswap``, tests/daemon.py) in front of
``tests/fake_llama_server.py`` children that misbehave on purpose, and checks three things:
the fault gives an honest answer (a JSON error, an SSE error event, a clean exit), nothing
is left running (``stop_and_clean`` after every daemon: exit 0 and no child alive), and the
daemon stays healthy: ``/health`` answers and the next request works.
"""
from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import HEALTH_TIMEOUT, Daemon, error_of, fake_cmd, fake_config as config, \
    fake_model as model, http_request, in_thread, open_stream, pid_alive, port_of, sigkill_leaving_children, \
    sse_data, stop_and_clean, wait_until


# -- helpers ----------------------------------------------------------------------------------------

def assert_healthy(d: Daemon, model_id: str | None = None) -> None:
    """The daemon answers /health, and (if given) a request for model_id succeeds."""
    r = d.request("GET", "/health", timeout=5)
    assert r.status == 200 and r.text == "OK", r
    if model_id is not None:
        status, body = d.chat(model_id)
        assert status == 200, body
        assert body["responseMessage"] == f"from {model_id}", body
        d.running()                                         # record the new child for the final check


def states(d: Daemon) -> dict[str, str]:
    return {m["model"]: m["state"] for m in d.running()}


def raw_request(port: int, head: bytes, body: bytes = b"", rcvbuf: int | None = None) -> socket.socket:
    """Send raw bytes on a fresh connection and return the socket (the response is unread)."""
    s = socket.socket()
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall(head + body)
    return s


def chat_head(model_id: str, body: bytes, path: str = "/v1/chat/completions") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()


def chat_body(model_id: str, **extra: Any) -> bytes:
    return json.dumps({"model": model_id, "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


def abort(s: socket.socket) -> None:
    """Close a client connection with a RST, as a killed client does."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


def logs(d: Daemon) -> str:
    return d.request("GET", "/logs").text


# -- 1. exits at start --------------------------------------------------------------------------------

def test_fault01_exit_at_start_gives_502_with_tail_then_retries(start_daemon, tmp_path):
    """PROC-5/7/8: 502 upstream_start_failed with this attempt's output; the next request starts afresh."""
    marker = str(tmp_path / "failed-once")
    d = start_daemon(config({"flaky": model("flaky", "--exit-at-start", "3", "--exit-at-start-marker", marker)}))
    t0 = time.monotonic()
    status, body = d.chat("flaky")
    assert error_of((status, body)) == (502, "upstream_start_failed"), body
    assert time.monotonic() - t0 < 5, "an exit during start must fail at once, not at the health timeout"
    msg = body["error"]["message"]
    assert msg.startswith("failed to start model 'flaky': exited with code 3; last output:\n"), msg
    assert "E srv load_model: failed to load model 'flaky'" in msg
    assert d.running() == []
    assert_healthy(d, "flaky")                              # the retry starts it again and succeeds


# -- 2. never healthy ---------------------------------------------------------------------------------

def test_fault02_never_healthy_502_after_timeout_group_killed(start_daemon):
    """PROC-6: 502 after healthCheckTimeout; the whole process group (grandchild too) is killed."""
    cfg = config({"stuck": model("stuck", "--load-delay", "1000", "--fork-child", "--ignore-sigterm",
                                 unloadTimeout=1),
                  "good": model("good")})
    d = start_daemon(cfg)
    t0 = time.monotonic()
    result = in_thread(d.chat, "stuck")
    assert wait_until(lambda: states(d).get("stuck") == "starting", 5)
    [entry] = d.running()
    grandchild = wait_until(lambda: re.search(r"forked grandchild pid=(\d+)", logs(d)), 5)
    assert grandchild, logs(d)
    grandchild = int(grandchild.group(1))
    d.child_pids.add(grandchild)
    assert_healthy(d)                                       # the daemon serves while a start hangs
    status, body = result(HEALTH_TIMEOUT + 10)
    elapsed = time.monotonic() - t0
    assert error_of((status, body)) == (502, "upstream_start_failed"), body
    assert body["error"]["message"].startswith(
        f"failed to start model 'stuck': health check did not pass within {HEALTH_TIMEOUT}s"), body
    assert HEALTH_TIMEOUT - 0.5 <= elapsed < HEALTH_TIMEOUT + 1 + 4, elapsed
    assert wait_until(lambda: not pid_alive(entry["pid"]) and not pid_alive(grandchild), 3), \
        "the process group outlived the failed start"
    assert d.running() == []
    assert_healthy(d, "good")


# -- 3. crash mid-stream / mid-generation -------------------------------------------------------------

def test_fault03_crash_mid_stream_error_event_no_done(start_daemon):
    """PROXY-9: a stream cut by a crash ends with an SSE error event and no [DONE]; non-stream gets 502."""
    d = start_daemon(config({"a": model("a")}))
    r = d.request("POST", "/v1/chat/completions?die_after=3", chat_body("a", stream=True))
    assert r.status == 200, r
    events = sse_data(r.body)
    assert len(events) == 4, events                          # three chunks, then the error
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:3])
    err = json.loads(events[-1])["error"]
    assert err["code"] == "upstream_error" and err["type"] == "server_error", err
    assert err["message"].startswith("upstream for model 'a' closed the stream: "), err
    assert b"[DONE]" not in r.body
    assert r.body.endswith(b"\n\n")
    assert wait_until(lambda: d.running() == [], 5), d.running()      # the crash was noticed
    assert_healthy(d, "a")

    status, body = d.json("POST", "/v1/chat/completions?die", chat_body("a"))
    assert status == 502, body
    assert body["error"]["code"] in ("upstream_unreachable", "upstream_error"), body
    assert wait_until(lambda: d.running() == [], 5), d.running()
    assert_healthy(d, "a")


# -- 4. crash while idle ------------------------------------------------------------------------------

def test_fault04_idle_crash_becomes_stopped_then_restarts(start_daemon):
    """PROC-10: an exit while ready gives state stopped; the next request starts the model again."""
    d = start_daemon(config({"a": model("a", "--exit-after", "1.5")}))
    assert d.chat("a")[0] == 200
    [entry] = d.running()
    assert wait_until(lambda: d.running() == [], 8, interval=0.1), d.running()
    assert not pid_alive(entry["pid"])
    text = logs(d)
    assert "a exited unexpectedly (code 1)" in text and "a: ready -> stopped" in text
    assert_healthy(d, "a")
    assert d.running()[0]["pid"] != entry["pid"]


# -- 5. ignores SIGTERM -------------------------------------------------------------------------------

def test_fault05_ignored_sigterm_sigkill_after_grace(start_daemon):
    """PROC-9: SIGTERM is ignored, so SIGKILL follows after unloadTimeout; the stop completes."""
    d = start_daemon(config({"a": model("a", "--ignore-sigterm", unloadTimeout=1)}))
    assert d.chat("a")[0] == 200
    [entry] = d.running()
    t0 = time.monotonic()
    assert d.json("POST", "/api/models/unload/a") == (200, {"msg": "ok"})
    elapsed = time.monotonic() - t0
    assert 0.9 <= elapsed < 4, elapsed
    assert not pid_alive(entry["pid"])
    assert d.running() == []
    assert_healthy(d, "a")


# -- 6. grandchild behind a shell wrapper -------------------------------------------------------------

def test_fault06_shell_wrapper_grandchildren_gone_after_stop(start_daemon):
    """PROC-2/9: sh -> fake -> sleep; the shell dies on TERM, the rest ignore it: the group is killed."""
    inner = fake_cmd("a", "--fork-child", "--ignore-sigterm", respond="from a")
    cfg = config({"a": {"cmd": f'/bin/sh -c "{inner}; echo wrapper-done"', "unloadTimeout": 5}})
    d = start_daemon(cfg)
    assert d.chat("a")[0] == 200
    [entry] = d.running()
    info = d.request("GET", "/upstream/a/info").json()
    pids = [entry["pid"], info["pid"], info["grandchild_pid"]]
    d.child_pids.update(pids)
    assert len(set(pids)) == 3 and info["pgid"] == entry["pid"], (entry, info)
    assert all(pid_alive(p) for p in pids)
    t0 = time.monotonic()
    assert d.json("POST", "/api/models/unload/a") == (200, {"msg": "ok"})
    assert time.monotonic() - t0 < 3, "the leader's exit should end the stop, not the 5 s grace period"
    left = [p for p in pids if pid_alive(p)]
    assert left == [], f"left behind: {left}"
    assert_healthy(d, "a")


# -- 7. port already in use ---------------------------------------------------------------------------

def test_fault07_port_in_use_clear_error_no_hang(start_daemon):
    """Someone else listens on the model's port when it starts: a prompt 502 naming the port and
    the holder, and no health probe ever reaches the squatter (it would hang: it never answers)."""
    cfg = config({"a": model("a")})
    d = start_daemon(cfg)
    port = port_of(cfg, "a")  # taken after the config was loaded, so allocation could not skip it
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen()                      # accepts connections (health checks hang) but never answers
    try:
        t0 = time.monotonic()
        status, body = d.chat("a")
        assert time.monotonic() - t0 < 6, "a start whose port is taken must not wait for the timeout"
        assert error_of((status, body)) == (502, "upstream_start_failed"), body
        msg = body["error"]["message"]
        assert f"port {port} is already in use by pid {os.getpid()}" in msg, msg
        assert d.running() == []
    finally:
        squatter.close()
    assert_healthy(d, "a")


def test_fault07_port_taken_before_startup_is_skipped(start_daemon):
    """A ${PORT} port already taken when the config is loaded is skipped: the model gets the next
    free one and its own child answers."""
    cfg = config({"a": model("a")})
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port_of(cfg, "a")))
    squatter.listen()
    try:
        d = start_daemon(cfg)
        status, body = d.chat("a")
        assert status == 200 and "from a" in json.dumps(body), body
        [running] = d.running()
        assert not running["proxy"].endswith(f":{port_of(cfg, 'a')}"), running
    finally:
        squatter.close()


# -- 8. client aborts mid-stream ----------------------------------------------------------------------

def test_fault08_client_abort_cancels_upstream_others_unaffected(start_daemon):
    """PROXY-7: the upstream connection is closed when the client leaves; a parallel stream completes."""
    d = start_daemon(config({"a": model("a")}))
    assert d.chat("a")[0] == 200
    path = "/v1/chat/completions?wait=0.1&chunks=30"
    other = in_thread(d.request, "POST", path, chat_body("a", stream=True))
    conn, resp = open_stream(d.port, "POST", path, chat_body("a", stream=True))
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")
    assert wait_until(lambda: [m["inflight"] for m in d.running()] == [2], 3), d.running()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert wait_until(lambda: "E fake: client went away after" in logs(d), 3), \
        "the upstream request was not cancelled"
    went = int(re.search(r"client went away after (\d+) chunks", logs(d)).group(1))
    assert went < 30
    r = other()
    assert r.status == 200
    events = sse_data(r.body)
    assert events[-1] == "[DONE]" and len(events) == 32, events
    assert wait_until(lambda: [m["inflight"] for m in d.running()] == [0], 3), d.running()

    # A client that reads slowly still gets everything, in order (back-pressure, PROXY-6).
    conn, resp = open_stream(d.port, "POST", "/v1/chat/completions?chunks=200",
                             chat_body("a", stream=True))
    time.sleep(0.5)
    events = sse_data(resp.read())
    conn.close()
    assert events[-1] == "[DONE]" and len(events) == 202
    assert_healthy(d, "a")


# -- 9. client aborts while queued / while the model starts ---------------------------------------------

def test_fault09_abort_while_queued_frees_slot_and_abandons_swap(start_daemon):
    """SCHED-8: a queued client that leaves frees its slot; the swap it waited for never happens."""
    cfg = config({"a": model("a"), "b": model("b", concurrencyLimit=1)}, scheduler={"maxWait": 60})
    d = start_daemon(cfg)
    assert d.chat("a")[0] == 200
    [a_entry] = d.running()
    stream = in_thread(d.request, "POST", "/v1/chat/completions?wait=0.1&chunks=20",
                       chat_body("a", stream=True))
    assert wait_until(lambda: [m["inflight"] for m in d.running()] == [1], 3)
    body = chat_body("b")
    queued = raw_request(d.port, chat_head("b", body), body)
    # b's one admission slot is taken by the queued client
    assert wait_until(lambda: d.chat("b")[0] == 429, 3)
    abort(queued)
    time.sleep(0.3)
    assert stream().status == 200
    time.sleep(0.5)                                      # the swap would begin now that a is idle
    assert [(m["model"], m["pid"]) for m in d.running()] == [("a", a_entry["pid"])]
    assert "b: stopped -> starting" not in logs(d)
    assert_healthy(d, "b")                               # slot free: admitted, swapped, served


def test_fault09_abort_while_starting_start_completes(start_daemon):
    """SCHED-8: clients leaving during a start never cancel it; the one still waiting is served."""
    d = start_daemon(config({"s": model("s", "--load-delay", "1.5"), "t": model("t", "--load-delay", "1")}))
    body = chat_body("s")
    leaver = raw_request(d.port, chat_head("s", body), body)
    stayer = in_thread(d.chat, "s")
    assert wait_until(lambda: states(d).get("s") == "starting", 5), d.running()
    abort(leaver)
    status, answer = stayer()
    assert status == 200, answer
    # the only waiter leaves: the start still runs to completion and the model idles
    body = chat_body("t")
    lone = raw_request(d.port, chat_head("t", body), body)
    assert wait_until(lambda: states(d).get("t") == "starting", 5), d.running()
    abort(lone)
    assert wait_until(lambda: states(d).get("t") == "ready", 5), d.running()
    assert_healthy(d, "t")


# -- 10. slow log reader ------------------------------------------------------------------------------

def test_fault10_slow_log_reader_dropped_upstream_never_blocks(start_daemon):
    """LOG-7: a reader that stops reading gets a drop marker; the child's stdout never blocks."""
    d = start_daemon(config({"a": model("a")}))
    assert d.chat("a")[0] == 200
    slow = raw_request(d.port, b"GET /logs/stream/a?no-history HTTP/1.1\r\nHost: x\r\n\r\n", rcvbuf=4096)
    time.sleep(0.3)
    t0 = time.monotonic()
    r = d.request("GET", "/upstream/a/spew?bytes=4000000", timeout=20)
    assert r.status == 200, r
    assert time.monotonic() - t0 < 15, "the upstream blocked on its output"
    assert_healthy(d, "a")
    # now read what the slow reader got: some output, then the marker
    slow.settimeout(3)
    got = b""
    deadline = time.monotonic() + 10
    while b"bytes dropped" not in got and time.monotonic() < deadline:
        try:
            chunk = slow.recv(1 << 20)
        except socket.timeout:
            break
        if not chunk:
            break
        got += chunk
        got = got[-(1 << 21):] if b"bytes dropped" not in got else got
    slow.close()
    assert re.search("\n\u2014 \\d+ bytes dropped \u2014\n".encode(), got), got[-300:]


# -- 11. SIGTERM during a start -----------------------------------------------------------------------

def test_fault11_sigterm_during_start_stops_all_exit_0(start_daemon):
    """CLI-9/PROC-13: the start is aborted, waiters get 503, every child is gone, exit 0."""
    cfg = config({"a": model("a", "--fork-child"),
                  "s": model("s", "--load-delay", "30", "--fork-child", "--ignore-sigterm", unloadTimeout=1)},
                 groups={"all": {"swap": False, "members": ["a", "s"]}})
    d = start_daemon(cfg)
    assert d.chat("a")[0] == 200
    waiter = in_thread(d.chat, "s")
    assert wait_until(lambda: states(d).get("s") == "starting", 5), d.running()
    found = wait_until(lambda: re.findall(r"forked grandchild pid=(\d+)", logs(d))[1:] and
                       re.findall(r"forked grandchild pid=(\d+)", logs(d)), 5)
    grandchildren = [int(p) for p in found]
    assert len(grandchildren) == 2, logs(d)
    pids = [m["pid"] for m in d.running()] + grandchildren
    d.child_pids.update(pids)
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert error_of(waiter()) == (503, "shutting_down")
    assert d.wait(1 + 5 + 2) == 0, d.output()
    assert time.monotonic() - t0 < 1 + 5
    assert [p for p in pids if pid_alive(p)] == []
    assert not os.path.exists(d.state_file)


def test_fault11_sigterm_during_swap_with_stream_in_flight(start_daemon):
    """CLI-9 during a swap (the evicted model ignores SIGTERM): the target never starts, its waiter
    gets 503, an in-flight stream ends with an error event (PROXY-9), every child is gone, exit 0."""
    cfg = config({"a": model("a", "--ignore-sigterm", unloadTimeout=3), "b": model("b"),
                  "e": model("e")},
                 groups={"helpers": {"swap": False, "exclusive": False, "persistent": True, "members": ["e"]}})
    d = start_daemon(cfg)
    assert d.chat("a")[0] == 200
    conn, resp = open_stream(d.port, "POST", "/v1/chat/completions?wait=0.2&chunks=100",
                             chat_body("e", stream=True))
    try:
        assert resp.status == 200
        first = resp.readline()
        waiter = in_thread(d.chat, "b")
        assert wait_until(lambda: states(d).get("a") == "stopping", 5), d.running()
        d.record_children()
        pids = [m["pid"] for m in d.running()]
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert error_of(waiter()) == (503, "shutting_down")
        raw = first + resp.read()
    finally:
        conn.close()
    events = sse_data(raw)
    assert b"[DONE]" not in raw and json.loads(events[-1])["error"]["code"] == "upstream_error", events[-2:]
    assert d.wait(3 + 5 + 2) == 0, d.output()
    assert time.monotonic() - t0 < 3 + 5
    assert "b: stopped -> starting" not in d.output()
    assert [p for p in pids if pid_alive(p)] == []


# -- 12. daemon SIGKILLed ------------------------------------------------------------------------------

def test_fault12_sigkilled_daemon_leftovers_killed_at_next_start(start_daemon, tmp_path):
    """PROC-14: the next daemon on the same state file kills the recorded groups, then serves."""
    cfg = config({"a": model("a", "--fork-child", "--ignore-sigterm")})
    first = start_daemon(cfg)
    child, grandchild = sigkill_leaving_children(first, "a")
    assert pid_alive(child) or pid_alive(grandchild), "nothing left: the test would prove nothing"
    assert json.loads(Path(first.state_file).read_text())["children"][0]["pid"] == child

    workdir = tmp_path / "second"
    workdir.mkdir()
    second = Daemon(cfg, workdir)
    second.state_file = first.state_file
    try:
        second.start()
        assert wait_until(lambda: not pid_alive(child) and not pid_alive(grandchild), 2), second.output()
        assert f"killing leftover process group {child}" in second.stdout.text(), second.output()
        assert_healthy(second, "a")
        assert second.running()[0]["pid"] != child
    finally:
        problems = stop_and_clean(second)
    assert not problems, problems


# -- 13. twistd daemon mode ------------------------------------------------------------------------------

_REAPER = r"""
import ctypes, json, os, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
rc = subprocess.call(sys.argv[1:], stdin=subprocess.DEVNULL)
print(json.dumps({"launcher": rc}), flush=True)
while True:
    try:
        pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    print(json.dumps({"pid": pid, "rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses PR_SET_CHILD_SUBREAPER")
def test_fault13_daemon_mode_pidfile_children_exit_0(tmp_path):
    """CLI-9 in daemon mode: pidfile written, serves, SIGTERM stops children, removes pidfile, exit 0.

    The launcher is run under a subreaper, so the daemonized process is reparented to it and its
    exit status can be observed.
    """
    cfg = config({"a": model("a", "--fork-child")})
    d = Daemon(cfg, tmp_path)
    logfile = tmp_path / "llamaswap.log"
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--pidfile", d.pidfile, "--logfile", str(logfile), "llamaswap", "--config", d.config_path,
            "--listen", "tcp:0:interface=127.0.0.1"]
    reaper = subprocess.Popen([sys.executable, "-c", _REAPER, *argv], cwd=tmp_path, env=d.env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              start_new_session=True, bufsize=0)   # unbuffered: select() sees every line
    pid = None
    children: list[int] = []

    def next_event(timeout: float) -> dict | None:
        """The reaper's next line, or None after ``timeout`` (never blocks the test for good)."""
        ready, _, _ = select.select([reaper.stdout], [], [], timeout)
        line = reaper.stdout.readline() if ready else b""
        return json.loads(line) if line else None

    try:
        launched = next_event(30)
        assert launched == {"launcher": 0}, launched
        assert wait_until(lambda: os.path.exists(d.pidfile), 10)
        pid = int(Path(d.pidfile).read_text().strip())
        port = wait_until(lambda: re.search(r"listening on tcp:127\.0\.0\.1:(\d+)",
                                            logfile.read_text() if logfile.exists() else ""), 10)
        assert port, logfile.read_text()
        port = int(port.group(1))
        r = http_request(port, "POST", "/v1/chat/completions", chat_body("a"))
        assert r.status == 200, r
        running = json.loads(http_request(port, "GET", "/running").body)["running"]
        info = json.loads(http_request(port, "GET", "/upstream/a/info").body)
        children = [running[0]["pid"], info["grandchild_pid"]]
        state_file = d.pidfile + ".children.json"                 # CLI-5: beside the pidfile
        assert json.loads(Path(state_file).read_text())["daemon_pid"] == pid
        os.kill(pid, signal.SIGTERM)
        exits = {}
        deadline = time.monotonic() + 15
        while pid not in exits and time.monotonic() < deadline:
            event = next_event(deadline - time.monotonic())
            if event is None:
                break
            exits[event["pid"]] = event["rc"]
        assert exits.get(pid) == 0, (exits, logfile.read_text())
        assert [p for p in children if pid_alive(p)] == []
        assert not os.path.exists(d.pidfile)
        assert not os.path.exists(state_file)
        text = logfile.read_text()
        assert "llamaswap stopped" in text and "Traceback" not in text, text
    finally:
        for p in ([pid] if pid else []) + children:
            if pid_alive(p):
                os.kill(p, signal.SIGKILL)
        try:
            os.killpg(reaper.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reaper.wait(5)


# -- admission and body limits ----------------------------------------------------------------------------

def test_concurrency_limit_429_json_retry_after(start_daemon):
    """SCHED-1: over concurrencyLimit -> 429 concurrency_limit, JSON, Retry-After: 1."""
    d = start_daemon(config({"a": model("a", concurrencyLimit=1)}))
    conn, resp = open_stream(d.port, "POST", "/v1/chat/completions?wait=0.1&chunks=10",
                             chat_body("a", stream=True))
    try:
        assert resp.status == 200
        r = d.request("POST", "/v1/chat/completions", chat_body("a"))
        assert r.status == 429, r
        assert r.headers["Retry-After"] == "1"
        assert r.headers["Content-Type"] == "application/json"
        err = r.json()["error"]
        assert err["code"] == "concurrency_limit" and err["message"] == \
            "too many requests for model 'a' (limit 1)", err
        assert sse_data(resp.read())[-1] == "[DONE]"
    finally:
        conn.close()
    assert_healthy(d, "a")


def test_request_too_large_413_while_received(start_daemon):
    """CFG-28: a body over maxRequestBody gets 413 before it has been sent whole; no model starts."""
    d = start_daemon(config({"a": model("a")}, maxRequestBody="64KiB"))
    declared = 10 * 1024 * 1024
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    s = raw_request(d.port, head, b'{"model":"a","x":"' + b"y" * 100_000)
    got = b""
    while True:                             # the answer comes although 10 MiB were announced
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        got += chunk
    s.close()
    assert got.startswith(b"HTTP/1.1 413 "), got[:200]
    body = json.loads(got.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_too_large", body

    # the same with a chunked body and no declared length
    s = raw_request(d.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n")
    got = b""
    try:
        for _ in range(20):
            s.sendall(b"8000\r\n" + b"z" * 0x8000 + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    s.close()
    assert got.startswith(b"HTTP/1.1 413 "), got[:200]
    assert d.running() == []
    assert "a: stopped -> starting" not in logs(d)
    assert_healthy(d, "a")
