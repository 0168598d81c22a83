"""llama-swap's swap matrix (``routing.router.use: matrix``): the set language and its solver.

A port of llama-swap's ``internal/config/matrix.go`` and ``internal/matrix`` (MIT licence,
Copyright (c) 2024 Benson Wong); docs/matrix.rst describes it for users. Pure: no Twisted, no I/O.

Grammar (an identifier is a run of letters, digits, ``_``, ``-``, ``.``; a var wins over a model)::

    expr := and ('|' and)*        and := atom ('&' atom)*        atom := IDENT | '+' IDENT | '(' expr ')'

Solver: a running target evicts nothing. Otherwise each combination of each set that holds the
target costs the evict costs of the running models outside it; the first cheapest wins, and a
target in no set evicts everything. "First" is llama-swap's order: sets in definition order,
except that a set comes after the sets it references, then each set's alternatives in order.
Combinations are never listed in full: each is projected onto the models that matter to one
request (the target and the running ones), as llama-swap does.
"""
from __future__ import annotations

import itertools
import re
import unicodedata
from typing import Any, Collection, Iterator, Optional, Sequence, Union

import attr

_VAR_NAME = re.compile(r"[a-zA-Z0-9.-]{1,32}")
_NEEDS_BRACKETS = re.compile(r"[.\[\]\s]")


# -- the expression tree ----------------------------------------------------------------------

@attr.s(frozen=True, slots=True, auto_attribs=True)
class Leaf:
    """One model (a var already resolved to its model id)."""
    model: str


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Ref:
    """``+name``: the expression of set ``name``."""
    name: str


@attr.s(frozen=True, slots=True, auto_attribs=True)
class And:
    children: tuple


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Or:
    children: tuple


Node = Union[Leaf, Ref, And, Or]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class MatrixSet:
    """One named set: its expression as written, its tree, and every model it names."""
    name: str
    dsl: str
    root: Node
    models: frozenset


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Decision:
    """What the solver chose for one request (llama-swap's ``matrix.Decision``).

    ``evict`` keeps the order of ``running``; ``target_set`` is the chosen combination, sorted
    (or ``running`` as given when the target already runs); ``set_name`` and ``dsl`` are empty
    when no set was used.
    """
    evict: tuple
    target_set: tuple
    set_name: str = ""
    dsl: str = ""
    total_cost: int = 0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Matrix:
    """A compiled matrix. ``sets`` is in the order the solver tries them (see the module doc)."""
    sets: tuple
    evict_costs: tuple = ()  # sorted (model id, cost) pairs; a model not listed costs 1
    _costs: dict = attr.ib(init=False, eq=False, repr=False, hash=False)
    _by_name: dict = attr.ib(init=False, eq=False, repr=False, hash=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_costs", dict(self.evict_costs))
        object.__setattr__(self, "_by_name", {s.name: s for s in self.sets})

    @property
    def models(self) -> frozenset:
        """Every model named by some set; any other model can only run alone."""
        return frozenset().union(*(s.models for s in self.sets))

    def evict_cost(self, model: str) -> int:
        return self._costs.get(model, 1)

    def solve(self, target: str, running: Collection[str]) -> frozenset:
        """The running models to evict before ``target`` starts."""
        return frozenset(self.decide(target, running).evict)

    def decide(self, target: str, running: Collection[str]) -> Decision:
        """llama-swap's ``Program.Solve``."""
        running = tuple(running)
        if target in running:
            found = self.set_containing(running)
            return Decision((), running, found.name if found else "", found.dsl if found else "")
        ev = _Evaluator(self._by_name, (target, *running))
        target_bit = ev.bits[target]
        best = None  # (cost, set, mask, witness)
        for s in self.sets:
            if target not in s.models:
                continue
            for mask, witness in ev.evaluate(s.root):
                if not mask & target_bit:
                    continue
                cost = sum(self.evict_cost(m) for m in running if not mask & ev.bits[m])
                if best is None or cost < best[0]:
                    best = (cost, s, mask, witness)
        if best is None:
            return Decision(running, (target,))
        cost, s, mask, witness = best
        evict = tuple(m for m in running if not mask & ev.bits[m])
        return Decision(evict, tuple(sorted(witness)), s.name, s.dsl, cost)

    def set_containing(self, models: Collection[str]) -> Optional[MatrixSet]:
        """The first set with one combination holding all of ``models`` (none for no models)."""
        models = tuple(models)
        if not models:
            return None
        ev = _Evaluator(self._by_name, models)
        required = (1 << len(ev.bits)) - 1
        for s in self.sets:
            if s.models.issuperset(models) and any(
                    mask & required == required for mask, _ in ev.evaluate(s.root)):
                return s
        return None

    def can_contain_all(self, models: Collection[str]) -> bool:
        """Whether some combination of some set holds all of ``models`` (true for none)."""
        return not models or self.set_containing(models) is not None

    def expand(self, name: str) -> Iterator[frozenset]:
        """The combinations of set ``name``, lazily, in order, repeats skipped (can be huge)."""
        seen = set()
        for combo in _expand(self._by_name[name].root, self._by_name):
            if combo not in seen:
                seen.add(combo)
                yield combo


# -- solving ----------------------------------------------------------------------------------

class _Evaluator:
    """Projects every combination of an expression onto the models relevant to one query.

    A state is ``(mask, witness)``: ``mask`` has a bit per relevant model in the combination,
    ``witness`` is the combination's models. States with the same mask keep the
    first witness; a state whose mask is a subset of another's is dropped (llama-swap's
    frontier: costs are positive, so the superset is never worse).
    """
    def __init__(self, sets: dict, relevant: Sequence[str]) -> None:
        self.sets = sets
        self.bits: dict = {}
        for model in relevant:
            self.bits.setdefault(model, 1 << len(self.bits))
        self.memo: dict = {}

    def evaluate(self, node: Node) -> list:
        key = id(node)
        if key in self.memo:
            return self.memo[key]
        if isinstance(node, Leaf):
            states = [(self.bits.get(node.model, 0), frozenset((node.model,)))]
        elif isinstance(node, Ref):
            states = self.evaluate(self.sets[node.name].root)
        elif isinstance(node, Or):
            states = []
            for child in node.children:
                for state in self.evaluate(child):
                    states = _add_to_frontier(states, state)
        else:
            states = [(0, frozenset())]
            for child in node.children:
                combined: list = []
                for lmask, lwit in states:
                    for rmask, rwit in self.evaluate(child):
                        combined = _add_to_frontier(combined, (lmask | rmask, lwit | rwit))
                states = combined
        self.memo[key] = states
        return states


def _add_to_frontier(states: list, candidate: tuple) -> list:
    mask = candidate[0]
    if any(mask & ~other == 0 for other, _ in states):
        return states
    return [s for s in states if s[0] & ~mask != 0] + [candidate]


def _expand(node: Node, sets: dict) -> Iterator[frozenset]:
    if isinstance(node, (Leaf, Ref)):
        yield from [frozenset((node.model,))] if isinstance(node, Leaf) else _expand(sets[node.name].root, sets)
    elif isinstance(node, Or):
        for child in node.children:
            yield from _expand(child, sets)
    else:
        for parts in itertools.product(*(_expand(child, sets) for child in node.children)):
            yield frozenset().union(*parts)


# -- parsing ----------------------------------------------------------------------------------

class ExpressionError(ValueError):
    """A malformed set expression; the message names the offending token and its position."""


def _is_space(ch: str) -> bool:  # Go's unicode.IsSpace
    return ch in "\t\n\v\f\r \x85\xa0" or (ch > "\xff" and unicodedata.category(ch) in ("Zs", "Zl", "Zp"))


def _is_ident(ch: str) -> bool:  # Go's unicode.IsLetter || unicode.IsDigit || _ - .
    return ch.isalpha() or ch.isdecimal() or ch in "_-."


def tokenize(text: str) -> list:
    """``(kind, value, position)``: kind ``ident``, ``ref`` (value without ``+``), an operator, ``end``."""
    tokens, i = [], 0
    while i < len(text):
        ch = text[i]
        if _is_space(ch):
            i += 1
        elif ch in "&|()":
            tokens.append((ch, ch, i))
            i += 1
        else:
            start = i + 1 if ch == "+" else i
            if ch != "+" and not _is_ident(ch):
                shown = f"'{ch}'" if ch.isprintable() else f"U+{ord(ch):04X}"
                raise ExpressionError(f"unexpected character {shown} at position {i}")
            j = start
            while j < len(text) and _is_ident(text[j]):
                j += 1
            if j == start:
                raise ExpressionError(f"expected set name after '+' at position {start}")
            tokens.append(("ref" if ch == "+" else "ident", text[start:j], i))
            i = j
    tokens.append(("end", "", len(text)))
    return tokens


def parse_expression(text: str) -> tuple:
    """The tree of one expression (identifiers as written) and ``(kind, name, position)`` of its names."""
    if all(_is_space(ch) for ch in text):
        raise ExpressionError("empty expression")
    tokens, pos, names = tokenize(text), 0, []

    def unexpected(tok: tuple) -> ExpressionError:
        return ExpressionError("unexpected end of expression" if tok[0] == "end"
                               else f"unexpected token '{tok[1]}' at position {tok[2]}")

    def sequence(op: str, item: Any, cls: type) -> Node:
        nonlocal pos
        children = [item()]
        while tokens[pos][0] == op:
            pos += 1
            children.append(item())
        return children[0] if len(children) == 1 else cls(tuple(children))

    def atom() -> Node:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok[0] in ("ident", "ref"):
            names.append((tok[0], tok[1], tok[2]))
            return Leaf(tok[1]) if tok[0] == "ident" else Ref(tok[1])
        if tok[0] == "(":
            node = expr()
            if tokens[pos][0] != ")":
                raise ExpressionError(f"missing closing parenthesis for '(' at position {tok[2]}")
            pos += 1
            return node
        raise unexpected(tok)

    def expr() -> Node:
        return sequence("|", lambda: sequence("&", atom, And), Or)

    try:
        root = expr()
    except RecursionError:
        raise ExpressionError("expression nested too deeply") from None
    if tokens[pos][0] != "end":
        raise unexpected(tokens[pos])
    return root, names


def _resolve(node: Node, resolve: Any) -> Node:
    if isinstance(node, Leaf):
        return Leaf(resolve(node.model))
    if isinstance(node, (And, Or)):
        return type(node)(tuple(_resolve(c, resolve) for c in node.children))
    return node


def _key(path: str, key: Any) -> str:
    key = str(key)
    if key == "" or _NEEDS_BRACKETS.search(key):
        return f'{path}["' + key.replace("\\", "\\\\").replace('"', '\\"') + '"]'
    return f"{path}.{key}"


def _got(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return " (got a mapping)" if isinstance(value, dict) else " (got a list)"
    if value is None or isinstance(value, bool):
        return f" (got {str(value).lower() if value is not None else 'null'})"
    return f" (got {value!r})"


def _name(key: Any) -> Any:
    """A YAML key as llama-swap reads it into a string: integers become their digits."""
    return str(key) if isinstance(key, int) and not isinstance(key, bool) else key


def parse_matrix(raw: object, path: str, model_ids: Collection[str]) -> tuple:
    """``(Matrix, [])`` for a valid ``matrix`` mapping, else ``(None, ["<path>: <message>", ...])``.

    ``model_ids`` are the configured model ids (not their aliases); vars, evict costs and set
    expressions may name only those, or vars. Other keys are left to the caller's key checks.
    """
    models = set(model_ids)
    errors: list = []
    if not isinstance(raw, dict):
        return None, [f"{path}: must be a mapping{_got(raw)}"]

    def mapping(key: str) -> Optional[dict]:
        value = raw.get(key)
        if value is not None and not isinstance(value, dict):
            errors.append(f"{_key(path, key)}: must be a mapping{_got(value)}")
            return None
        return {_name(k): v for k, v in (value or {}).items()}

    variables: dict = {}  # var -> model id, or None for a var already reported as bad
    for name, model in (mapping("vars") or {}).items():
        where = _key(_key(path, "vars"), name)
        variables[name] = None
        if not isinstance(name, str) or not _VAR_NAME.fullmatch(name):
            errors.append(f"{where}: a var name must be 1-32 letters, digits, '-' or '.'")
        elif not isinstance(model, str):
            errors.append(f"{where}: must be a string{_got(model)}")
        elif model not in models:
            errors.append(f"{where}: unknown model '{model}'")
        else:
            variables[name] = model

    def resolve(ident: Any) -> Optional[str]:
        """The model id ``ident`` names, None if bad, ``""`` if it names a bad var."""
        if ident in variables:
            return variables[ident] or ""
        return ident if ident in models else None

    costs: dict = {}
    given_as: dict = {}
    for name, cost in (mapping("evict_costs") or {}).items():
        where = _key(_key(path, "evict_costs"), name)
        model = resolve(name)
        if isinstance(cost, bool) or not isinstance(cost, int) or cost <= 0:
            errors.append(f"{where}: must be a positive integer{_got(cost)}")
        elif model is None:
            errors.append(f"{where}: unknown var or model '{name}'")
        elif model in costs:
            errors.append(f"{where}: model '{model}' already has a cost (as '{given_as[model]}')")
        elif model:
            costs[model], given_as[model] = cost, name

    sets_path = _key(path, "sets")
    raw_sets = mapping("sets")
    if raw_sets == {}:
        errors.append(f"{sets_path}: must define at least one set")
    texts: dict = {}
    trees: dict = {}
    deps: dict = {}
    set_names = {str(k) for k in raw_sets or ()}
    for name, dsl in (raw_sets or {}).items():
        name = str(name)
        where = _key(sets_path, name)
        if not isinstance(dsl, str):
            errors.append(f"{where}: must be a string{_got(dsl)}")
            continue
        try:
            root, names = parse_expression(dsl)
        except ExpressionError as e:
            errors.append(f"{where}: {e}")
            continue
        texts[name], deps[name], ok = dsl, [], True
        for kind, ident, at in names:
            if kind == "ident" and not resolve(ident):
                ok = False
                if resolve(ident) is None:
                    errors.append(f"{where}: unknown var or model '{ident}' at position {at}")
            elif kind == "ref" and ident not in set_names:
                ok = False
                errors.append(f"{where}: reference to undefined set '{ident}' at position {at}")
            elif kind == "ref" and ident not in deps[name]:
                deps[name].append(ident)
        if ok:
            trees[name] = _resolve(root, resolve)

    order: list = []
    state: dict = {}

    def visit(name: str, trail: list) -> None:  # llama-swap's depth-first topological order
        if state.get(name) == 2 or name not in trees:
            return
        if state.get(name) == 1:
            cycle = " -> ".join(trail[trail.index(name):] + [name])
            errors.append(f"{_key(sets_path, name)}: circular reference {cycle}")
            return
        state[name] = 1
        for dep in deps[name]:
            visit(dep, trail + [name])
        state[name] = 2
        order.append(name)

    for name in trees:
        visit(name, [])
    if errors:
        return None, errors
    support: dict = {}
    for name in order:
        support[name] = frozenset(_models(trees[name], support))
    sets = tuple(MatrixSet(n, texts[n], trees[n], support[n]) for n in order)
    return Matrix(sets, tuple(sorted(costs.items()))), []


def _models(node: Node, support: dict) -> Iterator[str]:
    if isinstance(node, Leaf):
        yield node.model
    elif isinstance(node, Ref):
        yield from support[node.name]
    else:
        for child in node.children:
            yield from _models(child, support)
