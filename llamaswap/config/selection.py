"""Names a request may use besides model ids and aliases: peer models, selectors and profile pins.

Read after the models, aliases, peers and the router, because their checks resolve names the way
a request does: a local id or alias first, then a peer model (``<peerId>/<model>``, or a bare
name exactly one peer lists), as llama-swap's ``ResolveBaseModel`` does.

llama-swap rejects a selector target or a pin target that names no model. Its own example config
names models it does not define, so here such a name is a warning: a selector drops that target,
a pin keeps it (the request then finds no model).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import attr

from llamaswap.config import SELECTOR_STRATEGIES, GroupConfig, PeerConfig, ProfileConfig, SelectorConfig
from llamaswap.config.reader import MSG_MAP, Reader, to_str_list
from llamaswap.config.yaml12 import got, index_path, is_scalar, key_path, plain, scalar_text
from llamaswap.matrix import Matrix

__all__ = ["Names", "drop_selector_preloads", "read_profiles", "read_selectors"]


@attr.s(frozen=True, auto_attribs=True)
class Names:
    """What the cross-checks resolve against: model ids (those that failed to read included, so
    their names still clash), aliases by name, and the peers."""

    model_ids: frozenset
    aliases: Mapping[str, str]
    peers: Mapping[str, PeerConfig]

    def local(self, name: str) -> Optional[str]:
        """The model id ``name`` designates (an id or an alias), or None."""
        if name in self.model_ids:
            return name
        return self.aliases.get(name)

    def peer_fqns(self) -> frozenset:
        """Every ``<peerId>/<model>`` name."""
        return frozenset(f"{peer_id}/{model}" for peer_id, peer in self.peers.items() for model in peer.models)

    def peer(self, name: str) -> Optional[str]:
        """The ``<peerId>/<model>`` that ``name`` designates, or None (also when it is ambiguous)."""
        exact = {(peer_id, model) for peer_id, peer in self.peers.items() for model in peer.models
                 if f"{peer_id}/{model}" == name}
        if not exact:
            exact = {(peer_id, model) for peer_id, peer in self.peers.items() for model in peer.models
                     if model == name}
        if len(exact) != 1:
            return None
        peer_id, model = next(iter(exact))
        return f"{peer_id}/{model}"

    def resolve(self, name: str) -> Optional[str]:
        """The model id, else the ``<peerId>/<model>``, that ``name`` designates; None if neither."""
        return self.local(name) or self.peer(name)


# --------------------------------------------------------------------------------------------
# Selectors


def read_selectors(top: Reader, names: Names, groups: Mapping[str, GroupConfig], matrix: Optional[Matrix],
                   co_reside: bool) -> dict[str, SelectorConfig]:
    """``selectors``, checked as llama-swap's ``validateSelectors`` does.

    :param groups: the active groups (empty under the matrix router).
    :param matrix: the active matrix, or None under the group router.
    :param co_reside: models in no group may run side by side (``memory.budget`` is set).
    """
    raw_selectors = top.mapping("selectors")
    ids = frozenset(raw_selectors)
    selectors: dict[str, SelectorConfig] = {}
    for selector_id, raw in raw_selectors.items():
        path = key_path("selectors", selector_id)
        if not str(selector_id).strip():
            top.errors.append(f"{path}: a selector id must not be empty")
            continue
        if not isinstance(raw, dict):
            top.errors.append(f"{path}: {MSG_MAP}{got(raw)}")
            continue
        before = len(top.errors)
        _check_selector_id(selector_id, path, names, top.errors)
        s = Reader(raw, path, top.errors, top.warnings, "selectors.<selectorId>")
        selector = _read_selector(selector_id, s, names, ids, groups, matrix, co_reside)
        if selector is not None and len(top.errors) == before:
            selectors[selector_id] = selector
    return selectors


def _check_selector_id(selector_id: str, path: str, names: Names, errors: list[str]) -> None:
    if selector_id in names.model_ids:
        errors.append(f"{path}: the selector id is already the id of model '{selector_id}'")
    elif selector_id in names.aliases:
        errors.append(f"{path}: the selector id is already an alias of model '{names.aliases[selector_id]}'")
    elif selector_id in names.peer_fqns():
        errors.append(f"{path}: the selector id is already the name of peer model '{selector_id}'")


def _read_selector(selector_id: str, s: Reader, names: Names, ids: frozenset, groups: Mapping[str, GroupConfig],
                   matrix: Optional[Matrix], co_reside: bool) -> Optional[SelectorConfig]:
    s.unknown_keys()
    strategy = s.str("strategy")
    if not s.has("strategy") or (not strategy and isinstance(s.value("strategy"), str)):
        s.error("strategy", f"is required (one of {', '.join(SELECTOR_STRATEGIES)})")
    elif strategy and strategy not in SELECTOR_STRATEGIES:
        s.invalid("strategy", f"must be one of {', '.join(SELECTOR_STRATEGIES)}", s.value("strategy"))
    settings = s.sub("settings")
    settings.unknown_keys()
    spillover = _at_least_one(settings, "spillover", 1)
    failures = _at_least_one(settings, "failures", 3)
    cooldown = _seconds(settings, "cooldown", 60.0)
    targets = _read_targets(s, strategy, names, ids)
    if strategy == "spillover" and targets is not None:
        _check_coexistence(s, [t for t in targets if names.local(t) is not None], names, groups, matrix,
                           co_reside)
    if targets is None:
        return None
    return SelectorConfig(
        id=selector_id, strategy=strategy, targets=tuple(targets), spillover=spillover,
        name=s.str("name").strip(), description=s.str("description").strip(), unlisted=s.bool("unlisted", False),
        metadata=plain(s.mapping("metadata")), failures=failures, cooldown=cooldown)


def _at_least_one(r: Reader, key: str, default: int) -> int:
    value = r.value(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        r.invalid(key, "must be an integer of at least 1", value)
        return default
    return int(value)


def _seconds(r: Reader, key: str, default: float) -> float:
    value = r.value(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        r.invalid(key, "must be a non-negative number of seconds", value)
        return default
    return float(value)


def _read_targets(s: Reader, strategy: str, names: Names, ids: frozenset) -> Optional[list[str]]:
    """The targets that name a model (unknown ones warn and are dropped); None when none is left."""
    where_all = s.at("targets")
    written = s.str_list("targets")
    if not written:
        if not any(e.startswith(where_all + ":") or e.startswith(where_all + "[") for e in s.errors):
            s.error("targets", "must contain at least one entry")
        return None
    kept: list[str] = []
    first_as: dict[str, str] = {}
    for i, target in enumerate(written):
        where = index_path(where_all, i)
        if target in ids:
            s.errors.append(f"{where}: '{target}' is a selector; a selector cannot target another selector")
            continue
        local = names.local(target)
        resolved = local or names.peer(target)
        if resolved is None:
            s.warnings.append(f"config: '{where}' names unknown model '{target}' (ignored)")
            continue
        if strategy == "warm" and local is None:
            s.errors.append(f"{where}: strategy 'warm' needs a local model or alias (got peer model '{resolved}')")
            continue
        if strategy in ("spillover", "failover") and resolved in first_as:
            s.errors.append(f"{where}: model '{resolved}' is already a target (as '{first_as[resolved]}')")
            continue
        first_as.setdefault(resolved, target)
        kept.append(target)
    if not kept and not any(e.startswith(where_all) for e in s.errors):
        s.error("targets", "no target names a configured model")
    return kept or None


def _check_coexistence(s: Reader, local_targets: list[str], names: Names, groups: Mapping[str, GroupConfig],
                       matrix: Optional[Matrix], co_reside: bool) -> None:
    """Spillover runs its local targets side by side, so the router must let them run together."""
    ids = list(dict.fromkeys(names.local(t) for t in local_targets))
    if len(ids) <= 1:
        return
    if matrix is not None:
        if not matrix.can_contain_all(ids):
            s.error("targets", "spillover targets must all appear together in one set of the matrix")
        return
    group_of = {member: gid for gid, group in groups.items() for member in group.members}
    owners = {group_of.get(model_id) for model_id in ids}
    if owners == {None} and co_reside:
        return                       # no group, and memory.budget lets ungrouped models run together
    if len(owners) != 1 or None in owners or groups[next(iter(owners))].swap:
        s.error("targets", "spillover targets must all be members of one group with swap: false")


# --------------------------------------------------------------------------------------------
# Profiles


def read_profiles(top: Reader, names: Names, selectors: Mapping[str, SelectorConfig]
                  ) -> tuple[dict[str, tuple[str, ...]], dict[str, ProfileConfig]]:
    """``profiles``: ``(list-form profiles, mapping-form profiles)``.

    A profile written as a list is llama-swap v89's set of models (``<profile>:<model>``); one
    written as a mapping is llama-swap v241's ``{description, pins}``.
    """
    lists: dict[str, tuple[str, ...]] = {}
    pinned: dict[str, ProfileConfig] = {}
    for name, raw in top.mapping("profiles").items():
        path = key_path("profiles", name)
        if isinstance(raw, dict):
            profile = _read_pin_profile(str(name), raw, path, top, names, selectors)
            if profile is not None:
                pinned[name] = profile
            continue
        if not name or ":" in name:
            top.errors.append(f"{path}: a profile name must be non-empty and must not contain ':'")
            continue
        ids: list[str] = []
        for i, entry in enumerate(to_str_list(raw, path, top.errors)):
            model_id = names.local(entry)
            if model_id is None:
                top.errors.append(f"{index_path(path, i)}: unknown model '{entry}'")
            elif model_id not in ids:
                ids.append(model_id)
        lists[name] = tuple(ids)
    return lists, pinned


def _read_pin_profile(name: str, raw: dict, path: str, top: Reader, names: Names,
                      selectors: Mapping[str, SelectorConfig]) -> Optional[ProfileConfig]:
    if not name.strip():
        top.errors.append(f"{path}: a profile name must not be empty")
        return None
    before = len(top.errors)
    p = Reader(raw, path, top.errors, top.warnings, "profiles.<name>")
    p.unknown_keys()
    description = p.str("description").strip()
    raw_pins = p.mapping("pins")
    if not raw_pins and len(top.errors) == before:
        p.error("pins", "must contain at least one entry")
    fqns = names.peer_fqns()
    pins: dict[str, Optional[str]] = {}
    for pin, target in raw_pins.items():
        where = key_path(p.at("pins"), pin)
        pin = pin if isinstance(pin, str) else scalar_text(pin)
        if not pin.strip():
            top.errors.append(f"{where}: a pinned id must not be empty")
            continue
        if pin in fqns:
            top.errors.append(f"{where}: the pinned id is already the name of peer model '{pin}'")
            continue
        if target is None or target == "":
            pins[pin] = None                     # the id is disabled while the profile is active
            continue
        if not is_scalar(target):
            top.errors.append(f"{where}: must be a model name, or empty to disable the id{got(target)}")
            continue
        target = target if isinstance(target, str) else scalar_text(target)
        if names.resolve(target) is None and target not in selectors:
            top.warnings.append(f"config: '{where}' names unknown model '{target}'")
        pins[pin] = target
    if len(top.errors) > before:
        return None
    return ProfileConfig(name=name, description=description, pins=pins)


# --------------------------------------------------------------------------------------------
# Preload


def drop_selector_preloads(preload: tuple[str, ...], selectors: Mapping[str, Any],
                           warnings: list[str]) -> tuple[str, ...]:
    """``hooks.on_startup.preload`` without the selector ids (llama-swap drops them silently)."""
    kept = []
    for name in preload:
        if name in selectors:
            warnings.append(f"config: 'hooks.on_startup.preload' names selector '{name}', which cannot be "
                            f"preloaded (ignored)")
        else:
            kept.append(name)
    return tuple(kept)

