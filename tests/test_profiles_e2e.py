"""Profile pins and selectors end to end: the real daemon (``twistd -n llamaswap``) with fake
upstreams, configured in llama-swap's YAML (``profiles.<name>: {description, pins}``,
``selectors.<id>``), driven over HTTP as a client would."""
from __future__ import annotations

import textwrap

import pytest

from llamaswap.config import parse_config
from tests.daemon import Daemon, HEALTH_TIMEOUT, fake_cmd, free_port_range


def _config() -> str:
    return textwrap.dedent(f"""\
        healthCheckTimeout: {HEALTH_TIMEOUT}
        startPort: {free_port_range(4)}
        unloadTimeout: 2
        models:
          a:
            cmd: {fake_cmd("a", respond="from a")}
          b:
            cmd: {fake_cmd("b", respond="from b")}
        groups:
          pair:
            swap: false
            members: [a, b]
        profiles:
          coding:
            description: Coding profile
            pins:
              public: b
              a: b
              off: ~
          plain:
            pins:
              public: a
        selectors:
          quick:
            strategy: warm
            targets: [a, b]
            name: Quick
        """)


def test_profiles_and_selectors(tmp_path):
    """PUT a profile active -> a pinned id goes to its target; GET /api/profiles; a warm selector
    is served by the target that is ready; a reload leaves no profile active."""
    config = _config()
    parsed = parse_config(config, port_in_use=lambda port: False)
    if not parsed.pin_profiles or not parsed.selectors:
        pytest.skip("the config reader does not fill profile pins and selectors yet")
    d = Daemon(config, tmp_path)
    d.start()
    try:
        status, body = d.json("GET", "/api/profiles")
        assert status == 200, body
        assert body == {"active": None, "profiles": [
            {"id": "coding", "description": "Coding profile", "pins": {"public": "b", "a": "b", "off": ""}},
            {"id": "plain", "description": "", "pins": {"public": "a"}}]}

        status, body = d.chat("public")
        assert status == 404, body  # no profile active yet

        status, body = d.json("PUT", "/api/profiles/active", {"name": "coding"})
        assert (status, body) == (200, {"active": "coding"})
        for name in ("public", "a"):
            status, body = d.chat(name)
            assert status == 200, (body, d.output())
            assert body["responseMessage"] == "from b"
        status, body = d.chat("off")
        assert status == 404 and body["error"]["code"] == "model_not_found", body
        assert d.running_ids() == ["b"]
        status, models = d.json("GET", "/v1/models")
        listed = {m["id"]: m for m in models["data"]}
        assert listed["public"]["meta"] == {"llamaswap": {"type": "profile"}}
        assert listed["quick"]["status"] == {"value": "loaded"}  # b is ready

        status, body = d.json("PUT", "/api/profiles/active", {"name": "nope"})
        assert status == 404 and body["error"]["code"] == "profile_not_found", body
        status, body = d.json("PUT", "/api/profiles/active", {"name": None})
        assert (status, body) == (200, {"active": None})

        # warm: b is ready and a is not, so b serves although a is listed first
        status, body = d.chat("quick")
        assert status == 200 and body["responseMessage"] == "from b", body
        assert d.running_ids() == ["b"]

        d.json("PUT", "/api/profiles/active", {"name": "coding"})
        status, body = d.json("POST", "/api/config/reload")
        assert status == 200, body
        status, body = d.json("GET", "/api/profiles")
        assert body["active"] is None
        status, body = d.chat("a")
        assert status == 200 and body["responseMessage"] == "from a", body
    finally:
        d.stop_clean()
