"""The benchmark runs end to end (``python bench/run.py --smoke``): no timing is asserted here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def test_bench_smoke_writes_every_scenario(tmp_path):
    import run as bench_run

    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--name", "smoke", "--out-dir", str(tmp_path)],
        cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "smoke.json").read_text())
    assert doc["mode"] == "smoke"
    assert doc["proxies"] == ["llamaswap"]
    for name in bench_run.SCENARIOS:
        assert name in doc["scenarios"], name
        assert "seconds" in doc["scenarios"][name]
        assert "error" not in doc["scenarios"][name], (name, doc["scenarios"][name], proc.stderr[-3000:])
    assert doc["table"] and "scenario" not in doc["table"][0][0]
    assert "written" in proc.stdout
