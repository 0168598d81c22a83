"""Load generation for the benchmarks: raw sockets, no HTTP library in the measured path.

* :class:`SyncClient`: one keep-alive connection, blocking ``socket`` calls (c=1 latency,
  stream timing: the least overhead Python can have per request).
* :func:`throughput`: N asyncio connections issuing requests back to back for T seconds.
* :func:`run_streams`: N concurrent (slow) streams, each on its own connection.
* :func:`wrk_throughput`: the same as :func:`throughput` with ``wrk`` (C, when installed).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any, Optional

CHAT_BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def chat_request(model: str, stream: bool = False, path: bytes = b"/v1/chat/completions",
                 close: bool = False) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    data = json.dumps(body, separators=(",", ":")).encode()
    return (b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(data)).encode() + b"\r\n"
            + (b"Connection: close\r\n" if close else b"") + b"\r\n" + data)


class HTTPError(Exception):
    pass


# -- synchronous ------------------------------------------------------------------------------------

class SyncClient:
    """One keep-alive HTTP/1.1 connection with blocking sockets."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 60.0) -> None:
        self.addr = (host, port)
        self.timeout = timeout
        self.sock: Optional[socket.socket] = None
        self.buf = b""

    def _connect(self) -> None:
        self.sock = socket.create_connection(self.addr, timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _recv(self) -> bytes:
        data = self.sock.recv(262144)
        if not data:
            raise HTTPError("connection closed")
        return data

    def request(self, raw: bytes, on_chunk=None) -> dict:
        """Send ``raw``; return status, headers, body, t_sent, t_first (first byte), t_end.

        ``on_chunk(data, t)`` sees every chunk of a chunked body as it arrives.
        """
        if self.sock is None:
            self._connect()
        t_sent = time.monotonic()
        self.sock.sendall(raw)
        buf = self.buf
        t_first = None
        while b"\r\n\r\n" not in buf:
            data = self._recv()
            if t_first is None:
                t_first = time.monotonic()
            buf += data
        if t_first is None:
            t_first = time.monotonic()
        end = buf.index(b"\r\n\r\n")
        head, buf = buf[:end], buf[end + 4:]
        status = int(head[9:12])
        lower = head.lower()
        m = re.search(rb"\r\ncontent-length:\s*(\d+)", lower)
        body = b""
        if m:
            n = int(m.group(1))
            while len(buf) < n:
                buf += self._recv()
            body, buf = buf[:n], buf[n:]
        elif b"\r\ntransfer-encoding: chunked" in lower:
            parts = []
            while True:
                while b"\r\n" not in buf:
                    buf += self._recv()
                line, _, buf = buf.partition(b"\r\n")
                size = int(line.split(b";")[0], 16)
                while len(buf) < size + 2:
                    buf += self._recv()
                chunk, buf = buf[:size], buf[size + 2:]
                if size == 0:
                    break
                if on_chunk is not None:
                    on_chunk(chunk, time.monotonic())
                parts.append(chunk)
            body = b"".join(parts)
        else:  # until close
            parts = [buf]
            buf = b""
            while True:
                data = self.sock.recv(262144)
                if not data:
                    break
                parts.append(data)
            body = b"".join(parts)
            self.close()
        self.buf = buf
        if b"\r\nconnection: close" in lower:
            self.close()
        return {"status": status, "head": head, "body": body, "t_sent": t_sent, "t_first": t_first,
                "t_end": time.monotonic()}


def header(head: bytes, name: bytes) -> Optional[bytes]:
    m = re.search(rb"\r\n" + re.escape(name) + rb":\s*([^\r\n]*)", head, re.I)
    return m.group(1).strip() if m else None


# -- asyncio --------------------------------------------------------------------------------------------

async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    i = lower.find(b"\r\ncontent-length:")
    if i >= 0:
        j = lower.find(b"\r\n", i + 2)
        body = await reader.readexactly(int(lower[i + 17:j]))
        return status, body
    if b"transfer-encoding: chunked" in lower:
        parts = []
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line[:-2].split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                return status, b"".join(parts)
            parts.append(data[:-2])
    return status, await reader.read()


async def _worker(port: int, raw: bytes, deadline: float, counts: dict, latencies: list) -> None:
    reader = writer = None
    while time.monotonic() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t0 = time.monotonic()
            writer.write(raw)
            status, _ = await _read_response(reader)
            latencies.append(time.monotonic() - t0)
            if status == 200:
                counts["ok"] += 1
            else:
                counts["errors"] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            counts["errors"] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def _throughput(port: int, raw: bytes, concurrency: int, duration: float, warmup: float) -> dict:
    if warmup > 0:
        await asyncio.gather(*[_worker(port, raw, time.monotonic() + warmup, {"ok": 0, "errors": 0}, [])
                               for _ in range(concurrency)])
    counts = {"ok": 0, "errors": 0}
    latencies: list = []
    t0 = time.monotonic()
    await asyncio.gather(*[_worker(port, raw, t0 + duration, counts, latencies) for _ in range(concurrency)])
    elapsed = time.monotonic() - t0
    return {"requests": counts["ok"], "errors": counts["errors"], "seconds": elapsed,
            "rps": counts["ok"] / elapsed, "tool": "python-asyncio"}


def throughput(port: int, raw: bytes, concurrency: int, duration: float, warmup: float = 0.5) -> dict:
    """Requests/s of ``concurrency`` keep-alive connections sending ``raw`` back to back."""
    return asyncio.run(_throughput(port, raw, concurrency, duration, warmup))


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = %s
wrk.headers["Content-Type"] = "application/json"
"""


def wrk_path() -> Optional[str]:
    return shutil.which("wrk")


def wrk_throughput(port: int, model: str, concurrency: int, duration: float, threads: int = 1) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % json.dumps(body))
        script = f.name
    try:
        out = subprocess.run(
            [wrk_path(), "-t", str(threads), "-c", str(concurrency), "-d", f"{max(1, int(duration))}s",
             "-s", script, f"http://127.0.0.1:{port}/v1/chat/completions"],
            capture_output=True, text=True, timeout=duration + 30).stdout
    finally:
        os.unlink(script)
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    n = re.search(r"(\d+) requests in ([\d.]+)s", out)
    errs = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    sockerr = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(errs.group(1)) if errs else 0
    if sockerr:
        errors += sum(int(x) for x in sockerr.groups())
    return {"requests": int(n.group(1)) if n else 0, "errors": errors,
            "seconds": float(n.group(2)) if n else duration, "rps": float(m.group(1)) if m else 0.0,
            "tool": "wrk"}


def _tally(result: dict, ok: bool, why: str = "") -> None:
    """Count one stream in ``result``: ok, or an error and why."""
    if ok:
        result["ok"] += 1
    else:
        result["errors"] += 1
        result.setdefault("why", []).append(why)


async def _one_stream(port: int, raw: bytes, result: dict, sem: Optional[asyncio.Semaphore]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        _tally(result, False, f"connect: {e}")
        return
    try:
        writer.write(raw)
        status, body = await _read_response(reader)
        _tally(result, status == 200 and body.endswith(b"data: [DONE]\n\n"), f"status {status}: {body[:200]!r}")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        _tally(result, False, f"{type(e).__name__}: {e}")
    finally:
        writer.close()


async def _started(n: int, ramp: float, timeout: float, one: Any) -> dict:
    """``n`` concurrent ``one(result)`` coroutines started over ``ramp`` seconds; ``result``
    counts ok and errors (those not done within ``timeout`` as errors), with up to five ``why``."""
    result: dict = {"ok": 0, "errors": 0}
    tasks = []
    for i in range(n):
        tasks.append(asyncio.ensure_future(one(result)))
        if ramp > 0:
            await asyncio.sleep(ramp / n)
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    result["errors"] += len(pending)
    result["why"] = result.get("why", [])[:5]
    return result


async def _streams(port: int, raw: bytes, n: int, ramp: float, timeout: float) -> dict:
    return await _started(n, ramp, timeout, lambda result: _one_stream(port, raw, result, None))


async def _timed_stream(port: int, raw: bytes, send_times: Any, lags: list, result: dict) -> None:
    """One stream, each complete SSE event timed when the read that completed it returned."""
    writer = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        chunked = b"transfer-encoding: chunked" in head.lower()
        framed, body, done, seen_done = b"", b"", False, False
        while not done:
            data = await reader.read(65536)
            t = time.monotonic()
            if not data:
                break
            if chunked:
                framed += data
                while True:  # every complete chunk of the transfer coding
                    eol = framed.find(b"\r\n")
                    if eol < 0:
                        break
                    size = int(framed[:eol].split(b";")[0], 16)
                    if len(framed) < eol + 2 + size + 2:
                        break
                    body += framed[eol + 2:eol + 2 + size]
                    framed = framed[eol + 4 + size:]
                    if size == 0:
                        done = True
                        break
            else:
                body += data
            *events, body = body.split(b"\n\n")
            for event in events:
                lags.extend(t - sent for sent in send_times(event))
                if event.strip() == b"data: [DONE]":
                    seen_done = True
                    done = done or not chunked
        _tally(result, status == 200 and seen_done, f"status {status}, [DONE] {'seen' if seen_done else 'missing'}")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        _tally(result, False, f"{type(e).__name__}: {e}")
    finally:
        if writer is not None:
            writer.close()


async def _timed_streams(port: int, raw: bytes, n: int, send_times: Any, ramp: float, timeout: float) -> dict:
    lags: list = []
    result = await _started(n, ramp, timeout, lambda r: _timed_stream(port, raw, send_times, lags, r))
    result["lags"] = lags
    return result


def run_timed_streams(port: int, raw: bytes, n: int, send_times: Any, ramp: float = 0.0,
                      timeout: float = 120.0) -> dict:
    """``n`` concurrent streams, one connection each, started over ``ramp`` seconds: ok, errors and
    ``lags``, every event's one-way delay (its arrival minus ``send_times(event)``, the upstream's
    own stamps, on the same monotonic clock)."""
    return asyncio.run(_timed_streams(port, raw, n, send_times, ramp, timeout))


def run_streams(port: int, raw: bytes, n: int, ramp: float = 0.0, timeout: float = 120.0) -> dict:
    """``n`` concurrent streams, one connection each; counts complete ones and errors."""
    return asyncio.run(_streams(port, raw, n, ramp, timeout))


def percentile(values: list, p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
