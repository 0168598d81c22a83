"""Selectors and profile pins: which concrete name a requested name stands for, per request.

llama-swap HEAD rewrites a request's model in two steps before aliases, filters and routing:

1. **Profile pins.** While a profile (``profiles.<name>: {description, pins}``) is active, a
   requested id that is one of its pins is replaced by the pin's target; a pin to nothing
   (``~``) makes the id unknown (404).
2. **Selectors.** A selector id (``selectors.<id>``) is replaced by one of its targets, chosen
   per request by the selector's strategy:

   * ``pin``: the first target;
   * ``warm``: the first target that is ready, else the first one starting, else the first
     target (a cold start);
   * ``spillover``: the targets are filled in order. Each active target (ready or starting, or
     busy) takes requests while its load is below ``settings.spillover``; the least busy one
     is used, the earliest listed among equals. When every active target is full, the first
     cold (stopped) target is started; when there is none, the least busy active target takes
     the request anyway and it queues there;
   * ``failover``: the targets in order, moving on to the next one when a target fails before
     answering; a circuit breaker skips a target that keeps failing. That needs the request
     itself and the targets' history, so the web layer runs it (``llamaswap.failover``);
     :func:`failover_of` tells it which requests are for such a selector.

Everything here is pure: :func:`choose` reads a :class:`TargetView` per target, which the
router builds from its slots, and returns the name to use. A target's *load* is every request
in flight on it or waiting for it, whoever asked (llama-swap counts only the selector's own
requests): a target that is busy with direct requests is as full as one busy with the
selector's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional, Sequence

import attr

from llamaswap.errors import LlamaSwapError

if TYPE_CHECKING:
    from llamaswap.config import Config, SelectorConfig

__all__ = ["NoSelectorTarget", "TargetView", "UnknownProfile", "choose", "failover_of", "pin_of",
           "selector_status"]

#: the process states in which a target takes no new work
_UNAVAILABLE = ("stopping", "shutdown")


class UnknownProfile(LlamaSwapError):
    """``PUT /api/profiles/active`` named no configured profile."""

    status, kind, code = 404, "invalid_request_error", "profile_not_found"

    @classmethod
    def named(cls, name: str, config: Config) -> "UnknownProfile":
        known = sorted(config.pin_profiles)
        listed = f"; the profiles are {', '.join(known)}" if known else "; no profiles are configured"
        return cls(f"profile '{name}' not found{listed}")


class NoSelectorTarget(LlamaSwapError):
    """A spillover selector none of whose targets can take a request now (all stopping)."""

    status, kind, code = 503, "server_error", "selector_unavailable"


@attr.s(frozen=True, slots=True)
class TargetView:
    """What :func:`choose` knows of one target.

    :ivar name: the target as written in the config (an id, an alias or a peer model).
    :ivar state: the local model's process state (``stopped``, ``starting``, ``ready``,
        ``stopping``, ``shutdown``), or ``None`` for a target that is no local model (a peer).
    :ivar load: requests in flight on the target or waiting for it (0 for peers: their load is
        not known here).
    """

    name: str = attr.ib()
    state: Optional[str] = attr.ib(default=None)
    load: int = attr.ib(default=0)

    @property
    def local(self) -> bool:
        return self.state is not None


def choose(selector: SelectorConfig, targets: Sequence[TargetView]) -> str:
    """The target ``selector`` sends one request to, as written in the config.

    :param targets: one view per ``selector.targets`` entry, in the same order.
    :raises NoSelectorTarget: for a spillover selector whose every target is stopping.

    ``failover`` is decided per request by ``llamaswap.failover``, which tries the targets in
    order; here it gets its first target, as ``pin`` does.
    """
    if not targets:
        raise NoSelectorTarget(f"selector '{selector.id}' has no targets")
    if selector.strategy == "warm":
        return _warm(targets)
    if selector.strategy == "spillover":
        return _spillover(selector, targets)
    return targets[0].name  # pin


def _warm(targets: Sequence[TargetView]) -> str:
    for wanted in ("ready", "starting"):
        for target in targets:
            if target.state == wanted:
                return target.name
    return targets[0].name


def _spillover(selector: SelectorConfig, targets: Sequence[TargetView]) -> str:
    active: list[TargetView] = []
    cold: list[TargetView] = []
    for target in targets:
        if target.state in _UNAVAILABLE:
            continue
        if target.state in ("ready", "starting") or target.load > 0:
            active.append(target)
        else:
            cold.append(target)
    if not active:
        if not cold:
            raise NoSelectorTarget(
                f"selector '{selector.id}' has no target that can take a request now "
                f"(every one of {', '.join(t.name for t in targets)} is stopping)")
        return cold[0].name
    least = min(t.load for t in active)
    if least >= selector.spillover and cold:
        return cold[0].name
    return next(t.name for t in active if t.load == least)


def selector_status(selector: SelectorConfig, states: Iterable[Optional[str]]) -> str:
    """``status.value`` of a selector in ``/v1/models``: ``loaded`` when a target is ready or
    starting (as llama-swap reports it), else ``unloaded``; a ``pin`` selector looks only at its
    first target. ``states`` are the targets' process states (None for peers), in order."""
    for state in states:
        if state in ("ready", "starting"):
            return "loaded"
        if selector.strategy == "pin":
            break
    return "unloaded"


def pin_of(config: Config, profile: Optional[str], name: str) -> tuple[bool, Optional[str]]:
    """``(pinned, target)``: whether the active ``profile`` pins ``name``, and to what (None:
    the pin disables ``name``)."""
    if profile is None:
        return False, None
    pins = config.pin_profiles.get(profile)
    if pins is None or name not in pins.pins:
        return False, None
    target = pins.pins[name]
    return True, (target or None)


def failover_of(config: Config, profile: Optional[str], name: str) -> Optional[SelectorConfig]:
    """The ``failover`` selector a request for ``name`` reaches (the active ``profile``'s pin of
    ``name`` applied first), or None."""
    pinned, target = pin_of(config, profile, name)
    if pinned:
        if target is None:
            return None  # disabled: resolving it answers the 404
        name = target
    selector = config.selectors.get(name)
    return selector if selector is not None and selector.strategy == "failover" else None
