"""The twistd plugin and its options (CLI-1..CLI-7)."""
import io
import os
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins

from llamaswap import tap

REPO = Path(__file__).resolve().parent.parent
FAKE_CMD = f"{sys.executable} {REPO / 'tests' / 'fake_llama_server.py'} --port ${{PORT}}"


def write_config(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def parse(argv):
    options = tap.Options()
    err = io.StringIO()
    with redirect_stderr(err):
        try:
            options.parseOptions(argv)
        except SystemExit as e:
            return None, e.code, err.getvalue()
    return options, 0, err.getvalue()


def test_plugin_is_discovered():
    """twistd finds the llamaswap ServiceMaker through twisted/plugins."""
    makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
    assert "llamaswap" in makers
    assert makers["llamaswap"].module == "llamaswap.tap"


def test_twistd_help_lists_plugin_and_options():
    """`twistd --help` lists llamaswap and `twistd llamaswap --help` documents its options."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    out = subprocess.run(run + ["--help"], capture_output=True, text=True, env=env, timeout=60)
    assert "llamaswap" in out.stdout
    out = subprocess.run(run + ["llamaswap", "--help"], capture_output=True, text=True, env=env, timeout=60)
    for option in ("--config", "--listen", "--watch-config", "--state-file"):
        assert option in out.stdout


@pytest.mark.parametrize("value, expected", [
    (":8080", "tcp:8080"),
    ("127.0.0.1:8080", "tcp:8080:interface=127.0.0.1"),
    ("localhost:0", "tcp:0:interface=localhost"),
    ("[::1]:8080", "tcp6:8080:interface=\\:\\:1"),
    ("tcp:8080:interface=127.0.0.1", "tcp:8080:interface=127.0.0.1"),
    ("unix:/run/llamaswap.sock", "unix:/run/llamaswap.sock"),
    ("tcp6:9000", "tcp6:9000"),
])
def test_listen_shorthands(value, expected):
    """CLI-3: llama-swap's shorthands become endpoint descriptions; descriptions pass through."""
    assert tap.expand_listen(value) == expected


@pytest.mark.parametrize("value", ["8080", "host:99999", "nonsense", ":", "[::1]8080"])
def test_bad_listen_values_are_usage_errors(value):
    """CLI-3: anything else is a usage error."""
    from twisted.python.usage import UsageError

    with pytest.raises(UsageError):
        tap.expand_listen(value)


def test_missing_config_option_exits_1(tmp_path):
    """CLI-2: --config is required; the message goes to stderr, exit status 1."""
    options, code, err = parse([])
    assert code == 1
    assert "--config is required" in err


def test_bad_config_lists_every_error_with_path(tmp_path):
    """CLI-6/CFG-3: every problem is listed with its path; exit 1, no traceback."""
    path = write_config(tmp_path, "models:\n  llama:\n    cmd: x ${PORT}\n    ttl: '300'\n    aliases: 5\n")
    options, code, err = parse(["--config", path])
    assert code == 1
    assert "models.llama.ttl: must be a non-negative integer" in err
    assert "models.llama.aliases: must be a list of strings" in err
    assert "Traceback" not in err


def test_unreadable_config_exits_1(tmp_path):
    """CLI-2: an unreadable file stops startup."""
    options, code, err = parse(["--config", str(tmp_path / "missing.yaml")])
    assert code == 1
    assert "missing.yaml" in err


def test_bad_listen_exits_1(tmp_path):
    """CLI-6: a usage error exits 1 with the message on stderr."""
    path = write_config(tmp_path, f"models:\n  a:\n    cmd: {FAKE_CMD}\n")
    options, code, err = parse(["--config", path, "--listen", "bogus"])
    assert code == 1
    assert "--listen" in err


def test_options_resolve_paths_and_state_file(tmp_path):
    """CLI-2/CLI-5: config and state file paths are made absolute before twistd may chdir."""
    path = write_config(tmp_path, f"models:\n  a:\n    cmd: {FAKE_CMD}\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        options, code, err = parse(["-c", "config.yaml", "-l", ":0", "--state-file", "kids.json"])
    finally:
        os.chdir(cwd)
    assert code == 0, err
    assert options["config"] == path
    assert options["listen"] == "tcp:0"
    assert options["state-file"] == str(tmp_path / "kids.json")
    assert list(options["loaded_config"].models) == ["a"]


def test_config_warnings_go_to_stderr(tmp_path):
    """CFG-4: warnings do not stop startup, and they are printed at startup."""
    path = write_config(tmp_path, f"bogusKey: 1\nmodels:\n  a:\n    cmd: {FAKE_CMD}\n")
    options, code, err = parse(["--config", path, "--state-file", str(tmp_path / "s.json")])
    assert code == 0
    assert "unknown key 'bogusKey'" in err


def test_make_service_builds_tree_on_injected_reactor(tmp_path):
    """make_service assembles logs, router and listener on the reactor it is given."""
    path = write_config(tmp_path, f"models:\n  a:\n    cmd: {FAKE_CMD}\n")
    options, code, err = parse(["--config", path, "--listen", "tcp:0:interface=127.0.0.1",
                                "--state-file", str(tmp_path / "s.json")])
    reactor = MemoryReactorClock()
    service = tap.make_service(options, reactor=reactor)
    names = [type(s).__name__ for s in service]
    assert names == ["LogBroadcaster", "ModelRouter", "ListenerService"]
    service.privilegedStartService()
    service.startService()
    assert reactor.tcpServers and reactor.tcpServers[0][0] == 0
    assert (tmp_path / "s.json").exists()
    d = service.stopService()
    assert d.called
    assert not (tmp_path / "s.json").exists()
