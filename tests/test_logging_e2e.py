"""Logging through the real daemon: ``logToStdout`` picks what reaches the twistd
log (LOG-6), ``logLevel`` filters what is stored and logged (LOG-4), and the combined
history does not depend on either (LOG-1).

The daemon runs with ``-n --logfile=-``, so its stdout is the twistd log.

``/logs`` gets child output as whole lines prefixed with the model id, so a line a child
writes in pieces is never split by the proxy's own lines; ``/logs/stream/<id>`` stays raw.
"""
from __future__ import annotations

import re
import shlex
import sys

import pytest

from tests.daemon import Daemon, fake_config as config, fake_model as model, open_stream, stop_and_clean, wait_until

PROXY_LINE = re.compile(r"alpha: stopped -> starting")
CHILD_LINE = re.compile(r"\[alpha\] main: server is listening on http://127\.0\.0\.1:\d+")


def run(tmp_path, **top):
    """Start a daemon with one model, load it, answer one request; return (stdout, /logs)."""
    d = Daemon(config({"alpha": model("alpha")}, **top), tmp_path)
    d.start()
    try:
        status, body = d.json("POST", "/api/models/load/alpha")
        assert status == 200, body
        d.record_children()
        status, _ = d.chat("alpha")
        assert status == 200
        history = d.request("GET", "/logs").text
        # the twistd log gets child lines as they arrive: wait for the startup line if expected
        wait_until(lambda: CHILD_LINE.search(d.stdout.text()), 2 if top.get("logToStdout") in
                   ("upstream", "both") else 0.3)
    finally:
        problems = stop_and_clean(d)
    assert not problems, problems
    return d.stdout.text(), history


@pytest.mark.parametrize("to_stdout,proxy,child", [
    ("proxy", True, False), ("upstream", False, True), ("both", True, True), ("none", False, False)])
def test_log_to_stdout(tmp_path, to_stdout, proxy, child):
    """LOG-6: proxy messages and/or child lines ('[<id>] <line>') in the twistd log, as
    logToStdout says; /logs has both whatever it says (LOG-1)."""
    stdout, history = run(tmp_path, logToStdout=to_stdout)
    assert bool(PROXY_LINE.search(stdout)) == proxy, stdout
    assert bool(CHILD_LINE.search(stdout)) == child, stdout
    # Twisted's own messages and the listening line always go to the twistd log.
    assert "llamaswap 0.1.0 listening on tcp:127.0.0.1:" in stdout or "listening on tcp:" in stdout
    assert "[INFO] alpha: stopped -> starting" in history
    assert "main: server is listening on http://127.0.0.1:" in history
    assert re.search(r'\[INFO\] Request 127\.0\.0\.1 "POST /v1/chat/completions HTTP/1\.1" 200 \d+ '
                     r'"[^"]*" \d+\.\d{3}s', history), history


def test_log_level_warn(tmp_path):
    """LOG-4: below logLevel nothing is stored (no INFO, access lines included) or logged;
    WARN lines still are; child output is never filtered (LOG-3)."""
    stdout, history = run(tmp_path, logLevel="warn", notAKey=1)
    assert "[INFO]" not in history, history
    assert "Request 127.0.0.1" not in history
    assert "[WARN] config: unknown key 'notAKey' (ignored)" in history, history
    assert "main: server is listening on http://127.0.0.1:" in history
    assert not PROXY_LINE.search(stdout), stdout
    assert "unknown key 'notAKey'" in stdout


def test_log_level_debug(tmp_path):
    """LOG-4: with logLevel debug, INFO and DEBUG lines are stored as '[LEVEL] message' (and
    child lines as '[alpha] line')."""
    _, history = run(tmp_path, logLevel="debug")
    assert "[INFO] alpha: stopped -> starting" in history
    assert all(re.match(r"\[(DEBUG|INFO|WARN|ERROR|alpha)\] ", line) for line in history.splitlines()
               if line.startswith("[") and not line.startswith("[ui]")), history


TIMING = ("slot print_timing: id  0 | task 1 | prompt eval time =     250.00 ms /    25 tokens"
          " (  10.00 ms per token,   100.00 tokens per second)")
ACCESS = '"POST /v1/chat/completions HTTP/1.1" 200'
LINE_START = re.compile(r"\[(alpha|dies|DEBUG|INFO|WARN|ERROR)\] ")
SPLICED = re.compile(r".\[(alpha|dies|DEBUG|INFO|WARN|ERROR)\] ")  # a line start inside a line


def read_stream_until(port, path, needle, timeout=10.0):
    """The bytes of a never-ending log stream, read until ``needle`` shows up."""
    conn, resp = open_stream(port, "GET", path, timeout=timeout)
    data = b""
    try:
        while needle not in data:
            chunk = resp.read1(65536)
            if not chunk:
                break
            data += chunk
    finally:
        conn.close()
    return data


def test_child_lines_whole_and_prefixed(tmp_path):
    """A child line written in pieces, with the proxy's access line logged between them,
    reaches /logs whole as '[<id>] <line>'; the model's own stream keeps the raw bytes; a
    last line without a newline is flushed when its child exits."""
    no_newline = "import sys; sys.stderr.write('dying words without a newline'); sys.exit(3)"
    d = Daemon(config({
        "alpha": model("alpha", "--split-log-lines", "0.5"),
        "dies": {"cmd": f"{shlex.quote(sys.executable)} -c {shlex.quote(no_newline)}",
                 "proxy": "http://127.0.0.1:9"},
    }), tmp_path)
    d.start()
    try:
        status, body = d.json("POST", "/api/models/load/alpha")
        assert status == 200, body
        d.record_children()
        status, _ = d.chat("alpha")  # the fake writes its line in 3 pieces, 0.5 s apart
        assert status == 200
        assert wait_until(lambda: TIMING in d.request("GET", "/logs").text, 10)
        assert d.json("POST", "/api/models/load/dies")[0] >= 400
        assert wait_until(lambda: "dying words" in d.request("GET", "/logs").text, 10)
        history = d.request("GET", "/logs").text
        raw = read_stream_until(d.port, "/logs/stream/alpha", TIMING.encode()).decode()
    finally:
        problems = stop_and_clean(d)
    assert not problems, problems
    lines = history.splitlines()
    assert [line for line in lines if "print_timing" in line] == [f"[alpha] {TIMING}"], history
    access = [i for i, line in enumerate(lines) if ACCESS in line]
    assert len(access) == 1 and lines[access[0]].startswith("[INFO] Request 127.0.0.1 "), history
    assert "[alpha] main: server is listening on http://127.0.0.1:" in history
    assert "[dies] dying words without a newline\n" in history
    assert not [line for line in lines if SPLICED.search(line)], history
    assert all(LINE_START.match(line) for line in lines if "main: " in line or "srv " in line), history
    assert f"\n{TIMING}\n" in raw and "[alpha]" not in raw, raw
