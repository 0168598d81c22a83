"""The forwarding floor: CPU per proxied request and per streamed chunk of twisted.web + the
forwarder alone, without the daemon's bookkeeping (admission, records, metrics, logs).

A server process answers on one port with one of these resources; a Go (or Python) upstream
stands behind it; ``loadgen`` drives it; the figure is the server's ``/proc`` CPU time divided
by the requests (or chunks) it served:

* ``self``: a twisted.web resource that answers by itself (the server's own floor);
* ``treq``: a naive treq proxy (one persistent pool, ``treq.request`` + ``treq.content``);
* ``forward``: ``llamaswap.proxy``'s ``Forwarder`` and client, as the daemon forwards.

    python bench/profile_client.py [--upstream ../shared/bench/fakeupstream] [--modes self,treq,forward]
        [--seconds 5] [--conc 1,32] [--chunks 2000 --delay-ms 0.2 --streams 5] [--profile DIR]

The stream figures (``--chunks 0``: none) are CPU per chunk and each chunk's one-way delay (the
``bench_t``/``t`` the upstream stamps it with), beside the same streams read straight from the
upstream (``direct``). ``--tree DIR`` imports ``llamaswap`` from another checkout (to compare two versions);
``--profile DIR`` records a py-spy profile (raw) of each mode at the highest concurrency.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def serve(mode: str, port: int, upstream: int) -> None:
    """The server process: one resource answering every path."""
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Site

    base = b"http://127.0.0.1:%d" % upstream

    class Self(Resource):
        isLeaf = True

        def render(self, request):
            request.setHeader(b"content-type", b"application/json")
            return b'{"object":"chat.completion","choices":[]}'

    class Treq(Resource):
        isLeaf = True

        def __init__(self):
            super().__init__()
            import treq
            from twisted.web.client import HTTPConnectionPool
            self.treq = treq
            self.pool = HTTPConnectionPool(reactor)
            self.pool.maxPersistentPerHost = 64

        def render(self, request):
            request.content.seek(0)
            d = self.treq.request(request.method.decode(), base + request.uri, data=request.content.read(),
                                  headers={b"content-type": [b"application/json"]}, pool=self.pool)

            def got(response):
                request.setResponseCode(response.code)
                for name, values in response.headers.getAllRawHeaders():
                    if name.lower() not in (b"content-length", b"transfer-encoding", b"connection"):
                        request.responseHeaders.setRawHeaders(name, values)
                return self.treq.content(response).addCallback(done)

            def done(body):
                request.write(body)
                request.finish()

            d.addCallback(got).addErrback(lambda f: (request.setResponseCode(502), request.finish()))
            return NOT_DONE_YET

    class Forward(Resource):
        isLeaf = True

        def __init__(self):
            super().__init__()
            from llamaswap.proxy import Forwarder, make_http_client, upstream_headers
            self.forwarder = Forwarder(reactor)
            self.http, _ = make_http_client(reactor)
            self.upstream_headers = upstream_headers

        def render(self, request):
            request.content.seek(0)
            body = request.content.read()
            d = self.forwarder.forward(
                request, http=self.http, url=base + request.uri,
                headers=self.upstream_headers(request, False, b"http"), body=lambda: body, model_id="m",
                still_ready=lambda: True)

            def done(outcome):
                if not request.finished and not getattr(request, "_disconnected", False):
                    request.finish()

            d.addCallbacks(done, lambda f: (request.setResponseCode(502), request.finish()))
            return NOT_DONE_YET

    class Request(__import__("twisted.web.server", fromlist=["Request"]).Request):
        client_gone = False

        def connectionLost(self, reason):
            self.client_gone = True
            super().connectionLost(reason)

    resource = {"self": Self, "treq": Treq, "forward": Forward}[mode]()
    site = Site(resource)
    site.requestFactory = Request
    site.noisy = False
    site._parsePOSTFormSubmission = False  # as the daemon's requests: bodies are the resources' to read
    site.log = lambda request: None
    reactor.listenTCP(port, site, interface="127.0.0.1")
    reactor.run()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_SENT = re.compile(rb'"(t|bench_t)":([0-9.e+-]+)')


def _sent_times(data: bytes) -> list:
    """The monotonic send time of every SSE event in ``data`` (Go stand-in: ns; Python's: s)."""
    return [float(v) / 1e9 if k == b"bench_t" else float(v) for k, v in _SENT.findall(data)]


def measure(mode: str, upstream_port: int, args: argparse.Namespace) -> dict:
    import loadgen
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", mode, "--port", str(port),
                               "--upstream-port", str(upstream_port), "--tree", args.tree], cwd=str(HERE.parent))
    out: dict = {}
    try:
        wait_port(port)
        raw = loadgen.chat_request("m")
        client = loadgen.SyncClient(port)
        for _ in range(200):
            assert client.request(raw)["status"] == 200
        concs = [int(c) for c in args.conc.split(",")]
        for conc in concs:
            loadgen.throughput(port, raw, conc, 0.5, warmup=0)
            spy = None
            if args.profile and conc == max(concs):
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                seconds = str(max(1, int(args.seconds) - 1))
                spy = subprocess.Popen(["py-spy", "record", "-p", str(server.pid), "-d", seconds,
                                        "-r", "250", "-f", "raw", "-o", f"{args.profile}/{mode}_c{conc}.txt"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            c0 = cpu_seconds(server.pid)
            r = loadgen.throughput(port, raw, conc, args.seconds, warmup=0)
            used = cpu_seconds(server.pid) - c0
            if spy is not None:
                spy.wait()
            out[f"c{conc}"] = {"cpu_us_per_request": round(used / max(1, r["requests"]) * 1e6, 1),
                               "rps": round(r["rps"]), "errors": r["errors"]}
        if mode != "self" and args.chunks:
            path = b"/v1/chat/completions?chunks=%d&delay_ms=%s" % (args.chunks, repr(args.delay_ms).encode())
            sraw = loadgen.chat_request("m", stream=True, path=path)
            client.request(sraw)
            lags: list = []
            c0 = cpu_seconds(server.pid)
            for _ in range(args.streams):
                r = client.request(sraw, on_chunk=lambda data, t: lags.extend(t - sent for sent in _sent_times(data)))
                assert r["status"] == 200, r["head"]
            used = cpu_seconds(server.pid) - c0
            n = len(lags)
            out["stream"] = {"chunks": n, "cpu_us_per_chunk": round(used / max(1, n) * 1e6, 2),
                             "lag_p50_ms": round(loadgen.percentile(lags, 50) * 1e3, 3),
                             "lag_p99_ms": round(loadgen.percentile(lags, 99) * 1e3, 3)}
        client.close()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    return out


def direct(port: int, args: argparse.Namespace) -> dict:
    """The same streams straight from the upstream: the lag the proxy's figures add to."""
    import loadgen
    path = b"/v1/chat/completions?chunks=%d&delay_ms=%s" % (args.chunks, repr(args.delay_ms).encode())
    sraw = loadgen.chat_request("m", stream=True, path=path)
    client = loadgen.SyncClient(port)
    client.request(sraw)
    lags: list = []
    for _ in range(args.streams):
        client.request(sraw, on_chunk=lambda data, t: lags.extend(t - sent for sent in _sent_times(data)))
    client.close()
    return {"stream": {"chunks": len(lags), "lag_p50_ms": round(loadgen.percentile(lags, 50) * 1e3, 3),
                       "lag_p99_ms": round(loadgen.percentile(lags, 99) * 1e3, 3)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--upstream", default=str(HERE.parent.parent / "shared" / "bench" / "fakeupstream"),
                    help="the upstream command (given --port N); the Go stand-in by default")
    ap.add_argument("--modes", default="self,treq,forward")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--conc", default="1,32")
    ap.add_argument("--chunks", type=int, default=2000)
    ap.add_argument("--delay-ms", type=float, default=0.2)
    ap.add_argument("--streams", type=int, default=5)
    ap.add_argument("--profile", default="")
    ap.add_argument("--tree", default=str(HERE.parent), help="the directory llamaswap is imported from")
    args = ap.parse_args()
    if args.serve:
        sys.path.insert(0, args.tree)
        serve(args.serve, args.port, args.upstream_port)
        return 0
    up_port = free_port()
    upstream = subprocess.Popen([*shlex.split(args.upstream), "--port", str(up_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(up_port)
        results = {mode: measure(mode, up_port, args) for mode in args.modes.split(",")}
        if args.chunks:
            results["direct"] = direct(up_port, args)
    finally:
        upstream.send_signal(signal.SIGTERM)
        upstream.wait(10)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
