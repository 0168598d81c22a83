"""The twistd log observer the plugin installs: Twisted's lines, made cheaper."""
from __future__ import annotations

import io
import random
import signal
import sys
from pathlib import Path

import pytest
from twisted.logger import FileLogObserver, Logger, LogLevel, textFileLogObserver
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

from llamaswap import twistdlog
from llamaswap.twistdlog import ClassicFormat

REPO = Path(__file__).resolve().parent.parent
FAKE_CMD = f"{sys.executable} {REPO / 'tests' / 'fake_llama_server.py'} --port ${{PORT}}"


def twisted_text(event: dict) -> str | None:
    """What twistd's own observer (``textFileLogObserver``) makes of ``event``."""
    return textFileLogObserver(io.StringIO()).formatEvent(event)


def _events():
    rnd = random.Random(7)
    start = 1_764_000_000.0
    lines = ["Request 127.0.0.1 \"POST /v1/chat/completions HTTP/1.1\" 200 415 \"\" 0.005s",
             "two\nlines", "", "tab\there", "unicode é ✓", "{braces} stay"]
    for i in range(300):
        t = start + rnd.uniform(0, 5) + i * 0.37
        event = {"log_time": t, "log_level": rnd.choice(list(LogLevel.iterconstants())),
                 "log_namespace": rnd.choice(["llamaswap.access", "llamaswap", "x.y"])}
        kind = i % 6
        if kind in (0, 1, 2):
            event.update(log_format="{line}", line=rnd.choice(lines))
        elif kind == 3:
            event.update(log_format="model {m} took {s:.2f}s", m="a", s=rnd.random())
        elif kind == 4:
            event.update(log_format="{line}", line=rnd.choice(lines), log_system="-")
        else:
            event.update(log_format="{line}", line=7)  # not text: Twisted's path
        if i % 50 == 49:
            event["log_failure"] = Failure(ValueError("boom"))
        if i % 40 == 39:
            del event["log_time"]
        if i % 45 == 44:
            del event["log_level"]
        yield event


def test_same_text_as_twisted():
    """Every kind of event gives exactly the line Twisted's twistd observer gives."""
    fmt = ClassicFormat()
    for event in _events():
        assert fmt(event) == twisted_text(event), event


def test_time_text_follows_the_second():
    fmt = ClassicFormat()
    base = 1_764_000_000
    for t in (base + 0.1, base + 0.9, base + 1.0, base + 1.5, base + 61.2, base + 0.3):
        event = {"log_time": t, "log_level": LogLevel.info, "log_namespace": "n",
                 "log_format": "{line}", "line": "x"}
        assert fmt(event) == twisted_text(event)


def test_through_a_logger_to_a_file():
    out = io.StringIO()
    Logger(namespace="llamaswap.access", observer=FileLogObserver(out, ClassicFormat())).info(
        "{line}", line="Request a")
    assert out.getvalue().endswith(" [llamaswap.access#info] Request a\n")


class _Options(dict):
    """The parts of twistd's ServerOptions that matter here."""


def test_use_for_names_the_factory_unless_one_is_given():
    options = _Options(logger=None, syslog=False)
    assert twistdlog.use_for(options)
    assert options["logger"] == "llamaswap.twistdlog.observer" and twistdlog.is_ours(options["logger"])
    for given in ({"logger": "my.factory"}, {"logger": None, "syslog": True}):
        assert not twistdlog.use_for(_Options(given))
    assert not twistdlog.is_ours("my.factory")


@pytest.fixture
def options(monkeypatch):
    monkeypatch.setattr(twistdlog, "_server_options", None)
    holder = _Options(logger=None, syslog=False, logfile=None, nodaemon=False)
    twistdlog.use_for(holder)
    return holder


def test_foreground_logs_to_stdout(options):
    options["nodaemon"] = True
    assert twistdlog.observer()._outFile is sys.stdout
    options["logfile"] = "-"
    assert twistdlog.observer()._outFile is sys.stdout


def test_daemon_cannot_log_to_stdout(options):
    options["logfile"] = "-"
    with pytest.raises(SystemExit, match="Daemons cannot log to stdout"):
        twistdlog.observer()


def test_log_file_rotated_on_usr1(options, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        obs = twistdlog.observer()  # a daemon without --logfile: twistd.log, as twistd
        assert isinstance(obs._outFile, LogFile) and obs._outFile.path == str(tmp_path / "twistd.log")
        assert callable(signal.getsignal(signal.SIGUSR1))
        obs._outFile.close()
        options["logfile"] = str(tmp_path / "other.log")
        obs = twistdlog.observer()
        Logger(namespace="n", observer=obs).info("{line}", line="hello")
        obs._outFile.close()
        assert (tmp_path / "other.log").read_text().endswith(" [n#info] hello\n")
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("twistd_args, ours", [
    (["-n"], True), (["-n", "--logfile", "x.log"], True), ([], True),
    (["-n", "--syslog"], False), (["-n", "--logger", "twisted.logger.globalLogPublisher"], False),
])
def test_twistd_command_line(tmp_path, monkeypatch, twistd_args, ours):
    """Parsed as twistd parses it: our factory survives twistd importing its ``--logger``."""
    from twisted.scripts.twistd import ServerOptions

    monkeypatch.setattr(twistdlog, "_server_options", None)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"models:\n  a:\n    cmd: {FAKE_CMD}\n")
    config = ServerOptions()
    config.parseOptions([*twistd_args, "--pidfile", str(tmp_path / "t.pid"), "llamaswap", "--config", str(cfg),
                         "--state-file", str(tmp_path / "s.json")])
    assert (config["logger"] is twistdlog.observer) is ours
