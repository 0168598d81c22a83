"""The benchmark runs end to end (``python bench/run.py --smoke``): no timing is asserted here."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _scenarios() -> list:
    spec = importlib.util.spec_from_file_location("llamaswap_bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SCENARIOS


def test_bench_smoke_writes_every_scenario(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--name", "smoke", "--out-dir", str(tmp_path)],
        cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "smoke.json").read_text())
    assert doc["mode"] == "smoke"
    assert doc["proxies"] == ["llamaswap"]
    for name in _scenarios():
        assert name in doc["scenarios"], name
        assert "seconds" in doc["scenarios"][name]
        assert "error" not in doc["scenarios"][name], (name, doc["scenarios"][name], proc.stderr[-3000:])
    assert doc["table"] and "scenario" not in doc["table"][0][0]
    assert "written" in proc.stdout
