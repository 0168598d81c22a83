"""Helpers for tests that run real processes: the llamaswap daemon and the fake upstream.

Plain stdlib (subprocess, threads, http.client), so the tests that use them are
ordinary pytest functions and need no reactor.

* :class:`Daemon` starts ``twistd -n llamaswap`` the way users do, on
  ``tcp:0:interface=127.0.0.1``, reads the bound port from the listening line
  (CLI-7), and stops it with SIGTERM. Teardown kills whatever is left (the
  daemon's own process group, and every child recorded in its state file or
  seen by the test) so that no test leaves processes behind.
* :class:`FakeServer` runs ``tests/fake_llama_server.py`` on its own.
* :func:`fake_cmd` builds a model ``cmd`` that runs the fake upstream.
* :func:`http_request` / :func:`http_json` are small http.client wrappers.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

REPO_ROOT = Path(__file__).resolve().parent.parent
FAKE = REPO_ROOT / "tests" / "fake_llama_server.py"
LISTENING = re.compile(rb"listening on tcp:127\.0\.0\.1:(\d+)")


# -- processes and ports ----------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie (a zombie has exited; only its parent can reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (FileNotFoundError, IndexError):
        return sys.platform != "linux"


def _is_test_process(pid: int) -> bool:
    """True if pid is alive and runs the fake upstream (or its grandchild ``sleep``)."""
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return sys.platform != "linux"
    return b"fake_llama_server" in cmdline or cmdline.startswith(b"sleep\0") or b"setpriv" in cmdline \
        or b"setsid" in cmdline


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll predicate until it returns something truthy; return it, or the last value on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def free_port_range(n: int = 8) -> int:
    """A base port P such that P..P+n-1 could all be bound on 127.0.0.1 just now."""
    try:   # stay below the ephemeral range, where outgoing connections take their ports
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    top = low - n if low - n > 12000 else 60000 - n
    for _ in range(200):
        base = random.randint(10000, top)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range found")


def free_port() -> int:
    """A port that could be bound on 127.0.0.1 just now (bind to 0, close)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_cmd(model: str, *extra: str, respond: str | None = None, port: str = "${PORT}") -> str:
    """A model ``cmd`` running the fake upstream as ``<python> fake_llama_server.py --port ${PORT} ...``."""
    argv = [sys.executable, str(FAKE), "--port", port, "--model", model]
    if respond is not None:
        argv += ["--respond", respond]
    argv += list(extra)
    # ${PORT} must stay unquoted text for the macro; shlex.quote would keep it literal anyway.
    return " ".join(a if a == port else shlex.quote(a) for a in argv)


def write_config(directory: str | os.PathLike, config: dict[str, Any] | str, name: str = "config.yaml") -> str:
    """Write a config (a dict is written as JSON, which is valid YAML) and return its path."""
    path = Path(directory) / name
    path.write_text(config if isinstance(config, str) else json.dumps(config, indent=1))
    return str(path)


# -- configs of fake-upstream models, and reading their answers ------------------------------------

HEALTH_TIMEOUT = 15          # CFG-10: the smallest value the daemon accepts


def fake_model(model_id: str, *extra: str, respond: str | None = None, **keys: Any) -> dict[str, Any]:
    """A model entry whose cmd runs the fake upstream answering ``from <id>`` (or ``respond``)."""
    return {"cmd": fake_cmd(model_id, *extra, respond=respond or f"from {model_id}"), **keys}


def fake_config(models: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A config with a fresh port range, a 15 s health timeout and a 2 s grace period."""
    return {"healthCheckTimeout": HEALTH_TIMEOUT, "startPort": free_port_range(len(models) + 2),
            "unloadTimeout": 2, "models": models, **top}


def port_of(cfg: dict[str, Any], model_id: str) -> int:
    """The ${PORT} of a model (MAC-5: ids in code-point order from startPort)."""
    ids = sorted(m for m, v in cfg["models"].items() if "${PORT}" in v["cmd"])
    return cfg["startPort"] + ids.index(model_id)


def error_of(status_body: tuple[int, Any]) -> tuple[int, str]:
    """(status, error code) of a (status, JSON body) answer, checking the error's shape."""
    status, body = status_body
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return status, body["error"]["code"]


def sse_data(raw: bytes) -> list[str]:
    """The payloads of the ``data:`` lines of an SSE body."""
    return [line[len(b"data: "):].decode() for line in raw.split(b"\n") if line.startswith(b"data: ")]


class _Collector:
    """Reads a pipe in a thread, keeping everything; lets callers wait for a regex."""

    def __init__(self, stream: Any) -> None:
        self.data = b""
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: Any) -> None:
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            with self._cond:
                if not chunk:
                    self._closed = True
                    self._cond.notify_all()
                    return
                self.data += chunk
                self._cond.notify_all()

    def wait_for(self, pattern: re.Pattern[bytes], timeout: float) -> re.Match[bytes] | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = pattern.search(self.data)
                if m or self._closed:
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


# -- HTTP -------------------------------------------------------------------------------------------

class Response:
    def __init__(self, status: int, reason: str, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.reason, self.headers, self.body = status, reason, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:500]!r}>"


def http_request(port: int, method: str, path: str, body: bytes | str | dict | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 30) -> Response:
    """One request on a fresh connection; a dict body is sent as JSON."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode("utf-8")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, resp.reason, resp.headers, resp.read())
    finally:
        conn.close()


def http_json(port: int, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
    """(status, parsed JSON body) of one request."""
    r = http_request(port, method, path, body, **kw)
    try:
        return r.status, r.json()
    except ValueError:
        raise AssertionError(f"{method} {path}: not JSON: {r!r}") from None


def open_stream(port: int, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None, timeout: float = 30
                ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Send a request and return (connection, response) with the body still unread."""
    if isinstance(body, dict):
        body = json.dumps(body).encode("utf-8")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(method, path, body=body, headers=headers or {})
    return conn, conn.getresponse()


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """Encode a multipart/form-data body; returns (body, content type)."""
    boundary = "----llamaswaptest%016x" % random.getrandbits(64)
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                     + value.encode() + b"\r\n")
    for name, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                     f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
                     + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


# -- the daemon -------------------------------------------------------------------------------------

class Daemon:
    """``twistd -n llamaswap`` as a child process, on an ephemeral port.

    :param config: a dict (written as JSON) or YAML text.
    :param workdir: a per-test directory for the config, pidfile and state file.
    """

    start_timeout = 20.0

    def __init__(self, config: dict[str, Any] | str, workdir: str | os.PathLike | None = None,
                 extra_args: Iterable[str] = (), env: dict[str, str] | None = None,
                 listen: str = "tcp:0:interface=127.0.0.1") -> None:
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="llamaswap-e2e-"))
        self.config_path = write_config(self.workdir, config)
        self.pidfile = str(self.workdir / "twistd.pid")
        self.state_file = str(self.workdir / "children.json")
        self.extra_args = list(extra_args)
        self.listen = listen
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.child_pids: set[int] = set()   # every upstream pid the test saw; checked/killed at the end
        self.returncode: int | None = None

    # lifecycle

    def argv(self) -> list[str]:
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                "--pidfile", self.pidfile, "--logfile=-", "llamaswap", "--config", self.config_path,
                "--listen", self.listen, "--state-file", self.state_file,
                *self.extra_args]

    def spawn(self) -> "Daemon":
        """Start the process without waiting for the listener."""
        self.proc = subprocess.Popen(self.argv(), cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.stdout = _Collector(self.proc.stdout)
        self.stderr = _Collector(self.proc.stderr)
        return self

    def start(self) -> "Daemon":
        """Start and wait for ``llamaswap <version> listening on tcp:127.0.0.1:<port>``."""
        self.spawn()
        m = self.stdout.wait_for(LISTENING, self.start_timeout)
        if m is None:
            self.kill()
            raise AssertionError(f"daemon did not report its listening port\n{self.output()}")
        self.port = int(m.group(1))
        self.wait_serving()
        return self

    def wait_serving(self) -> None:
        """Wait until the daemon answers a request. The listening line is logged before the
        reactor runs, and a SIGTERM before then gets the default action (exit -15), not our
        orderly shutdown; an answered request means the reactor and its handlers are up."""
        status = http_request(self.port, "GET", "/health").status
        assert status == 200, f"GET /health answered {status}\n{self.output()}"

    def wait(self, timeout: float) -> int | None:
        """Wait for exit; the exit code, or None if still running."""
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.stdout.join(2)
        self.stderr.join(2)
        return self.returncode

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then wait for the exit; returns the exit code (None if it did not exit)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.record_children()
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def stop_clean(self) -> None:
        """Stop, assert the daemon exited 0 (its output in the message), and kill what is left."""
        try:
            rc = self.stop()
            assert rc == 0, self.output()
        finally:
            self.kill()

    def kill(self) -> None:
        """Backstop: SIGKILL the daemon's process group and every child group it recorded or we saw."""
        if self.proc is None:
            return
        pgids = set(self._state_file_pgids())
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.wait(5)
        for pgid in pgids | self.child_pids:
            if not _is_test_process(pgid):
                continue                      # gone, or the pid was reused by something else
            for kill in (os.killpg, os.kill):
                try:
                    kill(pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def _state_file_pgids(self) -> list[int]:
        try:
            with open(self.state_file) as f:
                data = json.load(f)
            return [int(c.get("pgid") or c["pid"]) for c in data.get("children", [])]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def output(self) -> str:
        """Everything the daemon printed, for failure messages."""
        out = self.stdout.text() if self.proc else ""
        err = self.stderr.text() if self.proc else ""
        return f"--- daemon stdout ---\n{out}\n--- daemon stderr ---\n{err}\n--- rc={self.returncode}"

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        try:
            self.stop()
        finally:
            self.kill()

    # HTTP

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> Response:
        assert self.port is not None
        return http_request(self.port, method, path, body, **kw)

    def json(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        assert self.port is not None
        return http_json(self.port, method, path, body, **kw)

    def chat(self, model: str, content: str = "hello", **extra: Any) -> tuple[int, Any]:
        """POST /v1/chat/completions (non-streaming); (status, JSON)."""
        return self.json("POST", "/v1/chat/completions",
                         {"model": model, "messages": [{"role": "user", "content": content}], **extra})

    def running(self) -> list[dict[str, Any]]:
        """GET /running's list; records every pid seen."""
        status, body = self.json("GET", "/running")
        assert status == 200, body
        self.record_children(body["running"])
        return body["running"]

    def running_ids(self) -> list[str]:
        return [m["model"] for m in self.running()]

    def record_children(self, running: list[dict[str, Any]] | None = None) -> None:
        """Remember child pids (from /running and the state file) so the end of a test can check them."""
        if running is None and self.port is not None and self.proc and self.proc.poll() is None:
            try:
                status, body = http_json(self.port, "GET", "/running", timeout=5)
                running = body.get("running", []) if status == 200 else []
            except (OSError, AssertionError, http.client.HTTPException):
                running = []
        for m in running or []:
            if isinstance(m.get("pid"), int):
                self.child_pids.add(m["pid"])
        self.child_pids.update(self._state_file_pgids())

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


# -- one HTTP server as a child process: the fake upstream on its own, a real llama-server ------------

HTTP_LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")


class ChildServer:
    """``argv`` as a child process in a session of its own, its stdout and stderr collected; its
    port is read from the ``listening on http://127.0.0.1:<port>`` line it prints on stderr."""

    name = "server"                 # for failure messages
    listen_timeout = 10.0

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.stdout = _Collector(self.proc.stdout)
        self.stderr = _Collector(self.proc.stderr)
        self.port: int | None = None

    def wait_listening(self, timeout: float | None = None) -> int:
        """The port from the listening line (``listen_timeout`` unless given)."""
        m = self.stderr.wait_for(HTTP_LISTENING, self.listen_timeout if timeout is None else timeout)
        assert m, f"{self.name} did not start: rc={self.proc.poll()}\n{self.stderr.text()}"
        self.port = int(m.group(1))
        return self.port

    def wait(self, timeout: float = 10) -> int | None:
        """Wait for exit; the exit code, or None if it is still running."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Backstop: SIGKILL the process group."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.wait(5)


class FakeServer(ChildServer):
    """``fake_llama_server.py`` as a child process (for testing the fake itself)."""

    name = "fake"

    def __init__(self, *args: str, port: int = 0) -> None:
        super().__init__([sys.executable, str(FAKE), "--port", str(port), *args])

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> Response:
        assert self.port is not None
        return http_request(self.port, method, path, body, **kw)


def stop_and_clean(d: "Daemon", strict: bool = False) -> list[str]:
    """SIGTERM the daemon (if it still runs), then SIGKILL whatever is left; return what went
    wrong: an exit status other than 0, or children alive after it stopped (CLI-9). With
    ``strict``, a daemon that had exited already must have exited with 0 too.

    The daemon's output is printed so that pytest shows it with any failure.
    """
    problems = []
    try:
        if d.proc is not None and (strict or d.proc.poll() is None):
            rc = d.stop()
            if rc != 0:
                problems.append(f"daemon exit status after SIGTERM: {rc} (expected 0)")
        left = sorted(p for p in d.child_pids if pid_alive(p))
        if left:
            problems.append(f"children alive after the daemon stopped: {left}")
    finally:
        d.kill()
        print(d.output())
    return problems


def sigkill_leaving_children(d: "Daemon", model_id: str) -> tuple[int, int]:
    """Load ``model_id`` (a fake run with ``--fork-child``), then SIGKILL the daemon, leaving its
    child behind; return (the child's pid, the pid of the grandchild it forked)."""
    assert d.chat(model_id)[0] == 200
    [entry] = d.running()
    grandchild = d.request("GET", f"/upstream/{model_id}/info").json()["grandchild_pid"]
    d.child_pids.add(grandchild)
    os.kill(d.proc.pid, signal.SIGKILL)
    assert d.wait(10) == -signal.SIGKILL
    return entry["pid"], grandchild


def in_thread(fn, *args: Any, **kw: Any):
    """Run fn in a thread; the returned callable joins it and gives its result (or raises)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kw)
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def result(timeout: float = 30) -> Any:
        t.join(timeout)
        assert not t.is_alive(), "request did not finish"
        if "error" in box:
            raise box["error"]
        return box["value"]
    return result
