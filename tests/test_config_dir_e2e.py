"""--config-dir against the real daemon and the fake upstream: a directory of files served as one
config, reloaded when a file is added or removed."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import (HEALTH_TIMEOUT, Daemon, fake_model, free_port_range, stop_and_clean, wait_until)


class DirDaemon(Daemon):
    """The daemon started with ``--config-dir DIR`` (and ``--config`` only when ``with_config``)."""

    def __init__(self, config_dir: Path, workdir: Path, with_config: bool = False, config: Any = "",
                 **kw: Any) -> None:
        super().__init__(config, workdir, **kw)
        self.config_dir = str(config_dir)
        self.with_config = with_config

    def argv(self) -> list[str]:
        argv = super().argv()
        i = argv.index("--config")
        if self.with_config:
            argv[i + 2:i + 2] = ["--config-dir", self.config_dir]
        else:
            argv[i:i + 2] = ["--config-dir", self.config_dir]
        return argv


@pytest.fixture
def start_dir_daemon(tmp_path):
    started: list[Daemon] = []

    def start(config_dir: Path, **kw: Any) -> Daemon:
        d = DirDaemon(config_dir, tmp_path, **kw)
        started.append(d)
        return d.start()

    yield start
    problems = [p for d in started for p in stop_and_clean(d)]
    assert not problems, problems


def write_json(directory: Path, name: str, data: dict) -> None:
    """Write a file whole, through a rename, as an editor or a deploy tool does (the temporary
    name is not a config file name, so the daemon never reads half a file)."""
    tmp = directory / (name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, directory / name)


def common(start_port: int) -> dict:
    """Settings repeated in every file: the same value in two files is no conflict."""
    return {"healthCheckTimeout": HEALTH_TIMEOUT, "startPort": start_port, "unloadTimeout": 2,
            "groups": {}}


def group(model_id: str) -> dict:
    """A group of its own per file (group ids must differ between files), one that never
    stops the others, so every model loaded stays up."""
    return {f"g{model_id}": {"swap": False, "exclusive": False, "members": [model_id]}}


def listed(d: Daemon) -> list[str]:
    status, body = d.json("GET", "/v1/models")
    assert status == 200, body
    return sorted(m["id"] for m in body["data"])


def test_config_dir_served_and_reloaded_on_change(tmp_path, start_dir_daemon):
    """Two files serve their models; a third file added appears after the watch reloads; a
    removed file's model goes away."""
    conf = tmp_path / "conf.d"
    conf.mkdir()
    base = free_port_range(6)
    write_json(conf, "10-a.yaml", {**common(base), "models": {"a": fake_model("a")}, "groups": group("a")})
    write_json(conf, "20-b.yaml", {**common(base), "models": {"b": fake_model("b")}, "groups": group("b")})
    d = start_dir_daemon(conf, extra_args=["--watch-config"])
    assert f"2 models from conf.d{os.sep};" in d.stdout.text()     # relative to the daemon's directory
    assert listed(d) == ["a", "b"]
    for model_id in ("a", "b"):
        status, body = d.chat(model_id)
        assert status == 200 and body["responseMessage"] == f"from {model_id}", body
    d.record_children()

    write_json(conf, "30-c.yml", {**common(base), "models": {"c": fake_model("c")}, "groups": group("c")})
    assert wait_until(lambda: listed(d) == ["a", "b", "c"], 20), listed(d)
    status, body = d.chat("c")
    assert status == 200 and body["responseMessage"] == "from c", body
    d.record_children()
    assert {e["model"] for e in d.running()} == {"a", "b", "c"}   # a and b kept running

    os.remove(conf / "20-b.yaml")
    assert wait_until(lambda: listed(d) == ["a", "c"], 20), listed(d)
    status, body = d.chat("b")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    d.record_children()


def test_config_and_dir_reload_rejects_a_duplicate(tmp_path, start_dir_daemon):
    """--config with --config-dir: a reload that would define a model twice fails naming both
    files, and the running config keeps serving."""
    conf = tmp_path / "conf.d"
    conf.mkdir()
    base = free_port_range(6)
    main = {**common(base), "models": {"a": fake_model("a")}}
    write_json(conf, "b.yaml", {"models": {"b": fake_model("b")}})
    d = start_dir_daemon(conf, with_config=True, config=main)
    assert listed(d) == ["a", "b"]
    write_json(conf, "c.yaml", {"models": {"a": fake_model("a", respond="impostor")}})
    status, body = d.json("POST", "/api/config/reload")
    assert status == 400 and body["error"]["code"] == "invalid_config", body
    message = body["error"]["message"]
    assert f"{conf / 'c.yaml'}: models.a: already defined in {d.config_path}" in message
    status, body = d.chat("a")
    assert status == 200 and body["responseMessage"] == "from a", body
    d.record_children()
    os.remove(conf / "c.yaml")
    write_json(conf, "c.yaml", {"models": {"c": fake_model("c")}})
    status, body = d.json("POST", "/api/config/reload")
    assert status == 200 and body["added"] == ["c"], body
    assert listed(d) == ["a", "b", "c"]
