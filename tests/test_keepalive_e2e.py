"""Keep-alive end to end: a preloaded model with ``restart: on-failure`` whose child is killed with
SIGKILL comes back by itself, without any request (the real daemon, tests/daemon.py, with the
fake upstream)."""
from __future__ import annotations

import os
import re
import signal

from tests.daemon import Daemon, fake_config, fake_model, stop_and_clean, wait_until


def test_killed_preloaded_child_comes_back_without_a_request(tmp_path):
    config = fake_config(
        {"alpha": fake_model("alpha", restart="on-failure", maxRestarts=2, restartDelay=0.5),
         "beta": fake_model("beta")},
        hooks={"on_startup": {"preload": ["alpha"]}})
    d = Daemon(config, tmp_path).start()
    try:
        first = wait_until(lambda: [m for m in d.running() if m["model"] == "alpha" and m["state"] == "ready"], 15)
        assert first, d.output()
        pid = first[0]["pid"]
        os.kill(pid, signal.SIGKILL)

        def back() -> list:
            return [m for m in d.running() if m["model"] == "alpha" and m["state"] == "ready" and m["pid"] != pid]

        again = wait_until(back, 15)
        assert again, d.output()
        text = d.stdout.text()
        assert re.search(r"alpha: its server stopped unexpectedly \(killed by signal SIGKILL\); "
                         r"restarting in 0\.5s \(restart 1 of 2\)", text), text
        # the restart is logged with the previous run's last output (the fake's startup lines)
        m = re.search(r"alpha: restarting \(restart 1 of 2\) after: .*?last output of the previous run:\n(.*)",
                      text, re.S)
        assert m and "listening on http://127.0.0.1:" in m.group(1), text
        # no request was made: the access log has no inference request
        assert "POST /v1/chat/completions" not in text
        status, body = d.chat("alpha")
        assert status == 200, body
        d.record_children()
    finally:
        problems = stop_and_clean(d, strict=True)
    assert not problems, problems
