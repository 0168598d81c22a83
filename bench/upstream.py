"""A minimal, fast llama-server stand-in for the benchmarks (raw asyncio, stdlib only).

::

    python bench/upstream.py --port N [--load-delay S] [--start-log FILE] [--model NAME]

It is not a test double (``tests/fake_llama_server.py`` is): it exists so that the upstream
is never the bottleneck when the proxy is measured. It speaks just enough HTTP/1.1
(keep-alive, ``Content-Length`` request bodies, chunked responses):

* ``GET /health``: 503 until ``--load-delay`` has passed, then 200. The listener is up
  at once, as llama-server's is. When the load is over it prints
  ``listening on http://127.0.0.1:PORT`` on stderr, as llama-server does.
* ``POST /v1/chat/completions`` (and any other POST): a small OpenAI chat completion, or
  with ``"stream": true`` in the body an SSE stream of ``?chunks=N`` events (default 10)
  ``?delay=S`` seconds apart (default 0), then ``data: [DONE]``. Every event carries
  ``"t"``: ``time.monotonic()`` when it was written (CLOCK_MONOTONIC is system-wide on
  Linux, so a client on the same machine can compute per-chunk delivery latency).
* Every response has ``X-Ready-At: <monotonic time the load finished>`` so a client can
  tell "upstream became healthy" from "first byte arrived" on one clock.

``--start-log FILE`` appends ``<model> <pid> <monotonic>`` at startup (swap counting
that works for any proxy). SIGTERM/SIGINT exit at once with status 0.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from urllib.parse import parse_qs

_CHAT = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "",
         "choices": [{"index": 0, "finish_reason": "stop",
                      "message": {"role": "assistant", "content": "Hello! I am a bench upstream."}}],
         "usage": {"prompt_tokens": 14, "completion_tokens": 10, "total_tokens": 24}}


class Upstream:
    def __init__(self, model: str, load_delay: float) -> None:
        self.model = model
        self.started = time.monotonic()
        self.load_delay = load_delay
        self.ready_at = 0.0  # set by mark_ready()
        self.ready = False
        chat = dict(_CHAT, model=model)
        self.chat_body = json.dumps(chat, separators=(",", ":")).encode()
        self.port = 0

    def mark_ready(self) -> None:
        self.ready = True
        self.ready_at = time.monotonic()
        sys.stderr.write(f"bench upstream {self.model}: listening on http://127.0.0.1:{self.port}\n")
        sys.stderr.flush()


class HTTPProtocol(asyncio.Protocol):
    def __init__(self, server: Upstream) -> None:
        self.server = server
        self.buf = b""
        self.transport = None
        self.busy = False  # a streamed response is being written; later requests wait

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._process()

    def _process(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            lower = head.lower()
            i = lower.find(b"\r\ncontent-length:")
            if i >= 0:
                j = lower.find(b"\r\n", i + 2)
                length = int(head[i + 17:j if j >= 0 else len(head)])
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            line = head[:head.find(b"\r\n")] if b"\r\n" in head else head
            method, _, rest = line.partition(b" ")
            target = rest.rpartition(b" ")[0]
            close = b"\r\nconnection: close" in lower
            self._handle(method, target, body, close)

    def _respond(self, status: bytes, body: bytes, close: bool, ctype: bytes = b"application/json") -> None:
        s = self.server
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\nX-Ready-At: " + repr(s.ready_at).encode()
            + (b"\r\nConnection: close" if close else b"") + b"\r\n\r\n" + body)
        if close:
            self.transport.close()

    def _handle(self, method: bytes, target: bytes, body: bytes, close: bool) -> None:
        s = self.server
        path, _, query = target.partition(b"?")
        if not s.ready:
            self._respond(b"503 Service Unavailable",
                          b'{"error":{"message":"Loading model","type":"unavailable_error","code":503}}', close)
            return
        if path == b"/health":
            self._respond(b"200 OK", b'{"status":"ok"}', close)
        elif method == b"GET":
            self._respond(b"200 OK", json.dumps(
                {"object": "list", "data": [{"id": s.model, "object": "model"}]}).encode(), close)
        elif b'"stream":true' in body.replace(b" ", b""):
            q = parse_qs(query.decode("latin-1"))
            chunks = int(q.get("chunks", ["10"])[0])
            delay = float(q.get("delay", ["0"])[0])
            self._stream(chunks, delay, close)
        else:
            self._respond(b"200 OK", s.chat_body, close)

    def _stream(self, chunks: int, delay: float, close: bool) -> None:
        s = self.server
        self.busy = True
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\nX-Ready-At: " + repr(s.ready_at).encode()
            + (b"\r\nConnection: close" if close else b"") + b"\r\n\r\n")
        loop = asyncio.get_running_loop()
        prefix = b'data: {"object":"chat.completion.chunk","model":"' + s.model.encode() + \
            b'","choices":[{"index":0,"delta":{"content":"tok"}}],"t":'
        state = {"i": 0}

        def step() -> None:
            t = self.transport
            if t is None:
                return
            i = state["i"]
            if i < chunks:
                event = prefix + repr(time.monotonic()).encode() + b"}\n\n"
                t.write(b"%x\r\n%s\r\n" % (len(event), event))
                state["i"] = i + 1
                if delay > 0:
                    loop.call_later(delay, step)
                else:
                    step()
                return
            done = b"data: [DONE]\n\n"
            t.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            self.busy = False
            if close:
                t.close()
            elif self.buf:
                self._process()

        step()


async def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model", default="bench")
    p.add_argument("--load-delay", type=float, default=0.0)
    p.add_argument("--start-log", default=None)
    p.add_argument("--backlog", type=int, default=4096)
    args = p.parse_args(argv)
    if args.start_log:
        with open(args.start_log, "a") as f:
            f.write(f"{args.model} {os.getpid()} {time.monotonic()!r}\n")
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    up = Upstream(args.model, args.load_delay)
    server = await loop.create_server(lambda: HTTPProtocol(up), args.host, args.port,
                                      backlog=args.backlog, reuse_address=True)
    up.port = server.sockets[0].getsockname()[1]
    if args.load_delay <= 0:
        up.mark_ready()
    else:  # asyncio's loop.time() is time.monotonic()
        loop.call_at(up.started + args.load_delay, up.mark_ready)
    await stop
    os._exit(0)  # at once, with open streams (llama-server's 30 s linger is not what we measure)


if __name__ == "__main__":
    asyncio.run(main())
