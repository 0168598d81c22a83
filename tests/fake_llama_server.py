"""A fake llama-server for tests that run real processes (the fake upstream's documented behaviour).

Run it as ``python tests/fake_llama_server.py --port N [options]``; it binds
127.0.0.1 only. It is also importable: :func:`parse_args` and :func:`make_site`
build the same server for use on another reactor.

It imitates the parts of llama.cpp's ``llama-server`` that llamaswap depends on
(``/health`` while loading, OpenAI JSON and SSE responses with ``usage`` and
``timings``), and adds knobs to misbehave on purpose: a slow load, a crash at
start, a crash in the middle of a stream, ignoring SIGTERM, a grandchild left in
the process group. Everything it does is written to stderr (startup lines and
one access line per request), so tests can check log capture; ``--silent``
turns all of that off.

Routes (Appendix A plus extras):

* ``GET /health``: 503 ``{"status":"loading"}`` until ``--load-delay`` has
  passed, then 200 ``{"status":"ok"}``. While loading, every other route also
  answers 503, as llama-server does.
* ``GET /v1/models`` (and ``/models``): one entry, the ``--model`` name.
* ``POST /v1/chat/completions``: JSON, or SSE when ``"stream": true``: N
  ``data:`` chunks (``--chunks``, ``?chunks=``), then one chunk with ``usage``
  and ``timings``, then ``data: [DONE]``. ``?wait=<s>`` (``--chunk-delay``)
  sleeps between chunks and ``?die_after=<n>`` (``--crash-after-chunks``)
  exits the process after n chunks, without ending the response.
  Each chunk's ``delta.content`` is ``"asdf"`` by default; with ``--respond
  TEXT`` the pieces concatenate to TEXT.
* ``POST /v1/completions``, ``/completion``, ``/v1/embeddings``, ``/v1/rerank``
  (and the other rerank spellings), ``/infill``, ``/v1/messages``,
  ``/v1/messages/count_tokens``, ``/v1/responses``, ``/v1/audio/speech``,
  ``/v1/images/generations``: a JSON echo with ``model``, ``usage``,
  ``responseMessage``, ``request_body`` and ``path``.
* ``POST /v1/audio/transcriptions`` (and ``/v1/images/edits``): multipart;
  ``model`` (form field, or ``?model=``) and ``file`` are required;
  ``{"text":"The length of the file is N bytes","model":...}``.
* ``GET /slow-respond?echo=X&delay=0.1``: X, one character at a time.
* ``GET /env``: the process environment, ``KEY=VALUE`` lines.
* ``GET /info``: ``{"pid","pgid","sid","ppid","model","port","grandchild_pid"}``.
* ``GET /spew?bytes=N``: writes about N bytes of log lines to stderr, then answers
  ``{"written","seconds"}`` (a reader that stops reading the pipe makes it hang).
* ``POST /v1/chat/completions?die``: a non-streamed request during which the process
  exits before sending any response header.
* A stream whose client goes away logs ``E fake: client went away after N chunks``.
* ``/`` (any method): ``"<METHOD> /"``.
* anything else: a JSON echo of method, path, query, headers and body.
"""
from __future__ import annotations

import argparse
import email.parser
import email.policy
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

STREAM_USAGE = {"prompt_tokens": 25, "completion_tokens": 10, "total_tokens": 35}
STREAM_TIMINGS = {
    "prompt_n": 25,
    "predicted_n": 10,
    "prompt_per_second": 100,
    "predicted_per_second": 10,
    "prompt_ms": 250.0,
    "predicted_ms": 1000.0,
    "cache_n": 0,
}

# POST routes answered with a JSON echo (Appendix A: "JSON echo including model and usage").
ECHO_ROUTES = {
    "/v1/completions",
    "/completion",
    "/completions",
    "/v1/embeddings",
    "/embeddings",
    "/v1/rerank",
    "/v1/reranking",
    "/rerank",
    "/reranking",
    "/infill",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/v1/audio/speech",
    "/v1/images/generations",
}
MULTIPART_ROUTES = {"/v1/audio/transcriptions", "/v1/images/edits"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (Appendix A options plus test knobs)."""
    p = argparse.ArgumentParser(prog="fake_llama_server", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True, help="port to bind on 127.0.0.1")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--model", default="fake", help="model name reported by the server")
    p.add_argument("--respond", default=None, help="response text (default 'hi'; streams 'asdf' chunks)")
    p.add_argument("--load-delay", type=float, default=0.0, help="seconds /health answers 503")
    p.add_argument("--ignore-sigterm", action="store_true", help="ignore SIGTERM (and SIGINT)")
    p.add_argument("--exit-after", type=float, default=None, help="exit(1) after SECONDS (a crash)")
    p.add_argument("--print-pid", action="store_true", help="print 'fake_llama_server pid=N' on stdout")
    p.add_argument("--fork-child", action="store_true",
                   help="start a grandchild 'sleep 600' in the same process group")
    p.add_argument("--exit-at-start", type=int, default=None, metavar="CODE",
                   help="print a load error on stderr and exit with CODE at once")
    p.add_argument("--exit-at-start-marker", default=None, metavar="PATH",
                   help="with --exit-at-start: fail only while PATH does not exist (then create it), "
                        "so the first start fails and the next one succeeds")
    p.add_argument("--chunks", type=int, default=10, help="SSE content chunks (default 10)")
    p.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between SSE chunks")
    p.add_argument("--crash-after-chunks", type=int, default=None,
                   help="exit the process after N SSE chunks (like ?die_after=N)")
    p.add_argument("--split-log-lines", type=float, default=None, metavar="DELAY",
                   help="after each non-streamed chat answer, write a print_timing line to stderr "
                        "in three pieces, DELAY seconds apart (the first right after the answer)")
    p.add_argument("--silent", action="store_true", help="write nothing to stdout/stderr")
    return p.parse_args(argv)


class Output:
    """Line-oriented, always-flushed writes to stderr/stdout (pipes are block-buffered)."""

    def __init__(self, silent: bool) -> None:
        self.silent = silent

    def err(self, line: str) -> None:
        if not self.silent:
            self._write(sys.stderr, line)

    def out(self, line: str) -> None:
        if not self.silent:
            self._write(sys.stdout, line)

    def err_piece(self, text: str) -> None:
        """``text`` on stderr as is: a piece of a line, or its end if it ends with a newline."""
        if not self.silent:
            self._write(sys.stderr, text, end="")

    @staticmethod
    def _write(stream: Any, line: str, end: str = "\n") -> None:
        try:
            stream.write(line + end)
            stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            # The reader (the daemon) is gone, e.g. SIGKILLed: carry on like llama-server would,
            # and point the fd at /dev/null so later writes and the flush at exit cannot fail either.
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)
            except (OSError, ValueError):
                pass


class FakeState:
    """What the server knows about itself; shared by the resource and main()."""

    def __init__(self, args: argparse.Namespace, clock: Any, out: Output) -> None:
        self.args = args
        self.clock = clock
        self.out = out
        self.started = time.monotonic()
        self.grandchild: subprocess.Popen | None = None
        self.port = args.port

    @property
    def respond(self) -> str:
        return "hi" if self.args.respond is None else self.args.respond

    def loaded(self) -> bool:
        return time.monotonic() - self.started >= self.args.load_delay

    def stream_pieces(self, n: int) -> list[str]:
        """N content pieces: 'asdf' each by default, else TEXT split so that they join to TEXT."""
        if self.args.respond is None:
            return ["asdf"] * n
        text = self.args.respond
        return [text[i * len(text) // n:(i + 1) * len(text) // n] for i in range(n)]

    def crash(self, why: str, code: int = 1) -> None:
        self.out.err(f"E fake: {why}; exiting with code {code}")
        os._exit(code)


def _qs(request: server.Request) -> dict[str, str]:
    query = urlsplit(request.uri.decode("latin-1")).query
    return {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}


def _json(request: server.Request, obj: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    return json.dumps(obj).encode("utf-8")


def _headers(request: server.Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, values in request.requestHeaders.getAllRawHeaders():
        out[name.decode("latin-1").lower()] = ", ".join(v.decode("latin-1") for v in values)
    return out


def _parse_json(body: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(body) if body else {}
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


class FakeLlamaResource(Resource):
    """The whole route table; a leaf, dispatching on method and path."""

    isLeaf = True

    def __init__(self, state: FakeState) -> None:
        super().__init__()
        self.state = state

    def render(self, request: server.Request) -> bytes | int:
        path = request.path.decode("latin-1")
        method = request.method.decode("latin-1")
        if path == "/health":
            if self.state.loaded():
                return _json(request, {"status": "ok"})
            return _json(request, {"status": "loading"}, 503)
        if not self.state.loaded():
            return _json(request, {"error": {"code": 503, "message": "Loading model",
                                             "type": "unavailable_error"}}, 503)
        body = request.content.read() if request.content is not None else b""
        if method == "POST" and path == "/v1/chat/completions":
            return self.chat(request, body)
        if method == "POST" and path in ECHO_ROUTES:
            return self.echo(request, path, body)
        if method == "POST" and path in MULTIPART_ROUTES:
            return self.multipart(request, body)
        if method == "GET" and path in ("/v1/models", "/models"):
            return _json(request, {"object": "list", "data": [
                {"id": self.state.args.model, "object": "model", "created": 0, "owned_by": "fake"}]})
        if method == "GET" and path == "/slow-respond":
            return self.slow_respond(request)
        if method == "GET" and path == "/env":
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return "".join(f"{k}={v}\n" for k, v in os.environ.items()).encode("utf-8", "replace")
        if method == "GET" and path == "/info":
            return _json(request, self.info())
        if method == "GET" and path == "/spew":
            return self.spew(request)
        if path == "/":
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return f"{method} {path}".encode("utf-8")
        return _json(request, {
            "method": method,
            "path": path,
            "uri": request.uri.decode("latin-1"),
            "query": _qs(request),
            "headers": _headers(request),
            "body": body.decode("utf-8", "replace"),
            "model": self.state.args.model,
        })

    def info(self) -> dict[str, Any]:
        g = self.state.grandchild
        return {"pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0), "ppid": os.getppid(),
                "model": self.state.args.model, "port": self.state.port,
                "grandchild_pid": g.pid if g is not None else None}

    # -- chat -----------------------------------------------------------------------------------

    def chat(self, request: server.Request, body: bytes) -> bytes | int:
        req = _parse_json(body)
        if req is None:
            return _json(request, {"error": {"code": 400, "message": "invalid JSON body",
                                             "type": "invalid_request_error"}}, 400)
        model = req.get("model") if isinstance(req.get("model"), str) else self.state.args.model
        if req.get("stream") is True:
            return self.stream(request, model)
        if "die" in _qs(request):
            # A crash during a non-streamed generation: no response headers at all.
            request.notifyFinish().addErrback(lambda _: None)
            self.state.clock.callLater(0.05, self.state.crash, "died while generating (die)")
            return server.NOT_DONE_YET
        if self.state.args.split_log_lines is not None:
            self.timing_in_pieces(self.state.args.split_log_lines)
        return _json(request, {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "served_by": self.state.args.model,
            "responseMessage": self.state.respond,
            "request_body": body.decode("utf-8", "replace"),
            "h_content_length": request.getHeader(b"content-length") and
            request.getHeader(b"content-length").decode("latin-1"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": self.state.respond}}],
            "usage": dict(STREAM_USAGE),
            "timings": dict(STREAM_TIMINGS),
        })

    def timing_in_pieces(self, delay: float) -> None:
        """--split-log-lines: one llama-server print_timing line, written in three pieces."""
        pieces = ["slot print_timing: id  0 | task 1 | ",
                  "prompt eval time =     250.00 ms /    25 tokens",
                  " (  10.00 ms per token,   100.00 tokens per second)\n"]
        for i, piece in enumerate(pieces):  # the first right after this request's access line
            self.state.clock.callLater(i * delay, self.state.out.err_piece, piece)

    def stream(self, request: server.Request, model: str) -> int:
        qs = _qs(request)
        args = self.state.args
        n = int(qs.get("chunks", args.chunks))
        wait = float(qs.get("wait", args.chunk_delay))
        die_after = qs.get("die_after")
        die = int(die_after) if die_after is not None else args.crash_after_chunks
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        created = int(time.time())

        def event(obj: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps(obj).encode("utf-8") + b"\n\n"

        def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> bytes:
            return event({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created,
                          "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                          **extra})

        pieces = self.state.stream_pieces(n)
        gone: list[bool] = []
        sent = [0]

        def finished(result: Any) -> None:
            gone.append(True)
            if isinstance(result, Failure):      # the client (llamaswap) closed the connection
                self.state.out.err(f"E fake: client went away after {sent[0]} chunks")

        request.notifyFinish().addBoth(finished)

        def step(i: int) -> None:
            sent[0] = i
            if gone:
                return
            if die is not None and i >= die:
                # Flush what was written, drop the connection without the last chunk, then die.
                request.channel.transport.loseConnection()
                self.state.clock.callLater(0.05, self.state.crash, f"died after {i} chunks (die_after)")
                return
            if i < n:
                delta = {"role": "assistant", "content": pieces[i]} if i == 0 else {"content": pieces[i]}
                request.write(chunk(delta, None))
                self.state.clock.callLater(wait, step, i + 1)
                return
            request.write(chunk({}, "stop", usage=dict(STREAM_USAGE), timings=dict(STREAM_TIMINGS)))
            request.write(b"data: [DONE]\n\n")
            request.finish()

        step(0)
        return server.NOT_DONE_YET

    # -- other routes ---------------------------------------------------------------------------

    def spew(self, request: server.Request) -> bytes:
        """Write ``?bytes=N`` bytes of log lines to stderr (blocking writes), then answer."""
        total = int(_qs(request).get("bytes", "65536"))
        line = "I fake: spew " + "x" * 100
        t0 = time.monotonic()
        written = 0
        while written < total:
            self.state.out.err(line)
            written += len(line) + 1
        return _json(request, {"written": written, "seconds": time.monotonic() - t0})

    def echo(self, request: server.Request, path: str, body: bytes) -> bytes:
        req = _parse_json(body) or {}
        model = req.get("model") if isinstance(req.get("model"), str) else self.state.args.model
        text = self.state.respond
        out: dict[str, Any] = {
            "object": "fake.echo",
            "path": path,
            "model": model,
            "served_by": self.state.args.model,
            "responseMessage": text,
            "request_body": body.decode("utf-8", "replace"),
            "h_content_length": (request.getHeader(b"content-length") or b"").decode("latin-1"),
            "usage": dict(STREAM_USAGE),
        }
        if path in ("/v1/messages", "/v1/messages/count_tokens"):
            out.update(type="message", role="assistant", content=[{"type": "text", "text": text}],
                       usage={"input_tokens": 25, "output_tokens": 10}, input_tokens=25)
        elif path in ("/v1/completions", "/completions"):
            out["choices"] = [{"index": 0, "text": text, "finish_reason": "stop"}]
        elif path in ("/completion", "/infill"):
            out.update(content=text, timings=dict(STREAM_TIMINGS))
        elif path in ("/v1/embeddings", "/embeddings"):
            out["data"] = [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}]
        elif "rerank" in path:
            out["results"] = [{"index": 0, "relevance_score": 0.9}]
        return _json(request, out)

    def multipart(self, request: server.Request, body: bytes) -> bytes:
        ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
        if not ctype.lower().startswith("multipart/form-data"):
            return _json(request, {"error": {"code": 400, "message": "expected multipart/form-data",
                                             "type": "invalid_request_error"}}, 400)
        raw = f"Content-Type: {ctype}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1") + body
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
        fields: dict[str, str] = {}
        file_len: int | None = None
        file_name = None
        if msg.is_multipart():
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                if name is None:
                    continue
                payload = part.get_payload(decode=True) or b""
                if part.get_filename() is not None or name == "file":
                    if name == "file":
                        file_len, file_name = len(payload), part.get_filename()
                else:
                    fields[name] = payload.decode("utf-8", "replace")
        model = fields.get("model") or _qs(request).get("model")
        if not model or file_len is None:
            missing = "model" if not model else "file"
            return _json(request, {"error": {"code": 400, "message": f"missing '{missing}'",
                                             "type": "invalid_request_error"}}, 400)
        return _json(request, {"text": f"The length of the file is {file_len} bytes", "model": model,
                               "filename": file_name, "fields": fields, "served_by": self.state.args.model,
                               "h_content_length": (request.getHeader(b"content-length") or b"").decode()})

    def slow_respond(self, request: server.Request) -> int:
        qs = _qs(request)
        text = qs.get("echo", "")
        delay = float(qs.get("delay", "0.1"))
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        gone: list[bool] = []
        request.notifyFinish().addBoth(lambda _: gone.append(True))

        def step(i: int) -> None:
            if gone:
                return
            if i >= len(text):
                request.finish()
                return
            request.write(text[i].encode("utf-8"))
            self.state.clock.callLater(delay, step, i + 1)

        step(0)
        return server.NOT_DONE_YET


class FakeSite(server.Site):
    """A Site whose access log is a llama-server-like line on stderr."""

    def __init__(self, resource: Resource, state: FakeState, **kw: Any) -> None:
        super().__init__(resource, **kw)
        self.state = state

    def log(self, request: server.Request) -> None:
        ip = request.getClientAddress()
        host = getattr(ip, "host", "-")
        self.state.out.err(
            f"srv  log_server_r: request: {request.method.decode()} {request.uri.decode('latin-1')} "
            f"{host} {request.code}")


def make_site(args: argparse.Namespace, reactor: Any = None, out: Output | None = None) -> FakeSite:
    """Build the fake server's Site (importable entry point)."""
    if reactor is None:
        from twisted.internet import reactor
    state = FakeState(args, reactor, out or Output(args.silent))
    return FakeSite(FakeLlamaResource(state), state, reactor=reactor)


def _install_signals(reactor: Any, state: FakeState) -> None:
    def on_term(signum: int, frame: Any) -> None:
        reactor.callFromThread(_stop, reactor)      # first: logging below must never prevent the exit
        state.out.err(f"main: received signal {signum}, exiting")

    if state.args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)


def _stop(reactor: Any) -> None:
    if reactor.running:
        reactor.stop()
    else:                                  # signalled before run(): stop as soon as it starts
        reactor.callWhenRunning(reactor.stop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Output(args.silent)
    if args.print_pid:
        out.out(f"fake_llama_server pid={os.getpid()}")
    out.err(f"main: fake llama-server build=0 model='{args.model}' pid={os.getpid()} port={args.port}")
    if args.exit_at_start is not None:
        marker = args.exit_at_start_marker
        if marker is None or not os.path.exists(marker):
            if marker is not None:
                open(marker, "w").close()
            out.err(f"llama_model_load: error loading model: failed to open {args.model}.gguf")
            out.err(f"E srv load_model: failed to load model '{args.model}' (pid {os.getpid()})")
            sys.stdout.flush()
            sys.stderr.flush()
            return args.exit_at_start

    from twisted.internet import reactor

    site = make_site(args, reactor, out)
    state = site.state
    _install_signals(reactor, state)      # before the listening line: a test may signal right after it
    try:
        port = reactor.listenTCP(args.port, site, interface=args.host)
    except Exception as e:  # CannotListenError
        out.err(f"E main: could not bind {args.host}:{args.port}: {e}")
        return 1
    state.port = port.getHost().port
    if args.fork_child:
        state.grandchild = subprocess.Popen(["sleep", "600"])   # same process group, inherits stdio
        out.err(f"main: forked grandchild pid={state.grandchild.pid}")
    out.err(f"main: server is listening on http://{args.host}:{state.port} - starting the main loop")
    if args.load_delay > 0:
        out.err(f"main: loading model '{args.model}' ({args.load_delay}s)")
        reactor.callLater(args.load_delay, out.err, "main: model loaded")
    else:
        out.err("main: model loaded")
    if args.exit_after is not None:
        reactor.callLater(args.exit_after, state.crash, f"--exit-after {args.exit_after}s passed")
    reactor.run(installSignalHandlers=False)
    out.err("main: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
