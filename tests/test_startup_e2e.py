"""First use, end to end: what the terminal shows when ``twistd llamaswap`` starts or fails.

Every startup failure is one line on stderr and exit status 1, in the foreground (``-n``)
and as a daemon (twistd forks after building the service; llamaswap binds its listener
before that, so the launching process reports the failure whole). A failed start leaves
no pidfile, state file or process. Config warnings are seen once, and the startup line
says which config was loaded, how many models it has and where the UI is.

The daemons here run from their own working directory with twistd's defaults
(``twistd.pid`` there, state file ``twistd.pid.children.json`` beside it), as a new
user's would.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon import LISTENING, REPO_ROOT, Daemon, fake_cmd, http_request, pid_alive, wait_until, \
    write_config

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
MODES = ["foreground", "daemon"]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def workdir(tmp_path: Path, text: str | None = None) -> Path:
    """A fresh directory holding only config.yaml."""
    wd = tmp_path / "wd"
    wd.mkdir()
    write_config(wd, text if text is not None else f"models:\n  a:\n    cmd: {fake_cmd('a')}\n")
    return wd


def processes_in(wd: Path) -> list[int]:
    """Live processes running in wd, or whose command line mentions it."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if (cwd == str(wd) or str(wd).encode() in cmdline) and pid_alive(int(entry)):
            found.append(int(entry))
    return sorted(found)


def run_twistd(wd: Path, mode: str, *args: str, prefix: tuple = (), twistd_args: tuple = ()
               ) -> subprocess.CompletedProcess:
    """``twistd [-n] llamaswap -c config.yaml ARGS`` from wd, with twistd's default pidfile;
    returns when the command exits (a daemon's launcher exits once the daemon started)."""
    argv = [*prefix, *TWISTD, *(["-n"] if mode == "foreground" else []), *twistd_args,
            "llamaswap", "-c", "config.yaml", *args]
    return subprocess.run(argv, cwd=wd, env=env(), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)


def kill_daemons(wd: Path) -> None:
    """Backstop: SIGTERM (then SIGKILL) whatever still runs from wd."""
    pids = processes_in(wd)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    if not wait_until(lambda: not processes_in(wd), 15):
        for pid in processes_in(wd):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not processes_in(wd), 5)


def assert_failed_cleanly(proc: subprocess.CompletedProcess, wd: Path, line: str,
                          files: tuple = ("config.yaml",)) -> None:
    """Exit 1, exactly ``line`` on stderr, nothing on stdout, no new file, no process."""
    assert proc.returncode == 1, proc
    assert proc.stderr == line + "\n", proc.stderr
    assert proc.stdout == "", proc.stdout
    left = sorted(p.name for p in wd.iterdir())
    assert left == sorted(files), left       # no twistd.pid, no *.children.json, no twistd.log
    assert processes_in(wd) == []


@pytest.fixture
def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


# -- failures ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_port_in_use(tmp_path, mode, busy_port):
    wd = workdir(tmp_path)
    proc = run_twistd(wd, mode, "--listen", f"127.0.0.1:{busy_port}")
    assert_failed_cleanly(proc, wd, f"llamaswap: cannot listen on 127.0.0.1:{busy_port}: address already in use")


@pytest.mark.parametrize("mode", MODES)
def test_permission_denied(tmp_path, mode):
    """A unix socket in a directory we may not write to. As root, the capabilities that
    bypass file permissions are dropped with setpriv (uid 0 still owns the test files)."""
    prefix: tuple = ()
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv")
        prefix = ("setpriv", "--inh-caps=-all", "--bounding-set=-all")
    wd = workdir(tmp_path)
    locked = wd / "locked"
    locked.mkdir(mode=0o500)
    try:
        proc = run_twistd(wd, mode, "--listen", f"unix:{locked}/llamaswap.sock", prefix=prefix)
        assert_failed_cleanly(proc, wd, f"llamaswap: cannot listen on unix:{locked}/llamaswap.sock: "
                                        "permission denied", files=("config.yaml", "locked"))
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("mode", MODES)
def test_bad_endpoint(tmp_path, mode):
    wd = workdir(tmp_path)
    proc = run_twistd(wd, mode, "--listen", "nonsense:::")
    assert_failed_cleanly(proc, wd, "llamaswap: --listen: 'nonsense:::' is neither a Twisted endpoint "
                                    "description (e.g. tcp:8080:interface=127.0.0.1) nor one of :PORT, "
                                    "HOST:PORT, [V6ADDR]:PORT")


@pytest.mark.parametrize("mode", MODES)
def test_bad_endpoint_arguments(tmp_path, mode):
    """A known endpoint type with arguments it cannot take: caught before daemonizing too."""
    wd = workdir(tmp_path)
    proc = run_twistd(wd, mode, "--listen", "tcp:abc")
    assert_failed_cleanly(proc, wd, "llamaswap: bad --listen endpoint 'tcp:abc': "
                                    "invalid literal for int() with base 10: 'abc'")


@pytest.mark.parametrize("mode", MODES)
def test_bad_config_stays_one_line_per_error(tmp_path, mode):
    """Unchanged: an invalid config prints every error (a header, then one line each), exit 1."""
    wd = workdir(tmp_path, f"models:\n  a:\n    cmd: {fake_cmd('a')}\n    ttl: '300'\n")
    proc = run_twistd(wd, mode, "--listen", "127.0.0.1:0")
    assert proc.returncode == 1, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and lines[0] == f"llamaswap: invalid config {wd}/config.yaml:", proc.stderr
    assert lines[1].startswith("  models.a.ttl: must be a non-negative integer"), proc.stderr
    assert sorted(p.name for p in wd.iterdir()) == ["config.yaml"]


class FirstDaemon(Daemon):
    """``twistd -n llamaswap`` with twistd's default pidfile, from its directory."""

    def argv(self) -> list[str]:
        return [*TWISTD, "-n", "llamaswap", "--config", "config.yaml", "--listen", self.listen]


@pytest.mark.parametrize("mode", MODES)
def test_second_daemon_in_the_same_directory(tmp_path, mode):
    """The state file (and pidfile) in use: the line names the running daemon's pid, its
    pidfile and state file, and the flags that start a second one."""
    wd = workdir(tmp_path)
    first = FirstDaemon((wd / "config.yaml").read_text(), wd)
    first.pidfile, first.state_file = str(wd / "twistd.pid"), str(wd / "twistd.pid.children.json")
    first.start()
    try:
        before = {p.name: p.read_bytes() for p in wd.iterdir()}
        assert set(before) == {"config.yaml", "twistd.pid", "twistd.pid.children.json"}
        proc = run_twistd(wd, mode, "--listen", "127.0.0.1:0")
        assert proc.returncode == 1, proc
        assert proc.stderr == (
            f"llamaswap: state file {wd}/twistd.pid.children.json is in use by pid {first.proc.pid}: "
            f"another llamaswap is running from this directory (pidfile {wd}/twistd.pid); "
            "stop it, or start this one with --pidfile OTHER.pid (or --state-file PATH)\n"), proc.stderr
        assert proc.stdout == ""
        assert {p.name: p.read_bytes() for p in wd.iterdir()} == before   # the first one's files, untouched
        assert processes_in(wd) == [first.proc.pid]
        assert first.request("GET", "/health").text == "OK"

        # as the message says: another pidfile starts a second daemon
        second = run_twistd(wd, "daemon", "--listen", "127.0.0.1:0", twistd_args=("--pidfile", "other.pid"))
        assert second.returncode == 0, second
        pid = int((wd / "other.pid").read_text())
        assert (wd / "other.pid.children.json").exists()
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not pid_alive(pid), 15)
        assert first.stop() == 0, first.output()
        assert sorted(p.name for p in wd.iterdir()) == ["config.yaml", "twistd.log"]
    finally:
        first.kill()
        kill_daemons(wd)


@pytest.mark.parametrize("mode", MODES)
def test_unix_socket_daemon_owns_its_lock(tmp_path, mode):
    """A daemon binds its unix socket before twistd forks; the socket's lock then names the
    daemon, not the launcher, and a second daemon on that socket is refused in one line."""
    wd = workdir(tmp_path)
    sock = wd / "l.sock"
    proc = run_twistd(wd, "daemon", "--listen", f"unix:{sock}")
    try:
        assert proc.returncode == 0, proc
        pid = int((wd / "twistd.pid").read_text())
        assert os.readlink(f"{sock}.lock") == str(pid)
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(10)
            c.connect(str(sock))
            c.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            assert c.recv(65536).startswith(b"HTTP/1.0 200"), "no answer on the unix socket"
        second = run_twistd(wd, mode, "--listen", f"unix:{sock}", twistd_args=("--pidfile", "b.pid"))
        assert second.returncode == 1, second
        assert second.stderr == f"llamaswap: cannot listen on unix:{sock}: address already in use " \
                                f"(locked by {sock}.lock)\n", second.stderr
        assert not (wd / "b.pid").exists() and not (wd / "b.pid.children.json").exists()
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not pid_alive(pid), 15)
        assert sorted(p.name for p in wd.iterdir()) == ["config.yaml", "twistd.log"]
    finally:
        kill_daemons(wd)


# -- warnings and the startup line ------------------------------------------------------------------

WARN_CFG = f"bogusKey: 1\nlogRequests: true\nmodels:\n  a:\n    cmd: {fake_cmd('a')}\n"
WARNINGS = ["config: unknown key 'bogusKey' (ignored)",
            "config: llama-swap key 'logRequests' is not supported by llamaswap (ignored)"]


def test_foreground_warnings_once(tmp_path):
    """In the foreground the log is the terminal: each warning appears once, in the log."""
    d = Daemon(WARN_CFG, tmp_path)
    d.start()
    try:
        assert d.stop() == 0, d.output()
    finally:
        d.kill()
    terminal = d.stdout.text() + d.stderr.text()
    for warning in WARNINGS:
        assert terminal.count(warning) == 1, d.output()
    assert d.stderr.text() == "", d.output()


def test_foreground_with_log_file_warnings_once_on_stderr(tmp_path):
    """With -n and --logfile the log is a file: each warning is printed once on stderr and is
    once in the log."""
    log = tmp_path / "llamaswap.log"
    d = Daemon(WARN_CFG, tmp_path)
    argv = d.argv()
    argv[argv.index("--logfile=-")] = f"--logfile={log}"
    d.argv = lambda: argv
    d.spawn()
    try:
        assert wait_until(lambda: log.exists() and LISTENING.search(log.read_bytes()), 20), d.output()
        d.port = int(LISTENING.search(log.read_bytes()).group(1))
        d.wait_serving()
        assert d.stop() == 0, d.output()
    finally:
        d.kill()
    for warning in WARNINGS:
        assert d.stderr.text().count(warning) == 1, d.output()
        assert log.read_text().count(warning) == 1, log.read_text()


def test_daemon_warnings_once_and_startup_line(tmp_path):
    """As a daemon: the launching terminal gets each warning once (the log is a file), the
    log has each once, and the startup line names the config, the models and the UI."""
    wd = workdir(tmp_path, WARN_CFG)
    proc = run_twistd(wd, "daemon", "--listen", "127.0.0.1:0")
    try:
        assert proc.returncode == 0, proc
        assert proc.stderr == "".join(f"WARN {w}\n" for w in WARNINGS), proc.stderr
        log = wd / "twistd.log"
        m = wait_until(lambda: log.exists() and LISTENING.search(log.read_bytes()), 20)
        assert m, log.read_text() if log.exists() else "no log"
        text = log.read_text()
        for warning in WARNINGS:
            assert text.count(warning) == 1, text
        port = int(m.group(1))
        assert re.search(rf"llamaswap \S+ listening on tcp:127\.0\.0\.1:{port}; 1 model from config\.yaml; "
                         rf"UI at http://127\.0\.0\.1:{port}/ui/\n", text), text
        assert http_request(port, "GET", "/ui/").status == 200
        pid = int((wd / "twistd.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not pid_alive(pid), 15)
        assert sorted(p.name for p in wd.iterdir()) == ["config.yaml", "twistd.log"]
    finally:
        kill_daemons(wd)


def test_foreground_startup_line(start_daemon):
    """The startup line keeps CLI-7's 'llamaswap <version> listening on <endpoint>' first,
    then the model count, the config file and the UI's URL, which serves the UI."""
    models = {name: {"cmd": fake_cmd(name)} for name in ("a", "b", "c")}
    d = start_daemon({"models": models})
    m = re.search(r"llamaswap \S+ listening on tcp:127\.0\.0\.1:(\d+); 3 models from config\.yaml; "
                  r"UI at (http://127\.0\.0\.1:(\d+)/ui/)\n", d.stdout.text())
    assert m and int(m.group(1)) == int(m.group(3)) == d.port, d.output()
    assert d.request("GET", "/ui/").status == 200
    assert d.stdout.text().count("listening on tcp:") == 1
