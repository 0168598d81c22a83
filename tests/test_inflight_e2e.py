"""Cancelling a request in flight, end to end: the real daemon (``twistd -n llamaswap``) and the
fake upstream, driven over HTTP as a client and the web UI would."""
from __future__ import annotations

import json
import threading

from tests.daemon import Daemon, fake_config, fake_model, open_stream, sse_data, wait_until


def test_cancel_streaming_request_lets_queued_request_proceed(tmp_path):
    """A stream of model a is cancelled through /api/inflight/<id>/cancel: its client gets the
    cancellation as an SSE error event (no [DONE]), the upstream stops generating, and the request
    for b that waited for a to be free is served."""
    config = fake_config({"a": fake_model("a", "--chunks", "600", "--chunk-delay", "0.05"),
                          "b": fake_model("b")}, captureBuffer=1)
    with Daemon(config, tmp_path) as d:
        conn, resp = open_stream(d.port, "POST", "/v1/chat/completions",
                                 {"model": "a", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
                                 headers={"Content-Type": "application/json", "X-Session-ID": "sess-1"})
        assert resp.status == 200
        first = resp.readline()
        assert first.startswith(b"data: "), first

        waiting: dict = {}
        thread = threading.Thread(target=lambda: waiting.update(answer=d.chat("b")), daemon=True)
        thread.start()
        listed = wait_until(lambda: len(d.json("GET", "/api/inflight")[1]["requests"]) == 2, 10)
        assert listed, d.json("GET", "/api/inflight")
        requests = d.json("GET", "/api/inflight")[1]["requests"]
        stream = next(r for r in requests if r["model"] == "a")
        queued = next(r for r in requests if r["model"] == "b")
        assert stream["session_id"] == "sess-1"
        assert stream["resp_headers"]["Content-Type"].startswith("text/event-stream")
        assert stream["resp_bytes"] > 0
        assert queued["resp_headers"] == {} and queued["resp_bytes"] == 0
        assert thread.is_alive()  # b waits: a is busy

        status, body = d.json("POST", f"/api/inflight/{stream['id']}/cancel")
        assert (status, body) == (200, {"msg": "ok"})

        rest = resp.read()  # the stream ends
        conn.close()
        events = sse_data(first + rest)
        error = json.loads(events[-1])
        assert error["error"]["code"] == "request_cancelled", events[-3:]
        assert "[DONE]" not in events
        assert len(events) < 600  # far from the whole answer
        # the upstream request was closed too: the fake server stopped generating
        assert wait_until(lambda: "client went away after" in d.request("GET", "/logs").text, 10), \
            d.request("GET", "/logs").text[-2000:]

        thread.join(30)
        assert not thread.is_alive()
        status, answer = waiting["answer"]
        assert status == 200 and answer["choices"][0]["message"]["content"] == "from b", answer
        assert d.running_ids() == ["b"]
        assert d.json("GET", "/api/inflight")[1] == {"operation": "snapshot", "requests": []}

        status, body = d.json("POST", f"/api/inflight/{stream['id']}/cancel")
        assert status == 404 and body["error"]["code"] == "not_found"

        # the cancelled stream was captured under its activity id, partial answer included
        status, capture = d.json("GET", f"/api/captures/{stream['id']}")
        assert status == 200, capture
        assert capture["id"] == int(stream["id"]) and capture["req_path"] == "/v1/chat/completions"
        assert capture["resp_body"]
