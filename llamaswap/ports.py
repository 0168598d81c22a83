"""Port ownership: a model is ready only when its own child answers.

A health answer from port P proves nothing if another process already listens on P (a
second daemon on the same ``startPort``, a llama-server started by hand). This module
tells the supervisor who holds a port:

* before a start: is the model's port free? (and, if not, which pid and command hold it);
* when the health check passes: does the listening socket belong to the child's process
  group? (on Linux, from ``/proc/net/tcp``/``tcp6`` and the group's ``/proc/<pid>/fd``);
* when a health answer arrives: has the leader exited already?

The parsing and the decisions are small pure functions; :class:`SystemPorts` does the
reads, under a configurable ``/proc`` root so tests can hand it a fake tree. Where
``/proc`` is missing (macOS) a bind() test answers "is it free?" and ownership is unknown.
Standard library only: ``config`` and ``process`` both import it.
"""
from __future__ import annotations

import enum
import errno
import ipaddress
import os
import socket
import sys
from typing import Callable, Iterable, Optional
from urllib.parse import urlsplit

import attr

#: TCP state LISTEN as written in /proc/net/tcp.
_LISTEN = "0A"
#: argv[0] basenames whose listener is legitimately outside the child's group (a daemon
#: such as dockerd or docker-proxy owns it).
CONTAINER_RUNNERS = frozenset({"docker", "podman", "nerdctl", "docker-compose", "podman-remote"})
#: The holder's command is cut to this many characters in messages.
COMMAND_LIMIT = 80
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


@attr.s(frozen=True, auto_attribs=True)
class Listener:
    """One LISTEN socket from /proc/net/tcp(6)."""

    address: str
    port: int
    inode: int


@attr.s(frozen=True, auto_attribs=True)
class Holder:
    """Who holds a port: ``pid`` and ``command`` when /proc tells, else None and ``""``."""

    pid: Optional[int] = None
    command: str = ""

    def describe(self, port: int) -> str:
        text = f"port {port} is already in use"
        if self.pid is not None:
            text += f" by pid {self.pid}"
            if self.command:
                text += f" ({self.command})"
        return text


class Ownership(enum.Enum):
    OWN = "own"          # every listener on the port belongs to the child's group
    FOREIGN = "foreign"  # a process outside the group listens on the port
    UNKNOWN = "unknown"  # /proc cannot tell


@attr.s(frozen=True, auto_attribs=True)
class Watch:
    """What to check for one model: its ``port``, and whether its listener must be in the
    child's process group (``verify_owner``) or only free before the start."""

    port: int
    verify_owner: bool


# -- pure functions ---------------------------------------------------------------------------

def _decode_address(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # tcp6: four 32-bit words, each in host (little-endian) order
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


def parse_proc_net_tcp(text: str) -> list[Listener]:
    """The LISTEN entries of a /proc/net/tcp or /proc/net/tcp6 text; other lines are skipped."""
    listeners = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _LISTEN:
            continue
        address, _, port = fields[1].rpartition(":")
        try:
            listeners.append(Listener(_decode_address(address), int(port, 16), int(fields[9])))
        except ValueError:
            continue
    return listeners


def listeners_on(listeners: Iterable[Listener], port: int) -> list[Listener]:
    """The listeners on ``port``, whatever their address (0.0.0.0 and :: included)."""
    return [entry for entry in listeners if entry.port == port]


def socket_inode(link: str) -> Optional[int]:
    """``socket:[12345]`` (an fd symlink's target) -> 12345; anything else -> None."""
    if link.startswith("socket:[") and link.endswith("]"):
        try:
            return int(link[8:-1])
        except ValueError:
            return None
    return None


def stat_pgid(stat: bytes) -> Optional[int]:
    """The process group of a /proc/<pid>/stat line, or None for a zombie or bad line."""
    fields = stat[stat.rfind(b")") + 2:].split()
    if len(fields) < 3 or fields[0] == b"Z":
        return None
    try:
        return int(fields[2])
    except ValueError:
        return None


def describe_command(cmdline: bytes, limit: int = COMMAND_LIMIT) -> str:
    """A /proc/<pid>/cmdline (NUL-separated) as one line: argv[0]'s basename, then the rest."""
    argv = [a.decode("utf-8", "replace") for a in cmdline.rstrip(b"\0").split(b"\0") if a]
    if not argv:
        return ""
    argv[0] = os.path.basename(argv[0]) or argv[0]
    text = " ".join(argv)
    if len(text) > limit:
        text = text[:limit].rstrip() + " ..."
    return text


def ownership(on_port: Iterable[Listener], group_inodes: Optional[set]) -> Ownership:
    """OWN when every listener on the port is one of the group's sockets, FOREIGN when one is
    not, UNKNOWN when nothing listens or the group's sockets could not be read."""
    on_port = list(on_port)
    if not on_port or group_inodes is None:
        return Ownership.UNKNOWN
    if all(entry.inode in group_inodes for entry in on_port):
        return Ownership.OWN
    return Ownership.FOREIGN


def conflict_message(model_id: str, port: int, holder: Holder) -> str:
    """The start failure for a port held by someone else (502 ``upstream_start_failed``)."""
    return f"failed to start model '{model_id}': {holder.describe(port)}"


def is_local_host(host: str) -> bool:
    """True for a loopback or wildcard address, ``localhost``, this machine's host name, or an
    address assigned to one of this machine's interfaces (it can be bound)."""
    name = host.strip("[]").split("%", 1)[0].lower()
    if name in _LOCAL_NAMES or name.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return name == socket.gethostname().lower()
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((str(ip), 0))
    except OSError:
        return False
    return True


def _proxy_port(proxy: str) -> tuple[Optional[str], Optional[int]]:
    try:
        parts = urlsplit(proxy)
        port = parts.port
    except ValueError:
        return None, None
    if port is None:
        port = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.hostname, port


def watch_for(model, is_local: Callable[[str], bool] = is_local_host) -> Optional[Watch]:
    """What to check for ``model`` (a ``ModelConfig``), or None when its port is not known.

    The port is the ``proxy`` URL's when its host is local, else the ``${PORT}`` value.
    The listener must be in the child's group, except for container runners (docker,
    podman, nerdctl), runner-style models (``cmdStop``) and proxies to other hosts: those
    only get the "port was free" check.
    """
    host, port = _proxy_port(model.proxy)
    local = host is not None and port is not None and is_local(host)
    if not local:
        return Watch(model.port, False) if model.port is not None else None
    runner = os.path.basename(model.argv[0]) if model.argv else ""
    verify = not model.cmd_stop_argv and runner not in CONTAINER_RUNNERS
    return Watch(port, verify)


def claimed_ports(model) -> set:
    """Ports a running child of ``model`` may hold: its ``${PORT}`` and its proxy port."""
    ports = set()
    if model.port is not None:
        ports.add(model.port)
    _, port = _proxy_port(model.proxy)
    if port is not None:
        ports.add(port)
    return ports


def bind_in_use(port: int, hosts: Iterable[str] = ("127.0.0.1", "0.0.0.0", "::1", "::")) -> bool:
    """True if binding ``port`` fails with "address in use" on one of ``hosts``.

    SO_REUSEADDR is set, so TIME_WAIT leftovers (of our own stopped child) do not count.
    Addresses the machine does not have (no IPv6) are skipped.
    """
    for host in hosts:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                try:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                except OSError:
                    pass
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
    return False


# -- reading the system -------------------------------------------------------------------------

@attr.s(eq=False)
class SystemPorts:
    """Answers the supervisor's questions from ``/proc`` (or a bind() test without it).

    :param root: the /proc mount point (a fake tree in tests).
    :param bind_test: ``(port) -> bool``, used where ``root/net/tcp`` cannot be read.
    """

    root: str = attr.ib(default="/proc")
    bind_test: Callable[[int], bool] = attr.ib(default=bind_in_use)

    def listeners(self) -> Optional[list[Listener]]:
        """Every LISTEN socket of this network namespace; None when /proc cannot tell."""
        found, readable = [], False
        for name in ("tcp", "tcp6"):
            try:
                with open(os.path.join(self.root, "net", name), encoding="ascii", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            readable = True
            found += parse_proc_net_tcp(text)
        return found if readable else None

    def holder(self, port: int) -> Optional[Holder]:
        """Who listens on ``port``; None when it is free."""
        listeners = self.listeners()
        if listeners is None:
            return Holder() if self.bind_test(port) else None
        on_port = listeners_on(listeners, port)
        if not on_port:
            return None
        return self._holder_of({entry.inode for entry in on_port})

    def port_in_use(self, port: int) -> bool:
        return self.holder(port) is not None

    def owner(self, port: int, pgid: int) -> tuple[Ownership, Optional[Holder]]:
        """Whether the listener on ``port`` belongs to process group ``pgid``; with the
        holder when it does not."""
        listeners = self.listeners()
        if listeners is None:
            return Ownership.UNKNOWN, None
        on_port = listeners_on(listeners, port)
        if not on_port:
            return Ownership.UNKNOWN, None
        inodes = self.group_socket_inodes(pgid)
        verdict = ownership(on_port, inodes)
        if verdict is not Ownership.FOREIGN:
            return verdict, None
        assert inodes is not None
        return verdict, self._holder_of({e.inode for e in on_port if e.inode not in inodes})

    def leader_exited(self, pid: int) -> bool:
        """True once our child ``pid`` has exited, even before the reactor has reaped it."""
        waitid = getattr(os, "waitid", None)
        if waitid is not None:
            try:
                # WNOWAIT: only look; the reactor still reaps it and reports the exit.
                return waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
            except ChildProcessError:
                return True  # already reaped
            except OSError:
                pass
        try:
            with open(os.path.join(self.root, str(pid), "stat"), "rb") as f:
                return stat_pgid(f.read()) is None
        except FileNotFoundError:
            return sys.platform.startswith("linux")
        except OSError:
            return False

    # helpers

    def _pids(self) -> list[int]:
        try:
            return sorted(int(e) for e in os.listdir(self.root) if e.isdigit())
        except OSError:
            return []

    def group_pids(self, pgid: int) -> list[int]:
        """The live members of process group ``pgid``."""
        members = []
        for pid in self._pids():
            try:
                with open(os.path.join(self.root, str(pid), "stat"), "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if stat_pgid(stat) == pgid:
                members.append(pid)
        return members

    def socket_inodes(self, pid: int) -> Optional[set]:
        """The socket inodes among ``pid``'s open fds; None when they cannot be read."""
        fd_dir = os.path.join(self.root, str(pid), "fd")
        try:
            fds = os.listdir(fd_dir)
        except FileNotFoundError:
            return set()  # exited meanwhile
        except OSError:
            return None
        inodes = set()
        for fd in fds:
            try:
                inode = socket_inode(os.readlink(os.path.join(fd_dir, fd)))
            except OSError:
                continue
            if inode is not None:
                inodes.add(inode)
        return inodes

    def group_socket_inodes(self, pgid: int) -> Optional[set]:
        """Every socket inode open in process group ``pgid``; None when one member's fds
        could not be read."""
        inodes: set = set()
        for pid in self.group_pids(pgid):
            own = self.socket_inodes(pid)
            if own is None:
                return None
            inodes |= own
        return inodes

    def _holder_of(self, inodes: set) -> Holder:
        """The first process (lowest pid) with one of ``inodes`` open; only used on failure,
        so a scan of every readable process is affordable."""
        for pid in self._pids():
            found = self.socket_inodes(pid)
            if found and found & inodes:
                try:
                    with open(os.path.join(self.root, str(pid), "cmdline"), "rb") as f:
                        command = describe_command(f.read())
                except OSError:
                    command = ""
                return Holder(pid, command)
        return Holder()


#: The one instance the daemon uses.
SYSTEM = SystemPorts()


def port_in_use(port: int) -> bool:
    """True if something on this machine listens on ``port`` (``${PORT}`` allocation)."""
    return SYSTEM.port_in_use(port)
