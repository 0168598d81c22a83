"""Fixtures shared by the tests that run the real daemon."""
from __future__ import annotations

from typing import Any

import pytest

from tests.daemon import Daemon, stop_and_clean


@pytest.fixture
def start_daemon(tmp_path):
    """Start daemons for one test; stop them (and kill leftovers) afterwards."""
    started: list[Daemon] = []

    def start(cfg: dict[str, Any] | str, **kw: Any) -> Daemon:
        workdir = tmp_path / f"daemon{len(started)}"
        workdir.mkdir()
        d = Daemon(cfg, workdir, **kw)
        started.append(d)
        return d.start()

    yield start
    problems = [p for d in started for p in stop_and_clean(d)]
    assert not problems, problems
