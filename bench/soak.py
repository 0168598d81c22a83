"""Soak test: thousands of requests with random swaps, client aborts and upstream crashes (issue 5).

::

    python bench/soak.py [--duration 180] [--clients 16] [--seed 1] [--out bench/results/soak.json]

Not part of the default test run. It starts the real daemon (``twistd -n llamaswap``, via
tests/daemon.py) with three swapping models and one persistent one, all running
``tests/fake_llama_server.py``, and for ``--duration`` seconds has ``--clients`` threads send
random requests:

* plain and streamed chat completions for a random model (so models swap all the time);
* clients that abort a stream after its first event, or leave while queued / while the
  model starts;
* injected upstream crashes: streams with ``?die_after=N``, non-streamed ``?die``, and a
  chaos thread that SIGKILLs a random running child now and then;
* now and then an unload of a random model (``/api/models/unload/<id>``).

Every request must end with an honest answer: a complete success (JSON, or SSE ending with
``[DONE]``), a JSON error envelope, or an SSE stream ending with an error event (PROXY-9).
A request is *lost* when the client saw anything else (a dropped connection, a truncated
success, a non-JSON error) and *hung* when it got no answer within ``--request-timeout``.
At the end the daemon gets SIGTERM (it must exit 0) and every process that ran a fake
upstream of this run is looked for: *orphans* are those still alive. The daemon's RSS is
sampled throughout, and the daemon's state transitions are replayed from its log to check that
no two models of the exclusive group were ever alive together. Lost, hung, orphans and
overlaps must all be 0; the exit status says so.
"""
from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.daemon import Daemon, fake_cmd, free_port_range, pid_alive  # noqa: E402

SWAPPING = ["a", "b", "c"]
PERSISTENT = "emb"


def build_config(run_id: str, max_wait: float) -> dict[str, Any]:
    models = {}
    for mid in SWAPPING + [PERSISTENT]:
        models[mid] = {
            "cmd": fake_cmd(f"soak-{run_id}-{mid}", "--chunk-delay", "0.01", "--chunks", "8", "--silent",
                            respond=f"from {mid}"),
            "concurrencyLimit": 64,
            "unloadTimeout": 2,
        }
    return {
        "healthCheckTimeout": 15,
        "startPort": free_port_range(len(models) + 2),
        "logLevel": "info",     # state transitions are read back from the log (overlaps)
        "scheduler": {"maxWait": max_wait},
        "groups": {"helpers": {"swap": False, "exclusive": False, "persistent": True,
                               "members": [PERSISTENT]}},
        "models": models,
    }


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_TRANSITION = re.compile(r"\] (\S+): (stopped|starting|ready|stopping|shutdown) -> "
                         r"(stopped|starting|ready|stopping|shutdown)$")


def exclusive_overlaps(log_text: str) -> list[str]:
    """Moments when two models of the exclusive default group were alive (starting, ready or
    stopping) at once, replayed from the daemon's ``<id>: <old> -> <new>`` log lines."""
    state = {mid: "stopped" for mid in SWAPPING}
    out = []
    for line in log_text.splitlines():
        m = _TRANSITION.search(line.rstrip())
        if not m or m.group(1) not in state:
            continue
        state[m.group(1)] = m.group(3)
        alive = sorted(mid for mid, st in state.items() if st in ("starting", "ready", "stopping"))
        if len(alive) > 1:
            out.append(line.strip()[:160] + f"  (alive: {alive})")
    return out


def run_pids(run_id: str) -> list[int]:
    """Every live (non-zombie) process whose command line names this run's fake upstreams."""
    marker = f"soak-{run_id}-".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker in cmdline and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def group_members(pgids: set[int]) -> list[int]:
    """Live processes in any of the process groups (catches grandchildren without our marker)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2 and fields[0] not in (b"Z", b"X") and int(fields[2]) in pgids:
            out.append(int(entry))
    return out


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: collections.Counter = collections.Counter()
        self.lost: list[str] = []
        self.hung: list[str] = []
        self.latencies: list[float] = []

    def add(self, outcome: str, latency: float | None = None, detail: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if latency is not None and outcome in ("ok", "ok_stream"):
                self.latencies.append(latency)
            if outcome == "LOST":
                self.lost.append(detail or "")
            elif outcome == "HUNG":
                self.hung.append(detail or "")


def _chat_body(model: str, stream: bool) -> bytes:
    return json.dumps({"model": model, "stream": stream,
                       "messages": [{"role": "user", "content": "soak"}]}).encode()


def _is_error_envelope(body: bytes) -> str | None:
    try:
        err = json.loads(body)["error"]
        if set(err) >= {"message", "type", "param", "code"}:
            return str(err["code"])
    except (ValueError, KeyError, TypeError):
        pass
    return None


class Client(threading.Thread):
    def __init__(self, port: int, stats: Stats, deadline: float, seed: int, timeout: float) -> None:
        super().__init__(daemon=True)
        self.port, self.stats, self.deadline, self.timeout = port, stats, deadline, timeout
        self.rng = random.Random(seed)

    def run(self) -> None:
        while time.monotonic() < self.deadline:
            kind = self.rng.choices(
                ["chat", "stream", "abort_stream", "abort_queued", "die_stream", "die_chat", "unload",
                 "persistent"],
                weights=[40, 30, 6, 5, 4, 3, 1, 11])[0]
            model = PERSISTENT if kind == "persistent" else self.rng.choice(SWAPPING)
            t0 = time.monotonic()
            try:
                outcome, detail = getattr(self, "_" + ("chat" if kind == "persistent" else kind))(model)
            except socket.timeout:
                outcome, detail = "HUNG", f"{kind} {model}: no answer within {self.timeout}s"
            except (OSError, http.client.HTTPException) as e:
                outcome, detail = "LOST", f"{kind} {model}: {type(e).__name__}: {e}"
            self.stats.add(outcome, time.monotonic() - t0, detail)

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)

    def _error(self, status: int, body: bytes, kind: str) -> tuple[str, str | None]:
        code = _is_error_envelope(body)
        if code is None:
            return "LOST", f"{kind}: {status} without a JSON error envelope: {body[:200]!r}"
        return f"err_{status}_{code}", None

    def _chat(self, model: str, query: str = "") -> tuple[str, str | None]:
        conn = self._conn()
        try:
            conn.request("POST", "/v1/chat/completions" + query, _chat_body(model, False),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status == 200:
            try:
                served = json.loads(body)["served_by"]
            except (ValueError, KeyError):
                return "LOST", f"chat {model}: 200 with a bad body {body[:200]!r}"
            if not served.endswith(f"-{model}"):
                return "LOST", f"chat {model}: answered by {served}"
            return "ok", None
        return self._error(resp.status, body, "chat")

    def _stream(self, model: str, query: str = "") -> tuple[str, str | None]:
        conn = self._conn()
        try:
            conn.request("POST", "/v1/chat/completions" + query, _chat_body(model, True),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            try:
                body = resp.read()
            except http.client.IncompleteRead as e:
                return "LOST", f"stream {model}: incomplete chunked body after {len(e.partial)} bytes"
        finally:
            conn.close()
        if resp.status != 200:
            return self._error(resp.status, body, "stream")
        events = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
        if events and events[-1] == b"[DONE]":
            return "ok_stream", None
        if events and _is_error_envelope(events[-1]) == "upstream_error" and b"[DONE]" not in body:
            return "stream_error_event", None
        return "LOST", f"stream {model}: truncated without an error event: {body[-200:]!r}"

    def _die_stream(self, model: str) -> tuple[str, str | None]:
        outcome, detail = self._stream(model, f"?die_after={self.rng.randint(0, 5)}")
        return ("injected_" + outcome if not outcome.startswith("LOST") else outcome), detail

    def _die_chat(self, model: str) -> tuple[str, str | None]:
        outcome, detail = self._chat(model, "?die")
        return ("injected_" + outcome if not outcome.startswith("LOST") else outcome), detail

    def _abort_stream(self, model: str) -> tuple[str, str | None]:
        conn = self._conn()
        try:
            conn.request("POST", "/v1/chat/completions?wait=0.05&chunks=40", _chat_body(model, True),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status == 200:
                resp.readline()
        finally:
            if conn.sock is not None:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            conn.close()
        return "client_abort_stream", None

    def _abort_queued(self, model: str) -> tuple[str, str | None]:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        body = _chat_body(model, False)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(self.rng.uniform(0.0, 0.3))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        s.close()
        return "client_abort_waiting", None

    def _unload(self, model: str) -> tuple[str, str | None]:
        conn = self._conn()
        try:
            conn.request("POST", f"/api/models/unload/{model}")
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status == 200:
            return "unload", None
        return self._error(resp.status, body, "unload")


def chaos(d: Daemon, run_id: str, stop: threading.Event, rng: random.Random, every: float,
          kills: list) -> None:
    """SIGKILL a random running child now and then (an OOM killer, a segfault)."""
    while not stop.wait(rng.uniform(every * 0.5, every * 1.5)):
        try:
            running = d.running()
        except Exception:
            continue
        ours = set(run_pids(run_id))
        victims = [m for m in running if m.get("pid") in ours and m.get("state") == "ready"]
        if victims:
            victim = rng.choice(victims)
            try:
                os.kill(victim["pid"], signal.SIGKILL)
                kills.append(victim["model"])
            except ProcessLookupError:
                pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=180.0, help="seconds of traffic (default 180)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-wait", type=float, default=2.0, help="scheduler.maxWait (default 2)")
    p.add_argument("--chaos-every", type=float, default=4.0, help="mean seconds between SIGKILLs of a child")
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "soak.json"))
    args = p.parse_args(argv)

    run_id = f"{os.getpid()}x{args.seed}"
    cfg = build_config(run_id, args.max_wait)
    d = Daemon(cfg)
    d.start()
    pid = d.proc.pid
    print(f"daemon pid {pid} on port {d.port}; {args.clients} clients for {args.duration:.0f}s", flush=True)
    stats = Stats()
    rng = random.Random(args.seed)
    seen_pgids: set[int] = set()
    rss: list[tuple[float, int]] = []
    kills: list[str] = []
    stop = threading.Event()
    t_start = time.monotonic()
    deadline = t_start + args.duration
    clients = [Client(d.port, stats, deadline, args.seed * 1000 + i, args.request_timeout)
               for i in range(args.clients)]
    chaos_thread = threading.Thread(target=chaos, args=(d, run_id, stop, rng, args.chaos_every, kills),
                                    daemon=True)
    rc_daemon = None
    try:
        for c in clients:
            c.start()
        chaos_thread.start()
        while any(c.is_alive() for c in clients):
            value = rss_kib(pid)
            if value is not None:
                rss.append((time.monotonic() - t_start, value))
            seen_pgids.update(run_pids(run_id))
            try:
                d.record_children()
            except Exception:
                pass
            done = sum(stats.outcomes.values())
            print(f"  t={time.monotonic() - t_start:5.0f}s requests={done} rss={value} KiB "
                  f"lost={len(stats.lost)} hung={len(stats.hung)}", flush=True)
            for c in clients:
                c.join(timeout=max(0.0, 10.0 / len(clients)))
        stop.set()
        chaos_thread.join(10)
        healthy = d.request("GET", "/health", timeout=5).status == 200
        status, body = d.chat("a")
        final_request_ok = status == 200
        rss.append((time.monotonic() - t_start, rss_kib(pid) or 0))
        seen_pgids.update(d.child_pids)
        rc_daemon = d.stop(timeout=30)
    finally:
        stop.set()
        time.sleep(0.5)
        orphans = sorted(set(run_pids(run_id)) | set(group_members(seen_pgids)))
        d.kill()
        for orphan in orphans:               # never leave them behind, but count them first
            try:
                os.kill(orphan, signal.SIGKILL)
            except ProcessLookupError:
                pass

    overlaps = exclusive_overlaps(d.stdout.text())
    total = sum(stats.outcomes.values())
    warm = [v for t, v in rss if t >= min(20.0, args.duration / 4)] or [v for _, v in rss]
    lat = sorted(stats.latencies)
    result = {
        "duration_s": args.duration,
        "clients": args.clients,
        "seed": args.seed,
        "max_wait": args.max_wait,
        "requests": total,
        "outcomes": dict(sorted(stats.outcomes.items())),
        "lost": len(stats.lost),
        "hung": len(stats.hung),
        "lost_examples": stats.lost[:20],
        "hung_examples": stats.hung[:20],
        "chaos_kills": len(kills),
        "process_groups_seen_sampled": len(seen_pgids),
        "orphans": len(orphans),
        "exclusive_overlaps": len(overlaps),
        "overlap_examples": overlaps[:10],
        "orphan_pids": orphans,
        "daemon_exit_status": rc_daemon,
        "healthy_at_end": healthy,
        "request_after_soak_ok": final_request_ok,
        "rss_kib": {"start": rss[0][1] if rss else None, "after_warmup": warm[0] if warm else None,
                    "peak": max(v for _, v in rss) if rss else None, "end": rss[-1][1] if rss else None},
        "latency_ok_s": {"p50": lat[len(lat) // 2] if lat else None,
                         "p99": lat[int(len(lat) * 0.99)] if lat else None},
    }
    result["rss_kib"]["growth_after_warmup"] = (
        result["rss_kib"]["end"] - result["rss_kib"]["after_warmup"]
        if result["rss_kib"]["end"] is not None and result["rss_kib"]["after_warmup"] is not None else None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    rows = [("requests", total), ("lost (must be 0)", result["lost"]), ("hung (must be 0)", result["hung"]),
            ("orphan processes (must be 0)", result["orphans"]),
            ("exclusive models alive together (must be 0)", result["exclusive_overlaps"]),
            ("daemon exit status after SIGTERM", rc_daemon),
            ("healthy / next request ok at end", f"{healthy} / {final_request_ok}"),
            ("upstream process groups seen (sampled)", len(seen_pgids)), ("chaos SIGKILLs", len(kills)),
            ("RSS start / after warm-up / peak / end (KiB)",
             "{start} / {after_warmup} / {peak} / {end}".format(**result["rss_kib"])),
            ("RSS growth after warm-up (KiB)", result["rss_kib"]["growth_after_warmup"]),
            ("ok latency p50 / p99 (s)", "{:.3f} / {:.3f}".format(*(result["latency_ok_s"][k] or 0
                                                                     for k in ("p50", "p99"))))]
    rows += [(f"  outcome {k}", v) for k, v in result["outcomes"].items()]
    width = max(len(r[0]) for r in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for example in result["lost_examples"] + result["hung_examples"] + result["overlap_examples"]:
        print("  !", example)
    print(f"\nwrote {out}")
    ok = result["lost"] == 0 and result["hung"] == 0 and result["orphans"] == 0 and rc_daemon == 0 \
        and not overlaps \
        and healthy and final_request_ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
