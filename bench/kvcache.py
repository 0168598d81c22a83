"""Bench: a swap-back continuation with and without ``keepCache`` on the real llama-server.

::

    python bench/kvcache.py [--contexts 1024,2048,4096] [--repeats 3] [--name kv_cache]

For each context size and each mode (keepCache on, off) a fresh ``twistd -n llamaswap`` serves
chat-a (``-c 8192 -np 1 --slot-save-path ${CACHE_DIR}``, its context raised from the tiny model's
4096, the same command in both modes) and
chat-b, one at a time. Each repetition asks chat-a a conversation of about that many tokens,
then chat-b (a swap: chat-a is stopped, and saved with keepCache), then chat-a again with the
conversation plus one new turn, streamed. Measured on that last request: the time to its first
token (the swap back, the start, the restore and the prompt processing all included), the
prompt tokens llama-server evaluated (``timings.prompt_n``) and took from its cache
(``cache_n``); from ``/metrics``: the save and restore times. Every repetition uses another
conversation.

Target: the prompt tokens re-evaluated after a swap-back are at most 5 % of the context with
keepCache. The time ratio is reported as measured.

``bench/run.py`` runs the same thing as its ``kv_cache`` scenario (``--only kv_cache``); run
alone, this prints a table and writes ``bench/results/<name>.json``.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CONTEXTS = (1024, 2048, 4096)
#: tokens per word ("r0kt1w023") of the generated conversation on the tiny models' vocabulary (measured
#: with llama-server's /tokenize), and the chat template's tokens per turn with its answer
TOKENS_PER_WORD = 8
TOKENS_PER_TURN = 16
TURNS = 4
TARGET_FRACTION = 0.05
TARGET = "prompt tokens re-evaluated after a swap-back <= 5% of the context with keepCache"


def config(binary: str, paths: dict, keep_cache: bool) -> dict:
    """chat-a and chat-b swap each other out; only chat-a's command differs from the plain demo."""
    def cmd(name: str, extra: str = "") -> str:
        return f"{shlex.quote(binary)} -m {shlex.quote(paths[name])} --host 127.0.0.1 --port ${{PORT}} {extra}".strip()

    # the tiny models are trained on 4096 tokens and llama-server caps -c there: raise it for 4k contexts
    extra = "-c 8192 -np 1 --override-kv llama.context_length=int:8192 --slot-save-path ${CACHE_DIR}"
    return {"healthCheckTimeout": 60, "unloadTimeout": 5, "keepCache": keep_cache,
            "models": {"chat-a": {"cmd": cmd("chat-a", extra),
                                  "proxy": "http://127.0.0.1:${PORT}"},
                       "chat-b": {"cmd": cmd("chat-b"), "proxy": "http://127.0.0.1:${PORT}"}}}


def conversation(tokens: int, tag: str) -> list[dict]:
    """About ``tokens`` tokens of chat: TURNS user turns, each answered; it ends with a user turn."""
    words = max(1, round((tokens - TOKENS_PER_TURN * TURNS) / TURNS / TOKENS_PER_WORD))
    messages: list[dict] = []
    for turn in range(TURNS):
        messages.append({"role": "user", "content": " ".join(f"{tag}t{turn}w{i:03d}" for i in range(words))})
        messages.append({"role": "assistant", "content": "Hello! I am tiny chat model A."})
    return messages[:-1]


def _post(port: int, body: dict, timeout: float = 300.0) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:300]!r}")
        return json.loads(data)
    finally:
        conn.close()


def _stream(port: int, body: dict, timeout: float = 300.0) -> tuple[float, dict]:
    """(seconds to the first content token, the timings of the last event)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        t0 = time.monotonic()
        conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        first, timings = None, {}
        while True:
            line = resp.readline()
            if not line:
                break
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            delta = (event.get("choices") or [{}])[0].get("delta") or {}
            if first is None and delta.get("content"):
                first = time.monotonic() - t0
            if isinstance(event.get("timings"), dict):
                timings = event["timings"]
        if first is None:
            raise RuntimeError("no content token in the stream")
        return first, timings
    finally:
        conn.close()


def _metrics(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out = {}
    for line in text.splitlines():
        if line.startswith("llamaswap_kv_") and 'model="chat-a"' in line:
            name = line.split("{", 1)[0]
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


def _one_mode(port: int, tokens: int, repeats: int, mode: str) -> dict:
    runs = []
    for rep in range(repeats):
        messages = conversation(tokens, f"r{rep}{mode[0]}")
        cold = _post(port, {"model": "chat-a", "messages": messages})["timings"]
        before = _metrics(port)
        _post(port, {"model": "chat-b", "messages": [{"role": "user", "content": "hi"}]})
        messages += [{"role": "assistant", "content": "Hello! I am tiny chat model A."},
                     {"role": "user", "content": "And one more thing?"}]
        ttft, back = _stream(port, {"model": "chat-a", "messages": messages})
        after = _metrics(port)

        def delta(name: str) -> Optional[float]:
            return round(after[name] - before.get(name, 0.0), 4) if name in after else None

        runs.append({"context_tokens": cold.get("prompt_n", 0) + cold.get("cache_n", 0),
                     "ttft_s": round(ttft, 4), "prompt_n": back.get("prompt_n"), "cache_n": back.get("cache_n"),
                     "prompt_ms": back.get("prompt_ms"),
                     "save_s": delta("llamaswap_kv_save_duration_seconds_sum"),
                     "restore_s": delta("llamaswap_kv_restore_duration_seconds_sum"),
                     "saved_bytes": delta("llamaswap_kv_saved_bytes_total")})

    def med(key: str) -> Optional[float]:
        values = [r[key] for r in runs]
        return statistics.median(values) if all(v is not None for v in values) else None

    return {"runs": runs, "ttft_p50_ms": round(med("ttft_s") * 1000, 2), "prompt_n_p50": med("prompt_n"),
            "cache_n_p50": med("cache_n"), "context_tokens": med("context_tokens"),
            "save_p50_ms": None if med("save_s") is None else round(med("save_s") * 1000, 2),
            "restore_p50_ms": None if med("restore_s") is None else round(med("restore_s") * 1000, 2),
            "saved_bytes_p50": med("saved_bytes")}


def scenario(start: Callable[[dict, Path], Any], binary: str, paths: dict, workdir: Path,
             contexts: tuple = CONTEXTS, repeats: int = 3, log: Callable[[str], None] = print) -> dict:
    """The measurements for every context size; ``start(config, workdir)`` is a context manager
    running llamaswap with ``config`` (it has ``.port``)."""
    out: dict = {"contexts": list(contexts), "repeats": repeats, "target": TARGET}
    for tokens in contexts:
        row: dict = {}
        for mode, keep in (("keepCache", True), ("cold", False)):
            wd = workdir / f"kv{tokens}-{mode}"
            wd.mkdir(parents=True, exist_ok=True)
            with start(config(binary, paths, keep), wd) as proxy:
                row[mode] = _one_mode(proxy.port, tokens, repeats, mode)
            done = row[mode]
            log(f"   {tokens} tokens, {mode}: TTFT {done['ttft_p50_ms']} ms, prompt_n {done['prompt_n_p50']}, "
                f"cache_n {done['cache_n_p50']}")
        kept, cold = row["keepCache"], row["cold"]
        context = kept["context_tokens"] or tokens
        row["ttft_ratio"] = round(kept["ttft_p50_ms"] / cold["ttft_p50_ms"], 3)
        row["reevaluated_fraction"] = round(kept["prompt_n_p50"] / context, 4)
        row["target_met"] = row["reevaluated_fraction"] <= TARGET_FRACTION
        out[str(tokens)] = row
    out["targets_met"] = all(out[str(t)]["target_met"] for t in contexts)
    return out


def table(result: dict) -> list[tuple]:
    """(context, TTFT keepCache / cold ms, ratio, prompt tokens evaluated keepCache / cold, cache_n,
    save / restore ms, met) rows."""
    rows = []
    for tokens in result.get("contexts", []):
        r = result.get(str(tokens))
        if not r:
            continue
        k, c = r["keepCache"], r["cold"]
        rows.append((f"{k['context_tokens']:.0f}", f"{k['ttft_p50_ms']} / {c['ttft_p50_ms']}", f"{r['ttft_ratio']}",
                     f"{k['prompt_n_p50']:.0f} / {c['prompt_n_p50']:.0f}", f"{k['cache_n_p50']:.0f}",
                     f"{k['save_p50_ms']} / {k['restore_p50_ms']}",
                     f"{100 * r['reevaluated_fraction']:.1f}%", "yes" if r["target_met"] else "NO"))
    return rows


def render(result: dict) -> str:
    head = ("context tokens", "TTFT ms keepCache / cold", "ratio", "prompt tokens evaluated keepCache / cold",
            "cache_n", "save / restore ms", "re-evaluated", "<= 5%")
    body = table(result)
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda r: " | ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(head), "+".join("-" * (w + 2) for w in widths), *[fmt(r) for r in body]])


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default=",".join(str(c) for c in CONTEXTS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name", default="kv_cache")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import run as benchrun  # the daemon launcher and llama-server finder of bench/run.py

    bench = benchrun.Bench(argparse.Namespace(smoke=False, quick=True, compare_cmd=None, compare_name="compare",
                                              only=None))
    found = bench._llama()
    if found is None:
        print("no llama-server: install '.[llama]' or set LLAMASWAP_LLAMA_SERVER")
        return 1
    binary, paths = found
    target = benchrun.ProxyTarget("llamaswap", None)
    workdir = Path(tempfile.mkdtemp(prefix="llamaswap-kvbench-"))
    t0 = time.monotonic()
    contexts = tuple(int(c) for c in args.contexts.split(","))
    result = scenario(target.start, binary, paths, workdir, contexts, args.repeats,
                      log=lambda m: sys.stderr.write(m + "\n"))
    doc = {"name": args.name, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                          "platform": platform.platform()},
           "load_average": [round(x, 2) for x in os.getloadavg()],
           "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
           "seconds": round(time.monotonic() - t0, 1), "kv_cache": result, "table": [list(r) for r in table(result)]}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.name}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(render(result))
    print(f"\nwritten {path} ({doc['seconds']} s)")
    import shutil
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
