"""A failover selector end to end: the real daemon (tests/daemon.py) with fake upstreams.

``big``'s first start fails (``--exit-at-start`` with a marker file: the next start works), so
the first request for the selector is served by ``small``, named in ``X-Llamaswap-Target``;
``/running`` and ``/metrics`` show ``big``'s breaker open. After the one-second cool-down the
next request probes ``big``, which now starts: it serves the request and its breaker closes.
"""
from __future__ import annotations

import pytest

from tests.daemon import Daemon, fake_config, fake_model, stop_and_clean, wait_until


@pytest.fixture
def daemon(tmp_path):
    marker = tmp_path / "big-started-once"
    config = fake_config(
        {"big": fake_model("big", "--exit-at-start", "1", "--exit-at-start-marker", str(marker)),
         "small": fake_model("small")},
        selectors={"chat": {"strategy": "failover", "targets": ["big", "small"],
                            "settings": {"failures": 1, "cooldown": 1}}})
    d = Daemon(config, tmp_path).start()
    yield d
    problems = stop_and_clean(d, strict=True)
    assert not problems, problems


def chat(d: Daemon):
    r = d.request("POST", "/v1/chat/completions", {"model": "chat", "messages": []})
    return r.status, r.headers.get("X-Llamaswap-Target"), r.json()


def breakers(d: Daemon) -> dict:
    status, body = d.json("GET", "/running")
    assert status == 200, body
    d.record_children(body["running"])
    (selector,) = body["selectors"]
    assert selector["selector"] == "chat"
    return {t["target"]: t for t in selector["targets"]}


def gauge(d: Daemon, target: str) -> str:
    text = d.request("GET", "/metrics").text
    prefix = f'llamaswap_selector_breaker_state{{selector="chat",target="{target}"}} '
    (line,) = [line for line in text.splitlines() if line.startswith(prefix)]
    return line[len(prefix):]


def test_failover_and_the_breaker_end_to_end(daemon):
    d = daemon
    status, target, body = chat(d)
    assert (status, target) == (200, "small"), (status, target, body, d.output())
    assert body["choices"][0]["message"]["content"] == "from small"
    state = breakers(d)
    assert state["big"]["breaker"] == "open", state
    assert "big" in state["big"]["last_error"]
    assert state["small"] == {"target": "small", "breaker": "closed", "failures": 0}
    assert gauge(d, "big") == "1.0" and gauge(d, "small") == "0.0"
    # after the cool-down one request probes big, whose next start works
    assert wait_until(lambda: breakers(d)["big"]["breaker"] == "half_open", 5), breakers(d)
    assert gauge(d, "big") == "2.0"
    status, target, body = chat(d)
    assert (status, target) == (200, "big"), (status, target, body, d.output())
    assert body["choices"][0]["message"]["content"] == "from big"
    assert breakers(d)["big"] == {"target": "big", "breaker": "closed", "failures": 0,
                                  "last_error": state["big"]["last_error"]}
    assert gauge(d, "big") == "0.0"
    assert "selector chat: target big failed" in d.stdout.text()
