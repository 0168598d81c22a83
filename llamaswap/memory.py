"""Memory-budget bookkeeping of the router (``memory.budget``; docs/memory.rst).

``MemoryAccounting`` knows each model's need (declared > measured > estimated > unknown),
expected load time and decayed demand, measures ready models' process groups every
``MEASURE_INTERVAL`` seconds into a ``NeedBook``, raises a need after an out-of-memory start
and publishes ``MemoryChanged``. ``ModelRouter`` builds one and keeps the scheduling; without a
budget nothing here measures or publishes.
"""
from __future__ import annotations

import os
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from llamaswap import footprint, scheduler
from llamaswap.footprint import NeedBook
from llamaswap.observe import MemoryChanged, Observers
from llamaswap.process import State, UpstreamProcess

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from llamaswap.config import Config, ModelConfig

#: How often a ready model's process group is measured while a memory budget is set, seconds.
MEASURE_INTERVAL = 15.0
#: Half-life of a model's request rate (``scheduler.decayed_rate``), seconds.
DEMAND_HALF_LIFE = 600.0
#: How many measured loads the load-time moving average keeps.
LOAD_SAMPLES = 5
#: Before a model's first measured load: ``LOAD_BASE + weights bytes / LOAD_BYTES_PER_SECOND``
#: seconds, i.e. 1 s + the size of its weights read at 2 GB/s.
LOAD_BASE = 1.0
LOAD_BYTES_PER_SECOND = 2e9
#: After an out-of-memory start without a printed amount, the need grows by this factor
#: (and by at least this factor when an amount is printed).
OOM_GROWTH = 1.25
#: States in which a model holds memory.
_HOLDING = frozenset({"starting", "ready", "stopping"})


class SlotMemory:
    """The memory state of one router slot: decayed requests/min as of ``demand_at``, the last
    measured loads (seconds), the measurement timer."""

    def __init__(self) -> None:
        self.demand = 0.0
        self.demand_at = 0.0
        self.loads: deque[float] = deque(maxlen=LOAD_SAMPLES)
        self.measure_call = None

    def load_time(self) -> Optional[float]:
        """The average of the last measured loads, seconds; None before the first."""
        return sum(self.loads) / len(self.loads) if self.loads else None


class MemoryAccounting:
    """Needs, load times, demand, measurement and ``MemoryChanged`` for a router's models.

    A *slot* here is the router's per-model record: anything with ``.proc`` (its current
    ``UpstreamProcess``) and ``.memory`` (its ``SlotMemory``).

    :param config: ``() -> Config``, the router's current config.
    :param clock: ``IReactorTime`` for demand and the measurement timers.
    :param needs: the ``footprint.NeedBook`` of measured needs, keyed by a model's expanded ``cmd``.
    :param measure: ``(pgid) -> Deferred`` firing with the memory a process group holds (an
        object with ``.total`` bytes, or an int).
    :param observers: the ``Observers`` that get ``MemoryChanged``.
    :param slots: the router's table ``model id -> slot``, read only.
    :param reschedule: ``() -> None``, called after a measurement changed a need.
    """

    def __init__(self, config: Callable[[], Config], clock: IReactorTime, needs: NeedBook,
                 measure: Callable[[int], Deferred], observers: Observers, slots: Mapping[str, Any],
                 reschedule: Callable[[], None], log: Logger) -> None:
        self._config = config
        self.clock = clock
        self.needs = needs
        self._measure_group = measure
        self._observers = observers
        self._slots = slots
        self._reschedule = reschedule
        self.log = log
        # model id -> (ModelConfig, overhead, estimate, load-time estimate): computed once per config
        self._static: dict[str, tuple] = {}
        self._published: Optional[tuple] = None

    # -- what the scheduler and the API see ------------------------------------------------------

    def need(self, model_id: str) -> tuple[Optional[int], str]:
        """``(bytes, source)`` of ``model_id``'s need: its ``memory`` (declared), else the largest
        measured, else the estimate from its model file, else the whole budget (unknown; None
        without a budget)."""
        model = self._slots[model_id].proc.model
        measured = self.needs.get(model.cmd)
        estimate = self._static_of(model)[0]
        budget = self._config().memory_budget
        if budget is None and model.memory is None and measured is None and not estimate:
            return None, "unknown"
        return footprint.resolve_need(budget or 0, declared=model.memory, measured=measured,
                                      estimated=estimate or None)

    def load_time(self, model_id: str) -> Optional[float]:
        """The average of ``model_id``'s last measured loads (spawn to ready), seconds; None before
        its first."""
        return self._slots[model_id].memory.load_time()

    def used(self) -> int:
        """The needs of the models starting, ready or stopping, summed (unknown needs count 0
        without a budget)."""
        return sum(self.need(mid)[0] or 0 for mid, slot in self._slots.items()
                   if slot.proc.state.value in _HOLDING)

    def expected_load_time(self, slot: Any) -> float:
        """The measured load time of ``slot``'s model, else the estimate from its weights' size."""
        measured = slot.memory.load_time()
        return measured if measured is not None else self._static_of(slot.proc.model)[1]

    def view(self, model_id: str, slot: Any, now: float) -> dict:
        """The memory fields of ``model_id``'s ``scheduler.ModelView`` (with a budget)."""
        need, source = self.need(model_id)
        mem = slot.memory
        return dict(need=need, need_source=source, load_time=self.expected_load_time(slot),
                    demand=scheduler.decayed_rate(mem.demand, mem.demand_at, now, DEMAND_HALF_LIFE),
                    last_used=slot.last_used, persistent=self._config().group_of(model_id).persistent)

    def _static_of(self, model: ModelConfig) -> tuple[Union[footprint.Estimate, footprint.NoEstimate], float]:
        """(estimate, load-time estimate) of ``model``, computed once per model config."""
        overhead = self._config().memory_overhead
        cached = self._static.get(model.id)
        if cached is not None and cached[0] is model and cached[1] == overhead:
            return cached[2], cached[3]
        env = {**os.environ, **model.env_dict()}
        estimate = footprint.try_estimate(model.argv, overhead=overhead, env=env)
        weights = estimate.weights if estimate else _file_size(model.argv, env)
        load = LOAD_BASE + weights / LOAD_BYTES_PER_SECOND
        self._static[model.id] = (model, overhead, estimate, load)
        return estimate, load

    # -- what the router reports -------------------------------------------------------------------

    def requested(self, slot: Any) -> None:
        """One more request for ``slot``'s model (its decayed demand)."""
        mem, now = slot.memory, self.clock.seconds()
        mem.demand = scheduler.decayed_rate(mem.demand, mem.demand_at, now, DEMAND_HALF_LIFE, hits=1)
        mem.demand_at = now

    def forget(self, model_id: str) -> None:
        """``model_id`` was removed."""
        self._static.pop(model_id, None)

    def changed(self) -> None:
        """Publish ``MemoryChanged`` when the budget, the use or a need changed (budget set)."""
        if not self._observers:
            return
        budget = self._config().memory_budget
        if budget is None:
            state = (None, 0, ())
            if self._published is None or self._published == state:
                return  # never published: nothing to withdraw
        else:
            needs = tuple((mid, *self.need(mid)) for mid in sorted(self._slots))
            state = (budget, self.used(), needs)
        if state != self._published:
            self._published = state
            self._observers.publish(MemoryChanged(*state))

    # -- measurement -------------------------------------------------------------------------------

    def start_measuring(self, slot: Any) -> None:
        """A model got ready: measure its process group now and every MEASURE_INTERVAL s."""
        self.stop_measuring(slot)
        if self._config().memory_budget is not None:
            self._measure(slot, slot.proc)

    def stop_measuring(self, slot: Any) -> None:
        mem = slot.memory
        if mem.measure_call is not None and mem.measure_call.active():
            mem.measure_call.cancel()
        mem.measure_call = None

    def _measure(self, slot: Any, proc: UpstreamProcess) -> None:
        slot.memory.measure_call = None
        if slot.proc is not proc or proc.state is not State.READY or proc.pid is None \
                or self._config().memory_budget is None:
            return
        slot.memory.measure_call = self.clock.callLater(MEASURE_INTERVAL, self._measure, slot, proc)
        d = maybeDeferred(self._measure_group, proc.pid)
        d.addCallback(self._measured, slot, proc, proc.model.cmd)
        d.addErrback(lambda f: self.log.debug("{model}: measuring its memory failed: {why}",
                                              model=proc.id, why=str(f.value)))

    def _measured(self, result: Any, slot: Any, proc: UpstreamProcess, key: str) -> None:
        if slot.proc is not proc or proc.state is not State.READY:
            return  # it stopped meanwhile: a partial group is no measure of its need
        total = int(getattr(result, "total", result) or 0)
        if total <= 0 or not self.needs.record(key, total):
            return
        if not self.needs.autosave:
            self.needs.save()
        self.log.debug("{model}: measured {size}", model=proc.id, size=scheduler.format_size(total))
        self.changed()
        self._reschedule()

    def out_of_memory(self, slot: Any, message: str) -> None:
        """A start failed out of memory: raise the model's measured need so that the next start
        gets more room: to at least the largest failed allocation printed, and by at least
        OOM_GROWTH (need x 1.25 when no amount is printed)."""
        oom = footprint.find_oom(message)
        if oom is None or self._config().memory_budget is None:
            return
        model = slot.proc.model
        need = self.need(model.id)[0] or 0
        at_least = max(oom.amount or 0, int(need * OOM_GROWTH))
        if at_least <= 0:
            return
        raised = self.needs.raise_to(model.cmd, at_least)
        if not self.needs.autosave:
            self.needs.save()
        self.log.warn("{model}: out of memory while starting; its measured need is now {size}",
                      model=model.id, size=scheduler.format_size(raised))
        self.changed()


def _file_size(argv: tuple[str, ...], env: dict) -> int:
    """The size of the ``-m``/``--model`` file of ``argv``, 0 when there is none (not GGUF: no
    estimate, but a size for the load time)."""
    path = footprint.parse_model_args(argv, env).model
    try:
        return os.path.getsize(path) if path else 0
    except OSError:
        return 0
