"""Tests for llamaswap.matrix: llama-swap's swap matrix (``routing.router.use: matrix``).

The solver cases are ported from llama-swap's Go tests (internal/config/matrix_test.go,
internal/matrix/dsl_test.go, internal/router/matrix_test.go); each names the Go test it ports.
llama-swap is Copyright (c) 2024 Benson Wong, MIT licence.
"""
from __future__ import annotations

import time

import pytest
import yaml

from llamaswap.matrix import (
    And, Decision, ExpressionError, Leaf, Matrix, Or, Ref, _Evaluator, parse_expression,
    parse_matrix, tokenize)

P = "routing.router.settings.matrix"


def compile_ok(raw: dict, models) -> Matrix:
    matrix, errors = parse_matrix(raw, P, models)
    assert errors == []
    assert matrix is not None
    return matrix


def errors_of(raw: object, models=("a", "b", "gemma")) -> list:
    matrix, errors = parse_matrix(raw, P, models)
    assert matrix is None
    return errors


def identity(sets: dict, models, evict_costs: dict | None = None) -> Matrix:
    """Go's ``compileIdentity``: sets over the given models, no vars."""
    raw = {"sets": sets}
    if evict_costs:
        raw["evict_costs"] = evict_costs
    return compile_ok(raw, models)


def projected(matrix: Matrix, name: str, relevant) -> list:
    """Go's ``projectedSets``: the frontier of one set, each combination sorted."""
    ev = _Evaluator({s.name: s for s in matrix.sets}, relevant)
    root = next(s.root for s in matrix.sets if s.name == name)
    return [sorted(witness) for _, witness in ev.evaluate(root)]


# -- the expression language -------------------------------------------------------------------

def test_tokenize():  # Go: TestDSL_Tokenize (valid cases)
    assert tokenize("abc") == [("ident", "abc", 0), ("end", "", 3)]
    assert tokenize("model-name.v2") == [("ident", "model-name.v2", 0), ("end", "", 13)]
    assert [t[:2] for t in tokenize("(a | +base) & b")] == [
        ("(", "("), ("ident", "a"), ("|", "|"), ("ref", "base"), (")", ")"), ("&", "&"),
        ("ident", "b"), ("end", "")]


def test_identifiers_are_letters_digits_underscore_dash_dot():
    assert tokenize("qwen_2.5-7B\u00e9\u0663")[0] == ("ident", "qwen_2.5-7B\u00e9\u0663", 0)
    assert tokenize("\u3000a\u2028")[:1] == [("ident", "a", 1)]  # Unicode spaces separate


def test_parse_tree_and_precedence():
    assert parse_expression("a")[0] == Leaf("a")
    assert parse_expression("a | b & c")[0] == Or((Leaf("a"), And((Leaf("b"), Leaf("c")))))
    assert parse_expression("(a | b) & +s")[0] == And((Or((Leaf("a"), Leaf("b"))), Ref("s")))
    assert parse_expression("((a | b) | c)")[0] == Or((Or((Leaf("a"), Leaf("b"))), Leaf("c")))
    assert parse_expression("a & b & c")[0] == And((Leaf("a"), Leaf("b"), Leaf("c")))
    assert parse_expression(" a  &b ")[1] == [("ident", "a", 1), ("ident", "b", 5)]


@pytest.mark.parametrize("dsl, message", [
    # Go: TestDSL_Tokenize and TestProgram_CompileErrors
    ("", "empty expression"),
    ("  \t", "empty expression"),
    ("(a", "missing closing parenthesis for '(' at position 0"),
    ("a)", "unexpected token ')' at position 1"),
    ("()", "unexpected token ')' at position 1"),
    ("+", "expected set name after '+' at position 1"),
    ("a @ b", "unexpected character '@' at position 2"),
    # more
    ("(a | b &)", "unexpected token ')' at position 8"),
    ("a & (b | c", "missing closing parenthesis for '(' at position 4"),
    ("(a b)", "missing closing parenthesis for '(' at position 0"),
    ("a b", "unexpected token 'b' at position 2"),
    ("a &", "unexpected end of expression"),
    ("| a", "unexpected token '|' at position 0"),
    ("a & & b", "unexpected token '&' at position 4"),
    ("a + b", "expected set name after '+' at position 3"),
    ("a,b", "unexpected character ',' at position 1"),
    ("a:b", "unexpected character ':' at position 1"),
    ("a\x00", "unexpected character U+0000 at position 1"),
])
def test_bad_expressions(dsl, message):
    with pytest.raises(ExpressionError) as info:
        parse_expression(dsl)
    assert str(info.value) == message
    assert errors_of({"sets": {"chat": dsl}}) == [f"{P}.sets.chat: {message}"]


def test_deep_nesting_is_an_error_not_a_crash():
    assert errors_of({"sets": {"s": "(" * 5000 + "a" + ")" * 5000}}) == [
        f"{P}.sets.s: expression nested too deeply"]


# -- configuration errors ----------------------------------------------------------------------

def test_matrix_must_be_a_mapping_with_sets():
    assert errors_of(None) == [f"{P}: must be a mapping (got null)"]
    assert errors_of(["a"]) == [f"{P}: must be a mapping (got a list)"]
    assert errors_of({}) == [f"{P}.sets: must define at least one set"]  # Go: TestValidateMatrix_NoSets
    assert errors_of({"sets": {}}) == [f"{P}.sets: must define at least one set"]
    assert errors_of({"sets": "a"}) == [f"{P}.sets: must be a mapping (got 'a')"]
    assert errors_of({"sets": {"s": "a"}, "vars": ["a"], "evict_costs": 3}) == [
        f"{P}.vars: must be a mapping (got a list)", f"{P}.evict_costs: must be a mapping (got 3)"]
    assert errors_of({"sets": {"s": 5, "t": None}}) == [
        f"{P}.sets.s: must be a string (got 5)", f"{P}.sets.t: must be a string (got null)"]


@pytest.mark.parametrize("name", ["abcdefghijklmnopqrstuvwxyzABCDEF", "model-var", "model.var", "7"])
def test_valid_var_names(name):  # Go: TestValidateMatrix_VarKeyValidation (valid)
    matrix = compile_ok({"vars": {name: "gemma"}, "sets": {"s": name}}, ["gemma"])
    assert matrix.decide("gemma", []).target_set == ("gemma",)


@pytest.mark.parametrize("name, where", [  # Go: TestValidateMatrix_VarKeyValidation (invalid)
    ("abcdefghijklmnopqrstuvwxyzABCDEFG", ".abcdefghijklmnopqrstuvwxyzABCDEFG"),
    ("a_b", ".a_b"),
    ("", '[""]'),
    ("a b", '["a b"]'),
])
def test_invalid_var_names(name, where):
    # an expression naming the bad var is not reported a second time
    dsl = name if name and " " not in name else "gemma"
    assert errors_of({"vars": {name: "gemma"}, "sets": {"s": dsl}}) == [
        f"{P}.vars{where}: a var name must be 1-32 letters, digits, '-' or '.'"]


def test_var_errors():
    assert errors_of({"vars": {"x": "nonexistent"}, "sets": {"s": "x"}}) == [  # Go: ..._AliasReferencesUnknownModel
        f"{P}.vars.x: unknown model 'nonexistent'"]
    assert errors_of({"vars": {"x": 3}, "sets": {"s": "a"}}) == [f"{P}.vars.x: must be a string (got 3)"]


def test_evict_cost_errors():  # Go: TestValidateMatrix_EvictCostInvalid
    base = {"vars": {"g": "gemma"}, "sets": {"s": "g"}}
    assert errors_of({**base, "evict_costs": {"g": 0}}) == [
        f"{P}.evict_costs.g: must be a positive integer (got 0)"]
    assert errors_of({**base, "evict_costs": {"g": -1}}) == [
        f"{P}.evict_costs.g: must be a positive integer (got -1)"]
    assert errors_of({**base, "evict_costs": {"g": 1.5, "a": True, "b": "2"}}) == [
        f"{P}.evict_costs.g: must be a positive integer (got 1.5)",
        f"{P}.evict_costs.a: must be a positive integer (got true)",
        f"{P}.evict_costs.b: must be a positive integer (got '2')"]
    assert errors_of({**base, "evict_costs": {"unknown": 5}}) == [
        f"{P}.evict_costs.unknown: unknown var or model 'unknown'"]
    # a var and its model both given a cost (llama-swap keeps either, at random)
    assert errors_of({**base, "evict_costs": {"g": 5, "gemma": 6}}) == [
        f"{P}.evict_costs.gemma: model 'gemma' already has a cost (as 'g')"]
    # direct model name in evict_costs
    assert compile_ok({"evict_costs": {"gemma": 5}, "sets": {"s": "gemma"}}, ["gemma"]).evict_costs == (
        ("gemma", 5),)


def test_names_in_sets_must_be_known():
    # Go: TestValidateMatrix_UnknownMapIDInDSL, TestValidateMatrix_UndefinedRefTarget
    assert errors_of({"vars": {"g": "gemma"}, "sets": {"s": "g & nonexistent"}}) == [
        f"{P}.sets.s: unknown var or model 'nonexistent' at position 4"]
    assert errors_of({"sets": {"a": "+nonexistent"}}) == [
        f"{P}.sets.a: reference to undefined set 'nonexistent' at position 0"]
    # a model alias is not a model id; every bad name of every set is reported
    assert errors_of({"sets": {"s": "alias-of-a | b | zz", "t": "+s & +u"}}) == [
        f"{P}.sets.s: unknown var or model 'alias-of-a' at position 0",
        f"{P}.sets.s: unknown var or model 'zz' at position 17",
        f"{P}.sets.t: reference to undefined set 'u' at position 5"]


def test_circular_references():  # Go: TestValidateMatrix_CycleDetection
    assert errors_of({"sets": {"a": "+b", "b": "+a"}}) == [f"{P}.sets.a: circular reference a -> b -> a"]
    assert errors_of({"sets": {"x": "a", "a": "b & +c", "c": "+a | a"}}) == [
        f"{P}.sets.a: circular reference a -> c -> a"]
    assert errors_of({"sets": {"self": "a | +self"}}) == [f"{P}.sets.self: circular reference self -> self"]


def test_paths_quote_keys_with_dots():
    assert errors_of({"sets": {"v1.2": "("}}) == [
        f'{P}.sets["v1.2"]: unexpected end of expression']


def test_resolution():  # Go: TestValidateMatrix_DirectAndMixedModelNames, ..._ResolvedEvictCosts
    models = ["gemma", "qwen", "voxtral", "llama70B", "mistral"]
    assert compile_ok({"sets": {"combo": "gemma & voxtral"}}, models).decide(
        "gemma", ["voxtral"]).target_set == ("gemma", "voxtral")
    mixed = compile_ok({"vars": {"g": "gemma"}, "sets": {"base": "g | qwen", "combo": "+base & voxtral"}}, models)
    assert mixed.decide("qwen", ["voxtral"]) == Decision((), ("qwen", "voxtral"), "combo", "+base & voxtral")
    dedup = compile_ok({"vars": {"g": "gemma"}, "sets": {"combo": "g & gemma"}}, models)
    assert dedup.decide("gemma", []).target_set == ("gemma",)
    # vars take precedence over model names
    shadow = compile_ok({"vars": {"qwen": "gemma"}, "sets": {"combo": "qwen"}}, models)
    assert shadow.decide("gemma", []).target_set == ("gemma",)
    assert shadow.models == {"gemma"}
    costs = compile_ok({"vars": {"g": "gemma", "L": "llama70B"},
                        "evict_costs": {"L": 30, "g": 5, "mistral": 10}, "sets": {"s": "g"}}, models)
    assert costs.evict_costs == (("gemma", 5), ("llama70B", 30), ("mistral", 10))
    assert [costs.evict_cost(m) for m in ("llama70B", "gemma", "mistral", "qwen")] == [30, 5, 10, 1]


def test_config_matrix_only():  # Go: TestValidateMatrix_ConfigMatrixOnly (the matrix part)
    matrix = compile_ok({"vars": {"g": "gemma", "q": "qwen"}, "sets": {"combo": "g | q"}}, ["gemma", "qwen"])
    assert [s.name for s in matrix.sets] == ["combo"]
    assert matrix == compile_ok({"vars": {"g": "gemma", "q": "qwen"}, "sets": {"combo": "g | q"}}, ["gemma", "qwen"])
    hash(matrix)


# -- the solver --------------------------------------------------------------------------------

def test_basic():  # Go: TestValidateMatrix_Basic
    matrix = compile_ok({
        "vars": {"g": "gemma", "q": "qwen", "m": "mistral", "v": "voxtral", "L": "llama70B"},
        "evict_costs": {"L": 30, "v": 50},
        "sets": {"standard": "(g | q | m) & v", "full": "L"},
    }, ["gemma", "qwen", "mistral", "voxtral", "llama70B"])
    assert matrix.decide("gemma", ["voxtral"]) == Decision((), ("gemma", "voxtral"), "standard", "(g | q | m) & v")
    assert matrix.decide("llama70B", ["voxtral"]) == Decision(("voxtral",), ("llama70B",), "full", "L", 50)
    assert matrix.solve("llama70B", ["voxtral"]) == {"voxtral"}


def test_with_ref():  # Go: TestValidateMatrix_WithRef
    matrix = compile_ok({
        "vars": {"g": "gemma", "q": "qwen", "m": "mistral", "v": "voxtral", "e": "reranker"},
        "sets": {"llms": "g | q | m", "with_tts": "+llms & v", "mega": "+with_tts & e"},
    }, ["gemma", "qwen", "mistral", "voxtral", "reranker"])
    result = matrix.decide("reranker", ["gemma", "voxtral"])
    assert (result.set_name, result.target_set, result.evict) == ("mega", ("gemma", "reranker", "voxtral"), ())


@pytest.mark.parametrize("dsl, relevant, expect", [  # Go: TestProgram_Expressions
    ("a", "a", [["a"]]),
    ("a & b", "ab", [["a", "b"]]),
    ("a | b | c", "abc", [["a"], ["b"], ["c"]]),
    ("(a | b) & (c | d)", "abcd", [["a", "c"], ["a", "d"], ["b", "c"], ["b", "d"]]),
    ("a | b & c", "abc", [["a"], ["b", "c"]]),
    ("a & a", "a", [["a"]]),
])
def test_expressions(dsl, relevant, expect):
    matrix = identity({"test": dsl}, relevant)
    assert projected(matrix, "test", list(relevant)) == expect
    assert [sorted(c) for c in matrix.expand("test")] == expect


def test_references():  # Go: TestProgram_References
    models = ["g", "q", "m", "v", "e"]
    matrix = identity({"llms": "g | q | m", "with_tts": "+llms & v", "mega": "+with_tts & e"}, models)
    expect = [["e", "g", "v"], ["e", "q", "v"], ["e", "m", "v"]]
    assert projected(matrix, "mega", models) == expect
    assert [sorted(c) for c in matrix.expand("mega")] == [sorted(c) for c in expect]


def test_overlapping_references():  # Go: TestProgram_OverlappingReferences
    matrix = identity({"base": "a & b", "extended": "target & +base & b"}, ["target", "a", "b"])
    result = matrix.decide("target", ["a", "b"])
    assert (result.evict, result.target_set) == ((), ("a", "b", "target"))


def product(dimensions: int, choices: int) -> tuple:
    """Go's ``productDefinition``: target & (model-0-0 | ... ) & ... ."""
    groups = [[f"model-{d}-{c}" for c in range(choices)] for d in range(dimensions)]
    dsl = "target & " + " & ".join("(" + " | ".join(g) + ")" for g in groups)
    return dsl, ["target"] + [m for g in groups for m in g]


def test_no_expansion_limit():  # Go: TestProgram_NoExpansionLimit
    dsl, models = product(6, 10)  # a million combinations
    matrix = identity({"large": dsl}, models + ["outside"])
    running = [f"model-{d}-9" for d in range(6)] + ["outside"]
    started = time.monotonic()
    result = matrix.decide("target", running)
    assert time.monotonic() - started < 1
    assert (result.evict, result.set_name, len(result.target_set)) == (("outside",), "large", 7)


def test_more_than_64_relevant_models():  # Go: TestProgram_MoreThan64RelevantModels
    models = ["target"] + [f"model-{i}" for i in range(70)]
    matrix = identity({"wide": " & ".join(models)}, models + ["outside"])
    result = matrix.decide("target", models[1:] + ["outside"])
    assert result.evict == ("outside",)
    assert len(result.target_set) == 71


def test_dominated_projection():  # Go: TestProgram_DominatedProjection
    matrix = identity({"preferred": "target & (a | (a & b))"}, ["target", "a", "b"])
    result = matrix.decide("target", ["a", "b"])
    assert (result.evict, result.target_set) == ((), ("a", "b", "target"))


def test_target_absent():  # Go: TestProgram_TargetAbsent
    matrix = identity({"known": "a & b"}, ["a", "b", "missing"])
    assert matrix.decide("missing", ["a", "b"]) == Decision(("a", "b"), ("missing",))
    assert matrix.decide("not-a-model", []) == Decision((), ("not-a-model",))


def test_swap_evicts_conflicting():  # Go: TestMatrix_SwapEvictsConflicting, TestMatrix_IncompatibleQueues
    matrix = identity({"s_a": "a", "s_b": "b"}, ["a", "b"])
    assert matrix.solve("b", ["a"]) == {"a"}
    assert matrix.decide("b", ["a"]) == Decision(("a",), ("b",), "s_b", "b", 1)


def test_coexist_in_set():  # Go: TestMatrix_CoexistInSet, TestMatrix_CoexistingSetParallel
    matrix = identity({"s_ab": "a & b"}, ["a", "b"])
    assert matrix.solve("b", ["a"]) == frozenset()
    assert matrix.solve("a", []) == frozenset()
    assert matrix.decide("a", []) == Decision((), ("a", "b"), "s_ab", "a & b")


def test_tie_break_definition_order():  # Go: TestMatrixSolver_TieBreakDefinitionOrder
    matrix = identity({"first": "a & b", "second": "a & c"}, ["a", "b", "c"])
    assert matrix.decide("a", []).set_name == "first"


def test_evict_costs_preferred():  # Go: TestMatrixSolver_EvictCostsPreferred
    matrix = identity({"a_with_c": "a & c", "a_with_b": "a & b"}, ["a", "b", "c"], {"b": 10, "c": 1})
    result = matrix.decide("a", ["b", "c"])
    assert (result.set_name, result.evict, result.total_cost) == ("a_with_b", ("c",), 1)


def test_target_already_running():
    matrix = identity({"ab": "a & b", "c": "c"}, ["a", "b", "c"])
    assert matrix.decide("a", ["b", "a"]) == Decision((), ("b", "a"), "ab", "a & b")
    # running models no set holds together (e.g. after a reload): still nothing to evict
    assert matrix.decide("a", ["a", "c"]) == Decision((), ("a", "c"))


def test_referenced_sets_are_tried_before_the_sets_referencing_them():
    """llama-swap solves in depth-first order of references, not plain definition order."""
    matrix = identity({"p": "(t & x) | +q", "q": "t & y"}, ["t", "x", "y"])
    assert [s.name for s in matrix.sets] == ["q", "p"]
    # p's first alternative (evict y) ties with q (evict x); q comes first
    assert matrix.decide("t", ["x", "y"]) == Decision(("x",), ("t", "y"), "q", "t & y", 1)
    plain = identity({"p": "(t & x) | (t & y)"}, ["t", "x", "y"])
    assert plain.decide("t", ["x", "y"]) == Decision(("y",), ("t", "x"), "p", "(t & x) | (t & y)", 1)


def test_a_model_outside_the_sets_is_always_evicted():
    matrix = identity({"ab": "a & b"}, ["a", "b", "solo"])
    assert matrix.solve("a", ["solo"]) == {"solo"}
    assert matrix.solve("solo", ["a", "b"]) == {"a", "b"}
    assert matrix.models == {"a", "b"}


def test_can_contain_all():  # used by llama-swap for selector targets
    matrix = identity({"s": "(a | b) & c", "t": "+s & d"}, ["a", "b", "c", "d"])
    assert matrix.can_contain_all([])
    assert matrix.can_contain_all(["a", "c", "d"])
    assert not matrix.can_contain_all(["a", "b"])
    assert not matrix.can_contain_all(["a", "zz"])
    assert matrix.set_containing(["c", "d"]).name == "t"
    assert matrix.set_containing(["a"]).name == "s"


# -- the matrix example of llama-swap's config.example.yaml -------------------------------------

# Copied from llama-swap's config.example.yaml (routing.router.settings.matrix; llama-swap is
# Copyright (c) 2024 Benson Wong, MIT licence), dedented, unchanged otherwise.
EXAMPLE = """\
# The matrix lists the model combinations that are allowed to run
# concurrently. When a model is requested, the solver makes room for it
# by evicting as few running models as possible, preferring to keep the
# costliest ones loaded.
#
# Solver behaviour:
#   1. A request arrives for model X.
#   2. If X is already running, forward the request. Done.
#   3. Collect every set that contains X.
#   4. For each set, add up the evict_costs of the running models that
#      are NOT in that set — that is the set's cost.
#   5. Choose the lowest-cost set. Break ties by definition order.
#   6. Evict the models outside that set, start X, forward the request.
#
# Subset semantics: a set [a, b, c] also permits any subset of itself.
# Only the requested model is started; the others are not preloaded.
#
# A model that appears in no set can only run on its own.
#
matrix:
  # vars: optional aliases for model IDs
  # - names may contain alphanumeric, "-", or "." characters (1-32 chars)
  # - map each short name to a real model ID (not a model alias)
  # - keeps the set expressions short and readable
  # - sets and evict_costs may mix vars with real model IDs
  # - a var takes precedence when its name is also a real model ID
  vars:
    g: gemma-model
    q: qwen-model
    m: mistral-model
    v: voxtral-model
    e: reranker-model

  # evict_costs: relative cost of losing a running model (default: 1)
  evict_costs:
    v: 50 # vllm backend, slow cold start
    llama-70B: 30 # 70B weights, slow to load

  # sets: named combinations of models that may run together.
  # Each value is an expression built from these operators:
  #   &     AND   (models run together)
  #   |     OR    (alternatives)
  #   ()    grouping
  #   +ref  inline the expression of another set
  #
  # Each expression expands into one or more concrete sets:
  #   "model-a"            → [model-a]
  #   "a & b"              → [a, b]
  #   "a | b"              → [a], [b]
  #   "(a | b) & c"        → [a, c], [b, c]
  #   "(a | b) & (c | d)"  → [a,c], [a,d], [b,c], [b,d]
  #   "+llms & v"          → inline the llms set, then AND with v
  sets:
    # An LLM plus TTS. Vars and real model IDs may be mixed.
    # expands to: [g,v], [qwen-model,v], [m,v]
    standard: "(g | qwen-model | m) & v"

    # An LLM plus TTS plus reranker.
    # expands to: [g,v,e], [q,v,e]
    with_rerank: "(g | q) & v & e"

    # An LLM plus image generation, no TTS.
    # expands to: [g,stable-diffusion], [q,stable-diffusion]
    creative: "(g | q) & stable-diffusion"

    # The 70B model uses every GPU, so it can only run alone.
    # Vars are not required when using real model IDs.
    full: "llama-70B"
"""
# "the model names below are illustrative and are not defined above": these are they, plus one
# model that is in no set
EXAMPLE_MODELS = ["gemma-model", "qwen-model", "mistral-model", "voxtral-model", "reranker-model",
                  "llama-70B", "stable-diffusion", "solo"]


@pytest.fixture(scope="module")
def example() -> Matrix:
    return compile_ok(yaml.safe_load(EXAMPLE)["matrix"], EXAMPLE_MODELS)


def test_example_expansions(example):
    """The "expands to" comments of the example, vars resolved."""
    g, q, m, v, e = "gemma-model", "qwen-model", "mistral-model", "voxtral-model", "reranker-model"
    expansions = {s.name: list(example.expand(s.name)) for s in example.sets}
    assert expansions == {
        "standard": [{g, v}, {q, v}, {m, v}],
        "with_rerank": [{g, v, e}, {q, v, e}],
        "creative": [{g, "stable-diffusion"}, {q, "stable-diffusion"}],
        "full": [{"llama-70B"}],
    }
    assert example.evict_costs == (("llama-70B", 30), ("voxtral-model", 50))


def test_example_operator_comments():
    """The operator examples of the ``sets`` comment."""
    matrix = identity({"m": "model-a", "ab": "a & b", "a_b": "a | b", "abc": "(a | b) & c",
                       "abcd": "(a | b) & (c | d)", "llms": "a | b", "llv": "+llms & v"},
                      ["model-a", "a", "b", "c", "d", "v"])
    assert [sorted(c) for s in matrix.sets for c in matrix.expand(s.name)] == [
        ["model-a"], ["a", "b"], ["a"], ["b"], ["a", "c"], ["b", "c"],
        ["a", "c"], ["a", "d"], ["b", "c"], ["b", "d"], ["a"], ["b"], ["a", "v"], ["b", "v"]]


@pytest.mark.parametrize("target, running, evict, set_name, cost", [
    # nothing running: the first set holding the target
    ("gemma-model", [], [], "standard", 0),
    ("llama-70B", [], [], "full", 0),
    # subset semantics: the LLM joins the running TTS
    ("gemma-model", ["voxtral-model"], [], "standard", 0),
    ("reranker-model", ["gemma-model", "voxtral-model"], [], "with_rerank", 0),
    ("stable-diffusion", ["gemma-model"], [], "creative", 0),
    # already running: nothing to do
    ("gemma-model", ["gemma-model", "voxtral-model"], [], "standard", 0),
    # only creative holds stable-diffusion, and it has no TTS
    ("stable-diffusion", ["gemma-model", "voxtral-model"], ["voxtral-model"], "creative", 50),
    # full runs alone
    ("llama-70B", ["qwen-model", "voxtral-model"], ["qwen-model", "voxtral-model"], "full", 51),
    # every set holding voxtral evicts llama-70B (30): the first one wins
    ("voxtral-model", ["llama-70B"], ["llama-70B"], "standard", 30),
    ("gemma-model", ["llama-70B", "voxtral-model"], ["llama-70B"], "standard", 30),
    # mistral is only in standard, which has no reranker
    ("mistral-model", ["qwen-model", "voxtral-model", "reranker-model"], ["qwen-model", "reranker-model"],
     "standard", 2),
    # the cheaper later set beats the earlier one: keep the reranker
    ("qwen-model", ["gemma-model", "voxtral-model", "reranker-model"], ["gemma-model"], "with_rerank", 1),
    # keep the costly TTS, drop the image model
    ("gemma-model", ["stable-diffusion", "voxtral-model"], ["stable-diffusion"], "standard", 1),
    # a model in no set runs alone, and is evicted by any other
    ("solo", ["gemma-model", "voxtral-model"], ["gemma-model", "voxtral-model"], "", 0),
    ("gemma-model", ["solo"], ["solo"], "standard", 1),
])
def test_example_solver(example, target, running, evict, set_name, cost):
    result = example.decide(target, running)
    assert (list(result.evict), result.set_name, result.total_cost) == (evict, set_name, cost)
    assert example.solve(target, running) == set(evict)
    if set_name and target not in running:
        assert target in result.target_set and set(running) - set(evict) <= set(result.target_set)


def test_example_first_solution_sets(example):
    assert example.decide("gemma-model", []).target_set == ("gemma-model", "voxtral-model")
    assert example.decide("qwen-model", ["reranker-model"]).target_set == (
        "qwen-model", "reranker-model", "voxtral-model")


def test_docs_example():
    """docs/matrix.rst's configuration gives the outcomes its table shows."""
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "docs" / "matrix.rst").read_text(encoding="utf-8")
    block = text.split("``routing.router.settings.matrix``::\n")[1].split("\n\n``vars``")[0]
    raw = yaml.safe_load(block)["routing"]["router"]["settings"]["matrix"]
    matrix = compile_ok(raw, EXAMPLE_MODELS)
    assert matrix.solve("stable-diffusion", ["gemma-model", "voxtral-model"]) == {"voxtral-model"}
    assert matrix.solve("qwen-model", ["gemma-model", "voxtral-model", "reranker-model"]) == {"gemma-model"}
    assert matrix.solve("gemma-model", ["stable-diffusion", "voxtral-model"]) == {"stable-diffusion"}
