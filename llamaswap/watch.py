"""``--watch-config`` (CLI-4): reload when the config file, or the ``--config-dir``, changes.

:class:`ConfigWatcher` is a service that polls the file's ``(mtime, size, inode, device)``
(symlinks followed) on the clock it is given, and calls ``on_change`` when that differs
from what it last saw. A missing file is warned about once and keeps the current config.

:class:`ConfigDirWatcher` does the same for the ``*.yml``/``*.yaml`` files directly in a
directory, as llama-swap's ``DirWatcher`` does: a file added, removed or changed is a change.
A missing directory, or one without config files, is warned about once and keeps the current
config (an editor or a ConfigMap update may empty it for a moment); the first poll that finds
files again reloads.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["ConfigDirWatcher", "ConfigWatcher", "WATCH_INTERVAL", "dir_key", "stat_key"]

#: CLI-4: how often --watch-config looks at the file.
WATCH_INTERVAL = 2.0


def stat_key(path: str) -> Optional[tuple]:
    """(mtime, size, inode, device) of the resolved target (symlinks followed), or None if missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def dir_key(directory: str) -> Optional[tuple]:
    """``((name, stat_key), ...)`` of the config files in ``directory``, sorted by name; None
    when the directory cannot be listed. A file that vanishes while it is looked at is left out
    (the next poll sees the removal)."""
    from llamaswap.config.merge import is_config_file

    try:
        with os.scandir(directory) as entries:
            names = sorted(e.name for e in entries if is_config_file(e.name))
    except OSError:
        return None
    files = []
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            continue
        key = stat_key(path)
        if key is not None:
            files.append((name, key))
    return tuple(files)


class ConfigWatcher(Service):
    """Polls ``path`` every ``interval`` seconds while running; ``on_change()`` on a change.

    The file is looked at once here, when the watcher is built (right after the config
    was read), so that a change made before the first tick, or even before the daemon
    listens, is still seen.

    :param clock: ``IReactorTime`` the polling runs on.
    :param on_change: called with no argument after the file changed; it reloads and
        handles its own errors.
    :param log: where the missing-file warning goes.
    """

    name = "watch-config"

    def __init__(self, path: str, clock: Any, on_change: Callable[[], None], log: Logger,
                 interval: float = WATCH_INTERVAL) -> None:
        self.path = path
        self._on_change = on_change
        self._log = log
        self._interval = interval
        self._seen = stat_key(path)
        self._missing_warned = False
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock  # LoopingCall's documented way to take a clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def check(self) -> None:
        """Look at the file once: warn once if it is missing, ``on_change()`` if it changed."""
        key = stat_key(self.path)
        if key is None:
            if not self._missing_warned:
                self._missing_warned = True
                self._log.warn("config file {path} is missing; keeping the current config", path=self.path)
            self._seen = None
            return
        self._missing_warned = False
        if key != self._seen:
            self._seen = key
            self._on_change()


class ConfigDirWatcher(ConfigWatcher):
    """Polls the config files of ``path`` (a directory) every ``interval`` seconds while running;
    ``on_change()`` when one was added, removed or changed.

    Everything written in one poll interval is one change, so one reload.
    """

    name = "watch-config-dir"

    def __init__(self, path: str, clock: Any, on_change: Callable[[], None], log: Logger,
                 interval: float = WATCH_INTERVAL) -> None:
        super().__init__(path, clock, on_change, log, interval)
        self._seen = dir_key(path)

    def check(self) -> None:
        """Look at the directory once: warn once if it has no config files, ``on_change()`` if
        its files changed."""
        key = dir_key(self.path)
        if not key:
            if not self._missing_warned:
                self._missing_warned = True
                what = "is missing" if key is None else "has no *.yaml or *.yml files"
                self._log.warn("config directory {path} {what}; keeping the current config",
                               path=self.path, what=what)
            self._seen = key
            return
        self._missing_warned = False
        if key != self._seen:
            self._seen = key
            self._on_change()
