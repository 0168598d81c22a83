"""The deployment files in examples/ say what the README promises (CLI-1, CLI-9)."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
UNIT = EXAMPLES / "llamaswap.service"
DOCKERFILE = EXAMPLES / "Dockerfile"
README = EXAMPLES.parent / "README.rst"


def unit_settings() -> dict[str, str]:
    """``Key=value`` lines of the unit (continuations joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", UNIT.read_text())
    settings = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def test_unit_runs_twistd_in_the_foreground_without_pidfile():
    argv = shlex.split(unit_settings()["ExecStart"])
    assert Path(argv[0]).name == "twistd"
    assert argv[1:4] == ["-n", "--pidfile=", "--logfile=-"]
    rest = argv[argv.index("llamaswap") + 1:]
    assert "--config" in rest and "--state-file" in rest and "--listen" in rest


def test_unit_lets_llamaswap_stop_its_children():
    """CLI-9: SIGTERM to llamaswap only (KillMode=mixed), and a stop timeout longer than the
    default grace period + 5 s."""
    s = unit_settings()
    assert s["KillMode"] == "mixed"
    assert s.get("KillSignal", "SIGTERM") == "SIGTERM"
    assert int(s["TimeoutStopSec"]) > 10 + 5
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_verifies(tmp_path):
    """systemd-analyze accepts the unit (the twistd path replaced by one that exists here)."""
    unit = tmp_path / "llamaswap.service"
    unit.write_text(UNIT.read_text().replace("/opt/llamaswap/bin/twistd", shutil.which("true") or "/bin/true"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "llamaswap.service" in line and "user" not in line.lower()]
    assert result.returncode == 0 or not problems, result.stdout + result.stderr


def test_dockerfile_entrypoint():
    text = DOCKERFILE.read_text()
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--", "twistd"\]$', text, re.M)
    cmd = re.search(r"^CMD (\[.*?\])$", text, re.M | re.S).group(1)
    args = [a for a in re.findall(r'"([^"]*)"', cmd)]
    assert args[:4] == ["-n", "--pidfile=", "--logfile=-", "llamaswap"]
    assert "STOPSIGNAL SIGTERM" in text
    assert "--stop-timeout 30" in text


def test_readme_sections():
    text = README.read_text()
    for title in ("Running it as a service (systemd)", "Running it in Docker", "Behind nginx"):
        assert f"\n{title}\n{'-' * len(title)}\n" in text, title
    assert "proxy_buffering off" in text and "X-Accel-Buffering" in text and "proxy_read_timeout" in text
