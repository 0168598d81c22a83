"""Activity with the real daemon and the fake upstream: ``store.path`` keeps it across a restart,
an unusable store stops the start with one line naming it, and ``/api/performance`` answers."""
from __future__ import annotations

import re
import sqlite3

from tests.daemon import Daemon, fake_config, fake_model, stop_and_clean, wait_until


def _activity(d: Daemon, query: str = "") -> dict:
    status, body = d.json("GET", "/api/metrics/activity" + query)
    assert status == 200, (body, d.output())
    return body


def test_activity_survives_restart(tmp_path):
    """Requests made before a restart are still listed after it (the last one written at
    shutdown, before its flush was due), ids keep counting up, and the stats count them all."""
    store = tmp_path / "activity.db"
    cfg = fake_config({"m": fake_model("m"), "n": fake_model("n")}, store={"path": str(store)},
                      logTimeFormat="rfc3339")
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    first = Daemon(cfg, tmp_path / "one").start()
    try:
        for model in ("m", "n", "m"):
            status, body = first.chat(model)
            assert status == 200, body
        before = _activity(first)
        assert [e["model"] for e in before["data"]] == ["m", "n", "m"], before
        entry = before["data"][0]
        assert entry["req_path"] == "/v1/chat/completions" and entry["resp_status_code"] == 200, entry
        assert entry["tokens"]["input_tokens"] == 25 and entry["tokens"]["output_tokens"] == 10, entry
        logs = first.request("GET", "/logs").text
        assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d) \[INFO\] ", logs, re.M), logs
        assert first.chat("n")[0] == 200   # pending until the next flush: written at shutdown
    finally:
        problems = stop_and_clean(first)
    assert not problems, problems
    db = sqlite3.connect(store)
    try:
        assert db.execute("SELECT COUNT(*) FROM activity").fetchone()[0] == 4
        last_id = db.execute("SELECT MAX(id) FROM activity").fetchone()[0]
    finally:
        db.close()

    second = Daemon(cfg, tmp_path / "two").start()
    try:
        after = _activity(second)
        assert [e["id"] for e in after["data"][1:]] == [e["id"] for e in before["data"]], (after, before)
        assert (after["data"][0]["id"], after["data"][0]["model"]) == (last_id, "n"), after
        assert second.chat("n")[0] == 200
        newest = _activity(second, "?limit=1")["data"][0]
        assert newest["model"] == "n" and newest["id"] > last_id, newest
        only_m = _activity(second, "?model=m")
        assert only_m["total"] == 2, only_m
        status, stats = second.json("GET", "/api/metrics/stats")
        assert status == 200 and stats["total_requests"] == 5 and stats["total_output_tokens"] == 50, stats
        status, perf = second.json("GET", "/api/performance")
        assert status == 200 and perf["enabled"] is True, perf
        assert perf["gpu_stats"] is None or isinstance(perf["gpu_stats"], list), perf
        status, err = second.json("GET", "/api/metrics/activity?limit=0")
        assert status == 400 and err["error"]["message"] == "limit must be between 1 and 999", err
    finally:
        problems = stop_and_clean(second)
    assert not problems, problems


def test_corrupt_store_is_a_startup_error(tmp_path):
    """A store.path that is not a database: exit 1 and one line naming the file, nothing served."""
    store = tmp_path / "activity.db"
    store.write_bytes(b"definitely not sqlite\n" * 100)
    d = Daemon(fake_config({"m": fake_model("m")}, store={"path": str(store)}), tmp_path).spawn()
    try:
        assert d.wait(20) == 1, d.output()
        assert f"llamaswap: activity store '{store}' (store.path) cannot be used: file is not a database" \
            in d.stderr.text(), d.output()
        assert store.read_bytes() == b"definitely not sqlite\n" * 100
    finally:
        d.kill()


def test_performance_disabled(tmp_path):
    """performance.disabled: /api/performance answers 503 {"enabled": false}; activity is in memory."""
    d = Daemon(fake_config({"m": fake_model("m")}, performance={"disabled": True}, metricsMaxInMemory=2),
               tmp_path).start()
    try:
        assert d.json("GET", "/api/performance") == (503, {"enabled": False})
        for _ in range(3):
            assert d.chat("m")[0] == 200
        body = wait_until(lambda: _activity(d), 5)
        assert (body["total"], len(body["data"])) == (2, 2), body
    finally:
        problems = stop_and_clean(d)
    assert not problems, problems
