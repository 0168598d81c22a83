"""A model's keep-alive settings: restart after a crash, and a periodic health check.

::

    models:
      llama:
        cmd: llama-server --port ${PORT} -m /models/llama.gguf
        restart: on-failure      # or "no" (the default)
        maxRestarts: 5           # restarts in a row before the model is marked failed; 0: no limit
        restartDelay: 1          # seconds before the first restart; doubled for each one after
        restartMaxDelay: 60      # the longest wait between two restarts
        healthInterval: 30       # poll checkEndpoint of the ready model this often; 0: never
        healthFailures: 3        # failed polls in a row that count as a failure

The supervisor that acts on them is :mod:`llamaswap.keepalive`. This module imports nothing from
llamaswap at import time (``llamaswap.config`` imports it for the type).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import attr

__all__ = ["KEEPALIVE_KEYS", "KeepAlive", "RESTART_POLICIES", "read_keepalive", "with_keepalive"]

RESTART_POLICIES = ("no", "on-failure")
#: the model keys read here
KEEPALIVE_KEYS = ("restart", "maxRestarts", "restartDelay", "restartMaxDelay", "healthInterval",
                  "healthFailures")


@attr.s(frozen=True, auto_attribs=True)
class KeepAlive:
    """What to do when a model dies without being asked to stop.

    :ivar restart: ``"no"`` or ``"on-failure"``.
    :ivar max_restarts: restarts in a row before giving up (the model is then ``failed``);
        0 means no limit. A run that stays ready for ``restart_max_delay`` seconds starts the
        count again.
    :ivar restart_delay: seconds before the first restart; each further restart in a row
        waits twice as long as the one before, up to ``restart_max_delay``.
    :ivar restart_max_delay: the longest wait before a restart, in seconds.
    :ivar health_interval: seconds between two health checks of the ready model; 0: none.
    :ivar health_failures: failed health checks in a row that make the model unhealthy.
    """

    restart: str = "no"
    max_restarts: int = 5
    restart_delay: float = 1.0
    restart_max_delay: float = 60.0
    health_interval: float = 0.0
    health_failures: int = 3

    @property
    def restarts(self) -> bool:
        return self.restart == "on-failure"

    def delay(self, attempt: int) -> float:
        """The wait before restart number ``attempt`` (1 for the first of a row)."""
        return min(self.restart_max_delay, self.restart_delay * 2 ** max(0, attempt - 1))


def read_keepalive(r: Any, check_endpoint: Optional[str]) -> KeepAlive:
    """The keep-alive keys of the model read by ``r`` (a ``Reader`` at ``models.<id>``).

    :param check_endpoint: the model's effective ``checkEndpoint`` (None: ``none``), which
        ``healthInterval`` needs.
    """
    restart = r.str("restart", "no").strip()
    if restart not in RESTART_POLICIES:
        r.invalid("restart", "must be 'no' or 'on-failure'", r.value("restart"))
        restart = "no"
    max_restarts = r.int("maxRestarts", 5)
    delay = _seconds(r, "restartDelay", 1.0, positive=True)
    max_delay = _seconds(r, "restartMaxDelay", max(60.0, delay), positive=True)
    if r.has("restartMaxDelay") and max_delay < delay:
        r.error("restartMaxDelay", f"must not be less than restartDelay ({_text(delay)})")
    interval = _seconds(r, "healthInterval", 0.0, positive=False)
    if interval and check_endpoint is None:
        r.error("healthInterval", "needs a checkEndpoint (this model's is 'none')")
    failures = r.int("healthFailures", 3)
    if failures == 0:
        r.error("healthFailures", "must be at least 1")
        failures = 3
    return KeepAlive(restart, max_restarts, delay, max(max_delay, delay), interval, failures)


def _seconds(r: Any, key: str, default: float, positive: bool) -> float:
    value = r.value(key)
    if value is None:
        return default
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
        and (value > 0 if positive else value >= 0)
    if not ok:
        r.invalid(key, "must be a positive number of seconds" if positive
                  else "must be a non-negative number of seconds", value)
        return default
    return float(value)


def _text(seconds: float) -> str:
    return f"{seconds:g}"


def with_keepalive(model: Any, raw: Any, errors: list[str], warnings: list[str]) -> Any:
    """``model`` (a ``ModelConfig``, or None when it had errors) with its keep-alive settings
    read from ``raw`` (its ``RawModel``); the keys are checked either way, so that one run
    reports every mistake."""
    from llamaswap.config.reader import Reader

    r = Reader(raw.data, raw.path, errors, warnings, "models.<id>")
    check_endpoint = model.check_endpoint if model is not None else "/health"
    keepalive = read_keepalive(r, check_endpoint)
    if model is None:
        return None
    return attr.evolve(model, keepalive=keepalive)
