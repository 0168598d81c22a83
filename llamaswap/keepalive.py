"""Keep-alive: restart a model that dies while nobody asked it to stop, and poll its health.

:class:`KeepAlive` watches the router's model events (it is an ``IModelObserver`` on
``router.observers``) and acts on each model's ``keepalive`` settings
(:class:`llamaswap.config.keepalive.KeepAlive`; docs/sharing.rst):

* ``restart: on-failure``: a ready model whose child exits by itself (``Stopping`` with reason
  ``exited``), or a start that fails by itself (``StartFailed``), is started again through the
  router (``router.load``, so the swap rules hold) after a wait that doubles with each failure in
  a row, from ``restartDelay`` up to ``restartMaxDelay``. A restart that would stop another model
  is skipped: whatever started meanwhile took the dead model's place, as a swap would have.
  After ``maxRestarts`` restarts in a row the model is marked failed (``router.failed``), shown as
  ``failed`` with the reason until a request or a load starts it again. A run that stays ready
  for ``restartMaxDelay`` seconds starts the count again.
* ``healthInterval``: the ready model's ``checkEndpoint`` is polled that often; after
  ``healthFailures`` failed polls in a row it is stopped (``Stopping`` reason ``unhealthy``),
  then restarted as above, or marked failed when it may not restart.

Every restart is logged with the last lines of the previous run's output, read from the log
broadcaster's history of the model. Decisions are taken one reactor turn after the events that
call for them (``callLater(0)`` on the injected clock), once the child is really gone and every
other observer has seen the events.
"""
from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from llamaswap.observe import ModelEvent, Reloaded, Removed, Replaced, StartFailed, StateChanged, Stopping
from llamaswap.process import State

__all__ = ["KeepAlive", "TAIL_LINES", "output_tail"]

#: a restart's log line carries at most this much of the previous run's output
TAIL_LINES, TAIL_BYTES = 10, 2048


def output_tail(history: bytes, lines: int = TAIL_LINES, limit: int = TAIL_BYTES) -> str:
    """The last ``lines`` lines (``limit`` bytes at most) of a model's output history."""
    text = history.decode("utf-8", "replace").rstrip("\n")
    tail = "\n".join(line.rstrip("\r") for line in text.splitlines()[-lines:])
    if len(tail.encode("utf-8")) > limit:
        tail = tail.encode("utf-8")[-limit:].decode("utf-8", "ignore")
    return tail


def _summary(reason: str) -> str:
    """A failure reason without the output tail a failed start appends (the log has it)."""
    return reason.split("; last output:", 1)[0]


class _Watch:
    """What the supervisor keeps for one model."""

    def __init__(self) -> None:
        self.failures = 0                 # failures in a row (each restarted, or the last one not)
        self.ready_at: Optional[float] = None
        self.restarting = False           # our router.load is under way
        self.gave_up = False              # marked failed; a start by someone else resets
        self.pending: Optional[str] = None  # a failure waiting to be decided on
        self.pending_health = False         # ... found by the health checks
        self.why = ""                     # the failure that the next restart follows
        self.decide_call: Any = None
        self.restart_call: Any = None
        self.health_call: Any = None
        self.health_failures = 0
        self.probing: Optional[Deferred] = None

    def cancel_restart(self) -> None:
        if self.restart_call is not None and self.restart_call.active():
            self.restart_call.cancel()
        self.restart_call = None

    def stop_polling(self) -> None:
        if self.health_call is not None and self.health_call.active():
            self.health_call.cancel()
        self.health_call = None
        probing, self.probing = self.probing, None
        if probing is not None:
            probing.cancel()

    def cancel(self) -> None:
        self.cancel_restart()
        self.stop_polling()
        if self.decide_call is not None and self.decide_call.active():
            self.decide_call.cancel()
        self.decide_call = None


class KeepAlive(Service):
    """Restarts models with ``restart: on-failure`` and polls ``healthInterval``.

    :param router: the ``ModelRouter``; the supervisor adds itself to its observers, starts
        models with ``load``, stops unhealthy ones with ``stop_model`` and marks the ones it
        gave up on in ``router.failed``.
    :param clock: ``IReactorTime`` for the waits and the polls.
    :param logs: the ``LogBroadcaster`` whose history of a model gives the previous run's
        output.
    """

    name = "keepalive"

    def __init__(self, router: Any, clock: Any, logs: Any, log: Optional[Logger] = None) -> None:
        self.router = router
        self.clock = clock
        self.logs = logs
        self.log = log or Logger(namespace="llamaswap.keepalive")
        self._watches: dict[str, _Watch] = {}
        router.observers.add(self.observe, queue=False)  # no use for the per-request QueueChanged

    def stopService(self) -> None:
        """No restart or poll after this (the daemon is stopping every model)."""
        Service.stopService(self)
        for watch in self._watches.values():
            watch.cancel()

    def failures(self, model_id: str) -> int:
        """Failures in a row of ``model_id`` (0 after a stable run)."""
        watch = self._watches.get(model_id)
        return watch.failures if watch is not None else 0

    # -- events -----------------------------------------------------------------------------------

    def observe(self, event: ModelEvent) -> None:
        """``IModelObserver``: crashes, failed starts and state changes; reloads forget."""
        if not self.running:
            return
        if isinstance(event, StateChanged):
            self._state_changed(event)
        elif isinstance(event, Stopping) and event.reason == "exited":
            self._failed(event.model, f"its server stopped unexpectedly ({self._exit(event.model)})")
        elif isinstance(event, StartFailed):
            self._failed(event.model, _summary(event.reason))
        elif isinstance(event, Reloaded):
            for model_id in (*event.changed, *event.removed):
                self._forget(model_id)
        elif isinstance(event, (Removed, Replaced)):
            self._forget(event.model)

    def _watch(self, model_id: str) -> _Watch:
        watch = self._watches.get(model_id)
        if watch is None:
            watch = self._watches[model_id] = _Watch()
        return watch

    def _state_changed(self, event: StateChanged) -> None:
        watch = self._watch(event.model)
        now = self.clock.seconds()
        if event.new == "starting" and not watch.restarting:
            watch.cancel_restart()  # a request or a load starts it: no restart of ours
            if watch.gave_up:       # ... and it is no longer failed: a fresh count
                watch.gave_up, watch.failures = False, 0
        if event.old == "ready":
            watch.stop_polling()
            model = self.router.config.models.get(event.model)
            if watch.ready_at is not None and model is not None \
                    and now - watch.ready_at >= model.keepalive.restart_max_delay:
                watch.failures = 0  # a stable run ends the row
            watch.ready_at = None
        if event.new == "ready":
            watch.ready_at = now
            watch.health_failures = 0
            self._poll_later(event.model)
        if event.new == "stopped" and watch.pending is not None:
            self._decide_later(event.model)

    def _forget(self, model_id: str) -> None:
        """A reload changed or removed the model: start afresh with its new settings."""
        watch = self._watches.pop(model_id, None)
        if watch is not None:
            watch.cancel()
        self.router.failed.pop(model_id, None)

    # -- failures and restarts ------------------------------------------------------------------

    def _failed(self, model_id: str, why: str, health: bool = False) -> None:
        watch = self._watch(model_id)
        watch.pending, watch.pending_health = why, health
        if self._state(model_id) is State.STOPPED:
            self._decide_later(model_id)
        # otherwise the child is still going away: decided once it is stopped

    def _decide_later(self, model_id: str) -> None:
        watch = self._watch(model_id)
        if watch.decide_call is None:
            watch.decide_call = self.clock.callLater(0, self._decide, model_id)

    def _decide(self, model_id: str) -> None:
        """Count the failure, then schedule a restart or give up."""
        watch = self._watch(model_id)
        watch.decide_call = None
        why, health, watch.pending = watch.pending, watch.pending_health, None
        model = self.router.config.models.get(model_id)
        if why is None or model is None or not self.running or self._state(model_id) is not State.STOPPED:
            return
        policy = model.keepalive
        if not policy.restarts:
            if health:
                self._give_up(model_id, why)
            return
        watch.failures += 1
        if policy.max_restarts and watch.failures > policy.max_restarts:
            plural = "" if policy.max_restarts == 1 else "s"
            self._give_up(model_id, f"{why}; gave up after {policy.max_restarts} restart{plural} in a row")
            return
        watch.why = why
        delay = policy.delay(watch.failures)
        self.log.warn("{model}: {why}; restarting in {delay}s (restart {n} of {limit})", model=model_id,
                      why=why, delay=f"{delay:g}", n=watch.failures,
                      limit=policy.max_restarts or "unlimited")
        watch.cancel_restart()
        watch.restart_call = self.clock.callLater(delay, self._restart, model_id)

    def _restart(self, model_id: str) -> None:
        watch = self._watch(model_id)
        watch.restart_call = None
        model = self.router.config.models.get(model_id)
        if model is None or not model.keepalive.restarts or not self.running \
                or self._state(model_id) is not State.STOPPED:
            return
        others = self.router.evicts_to_start(model_id)
        if others:
            self.log.info("{model}: not restarted: starting it now would stop {others}", model=model_id,
                          others=", ".join(sorted(others)))
            watch.failures = 0
            return
        limit = model.keepalive.max_restarts or "unlimited"
        self.log.warn("{model}: restarting (restart {n} of {limit}) after: {why}; "
                      "last output of the previous run:\n{tail}", model=model_id, n=watch.failures,
                      limit=limit, why=watch.why, tail=self._tail(model_id) or "(none)")
        watch.restarting = True
        d = self.router.load(model_id)
        d.addBoth(self._restart_done, model_id)

    def _restart_done(self, result: Any, model_id: str) -> None:
        """The load ended; a failed start is counted from its ``StartFailed`` event, not here."""
        watch = self._watches.get(model_id)
        if watch is not None:
            watch.restarting = False

    def _give_up(self, model_id: str, reason: str) -> None:
        watch = self._watch(model_id)
        watch.gave_up = True
        self.router.failed[model_id] = reason
        self.log.error("{model}: marked failed: {reason}; it stays stopped until a request or a load "
                       "starts it", model=model_id, reason=reason)
        self.router.observers.publish(StateChanged(model_id, "stopped", "failed"))

    def _tail(self, model_id: str) -> str:
        try:
            return output_tail(self.logs.history(model_id))
        except KeyError:
            return ""

    def _exit(self, model_id: str) -> str:
        try:
            return self.router.process(model_id).exit_description or "exited"
        except KeyError:
            return "exited"

    def _state(self, model_id: str) -> Optional[State]:
        try:
            return self.router.process(model_id).state
        except KeyError:
            return None

    # -- health checks ----------------------------------------------------------------------------

    def _poll_later(self, model_id: str) -> None:
        model = self.router.config.models.get(model_id)
        interval = model.keepalive.health_interval if model is not None else 0
        if not interval or not self.running:
            return
        watch = self._watch(model_id)
        if watch.health_call is None or not watch.health_call.active():
            watch.health_call = self.clock.callLater(interval, self._poll, model_id)

    def _poll(self, model_id: str) -> None:
        watch = self._watch(model_id)
        watch.health_call = None
        try:
            proc = self.router.process(model_id)
        except KeyError:
            return
        if proc.state is not State.READY:
            return
        since = proc.ready_since
        d = proc.probe_health()
        watch.probing = d
        d.addCallback(self._polled, model_id, proc, since)

    def _polled(self, status: Optional[int], model_id: str, proc: Any, since: Optional[float]) -> None:
        watch = self._watches.get(model_id)
        if watch is None or not self.running:
            return
        watch.probing = None
        current = self._state(model_id) is State.READY and self.router.process(model_id) is proc \
            and proc.ready_since == since
        if not current:
            return  # the run it checked is over
        limit = proc.model.keepalive.health_failures
        if status == 200:
            watch.health_failures = 0
        else:
            watch.health_failures += 1
            what = f"status {status}" if status is not None else "no answer"
            self.log.warn("{model}: health check failed ({what}), {n} of {limit} in a row", model=model_id,
                          what=what, n=watch.health_failures, limit=limit)
            if watch.health_failures >= limit:
                self._unhealthy(model_id, watch.health_failures)
                return
        self._poll_later(model_id)

    def _unhealthy(self, model_id: str, n: int) -> None:
        why = f"its health check failed {n} time{'' if n == 1 else 's'} in a row"
        self.log.error("{model}: {why}; stopping it", model=model_id, why=why)
        d = self.router.stop_model(model_id, "unhealthy")
        d.addCallback(lambda _: self._failed(model_id, why, health=True))
        d.addErrback(lambda f: self.log.failure("stopping unhealthy {model} failed", f, model=model_id))
