"""Port ownership (llamaswap/ports.py): /proc parsing, the decisions, ${PORT} allocation that
skips busy ports, and reload keeping our own children's ports."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from llamaswap import ports
from llamaswap.config import load_config, parse_config
from llamaswap.ports import (
    Holder, Listener, Ownership, SystemPorts, Watch, bind_in_use, claimed_ports, conflict_message,
    describe_command, is_local_host, listeners_on, ownership, parse_proc_net_tcp, socket_inode,
    stat_pgid, watch_for)
from tests.factories import make_model

linux_only = pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc")

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:16A8 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0 100 0 0 10 0
   1: 00000000:16A9 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4343 1 0 100 0 0 10 0
   2: 0100007F:16A8 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 5555 1 0 20 4 30 10 -1
   3: 0100007F:9C40 0100007F:16A8 06 00000000:00000000 03:00000F9B 00000000     0        0 0 3 0
"""
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:16AA 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4444 1 0 100 0 0 10 0
   1: 00000000000000000000000001000000:16A8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4545 1 0 100 0 0 10 0
"""


# -- pure functions ---------------------------------------------------------------------------

def test_parse_proc_net_tcp_keeps_listen_entries_only():
    assert parse_proc_net_tcp(TCP) == [Listener("127.0.0.1", 5800, 4242), Listener("0.0.0.0", 5801, 4343)]


def test_parse_proc_net_tcp6_addresses():
    assert parse_proc_net_tcp(TCP6) == [Listener("::", 5802, 4444), Listener("::1", 5800, 4545)]


def test_parse_tolerates_garbage_and_empty():
    assert parse_proc_net_tcp("") == []
    assert parse_proc_net_tcp("header\n  0: zz:zz 0 0A a b c d e f\nshort line\n") == []


def test_listeners_on_any_address():
    entries = parse_proc_net_tcp(TCP) + parse_proc_net_tcp(TCP6)
    assert [e.inode for e in listeners_on(entries, 5800)] == [4242, 4545]
    assert listeners_on(entries, 5900) == []


def test_socket_inode():
    assert socket_inode("socket:[12345]") == 12345
    assert socket_inode("pipe:[12345]") is None
    assert socket_inode("/dev/null") is None
    assert socket_inode("socket:[x]") is None


def test_stat_pgid_handles_odd_names_and_zombies():
    assert stat_pgid(b"42 (llama server) S 1 4200 4200 0 -1") == 4200
    assert stat_pgid(b"42 (a) b) R 1 77 77 0") == 77
    assert stat_pgid(b"42 (gone) Z 1 77 77 0") is None
    assert stat_pgid(b"garbage") is None


def test_describe_command():
    assert describe_command(b"/opt/llama.cpp/bin/llama-server\0--port\x005800\0") == "llama-server --port 5800"
    long = describe_command(b"srv\0" + b"x" * 200 + b"\0")
    assert long.endswith(" ...") and len(long) <= ports.COMMAND_LIMIT + 4
    assert describe_command(b"") == ""


def test_ownership_decision():
    on_port = [Listener("127.0.0.1", 5800, 1), Listener("::1", 5800, 2)]
    assert ownership(on_port, {1, 2, 9}) is Ownership.OWN
    assert ownership(on_port, {1}) is Ownership.FOREIGN
    assert ownership(on_port, set()) is Ownership.FOREIGN
    assert ownership([], {1}) is Ownership.UNKNOWN
    assert ownership(on_port, None) is Ownership.UNKNOWN


def test_messages():
    assert conflict_message("b", 5800, Holder(1234, "llama-server --port 5800")) == (
        "failed to start model 'b': port 5800 is already in use by pid 1234 (llama-server --port 5800)")
    assert Holder(7).describe(1) == "port 1 is already in use by pid 7"
    assert Holder().describe(1) == "port 1 is already in use"


def test_is_local_host():
    for host in ("localhost", "LOCALHOST", "127.0.0.1", "127.0.0.2", "0.0.0.0", "::", "::1", "[::1]",
                 "::ffff:127.0.0.1", socket.gethostname()):
        assert is_local_host(host), host
    for host in ("192.0.2.1", "example.invalid", "2001:db8::1"):
        assert not is_local_host(host), host


def test_watch_for():
    local = lambda host: host in ("127.0.0.1", "localhost")  # noqa: E731
    m = make_model(id="m", proxy="http://127.0.0.1:5800")
    assert watch_for(m, local) == Watch(5800, True)
    assert watch_for(make_model(id="m", proxy="http://localhost"), local) == Watch(80, True)
    assert watch_for(make_model(id="m", proxy="https://localhost/v1"), local) == Watch(443, True)
    for runner in ("docker", "/usr/bin/podman", "nerdctl"):
        assert watch_for(make_model(id="m", argv=(runner, "run")), local) == Watch(5800, False)
    assert watch_for(make_model(id="m", cmd_stop_argv=("stop",)), local) == Watch(5800, False)
    assert watch_for(make_model(id="m", proxy="http://gpu-box:9000"), local) is None
    assert watch_for(make_model(id="m", proxy="http://gpu-box:5803", port=5803), local) == Watch(5803, False)


def test_claimed_ports():
    assert claimed_ports(make_model(id="m", proxy="http://127.0.0.1:5800", port=5800)) == {5800}
    assert claimed_ports(make_model(id="m", proxy="http://127.0.0.1:9000", port=5801)) == {9000, 5801}


# -- SystemPorts on a fake /proc ----------------------------------------------------------------

def fake_proc(tmp_path, tcp: str = TCP, tcp6: str | None = TCP6, procs: dict | None = None) -> str:
    """A /proc tree: net/tcp(6) and, per pid, stat (pgid), cmdline and fd symlinks."""
    root = tmp_path / "proc"
    (root / "net").mkdir(parents=True)
    (root / "net" / "tcp").write_text(tcp)
    if tcp6 is not None:
        (root / "net" / "tcp6").write_text(tcp6)
    for pid, (pgid, cmdline, fds) in (procs or {}).items():
        d = root / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "stat").write_bytes(f"{pid} (x) S 1 {pgid} {pgid} 0".encode())
        (d / "cmdline").write_bytes(cmdline)
        for i, target in enumerate(fds):
            os.symlink(target, d / "fd" / str(i))
    return str(root)


PROCS = {
    100: (100, b"/usr/bin/llama-server\0--port\x005800\0", ["/dev/null", "socket:[4242]", "socket:[4545]"]),
    101: (100, b"helper\0", ["pipe:[1]", "socket:[9]"]),
    200: (200, b"python\0fake.py\0", ["socket:[4343]"]),
}


def test_holder_names_pid_and_command(tmp_path):
    sp = SystemPorts(root=fake_proc(tmp_path, procs=PROCS), bind_test=lambda p: pytest.fail("no bind test"))
    assert sp.holder(5800) == Holder(100, "llama-server --port 5800")
    assert sp.holder(5801) == Holder(200, "python fake.py")
    assert sp.holder(5802) == Holder()            # listening, but no readable process has it
    assert sp.holder(5900) is None
    assert sp.port_in_use(5800) and not sp.port_in_use(5900)


def test_owner_own_foreign_unknown(tmp_path):
    sp = SystemPorts(root=fake_proc(tmp_path, procs=PROCS))
    assert sp.group_pids(100) == [100, 101]
    assert sp.owner(5800, 100) == (Ownership.OWN, None)
    assert sp.owner(5800, 200) == (Ownership.FOREIGN, Holder(100, "llama-server --port 5800"))
    assert sp.owner(5801, 100) == (Ownership.FOREIGN, Holder(200, "python fake.py"))
    assert sp.owner(5801, 999) == (Ownership.FOREIGN, Holder(200, "python fake.py"))   # group gone
    assert sp.owner(5900, 100) == (Ownership.UNKNOWN, None)


def test_tcp6_alone_is_enough(tmp_path):
    root = fake_proc(tmp_path, procs=PROCS)
    os.remove(os.path.join(root, "net", "tcp"))
    assert SystemPorts(root=root).holder(5802) == Holder()


def test_without_proc_net_falls_back_to_bind_test(tmp_path):
    asked = []
    sp = SystemPorts(root=str(tmp_path / "nothing"), bind_test=lambda p: asked.append(p) or p == 1)
    assert sp.holder(1) == Holder() and sp.holder(2) is None
    assert asked == [1, 2]
    assert sp.owner(1, 100) == (Ownership.UNKNOWN, None)


# -- the real system ---------------------------------------------------------------------------------

def listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def test_bind_in_use_sees_a_listener():
    with listening_socket() as s:
        port = s.getsockname()[1]
        assert bind_in_use(port)
    assert not bind_in_use(port)


def test_bind_test_ignores_time_wait():
    """SO_REUSEADDR: the TIME_WAIT leftover of a closed connection of a server that set
    SO_REUSEADDR itself (llama-server and Twisted do) does not count as in use."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()            # the server side closes first: its end goes to TIME_WAIT
    client.recv(1)
    client.close()
    server.close()
    assert not bind_in_use(port)
    if os.path.exists("/proc/net/tcp"):
        assert ports.SYSTEM.holder(port) is None      # /proc counts LISTEN sockets only


@linux_only
def test_real_proc_finds_this_process_as_holder_and_owner():
    with listening_socket() as s:
        port = s.getsockname()[1]
        holder = ports.SYSTEM.holder(port)
        assert holder is not None and holder.pid == os.getpid(), holder
        assert "python" in holder.command or "pytest" in holder.command
        assert ports.SYSTEM.owner(port, os.getpgrp()) == (Ownership.OWN, None)
        verdict, foreign = ports.SYSTEM.owner(port, 2**22 + 12345)   # a group with no members
        assert verdict is Ownership.FOREIGN and foreign.pid == os.getpid()
    assert ports.SYSTEM.holder(port) is None


@pytest.mark.skipif(not hasattr(os, "waitid"), reason="needs os.waitid")
def test_leader_exited_before_the_reaper_runs():
    """An exited but unreaped child counts as exited; the reaper can still collect it."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)      # blocks until it exits, no reap
    assert ports.SYSTEM.leader_exited(child.pid)
    assert child.wait(5) == 0
    assert ports.SYSTEM.leader_exited(child.pid)                 # reaped: gone


@pytest.mark.skipif(not hasattr(os, "waitid"), reason="needs os.waitid")
def test_leader_alive():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert not ports.SYSTEM.leader_exited(child.pid)
    finally:
        child.stdin.close()
        child.wait(10)


# -- ${PORT} allocation ------------------------------------------------------------------------------

CONFIG = """\
startPort: 5800
models:
  a: {cmd: "srv --port ${PORT}"}
  c: {cmd: "srv --port ${PORT}"}
  b: {cmd: "srv --port ${PORT}"}
  fixed: {cmd: "srv --port 9000", proxy: "http://127.0.0.1:9000"}
"""


def test_allocation_skips_busy_ports():
    busy = {5800, 5802}
    c = parse_config(CONFIG, port_in_use=lambda p: p in busy)
    assert {m: c.models[m].port for m in c.models} == {"a": 5801, "b": 5803, "c": 5804, "fixed": None}
    assert c.models["b"].argv == ("srv", "--port", "5803")
    assert c.models["b"].proxy == "http://localhost:5803"


def test_parse_config_assumes_nothing_in_use():
    c = parse_config(CONFIG)
    assert {m: c.models[m].port for m in c.models} == {"a": 5800, "b": 5801, "c": 5802, "fixed": None}


def test_load_config_checks_this_machine(tmp_path, monkeypatch):
    class Busy:
        def port_in_use(self, port):
            return port == 5800

    monkeypatch.setattr(ports, "SYSTEM", Busy())
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG)
    c = load_config(str(path))
    assert (c.models["a"].port, c.models["b"].port) == (5801, 5802)
    c = load_config(str(path), port_in_use=lambda p: False)
    assert c.models["a"].port == 5800


# -- reload ---------------------------------------------------------------------------------------------

class FakePorts:
    """ports.SYSTEM for the service: ports in ``busy`` are held (by our own children here)."""

    def __init__(self) -> None:
        self.busy: set = set()

    def port_in_use(self, port):
        return port in self.busy

    def holder(self, port):
        return Holder() if port in self.busy else None

    def owner(self, port, pgid):
        return Ownership.OWN, None

    def leader_exited(self, pid):
        return False


def test_reload_keeps_ports_of_our_running_children(tmp_path, monkeypatch):
    """At reload, the ports our own children hold count as free: unchanged ${PORT} models keep
    their port and their child; a port held by someone else is still skipped."""
    from llamaswap.service import LlamaSwapService
    from tests.fakes import FakeProcessReactor

    fake = FakePorts()
    monkeypatch.setattr(ports, "SYSTEM", fake)
    def text(c_ttl: int = 0) -> str:
        return textwrap.dedent(f"""\
            startPort: 5800
            groups: {{all: {{swap: false, members: [a, b, c]}}}}
            models:
              a: {{cmd: "{sys.executable} --port ${{PORT}}"}}
              b: {{cmd: "{sys.executable} --port ${{PORT}}"}}
              c: {{cmd: "{sys.executable} --port ${{PORT}}", ttl: {c_ttl}}}
            """)

    path = tmp_path / "config.yaml"
    path.write_text(text())
    reactor = FakeProcessReactor()
    service = LlamaSwapService(load_config(str(path)), reactor, "tcp:0", str(tmp_path / "state.json"),
                               install_signals=False, config_path=str(path))
    for model_id in ("a", "b"):
        service.router.load(model_id).addErrback(lambda f: None)
    reactor.advance(0)
    running = {p.id: (p.pid, p.state.value) for p in service.router.processes() if p.pid}
    assert set(running) == {"a", "b"} and all(s == "starting" for _, s in running.values()), running
    fake.busy = {5800, 5801}           # held by our own a and b now
    path.write_text(text(c_ttl=30))     # only a ttl change for c
    outcome = service.reload()
    assert outcome["changed"] == [] and sorted(outcome["unchanged"]) == ["a", "b", "c"], outcome
    assert [service.router.process(m).model.port for m in "abc"] == [5800, 5801, 5802]
    assert {p.id: p.pid for p in service.router.processes() if p.pid} == {m: running[m][0] for m in running}

    fake.busy = {5800, 5801, 5802}     # a foreign process took c's port; c is not running
    outcome = service.reload()
    assert outcome["changed"] == ["c"] and service.router.process("c").model.port == 5803
    assert [service.router.process(m).model.port for m in "ab"] == [5800, 5801]
    for proc in service.router.processes():
        if proc.pid:
            reactor.by_pid(proc.pid).exit(0)
