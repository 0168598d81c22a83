"""The twistd plugin and its options (CLI-1..CLI-7)."""
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins

from llamaswap import __version__, tap
from llamaswap.service import LlamaSwapService

REPO = Path(__file__).resolve().parent.parent
FAKE_CMD = f"{sys.executable} {REPO / 'tests' / 'fake_llama_server.py'} --port ${{PORT}}"


def write_config(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def parse(argv, options=None):
    """Parse llamaswap's own options (or ``options``): (the parsed options, exit code, stderr)."""
    options = tap.Options() if options is None else options
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


def parse_twistd(argv):
    """Parse a whole twistd command line, as twistd does; (llamaswap's options, exit code, stderr)."""
    from twisted.scripts.twistd import ServerOptions

    config, code, err = parse(argv, ServerOptions())
    return (None if config is None else config.subOptions), code, err


WARN_CFG = f"bogusKey: 1\nmodels:\n  a:\n    cmd: {FAKE_CMD}\n"


def test_config_warnings_do_not_stop_startup(tmp_path):
    """CFG-4: warnings do not stop startup; parsing the options prints nothing."""
    path = write_config(tmp_path, WARN_CFG)
    options, code, err = parse(["--config", path, "--state-file", str(tmp_path / "s.json")])
    assert code == 0 and err == ""
    assert "config: unknown key 'bogusKey' (ignored)" in options["loaded_config"].warnings


@pytest.mark.parametrize("twistd_args, extra_cfg, printed", [
    (["-n"], "", False),                                  # foreground: the log is this terminal
    (["-n", "--logfile=-"], "", False),
    (["-n", "--logfile", "x.log"], "", True),             # the log is a file: print them
    ([], "", True),                                       # a daemon: print them before forking
    (["--logfile", "x.log"], "", True),
    (["-n", "--syslog"], "", True),
    (["-n"], "logToStdout: none\n", True),              # the log leaves proxy messages out
    (["-n"], "logToStdout: upstream\n", True),
    (["-n"], "logLevel: error\n", True),                # ... or WARNs
    (["-n"], "logToStdout: both\nlogLevel: warn\n", False),
])
def test_warnings_printed_only_when_the_log_is_elsewhere(tmp_path, twistd_args, extra_cfg, printed):
    """Each config warning is seen once on the terminal: through the log when twistd logs to
    it, else printed on stderr by make_service."""
    path = write_config(tmp_path, extra_cfg + WARN_CFG)
    options, code, err = parse_twistd([*twistd_args, "--pidfile", str(tmp_path / "t.pid"),
                                       "llamaswap", "--config", path])
    assert code == 0, err
    expected = ["config: unknown key 'bogusKey' (ignored)"] if printed else []
    assert tap.warnings_for_stderr(options) == expected


def test_make_service_prints_warnings_once(tmp_path):
    """A daemon: make_service prints each warning on stderr, and binds the listener."""
    path = write_config(tmp_path, WARN_CFG + "logRequests: true\n")
    options, code, err = parse_twistd(["--pidfile", str(tmp_path / "t.pid"), "--logfile", str(tmp_path / "l"),
                                       "llamaswap", "--config", path, "--listen", "127.0.0.1:0"])
    reactor = MemoryReactorClock()
    out = io.StringIO()
    with redirect_stderr(out):
        service = tap.make_service(options, reactor=reactor)
    assert out.getvalue() == ("WARN config: unknown key 'bogusKey' (ignored)\n"
                              "WARN config: llama-swap key 'logRequests' is not supported by llamaswap (ignored)\n")
    assert reactor.tcpServers and service.listener.port is not None
    assert not (tmp_path / "t.pid.children.json").exists()   # written once the daemon runs


class RefusingReactor(MemoryReactorClock):
    def __init__(self, errno_, message):
        super().__init__()
        self.error = (errno_, message)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        from twisted.internet.error import CannotListenError

        raise CannotListenError(interface, port, OSError(*self.error))


@pytest.mark.parametrize("listen, reactor, line", [
    ("127.0.0.1:8080", RefusingReactor(98, "Address already in use"),
     "llamaswap: cannot listen on 127.0.0.1:8080: address already in use"),
    ("tcp:80", RefusingReactor(13, "Permission denied"),
     "llamaswap: cannot listen on tcp:80: permission denied"),
    ("tcp:abc", MemoryReactorClock(),
     "llamaswap: bad --listen endpoint 'tcp:abc': invalid literal for int() with base 10: 'abc'"),
    ("tcp:8080:bogus=1", MemoryReactorClock(), None),
])
def test_listen_failures_are_one_line(tmp_path, listen, reactor, line):
    """CLI-6: a listener that cannot bind stops make_service (before twistd daemonizes) with
    one line on stderr and exit 1; no state file is written."""
    path = write_config(tmp_path, f"models:\n  a:\n    cmd: {FAKE_CMD}\n")
    options, code, err = parse(["--config", path, "--listen", listen, "--state-file", str(tmp_path / "s.json")])
    assert code == 0, err
    out = io.StringIO()
    with redirect_stderr(out), pytest.raises(SystemExit) as e:
        tap.make_service(options, reactor=reactor)
    assert e.value.code == 1
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n"), text
    if line is None:
        assert text.startswith(f"llamaswap: bad --listen endpoint '{listen}': "), text
    else:
        assert text == line + "\n"
    assert not (tmp_path / "s.json").exists()


def live_state(path, pidfile=None):
    """A state file recorded by a live daemon (our parent process stands in for it)."""
    from llamaswap.process import process_start_time

    pid = os.getppid()
    data = {"daemon_pid": pid, "daemon_start_time": process_start_time(pid), "children": []}
    if pidfile:
        data["pidfile"] = pidfile
    path.write_text(json.dumps(data))
    return pid


def test_state_file_in_use_message_default_paths(tmp_path, monkeypatch):
    """A second `twistd -n llamaswap` in the same directory: one line naming the running
    daemon's pid, its pidfile and state file, and the flags that start a second one."""
    path = write_config(tmp_path, f"models:\n  a:\n    cmd: {FAKE_CMD}\n")
    monkeypatch.chdir(tmp_path)
    pid = live_state(tmp_path / "twistd.pid.children.json")
    options, code, err = parse_twistd(["-n", "llamaswap", "--config", path])
    assert code == 1
    assert err == (f"llamaswap: state file {tmp_path}/twistd.pid.children.json is in use by pid {pid}: "
                   f"another llamaswap is running from this directory (pidfile {tmp_path}/twistd.pid); "
                   "stop it, or start this one with --pidfile OTHER.pid (or --state-file PATH)\n")


def test_state_file_in_use_message_explicit_state_file(tmp_path):
    """Given --state-file, the way out is another --state-file; the other daemon's recorded
    pidfile is named."""
    path = write_config(tmp_path, f"models:\n  a:\n    cmd: {FAKE_CMD}\n")
    state = tmp_path / "kids.json"
    pid = live_state(state, pidfile="/srv/other/twistd.pid")
    options, code, err = parse_twistd(["-n", "--pidfile", str(tmp_path / "b.pid"), "llamaswap",
                                       "--config", path, "--state-file", str(state)])
    assert code == 1
    assert err == (f"llamaswap: state file {state} is in use by pid {pid}: another llamaswap is running "
                   "(pidfile /srv/other/twistd.pid); stop it, or start this one with another --state-file PATH\n")


def test_pidfile_in_use_is_one_line(tmp_path, monkeypatch):
    """A live pid in twistd's pidfile: one line instead of twistd's paragraph."""
    path = write_config(tmp_path, f"models:\n  a:\n    cmd: {FAKE_CMD}\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "twistd.pid").write_text(str(os.getppid()))
    options, code, err = parse_twistd(["-n", "llamaswap", "--config", path, "--state-file", "s.json"])
    assert code == 1
    assert err == (f"llamaswap: pidfile {tmp_path}/twistd.pid is in use by pid {os.getppid()}: another twistd "
                   "is running from this directory; stop it, or start this one with --pidfile OTHER.pid\n")


def test_stale_pidfile_is_left_to_twistd(tmp_path):
    """A pidfile naming a dead process does not stop startup (twistd removes it)."""
    path = write_config(tmp_path, f"models:\n  a:\n    cmd: {FAKE_CMD}\n")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "t.pid").write_text(str(dead.pid))
    options, code, err = parse_twistd(["-n", "--pidfile", str(tmp_path / "t.pid"), "llamaswap", "--config", path])
    assert code == 0, err


def started_lines(service, reactor):
    """Start the service on a memory reactor; the formatted messages logged meanwhile."""
    from twisted.logger import formatEvent, globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        service.privilegedStartService()
        service.startService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return [formatEvent(e) for e in events if e.get("log_namespace", "").startswith("llamaswap")]


@pytest.mark.parametrize("models, count", [(1, "1 model"), (3, "3 models")])
def test_startup_line(tmp_path, monkeypatch, models, count):
    """CLI-7's line, then how many models were loaded from which file and where the UI is."""
    monkeypatch.chdir(tmp_path)
    text = "models:\n" + "".join(f"  m{i}:\n    cmd: {FAKE_CMD}\n" for i in range(models))
    write_config(tmp_path, text)
    options, code, err = parse(["--config", "config.yaml", "--listen", "tcp:0:interface=127.0.0.1",
                                "--state-file", str(tmp_path / "s.json")])
    reactor = MemoryReactorClock()
    service = tap.make_service(options, reactor=reactor)
    lines = started_lines(service, reactor)
    listening = [line for line in lines if line.startswith("llamaswap ")]
    # MemoryReactor's ports report 0.0.0.0:0
    assert listening == [f"llamaswap {__version__} listening on tcp:0.0.0.0:0; {count} from config.yaml; "
                         "UI at http://127.0.0.1:0/ui/"]
    service.stopService()


def fake_port(address):
    from types import SimpleNamespace

    return SimpleNamespace(getHost=lambda: address)


@pytest.mark.parametrize("listen, address, url", [
    ("tcp:8080:interface=127.0.0.1", IPv4Address("TCP", "127.0.0.1", 8080), "http://127.0.0.1:8080/ui/"),
    ("tcp:8080", IPv4Address("TCP", "0.0.0.0", 8080), "http://127.0.0.1:8080/ui/"),
    ("tcp6:8080", IPv6Address("TCP", "::", 8080), "http://[::1]:8080/ui/"),
    ("tcp6:8080:interface=fe80\\:\\:1%eth0", IPv6Address("TCP", "fe80::1%eth0", 8080),
     "http://[fe80::1%25eth0]:8080/ui/"),
    ("ssl:8443:privateKey=k.pem", IPv4Address("TCP", "192.0.2.7", 8443), "https://192.0.2.7:8443/ui/"),
    ("unix:/run/l.sock", UNIXAddress(b"/run/l.sock"), None),
])
def test_ui_url(tmp_path, listen, address, url):
    """UI-1: where a browser on this machine finds the UI; none for a unix socket."""
    path = write_config(tmp_path, f"models:\n  a:\n    cmd: {FAKE_CMD}\n")
    options, code, err = parse(["--config", path, "--state-file", str(tmp_path / "s.json")])
    service = LlamaSwapService(options["loaded_config"], MemoryReactorClock(), listen, options["state-file"])
    assert service.ui_url(fake_port(address)) == url


def test_make_service_builds_tree_on_injected_reactor(tmp_path):
    """make_service assembles logs, router and listener on the reactor it is given."""
    path = write_config(tmp_path, f"models:\n  a:\n    cmd: {FAKE_CMD}\n")
    options, code, err = parse(["--config", path, "--listen", "tcp:0:interface=127.0.0.1",
                                "--state-file", str(tmp_path / "s.json")])
    reactor = MemoryReactorClock()
    service = tap.make_service(options, reactor=reactor)
    names = [type(s).__name__ for s in service]
    assert names == ["LogBroadcaster", "StateFileService", "EventHub", "ActivityLog", "PerformanceMonitor",
                     "HTTPPools", "PeerPool", "ModelRouter", "KeepAlive", "ListenerService"]
    service.privilegedStartService()
    service.startService()
    assert reactor.tcpServers and reactor.tcpServers[0][0] == 0
    assert (tmp_path / "s.json").exists()
    d = service.stopService()
    assert d.called
    assert not (tmp_path / "s.json").exists()

