"""Benchmarks: llamaswap side by side with the upstream itself and, optionally, another proxy.

::

    python bench/run.py [--quick | --smoke] [--name NAME] [--only SCENARIO,...]
                        [--compare-cmd "/path/to/llama-swap -config {config} -listen 127.0.0.1:{port}"]
                        [--upstream-cmd /path/to/fakeupstream]

Every scenario runs against (a) the upstream directly, (b) llamaswap (``twistd -n llamaswap``
from this checkout) and (c) the ``--compare-cmd`` proxy when given (``{config}`` is replaced by
a llama-swap config file, ``{port}`` by a free port), in the same run on the same upstream.
It prints a table and writes ``bench/results/<name>.json``.

The proxy-overhead scenarios (latency, throughput, streams) use ``bench/upstream.py`` (a raw-asyncio
llama-server stand-in), or the command given with ``--upstream-cmd`` (run with ``--port N``
appended; any server that answers ``/health`` and streams SSE chunks stamped with ``"t"``
(monotonic seconds) or ``"bench_t"`` (monotonic ns), such as a Go stand-in, which adds less
delay of its own so that the "added" figures are not flattered). "direct" is one such
process, and each proxy runs its own copy as its model ``m``. The scenarios that start and
stop models run ``bench/upstream.py`` as the model's ``cmd``, and the real-server ones run
llama.cpp's ``llama-server`` on the tiny models.

llamaswap runs from bytecode written first (``compile_bytecode``), as an installed copy does.

The proxy CPU figures are the daemon's user + system time from ``/proc/<pid>/stat`` over a
measured run, divided by the requests (or streamed chunks) it served in that run.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import re
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402
from loadgen import SyncClient, chat_request, header, percentile  # noqa: E402

UPSTREAM = HERE / "upstream.py"
LISTENING = re.compile(rb"listening on tcp:127\.0\.0\.1:(\d+)")
UP_LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")

SCENARIOS = ["loadgen_ceiling", "latency_c1", "throughput_c32", "stream_500", "readiness", "swap",
             "mixed_load", "memory_packing", "streams_200", "streams_1000", "idle_rss_10_models", "real_llama", "router_mode",
             "kv_cache"]

# name: (quick, full, smoke) parameters
PROFILES = {
    "full": dict(lat_n=3000, tp_seconds=8, tp_conc=32, stream_n=20, stream_chunks=500, stream_delay=0.002,
                 ready_n=10, ready_delay=0.3, swap_n=10, mixed_load=2.0, mixed_per_client=5, mixed_wait=10.0,
                 slow_n=1000, slow_chunks=20, slow_delay=0.25, real_n=10, own_n=7, warm_n=50, ramp=1.0, settle=1.0,
                 pack_n=400, pack_scale=1.0, conc_n=200, conc_chunks=80, conc_delay=0.05, conc_ramp=1.0),
    "quick": dict(lat_n=1000, tp_seconds=4, tp_conc=32, stream_n=8, stream_chunks=500, stream_delay=0.002,
                  ready_n=5, ready_delay=0.3, swap_n=6, mixed_load=1.0, mixed_per_client=3, mixed_wait=5.0,
                  slow_n=1000, slow_chunks=10, slow_delay=0.2, real_n=6, own_n=5, warm_n=20, ramp=1.0, settle=1.0,
                  pack_n=200, pack_scale=1.0, conc_n=200, conc_chunks=40, conc_delay=0.05, conc_ramp=1.0),
    "smoke": dict(lat_n=30, tp_seconds=1, tp_conc=4, stream_n=2, stream_chunks=20, stream_delay=0.001,
                  ready_n=1, ready_delay=0.1, swap_n=2, mixed_load=0.1, mixed_per_client=1, mixed_wait=1.0,
                  slow_n=20, slow_chunks=3, slow_delay=0.05, real_n=1, own_n=1, warm_n=2, ramp=0.05, settle=0.1,
                  pack_n=12, pack_scale=0.1, conc_n=10, conc_chunks=5, conc_delay=0.01, conc_ramp=0.05),
}

TARGETS = {
    "latency_c1": "added p50 <= 1 ms, added p99 <= 3 ms",
    "throughput_c32": "ratio >= 0.5",
    "stream_500": "added TTFB <= 1 ms, added per-chunk p99 <= 0.5 ms",
    "readiness": "<= 50 ms",
    "swap": "<= 100 ms",
    "mixed_load": "makespan <= 0.5 x FIFO, max wait bounded",
    "memory_packing": "cost-policy loads <= 0.5 x one-at-a-time, load time <= 0.75 x lru, 0 errors",
    "streams_200": "chunk delay p99 <= 2 x direct",
    "streams_1000": "0 errors, RSS <= 100 MB",
    "idle_rss_10_models": "<= 50 MB",
    "real_llama": "<= 50 ms",
    "router_mode": "ratios <= 1.0",
    "kv_cache": "prompt tokens re-evaluated after a swap-back <= 5% of the context with keepCache",
}


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def ms(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x * 1000.0, 3)


def med(values: list) -> float:
    return statistics.median(values) if values else float("nan")


# -- processes --------------------------------------------------------------------------------------

class Proc:
    """A child in its own session; stdout/stderr go to files; killed (group) on close."""

    def __init__(self, argv: list[str], workdir: Path, name: str, env: Optional[dict] = None) -> None:
        self.name = name
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        self.out = open(self.out_path, "wb")
        self.err = open(self.err_path, "wb")
        self.t_spawn = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.err,
                                     cwd=str(workdir), env=env or os.environ.copy(), start_new_session=True)
        self.pid = self.proc.pid

    def wait_for(self, pattern: re.Pattern, timeout: float, which: str = "out") -> Optional[re.Match]:
        path = self.out_path if which == "out" else self.err_path
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pattern.search(path.read_bytes())
            if m:
                return m
            if self.proc.poll() is not None:
                return pattern.search(path.read_bytes())
            time.sleep(0.005)
        return None

    def rss_kb(self) -> int:
        return _status_kb(self.pid, "VmRSS")

    def hwm_kb(self) -> int:
        return _status_kb(self.pid, "VmHWM")

    def text(self) -> str:
        return (self.out_path.read_bytes() + self.err_path.read_bytes()).decode("utf-8", "replace")

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.out.close()
        self.err.close()


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of ``pid`` so far."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.01)
    return False


def start_upstream(workdir: Path, name: str, *args: str) -> tuple[Proc, int]:
    p = Proc([sys.executable, str(UPSTREAM), "--port", "0", *args], workdir, name)
    m = p.wait_for(UP_LISTENING, 10, which="err")
    if not m:
        p.kill()
        raise RuntimeError(f"bench upstream did not start: {p.text()}")
    return p, int(m.group(1))


def upstream_cmd(*args: str) -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable, str(UPSTREAM), "--port"]) + " ${PORT} " + \
        " ".join(shlex.quote(a) for a in args)


def fast_upstream_cmd(command: Optional[str]) -> str:
    """The model ``cmd`` of the proxy-overhead scenarios: ``--upstream-cmd`` (or bench/upstream.py)
    with ``--port ${PORT}``."""
    if not command:
        return upstream_cmd()
    return command + " --port ${PORT}"


def start_fast_upstream(command: Optional[str], workdir: Path, name: str) -> tuple[Proc, int]:
    """The "direct" upstream: bench/upstream.py, or ``command --port N`` once /health answers 200."""
    if not command:
        return start_upstream(workdir, name)
    port = free_port()
    p = Proc([*shlex.split(command), "--port", str(port)], workdir, name)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if p.proc.poll() is not None:
            break
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
            if ok:
                return p, port
        except OSError:
            pass
        time.sleep(0.01)
    p.kill()
    raise RuntimeError(f"upstream {command!r} did not answer /health: {p.text()}")


#: the send time a streamed chunk carries: bench/upstream.py's "t" (monotonic seconds) or the
#: Go stand-in's "bench_t" (monotonic ns).
_CHUNK_T = re.compile(rb'"(t|bench_t)":([0-9.e+-]+)')


def chunk_send_times(data: bytes) -> list[float]:
    """time.monotonic() at which the upstream wrote each SSE event in ``data``."""
    return [float(v) / 1e9 if k == b"bench_t" else float(v) for k, v in _CHUNK_T.findall(data)]


def stream_path(chunks: int, delay: float) -> bytes:
    """A chat path asking for ``chunks`` events ``delay`` s apart (both upstreams' spellings)."""
    return b"/v1/chat/completions?chunks=%d&delay=%s&delay_ms=%s" % (
        chunks, repr(delay).encode(), repr(delay * 1000.0).encode())


class ProxyTarget:
    """How to start one proxy under test with a given config."""

    def __init__(self, name: str, template: Optional[str]) -> None:
        self.name = name
        self.template = template  # None: llamaswap from this checkout

    @property
    def is_llamaswap(self) -> bool:
        return self.template is None

    def start(self, config: dict, workdir: Path) -> "RunningProxy":
        workdir.mkdir(parents=True, exist_ok=True)
        if not self.is_llamaswap:
            config = {k: v for k, v in config.items() if k != "scheduler"}
        cpath = workdir / "config.yaml"
        cpath.write_text(json.dumps(config, indent=1))
        if self.is_llamaswap:
            argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                    "--pidfile", str(workdir / "twistd.pid"), "--logfile=-", "llamaswap",
                    "--config", str(cpath), "--listen", "tcp:0:interface=127.0.0.1",
                    "--state-file", str(workdir / "children.json")]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            p = Proc(argv, workdir, "daemon", env)
            m = p.wait_for(LISTENING, 30)
            if not m:
                p.stop()
                raise RuntimeError(f"llamaswap did not start:\n{p.text()}")
            return RunningProxy(p, int(m.group(1)), workdir)
        port = free_port()
        argv = shlex.split(self.template.format(config=str(cpath), port=port))
        p = Proc(argv, workdir, "proxy")
        if not wait_port(port, 30):
            p.stop()
            raise RuntimeError(f"{self.name} did not listen on {port}:\n{p.text()}")
        return RunningProxy(p, port, workdir)


class RunningProxy:
    def __init__(self, proc: Proc, port: int, workdir: Path) -> None:
        self.proc, self.port, self.workdir = proc, port, workdir

    def get(self, path: str, method: str = "GET", timeout: float = 30) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def unload(self) -> None:
        self.get("/unload")

    def stop(self) -> None:
        self.proc.stop(30)

    def __enter__(self) -> "RunningProxy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def static_config(concurrency: int = 64, cmd: Optional[str] = None, **top: Any) -> dict:
    """One model ``m`` running its own copy of the bench upstream (``cmd``: see
    :func:`fast_upstream_cmd`; the one the "direct" figures use runs beside it). The proxy must
    own its upstream: a port held by a process the proxy did not start is refused, so the proxy
    is never pointed at the shared one."""
    return {"healthCheckTimeout": 30, **top,
            "models": {"m": {"cmd": fast_upstream_cmd(cmd), "proxy": "http://127.0.0.1:${PORT}",
                             "checkEndpoint": "/health", "concurrencyLimit": concurrency}}}


# -- scenarios ------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
        self.p = PROFILES[self.mode]
        self.workdir = Path(tempfile.mkdtemp(prefix="llamaswap-bench-"))
        self.proxies = [ProxyTarget("llamaswap", None)]
        if args.compare_cmd:
            self.proxies.append(ProxyTarget(args.compare_name, args.compare_cmd))
        self.results: dict = {}
        self.upstream: Optional[Proc] = None
        self.up_port = 0

    def static_config(self, concurrency: int = 64, **top: Any) -> dict:
        return static_config(concurrency, cmd=self.args.upstream_cmd, **top)

    def wd(self, *parts: str) -> Path:
        d = self.workdir.joinpath(*parts)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def run(self) -> dict:
        self.upstream, self.up_port = start_fast_upstream(self.args.upstream_cmd, self.wd("upstream"), "upstream")
        only = set(self.args.only.split(",")) if self.args.only else None
        try:
            for name in SCENARIOS:
                if only and name not in only:
                    continue
                log(f"== {name}")
                t0 = time.monotonic()
                try:
                    self.results[name] = getattr(self, "s_" + name)()
                except Exception as e:  # a failed scenario is reported, the others still run
                    import traceback
                    traceback.print_exc()
                    self.results[name] = {"error": f"{type(e).__name__}: {e}"}
                self.results[name]["seconds"] = round(time.monotonic() - t0, 1)
                log(f"   {json.dumps(self.results[name])[:600]}")
        finally:
            self.upstream.stop()
        return self.results

    # -- proxy overhead on the shared fast upstream --

    def with_proxies(self, config: dict, fn: Callable[..., dict], tag: str, pid: bool = False) -> dict:
        """``fn(port[, pid])`` against the upstream, then against each proxy (after a warm-up run)."""
        out = {"direct": fn(self.up_port, self.upstream.pid) if pid else fn(self.up_port)}
        for target in self.proxies:
            with target.start(config, self.wd(tag, target.name)) as proxy:
                fn(proxy.port, proxy.proc.pid) if pid else fn(proxy.port)  # warm-up: model starts, pools fill
                out[target.name] = fn(proxy.port, proxy.proc.pid) if pid else fn(proxy.port)
                out[target.name]["rss_mb"] = round(proxy.proc.rss_kb() / 1024, 1)
        return out

    def s_loadgen_ceiling(self) -> dict:
        """The load generators alone against the trivial upstream."""
        p = self.p
        raw = chat_request("m")
        c = SyncClient(self.up_port)
        lat = []
        for _ in range(max(50, p["lat_n"] // 3)):
            r = c.request(raw)
            lat.append(r["t_end"] - r["t_sent"])
        c.close()
        out = {"sync_c1_p50_ms": ms(percentile(lat, 50)), "sync_c1_p99_ms": ms(percentile(lat, 99)),
               "asyncio_c32_rps": round(loadgen.throughput(self.up_port, raw, p["tp_conc"], p["tp_seconds"] / 2)["rps"])}
        if loadgen.wrk_path():
            out["wrk_c32_rps"] = round(loadgen.wrk_throughput(self.up_port, "m", p["tp_conc"], p["tp_seconds"] / 2)["rps"])
        return out

    def s_latency_c1(self) -> dict:
        n = self.p["lat_n"]
        raw = chat_request("m")

        def measure(port: int, pid: int) -> dict:
            c = SyncClient(port)
            lat = []
            for i in range(50):
                assert c.request(raw)["status"] == 200
            cpu0 = cpu_seconds(pid)
            for i in range(n):
                r = c.request(raw)
                assert r["status"] == 200, r
                lat.append(r["t_end"] - r["t_sent"])
            cpu = cpu_seconds(pid) - cpu0
            c.close()
            return {"p50_ms": ms(percentile(lat, 50)), "p99_ms": ms(percentile(lat, 99)), "n": n,
                    "server_cpu_us_per_request": round(cpu / n * 1e6, 1)}

        out = self.with_proxies(self.static_config(), measure, "latency", pid=True)
        for t in self.proxies:
            out[t.name]["added_p50_ms"] = round(out[t.name]["p50_ms"] - out["direct"]["p50_ms"], 3)
            out[t.name]["added_p99_ms"] = round(out[t.name]["p99_ms"] - out["direct"]["p99_ms"], 3)
        return out

    def s_throughput_c32(self) -> dict:
        p = self.p
        conc = p["tp_conc"]
        use_wrk = loadgen.wrk_path() is not None and self.mode != "smoke"

        def measure(port: int, pid: int) -> dict:
            # the connections made and warm before the CPU clock starts: the figure is the server's
            # CPU per request of the measured requests alone (the warm-up's CPU counted them too)
            loadgen.throughput(port, chat_request("m"), conc, 0.5, warmup=0)
            cpu0 = cpu_seconds(pid)
            if use_wrk:
                r = loadgen.wrk_throughput(port, "m", conc, p["tp_seconds"])
            else:
                r = loadgen.throughput(port, chat_request("m"), conc, p["tp_seconds"], warmup=0)
            cpu = cpu_seconds(pid) - cpu0
            n = max(1, r["requests"])
            # the server's own CPU time per request (upstream process, or the proxy's daemon)
            return {"rps": round(r["rps"], 1), "errors": r["errors"], "tool": r["tool"],
                    "server_cpu_us_per_request": round(cpu / n * 1e6, 1),
                    "server_cpu_share": round(cpu / r["seconds"], 2)}

        out = self.with_proxies(self.static_config(concurrency=max(64, conc * 2)), measure, "throughput",
                                pid=True)
        for t in self.proxies:
            out[t.name]["ratio"] = round(out[t.name]["rps"] / out["direct"]["rps"], 3)
        return out

    def s_stream_500(self) -> dict:
        p = self.p
        raw = chat_request("m", stream=True, path=stream_path(p["stream_chunks"], p["stream_delay"]))

        def measure(port: int, pid: int) -> dict:
            ttfb, per_chunk = [], []
            c = SyncClient(port)
            cpu0 = cpu_seconds(pid)
            for _ in range(p["stream_n"]):
                lags = []

                def on_chunk(data: bytes, t: float) -> None:
                    lags.extend(t - sent for sent in chunk_send_times(data))

                r = c.request(raw, on_chunk=on_chunk)
                assert r["status"] == 200 and r["body"].endswith(b"data: [DONE]\n\n"), r["head"]
                ttfb.append(r["t_first"] - r["t_sent"])
                per_chunk.extend(lags)
            cpu = cpu_seconds(pid) - cpu0
            c.close()
            return {"ttfb_p50_ms": ms(percentile(ttfb, 50)), "chunk_lag_p50_ms": ms(percentile(per_chunk, 50)),
                    "chunk_lag_p99_ms": ms(percentile(per_chunk, 99)), "chunks": len(per_chunk),
                    "server_cpu_us_per_chunk": round(cpu / max(1, len(per_chunk)) * 1e6, 1)}

        out = self.with_proxies(self.static_config(), measure, "stream", pid=True)
        for t in self.proxies:
            o = out[t.name]
            o["added_ttfb_ms"] = round(o["ttfb_p50_ms"] - out["direct"]["ttfb_p50_ms"], 3)
            o["added_chunk_p50_ms"] = round(o["chunk_lag_p50_ms"] - out["direct"]["chunk_lag_p50_ms"], 3)
            o["added_chunk_p99_ms"] = round(o["chunk_lag_p99_ms"] - out["direct"]["chunk_lag_p99_ms"], 3)
        return out

    # -- starting and swapping models --

    def s_readiness(self) -> dict:
        p = self.p
        out = {}
        for target in self.proxies:
            config = {"healthCheckTimeout": 30, "models": {"r": {
                "cmd": upstream_cmd("--model", "r", "--load-delay", str(p["ready_delay"])),
                "proxy": "http://127.0.0.1:${PORT}"}}}
            lags, totals = [], []
            with target.start(config, self.wd("readiness", target.name)) as proxy:
                for _ in range(p["ready_n"]):
                    c = SyncClient(proxy.port)
                    r = c.request(chat_request("r"))
                    c.close()
                    assert r["status"] == 200, r
                    ready_at = float(header(r["head"], b"x-ready-at"))
                    lags.append(r["t_first"] - ready_at)
                    totals.append(r["t_first"] - r["t_sent"])
                    proxy.unload()
            out[target.name] = {"ready_to_first_byte_p50_ms": ms(med(lags)), "max_ms": ms(max(lags)),
                                "cold_request_p50_ms": ms(med(totals)), "n": len(lags),
                                "load_delay_ms": ms(p["ready_delay"])}
        return out

    def own_start(self, argv_for_port: Callable[[int], list], n: int, tag: str) -> list:
        """spawn -> first /health 200 of a command run directly (2 ms poll)."""
        times = []
        for i in range(n):
            port = free_port()
            proc = Proc(argv_for_port(port), self.wd("own_start"), f"{tag}-{i}")
            t0 = proc.t_spawn
            deadline = t0 + 30
            ok = False
            while time.monotonic() < deadline:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    conn.request("GET", "/health")
                    status = conn.getresponse().status
                    conn.close()
                    if status == 200:
                        ok = True
                        break
                except OSError:
                    pass
                time.sleep(0.002)
            t1 = time.monotonic()
            proc.stop()
            if ok:
                times.append(t1 - t0)
        return times

    def s_swap(self) -> dict:
        p = self.p
        def own_argv(port: int) -> list:
            return [sys.executable, str(UPSTREAM), "--port", str(port)]

        own = self.own_start(own_argv, p["own_n"], "bench-upstream")
        out: dict = {}
        for target in self.proxies:
            config = {"healthCheckTimeout": 30, "models": {
                x: {"cmd": upstream_cmd("--model", x), "proxy": "http://127.0.0.1:${PORT}"} for x in ("A", "B")}}
            totals, pre, post = [], [], []
            with target.start(config, self.wd("swap", target.name)) as proxy:
                c = SyncClient(proxy.port)
                c.request(chat_request("A"))
                c.close()
                for i in range(p["swap_n"]):
                    model = "B" if i % 2 == 0 else "A"
                    c = SyncClient(proxy.port)
                    r = c.request(chat_request(model))
                    c.close()
                    assert r["status"] == 200, r
                    ready_at = float(header(r["head"], b"x-ready-at"))
                    totals.append(r["t_first"] - r["t_sent"])
                    pre.append(ready_at - r["t_sent"])
                    post.append(r["t_first"] - ready_at)
            out[target.name] = {"swap_to_first_byte_p50_ms": ms(med(totals)),
                                "request_to_upstream_ready_p50_ms": ms(med(pre)),
                                "upstream_ready_to_first_byte_p50_ms": ms(med(post)),
                                "n": len(totals)}
        # own start measured before and after the proxied runs, so both see the same machine
        own += self.own_start(own_argv, p["own_n"], "bench-upstream-after")
        own_ms = ms(med(own))
        out["upstream_own_start_p50_ms"] = own_ms
        for target in self.proxies:
            out[target.name]["overhead_p50_ms"] = round(out[target.name]["swap_to_first_byte_p50_ms"] - own_ms, 3)
        return out

    def s_mixed_load(self) -> dict:
        p = self.p
        out: dict = {"load_time_s": p["mixed_load"], "clients": 6, "requests_per_client": p["mixed_per_client"],
                     "max_wait_s": p["mixed_wait"]}
        for target in self.proxies:
            policies = ["swap-aware", "fifo"] if target.is_llamaswap else ["own"]
            for policy in policies:
                wd = self.wd("mixed", target.name, policy)
                start_log = wd / "starts.log"
                start_log.write_text("")
                config = {"healthCheckTimeout": 60, "models": {
                    x: {"cmd": upstream_cmd("--model", x, "--load-delay", str(p["mixed_load"]),
                                            "--start-log", str(start_log)),
                        "proxy": "http://127.0.0.1:${PORT}", "concurrencyLimit": 32} for x in "ABC"}}
                if policy != "own":
                    config["scheduler"] = {"policy": policy, "maxWait": p["mixed_wait"]}
                with target.start(config, wd) as proxy:
                    r = asyncio.run(_mixed(proxy.port, 6, p["mixed_per_client"]))
                r["swaps"] = len(start_log.read_text().splitlines())
                out[f"{target.name}:{policy}"] = r
        if "llamaswap:fifo" in out and "llamaswap:swap-aware" in out:
            aware, fifo = out["llamaswap:swap-aware"], out["llamaswap:fifo"]
            out["makespan_ratio"] = round(aware["makespan_s"] / fifo["makespan_s"], 3)
            # a waiter is held for at most maxWait, then drains in-flight work and waits one swap
            out["wait_bound_s"] = round(p["mixed_wait"] + 2 * p["mixed_load"] + 1.0, 2)
            out["max_wait_within_bound"] = aware["max_wait_s"] <= out["wait_bound_s"]
        return out

    #: memory_packing: model -> (load delay s at pack_scale 1, share of the requests). The hot
    #: model is the big one that loads slowest, as on a real box (the main chat model beside a
    #: smaller second chat model and two rarely used helpers).
    PACK_MODELS = {"A": (3.0, 0.60), "B": (1.5, 0.25), "C": (0.5, 0.075), "D": (1.0, 0.075)}
    PACK_CLIENTS = 4
    PACK_SEED = 20240

    def s_memory_packing(self) -> dict:
        """4 models of 7 GiB, a 16 GiB budget (2 fit), a skewed seeded request mix from 4 clients:
        one-at-a-time swapping (no budget) vs ``memory.policy: lru`` vs the reload-cost policy."""
        import random
        p = self.p
        delays = {m: round(d * p["pack_scale"], 3) for m, (d, _) in self.PACK_MODELS.items()}
        rng = random.Random(self.PACK_SEED)
        names = list(self.PACK_MODELS)
        seq = rng.choices(names, weights=[w for _, w in self.PACK_MODELS.values()], k=p["pack_n"])
        clients = self.PACK_CLIENTS
        seqs = [seq[i::clients] for i in range(clients)]
        out: dict = {"load_delay_s": delays, "clients": clients, "requests": len(seq), "seed": self.PACK_SEED,
                     "mix": {m: seq.count(m) for m in names}, "budget": "16GiB", "model_memory": "7GiB"}
        for target in self.proxies:
            configs = ["one-at-a-time", "lru", "cost"] if target.is_llamaswap else ["one-at-a-time"]
            for conf in configs:
                wd = self.wd("packing", target.name, conf)
                start_log = wd / "starts.log"
                start_log.write_text("")
                models = {}
                for m in names:
                    models[m] = {"cmd": upstream_cmd("--model", m, "--load-delay", str(delays[m]),
                                                     "--start-log", str(start_log)),
                                 "proxy": "http://127.0.0.1:${PORT}", "checkEndpoint": "/health",
                                 "concurrencyLimit": 32}
                    if target.is_llamaswap:
                        models[m]["memory"] = "7GiB"
                # own port range: other daemons on this machine (tests, benches) start at 5800
                config: dict = {"healthCheckTimeout": 60, "startPort": _free_port_range(len(names)),
                                "models": models}
                if conf != "one-at-a-time":
                    config["memory"] = {"budget": "16GiB", "policy": conf}
                with target.start(config, wd) as proxy:
                    r = asyncio.run(_packing(proxy.port, seqs))
                    metrics = _prom(proxy.get("/metrics")[1]) if target.is_llamaswap else {}
                starts = [line.split()[0] for line in start_log.read_text().splitlines() if line.strip()]
                r["loads"] = len(starts)
                r["loads_by_model"] = {m: starts.count(m) for m in names}
                r["load_time_from_delays_s"] = round(sum(delays[m] for m in starts), 2)
                if metrics:
                    cnt = _prom_sum(metrics, "llamaswap_model_load_duration_seconds_count", outcome="success")
                    r["loads_metrics"] = int(cnt)
                    r["load_time_s"] = round(_prom_sum(metrics, "llamaswap_model_load_duration_seconds_sum",
                                                       outcome="success"), 2)
                    r["failed_starts"] = int(_prom_sum(metrics, "llamaswap_model_load_duration_seconds_count",
                                                       outcome="failure"))
                    ev: dict = {}
                    for labels, v in metrics.get("llamaswap_evictions_total", []):
                        if v:
                            ev[labels.get("reason", "?")] = ev.get(labels.get("reason", "?"), 0) + int(v)
                    r["evictions"] = ev
                else:
                    r["load_time_s"] = r["load_time_from_delays_s"]
                out[f"{target.name}:{conf}"] = r
        one, lru, cost = (out.get(f"llamaswap:{c}") for c in ("one-at-a-time", "lru", "cost"))
        if one and lru and cost:
            out["loads_ratio_vs_one_at_a_time"] = round(cost["loads"] / max(1, one["loads"]), 3)
            out["load_time_ratio_vs_lru"] = round(cost["load_time_s"] / lru["load_time_s"], 3) \
                if lru["load_time_s"] else None
            out["targets"] = {
                "loads_le_half_of_one_at_a_time": cost["loads"] <= 0.5 * one["loads"],
                "load_time_ge_25pct_less_than_lru": lru["load_time_s"] > 0
                and cost["load_time_s"] <= 0.75 * lru["load_time_s"],
                "zero_errors": one["errors"] == lru["errors"] == cost["errors"] == 0}
            out["targets_met"] = all(out["targets"].values())
        return out

    def s_streams_200(self) -> dict:
        """Many concurrent token streams (200 clients, a chunk every 50 ms each), started all at
        once (their chunks come in bursts of 200) and started over ``conc_ramp`` seconds: each
        chunk's one-way delay from the upstream's write, and the peak RSS."""
        p = self.p
        n = p["conc_n"]
        raw = chat_request("m", stream=True, path=stream_path(p["conc_chunks"], p["conc_delay"]))
        out: dict = {"streams": n, "chunks_per_stream": p["conc_chunks"], "chunk_interval_ms": p["conc_delay"] * 1000,
                     "ramp_s": p["conc_ramp"]}
        for variant, ramp in (("together", 0.0), ("ramped", p["conc_ramp"])):

            def measure(port: int, pid: int) -> dict:
                peak = [_status_kb(pid, "VmRSS")]
                stop = threading.Event()

                def sample() -> None:
                    while not stop.wait(0.05):
                        peak.append(_status_kb(pid, "VmRSS"))

                th = threading.Thread(target=sample, daemon=True)
                th.start()
                try:
                    r = loadgen.run_timed_streams(port, raw, n, chunk_send_times, ramp=ramp)
                finally:
                    stop.set()
                    th.join()
                lags = r["lags"]
                return {"ok": r["ok"], "errors": r["errors"], "why": r["why"], "chunks": len(lags),
                        "chunk_lag_p50_ms": ms(percentile(lags, 50)),
                        "chunk_lag_p99_ms": ms(percentile(lags, 99)), "rss_peak_mb": round(max(peak) / 1024, 1)}

            res = self.with_proxies(self.static_config(concurrency=n + 100), measure, f"streams200-{variant}",
                                    pid=True)
            direct = res["direct"]["chunk_lag_p99_ms"]
            for t in self.proxies:
                res[t.name]["p99_vs_direct"] = round(res[t.name]["chunk_lag_p99_ms"] / max(direct, 1e-3), 2)
            out[variant] = res
        return out

    def s_streams_1000(self) -> dict:
        p = self.p
        n = p["slow_n"]
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(hard, max(soft, 4 * n + 1024))
        if want > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # children inherit it
        raw = chat_request("m", stream=True, path=stream_path(p["slow_chunks"], p["slow_delay"]))
        out: dict = {"streams": n, "stream_seconds": round(p["slow_chunks"] * p["slow_delay"], 2),
                     "nofile": want}
        r = loadgen.run_streams(self.up_port, raw, n, ramp=p["ramp"])
        out["direct"] = {"ok": r["ok"], "errors": r["errors"], "why": r["why"]}
        for target in self.proxies:
            with target.start(self.static_config(concurrency=n + 100),
                              self.wd("streams", target.name)) as proxy:
                loadgen.run_streams(proxy.port, chat_request("m", stream=True), 4)
                before = proxy.proc.rss_kb()
                peak = [before]
                stop = threading.Event()

                def sample() -> None:
                    while not stop.wait(0.05):
                        peak.append(proxy.proc.rss_kb())

                th = threading.Thread(target=sample, daemon=True)
                th.start()
                r = loadgen.run_streams(proxy.port, raw, n, ramp=p["ramp"])
                stop.set()
                th.join()
                out[target.name] = {"ok": r["ok"], "errors": r["errors"], "why": r["why"],
                                    "rss_before_mb": round(before / 1024, 1),
                                    "rss_peak_mb": round(max(peak) / 1024, 1),
                                    "vmhwm_mb": round(proxy.proc.hwm_kb() / 1024, 1)}
        return out

    def s_idle_rss_10_models(self) -> dict:
        out = {}
        config = {"models": {f"model-{i}": {"cmd": upstream_cmd("--model", f"model-{i}"),
                                            "proxy": "http://127.0.0.1:${PORT}"} for i in range(10)}}
        for target in self.proxies:
            with target.start(config, self.wd("idle", target.name)) as proxy:
                proxy.get("/v1/models")
                time.sleep(self.p["settle"])
                out[target.name] = {"rss_mb": round(proxy.proc.rss_kb() / 1024, 1)}
        return out

    # -- real llama-server --

    def _llama(self) -> Optional[tuple[str, dict]]:
        try:
            sys.path.insert(0, str(ROOT))
            from llamaswap.demo import llama_server, tinymodels
            binary = llama_server.find_binary()
            if binary is None:
                raise RuntimeError("no llama-server binary")
            paths = {k: str(v) for k, v in tinymodels.ensure_models(names=["chat-a", "chat-b"]).items()}
        except Exception as e:  # no llama-server here: the scenario reports why
            log(f"   no llama-server: {e}")
            return None
        return str(binary), paths

    def s_real_llama(self) -> dict:
        found = self._llama()
        if found is None:
            return {"skipped": "llama-server not found"}
        binary, paths = found
        p = self.p
        def own_runs(tag: str) -> list:
            runs = []
            for name in ("chat-a", "chat-b"):
                runs += self.own_start(
                    lambda port, n=name: [binary, "-m", paths[n], "--host", "127.0.0.1", "--port", str(port)],
                    p["own_n"], f"llama-{name}-{tag}")
            return runs

        own_all = own_runs("before")
        out: dict = {"binary": binary}
        for target in self.proxies:
            config = {"healthCheckTimeout": 60, "models": {
                n: {"cmd": f"{shlex.quote(binary)} -m {shlex.quote(paths[n])} --host 127.0.0.1 --port ${{PORT}}",
                    "proxy": "http://127.0.0.1:${PORT}"} for n in ("chat-a", "chat-b")}}
            with target.start(config, self.wd("real", target.name)) as proxy:
                out[target.name] = _alternate(proxy.port, ("chat-a", "chat-b"), p["real_n"], p["warm_n"])
        own_all += own_runs("after")  # before and after: the same machine state as the proxied runs
        out["llama_server_own_start_p50_ms"] = ms(med(own_all))
        for target in self.proxies:
            o = out[target.name]
            o["overhead_p50_ms"] = round(o["cold_first_byte_p50_ms"] - ms(med(own_all)), 3)
        return out

    def s_kv_cache(self) -> dict:
        """bench/kvcache.py: a swap-back continuation with and without keepCache (llamaswap only)."""
        found = self._llama()
        if found is None:
            return {"skipped": "llama-server not found"}
        import kvcache
        contexts = (1024,) if self.mode == "smoke" else kvcache.CONTEXTS
        repeats = {"smoke": 1, "quick": 2, "full": 3}[self.mode]
        return kvcache.scenario(self.proxies[0].start, *found, self.wd("kv"), contexts, repeats, log=log)

    def s_router_mode(self) -> dict:
        found = self._llama()
        if found is None:
            return {"skipped": "llama-server not found"}
        binary, paths = found
        p = self.p
        models_dir = self.wd("router", "models")
        for n in ("chat-a", "chat-b"):
            link = models_dir / f"tiny-{n}.gguf"
            if not link.exists():
                link.symlink_to(paths[n])
        port = free_port()
        router = Proc([binary, "--models-dir", str(models_dir), "--models-max", "1", "--host", "127.0.0.1",
                       "--port", str(port)], self.wd("router"), "router")
        try:
            if not wait_port(port, 30):
                raise RuntimeError("router did not listen:\n" + router.text())
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    c.request("GET", "/health")
                    if c.getresponse().status == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.01)
            out: dict = {"router": _alternate(port, ("tiny-chat-a", "tiny-chat-b"), p["real_n"], p["warm_n"])}
        finally:
            router.stop()
        real = self.results.get("real_llama", {})
        for target in self.proxies:
            if target.name in real and "cold_first_byte_p50_ms" in real[target.name]:
                mine = real[target.name]
                out[target.name] = {
                    "cold_swap_ratio": round(mine["cold_first_byte_p50_ms"] / out["router"]["cold_first_byte_p50_ms"], 3),
                    "warm_latency_ratio": round(mine["warm_p50_ms"] / out["router"]["warm_p50_ms"], 3)}
        return out


def _alternate(port: int, names: tuple, n: int, warm_n: int) -> dict:
    """Cold requests alternating between two models, then warm requests to the loaded one."""
    cold = []
    for i in range(n + 1):
        model = names[i % 2]
        c = SyncClient(port, timeout=120)
        r = c.request(chat_request(model, stream=True))
        c.close()
        assert r["status"] == 200, r
        if i > 0:  # the first one starts from nothing: not a swap
            cold.append(r["t_first"] - r["t_sent"])
    model = names[n % 2]
    warm = []
    c = SyncClient(port, timeout=120)
    for i in range(warm_n + 3):
        r = c.request(chat_request(model))
        assert r["status"] == 200, r
        if i >= 3:
            warm.append(r["t_end"] - r["t_sent"])
    c.close()
    return {"cold_first_byte_p50_ms": ms(med(cold)), "cold_first_byte_max_ms": ms(max(cold)),
            "warm_p50_ms": ms(med(warm)), "warm_p99_ms": ms(percentile(warm, 99)), "n": len(cold)}


async def _packing(port: int, seqs: list, timeout: float = 300.0) -> dict:
    """One closed-loop client per sequence of model names: a short non-streamed chat each, one after another."""
    waits: list = []
    errors: list = []
    raw_for = {m: chat_request(m) for s in seqs for m in s}

    async def one(model: str) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(raw_for[model])
            status, _ = await loadgen._read_response(reader)
            return status
        finally:
            writer.close()

    async def client(seq: list) -> None:
        for model in seq:
            t0 = time.monotonic()
            try:
                status = await asyncio.wait_for(one(model), timeout)
                if status != 200:
                    errors.append(f"{model}: HTTP {status}")
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as e:
                errors.append(f"{model}: {type(e).__name__}")
            waits.append(time.monotonic() - t0)

    t0 = time.monotonic()
    await asyncio.gather(*[client(s) for s in seqs])
    makespan = time.monotonic() - t0
    return {"makespan_s": round(makespan, 2), "requests": len(waits), "errors": len(errors),
            "error_samples": errors[:5], "p50_wait_s": round(percentile(waits, 50), 3),
            "p99_wait_s": round(percentile(waits, 99), 3), "max_wait_s": round(max(waits), 3)}


def _free_port_range(n: int) -> int:
    """A base port below the ephemeral range with ``n`` free ports from it."""
    import random
    for _ in range(200):
        base = random.randrange(20000, 30000 - n)
        try:
            socks = []
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
    raise RuntimeError(f"no {n} consecutive free ports found")


_PROM_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_PROM_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _prom(text: bytes) -> dict:
    """Prometheus text -> {name: [(labels, value), ...]}."""
    out: dict = {}
    for line in text.decode("utf-8", "replace").splitlines():
        m = _PROM_LINE.match(line.strip())
        if not m or line.startswith("#"):
            continue
        labels = dict(_PROM_LABEL.findall(m.group(2) or ""))
        try:
            out.setdefault(m.group(1), []).append((labels, float(m.group(3))))
        except ValueError:
            pass
    return out


def _prom_sum(metrics: dict, name: str, **match: str) -> float:
    return sum(v for labels, v in metrics.get(name, []) if all(labels.get(k) == x for k, x in match.items()))


async def _mixed(port: int, clients: int, per_client: int) -> dict:
    """``clients`` clients, client i asking A B C A B C ... starting at model i % 3."""
    models = "ABC"
    waits: list = []
    errors = [0]
    raw_for = {m: chat_request(m) for m in models}

    async def client(i: int) -> None:
        for k in range(per_client):
            model = models[(i + k) % 3]
            t0 = time.monotonic()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(raw_for[model])
                status, _ = await loadgen._read_response(reader)
                writer.close()
                if status != 200:
                    errors[0] += 1
            except (OSError, asyncio.IncompleteReadError):
                errors[0] += 1
            waits.append(time.monotonic() - t0)

    t0 = time.monotonic()
    await asyncio.gather(*[client(i) for i in range(clients)])
    makespan = time.monotonic() - t0
    return {"makespan_s": round(makespan, 2), "requests": len(waits), "errors": errors[0],
            "p99_wait_s": round(percentile(waits, 99), 2), "max_wait_s": round(max(waits), 2),
            "p50_wait_s": round(percentile(waits, 50), 2)}


# -- report ------------------------------------------------------------------------------------------------

def rows(results: dict, proxies: list[str]) -> list[tuple]:
    """(scenario, figure, direct, llamaswap[, compare...], target, met) for the table."""
    R = results
    out: list = []

    def g(*keys, default=None):
        d: Any = R
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return default
            d = d[k]
        return d

    def per(scn: str, key: str) -> list:
        return [g(scn, t, key) for t in proxies]

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    def signed(v: Any) -> str:
        return fmt(v) if isinstance(v, (int, float)) and v < 0 else f"+{fmt(v)}"

    def add(scn, figure, direct, values, target, met):
        out.append((scn, figure, fmt(direct), *[fmt(v) for v in values], target,
                    "-" if met is None else ("yes" if met else "NO")))

    lt = g("loadgen_ceiling") or {}
    add("loadgen ceiling", "c=1 p50 ms / c=32 req/s (asyncio, wrk)",
        f"{fmt(lt.get('sync_c1_p50_ms'))} / {fmt(lt.get('asyncio_c32_rps'))}, {fmt(lt.get('wrk_c32_rps'))}",
        [None] * len(proxies), "-", None)
    a50, a99 = per("latency_c1", "added_p50_ms"), per("latency_c1", "added_p99_ms")
    add("chat c=1", "p50 / p99 ms (added)", f"{fmt(g('latency_c1', 'direct', 'p50_ms'))} / {fmt(g('latency_c1', 'direct', 'p99_ms'))}",
        [f"{fmt(g('latency_c1', t, 'p50_ms'))} / {fmt(g('latency_c1', t, 'p99_ms'))} ({signed(x)} / {signed(y)})"
         for t, x, y in zip(proxies, a50, a99)],
        "<= 1 / <= 3 ms", None if a50[0] is None else a50[0] <= 1 and a99[0] <= 3)
    ratio = per("throughput_c32", "ratio")
    add("chat c=32", "req/s (ratio); server CPU us/request",
        f"{fmt(g('throughput_c32', 'direct', 'rps'))}; {fmt(g('throughput_c32', 'direct', 'server_cpu_us_per_request'))}",
        [f"{fmt(g('throughput_c32', t, 'rps'))} ({fmt(r)}); {fmt(g('throughput_c32', t, 'server_cpu_us_per_request'))}"
         for t, r in zip(proxies, ratio)],
        ">= 0.5", None if ratio[0] is None else ratio[0] >= 0.5)
    tt, ch = per("stream_500", "added_ttfb_ms"), per("stream_500", "added_chunk_p99_ms")
    c50 = per("stream_500", "added_chunk_p50_ms")
    add("stream 500 chunks", "added TTFB ms; added per-chunk p50 / p99 ms",
        f"{fmt(g('stream_500', 'direct', 'ttfb_p50_ms'))}; {fmt(g('stream_500', 'direct', 'chunk_lag_p50_ms'))} / "
        f"{fmt(g('stream_500', 'direct', 'chunk_lag_p99_ms'))}",
        [f"{signed(x)}; {signed(z)} / {signed(y)}" for x, y, z in zip(tt, ch, c50)], "<= 1; - / <= 0.5",
        None if tt[0] is None else tt[0] <= 1 and ch[0] <= 0.5)
    cpu = [(g("latency_c1", t, "server_cpu_us_per_request"), g("throughput_c32", t, "server_cpu_us_per_request"),
            g("stream_500", t, "server_cpu_us_per_chunk")) for t in ["direct", *proxies]]
    add("proxy CPU", "us per request c=1 / c=32; us per streamed chunk",
        " / ".join(fmt(v) for v in cpu[0][:2]) + f"; {fmt(cpu[0][2])}",
        [" / ".join(fmt(v) for v in c[:2]) + f"; {fmt(c[2])}" for c in cpu[1:]], "-", None)
    rd = per("readiness", "ready_to_first_byte_p50_ms")
    add("readiness", "health 200 -> first byte, p50 ms", None, rd, "<= 50", None if rd[0] is None else rd[0] <= 50)
    sw = per("swap", "overhead_p50_ms")
    add("swap A->B", "overhead beyond own start, p50 ms", g("swap", "upstream_own_start_p50_ms"), sw, "<= 100",
        None if sw[0] is None else sw[0] <= 100)
    aware, fifo = g("mixed_load", "llamaswap:swap-aware"), g("mixed_load", "llamaswap:fifo")
    if aware and fifo:
        vals = [f"{aware['makespan_s']} s vs FIFO {fifo['makespan_s']} s; swaps {aware['swaps']} vs {fifo['swaps']}; "
                f"p99/max wait {aware['p99_wait_s']}/{aware['max_wait_s']} s vs {fifo['p99_wait_s']}/{fifo['max_wait_s']} s"]
        for t in proxies[1:]:
            o = g("mixed_load", f"{t}:own") or {}
            vals.append(f"{o.get('makespan_s')} s; swaps {o.get('swaps')}; max wait {o.get('max_wait_s')} s")
        add("mixed 3 models x 6 clients", "makespan; swaps; p99/max wait", None, vals,
            f"<= 0.5x FIFO; max wait <= {g('mixed_load', 'wait_bound_s')} s",
            g("mixed_load", "makespan_ratio", default=9) <= 0.5 and g("mixed_load", "max_wait_within_bound"))
    pk = g("memory_packing")
    if pk and "error" not in pk:
        for conf in ("one-at-a-time", "lru", "cost"):
            vals = []
            for t in proxies:
                o = g("memory_packing", f"{t}:{conf}")
                vals.append(None if not o else
                            f"loads {o['loads']}; load {fmt(o['load_time_s'])} s; makespan {fmt(o['makespan_s'])} s; "
                            f"p99 {fmt(o['p99_wait_s'])} s; errors {o['errors']}")
            last = conf == "cost"
            add(f"memory 4x7GiB/16GiB: {conf}", "loads; load time; makespan; p99 wait; errors", None, vals,
                "loads <= 0.5x one-at-a-time; load <= 0.75x lru; 0 errors" if last else "-",
                pk.get("targets_met") if last else None)
    cs = g("streams_200")
    for variant, how in (("together", "started together"), ("ramped", f"started over {g('streams_200', 'ramp_s')} s")):
        if not cs or variant not in cs:
            continue
        rel = [g("streams_200", variant, t, "p99_vs_direct") for t in proxies]
        errs = [g("streams_200", variant, t, "errors") for t in proxies]
        add(f"{cs.get('streams')} concurrent streams, {how}", "chunk delay p50 / p99 ms (p99 x direct); errors; peak RSS MB",
            f"{fmt(g('streams_200', variant, 'direct', 'chunk_lag_p50_ms'))} / "
            f"{fmt(g('streams_200', variant, 'direct', 'chunk_lag_p99_ms'))}; {g('streams_200', variant, 'direct', 'errors')}",
            [f"{fmt(g('streams_200', variant, t, 'chunk_lag_p50_ms'))} / {fmt(g('streams_200', variant, t, 'chunk_lag_p99_ms'))} "
             f"({fmt(x)}x); {e}; {fmt(g('streams_200', variant, t, 'rss_peak_mb'))}"
             for t, x, e in zip(proxies, rel, errs)],
            "p99 <= 2x direct", None if rel[0] is None else rel[0] <= 2 and errs[0] == 0)
    er = per("streams_1000", "errors")
    rss = per("streams_1000", "rss_peak_mb")
    add(f"{g('streams_1000', 'streams')} slow streams", "errors; peak RSS MB", f"{g('streams_1000', 'direct', 'errors')}; -",
        [f"{fmt(e)}; {fmt(r)}" for e, r in zip(er, rss)], "0; <= 100",
        None if er[0] is None else er[0] == 0 and rss[0] <= 100)
    idle = per("idle_rss_10_models", "rss_mb")
    add("idle, 10 models", "RSS MB", None, idle, "<= 50", None if idle[0] is None else idle[0] <= 50)
    rl = per("real_llama", "overhead_p50_ms")
    add("llama-server chat-a<->chat-b", "cold first byte minus own start, p50 ms",
        g("real_llama", "llama_server_own_start_p50_ms"), rl, "<= 50", None if rl[0] is None else rl[0] <= 50)
    cr, wr = per("router_mode", "cold_swap_ratio"), per("router_mode", "warm_latency_ratio")
    add("vs llama-server router", "cold swap ratio; warm latency ratio",
        f"router: {fmt(g('router_mode', 'router', 'cold_first_byte_p50_ms'))} ms; {fmt(g('router_mode', 'router', 'warm_p50_ms'))} ms",
        [f"{fmt(x)}; {fmt(y)}" for x, y in zip(cr, wr)], "<= 1.0",
        None if cr[0] is None else cr[0] <= 1.0 and wr[0] <= 1.0)
    kv = g("kv_cache") or {}
    for tokens in kv.get("contexts", []):
        r = kv.get(str(tokens)) or {}
        if r:
            k, c = r["keepCache"], r["cold"]
            add(f"keepCache swap-back ~{tokens} tokens",
                "TTFT ms keepCache / cold (ratio); prompt tokens evaluated; save / restore ms", None,
                [f"{fmt(k['ttft_p50_ms'])} / {fmt(c['ttft_p50_ms'])} ({fmt(r['ttft_ratio'])}); "
                 f"{fmt(k['prompt_n_p50'])} / {fmt(c['prompt_n_p50'])} of {fmt(k['context_tokens'])}; "
                 f"{fmt(k['save_p50_ms'])} / {fmt(k['restore_p50_ms'])}"] + [None] * (len(proxies) - 1),
                "re-evaluated <= 5%", r["target_met"])
    return [r for r in out if any(k in R for k in _row_scenarios(r[0]))]


#: the scenarios behind each row of the table (a row is left out when none of them ran)
_ROW_SCENARIOS = (("loadgen ceiling", ("loadgen_ceiling",)), ("chat c=1", ("latency_c1",)),
                  ("chat c=32", ("throughput_c32",)), ("stream 500", ("stream_500",)),
                  ("proxy CPU", ("latency_c1", "throughput_c32", "stream_500")), ("readiness", ("readiness",)),
                  ("swap", ("swap",)), ("mixed", ("mixed_load",)), ("memory", ("memory_packing",)),
                  ("idle", ("idle_rss_10_models",)), ("llama-server", ("real_llama",)),
                  ("vs llama-server router", ("router_mode",)), ("keepCache", ("kv_cache",)))


def _row_scenarios(label: str) -> tuple:
    if label.endswith("slow streams"):
        return ("streams_1000",)
    if " concurrent streams" in label:
        return ("streams_200",)
    for prefix, scenarios in _ROW_SCENARIOS:
        if label.startswith(prefix):
            return scenarios
    return ()


def render_table(results: dict, proxies: list[str]) -> str:
    header_row = ("scenario", "figure", "direct", *proxies, "target", "met")
    body = rows(results, proxies)
    widths = [max(len(str(r[i])) for r in [header_row, *body]) for i in range(len(header_row))]
    line = "+".join("-" * (w + 2) for w in widths)
    fmt_row = lambda r: " | ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt_row(header_row), line, *[fmt_row(r) for r in body]])


def compile_bytecode() -> None:
    """Write this checkout's bytecode, as an install (or a first run that may write
    ``__pycache__``) has it: without it (``PYTHONDONTWRITEBYTECODE`` set, a read-only tree)
    every daemon compiles its modules at start, which leaves the heap about 0.8 MB larger."""
    import compileall
    for target in (ROOT / "llamaswap", ROOT / "twisted" / "plugins"):
        compileall.compile_dir(str(target), quiet=1)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="shorter runs (about a minute and a half)")
    mode.add_argument("--smoke", action="store_true", help="tiny counts: checks that everything runs (seconds)")
    ap.add_argument("--name", default=None, help="results/<name>.json (default: the mode)")
    ap.add_argument("--compare-cmd", default=None,
                    help="another llama-swap-compatible proxy: a command with {config} and {port}")
    ap.add_argument("--compare-name", default="compare")
    ap.add_argument("--upstream-cmd", default=None,
                    help="the upstream of the latency, throughput and stream scenarios, run with --port N "
                         "appended (default: bench/upstream.py), e.g. a Go stand-in for llama-server")
    ap.add_argument("--only", default=None, help="comma-separated scenario names: " + ",".join(SCENARIOS))
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    compile_bytecode()
    bench = Bench(args)
    t0 = time.monotonic()
    results = bench.run()
    proxies = [t.name for t in bench.proxies]
    doc = {"name": args.name or bench.mode, "mode": bench.mode, "proxies": proxies,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "platform": platform.platform(), "load_generator": "wrk" if loadgen.wrk_path() else "python"},
           "load_average": [round(x, 2) for x in os.getloadavg()],
           "upstream": args.upstream_cmd or str(UPSTREAM),
           "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
           "seconds": round(time.monotonic() - t0, 1), "targets": TARGETS, "scenarios": results,
           "table": [list(r) for r in rows(results, proxies)]}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{doc['name']}.json"
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(render_table(results, proxies))
    print(f"\nwritten {path} ({doc['seconds']} s)")
    import shutil
    shutil.rmtree(bench.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
