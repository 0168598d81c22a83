"""docs/configuration.rst and the config reader share one key table (llamaswap/config/keys.py).

These tests keep the three in step: the committed page is the generated one, the reader reads
exactly the keys the table lists, warns about any other key at every level the table documents,
and every documented example loads.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from llamaswap.config import keys as configkeys
from llamaswap.config import parse_config
from llamaswap.config.keys import KEYS, NOT_IMPLEMENTED, SUPPORTED, UNSUPPORTED, concrete, example_yaml
from llamaswap.config.reader import Reader

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.rst"
ENV = {"LLAMASWAP_KEY": "sk-doc", "OPENROUTER_KEY": "sk-peer"}
READ = [k for k in KEYS if k.status != UNSUPPORTED]
#: setting both spellings is an error, so the legacy one is checked on its own
LEGACY = {"models.<id>.filters.strip_params"}
#: keys that exclude the top-level ``groups`` (and each other), each set checked in a config of its own
ALTERNATIVES = (
    {k.path for k in READ if k.path.startswith("routing.router")},
    {"matrix"},
)
SEPARATE = LEGACY.union(*ALTERNATIVES)


def merge(into: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


def config_of(rows: list) -> str:
    """One config holding the examples of ``rows`` (later rows win)."""
    data: dict[str, Any] = {}
    for row in rows:
        merge(data, yaml.safe_load(example_yaml(row)))
    return yaml.safe_dump(data, sort_keys=False)


def test_committed_doc_is_generated():
    """docs/configuration.rst is exactly what `python -m llamaswap.config.keys` prints."""
    assert DOC.read_text(encoding="utf-8") == configkeys.render(), (
        "docs/configuration.rst is stale: run `python -m llamaswap.config.keys > docs/configuration.rst`")


def alternative(paths: set) -> str:
    """A config of the ``models`` example and the examples of ``paths`` (in table order)."""
    return config_of([configkeys.find("models")] + [k for k in KEYS if k.path in paths])


def test_reader_reads_exactly_the_table(monkeypatch):
    """The keys the reader takes, nested ones included, are the table's (not-unsupported) rows."""
    seen: set[str] = set()
    real = Reader.value

    def value(self, key):
        seen.add(configkeys.join(self.pattern, key))
        return real(self, key)

    monkeypatch.setattr(Reader, "value", value)
    parse_config(config_of([k for k in READ if k.path not in SEPARATE]), "all.yaml", ENV)
    for paths in ALTERNATIVES:
        parse_config(alternative(paths), "alternative.yaml", ENV)
    assert seen == {k.path for k in READ}


def test_every_example_loads_without_warnings():
    """All documented examples together form a valid config with no warning; so do the alternatives."""
    everything = parse_config(config_of([k for k in READ if k.path not in SEPARATE]), "all.yaml", ENV)
    assert everything.warnings == ()
    assert everything.models["llama"].ttl == 600 and everything.peers["openrouter"].api_key == "sk-peer"
    assert everything.later_keys == ()
    assert everything.memory_budget == 48 * 2**30 and everything.memory_policy == "lru"
    assert everything.scheduler_priority == {"llama": 10} and everything.router_use == "group"
    legacy = parse_config(alternative(LEGACY), "legacy.yaml", ENV)
    assert legacy.warnings == () and legacy.models["llama"].strip_params == ("top_k",)
    router = parse_config(alternative(ALTERNATIVES[0]), "router.yaml", ENV)
    assert router.warnings == () and router.router_use == "matrix" and router.groups == {}
    assert [s.name for s in router.matrix.sets] == ["solo", "again"]
    top_matrix = parse_config(alternative(ALTERNATIVES[1]), "matrix.yaml", ENV)
    assert top_matrix.warnings == () and top_matrix.router_use == "matrix"


@pytest.mark.parametrize("row", [k for k in KEYS if k.status == UNSUPPORTED], ids=lambda k: k.path)
def test_unsupported_keys_warn(row):
    """A recognised llama-swap key that llamaswap does not support loads with exactly its warning."""
    context = [configkeys.find("models"), configkeys.find("peers")]
    config = parse_config(config_of(context + [row]), "u.yaml", ENV)
    assert config.warnings == (
        f"config: llama-swap key '{concrete(row.path)}' is not supported by llamaswap (ignored)",)


def _checked_levels() -> list[str]:
    """Every path under which the table lists keys (placeholder levels included)."""
    parents = {k.parent for k in KEYS if not k.name.startswith("<")}
    free_form = {"macros", "profiles"}         # free-form mappings have no key list
    return sorted(parents - free_form)


@pytest.mark.parametrize("level", _checked_levels())
def test_unknown_keys_warn_at_every_level(level):
    """At every documented level, a key the table does not list is reported as unknown."""
    stray = configkeys.KeyDoc(configkeys.join(level, "zzStray"), "", "", "1", "", "")
    context = [configkeys.find("models"), configkeys.find("peers")]
    if level.startswith("routing.router.settings.matrix"):
        context.append(configkeys.find("routing.router.settings.matrix.sets"))    # a matrix needs a set
    elif not level.startswith("routing.router"):
        context.append(configkeys.find("groups"))          # top-level groups exclude routing.router
    needs = {"profiles.<name>": ["profiles.<name>.pins"], "store": ["store.path"],
             "selectors": ["selectors.<selectorId>.strategy", "selectors.<selectorId>.targets"]}
    for prefix, paths in needs.items():                    # the keys required at that level
        if level.startswith(prefix):
            context += [configkeys.find(path) for path in paths]
    config = parse_config(config_of(context + [stray]), "s.yaml", ENV)
    warning, = config.warnings                             # ("...; did you mean 'strategy'?" may follow)
    assert warning.startswith(f"config: unknown key '{concrete(stray.path)}' (ignored)")


def test_table_is_well_formed():
    """Statuses and versions have the documented values; secrets are leaves the reader reads."""
    for row in KEYS:
        assert row.status in (SUPPORTED, NOT_IMPLEMENTED, UNSUPPORTED), row
        assert row.since == "llamaswap" or re.fullmatch(r"v\d+", row.since), row
        assert row.type and row.default and row.example and row.description, row
    assert {k.path for k in KEYS if k.secret} == {
        "apiKeys", "models.<id>.env", "peers.<peerId>.apiKey"}
    memory = {k.path: k.status for k in KEYS if "memory" in k.path}
    assert memory == dict.fromkeys(
        ["models.<id>.memory", "memory", "memory.budget", "memory.overhead", "memory.policy"], SUPPORTED)
    assert {k.path for k in KEYS if k.status == NOT_IMPLEMENTED} == set()
    routing = {k.path: k.since for k in KEYS if k.path.startswith("routing")}
    assert set(routing.values()) == {"v225"} and configkeys.find("matrix").status == SUPPORTED


def test_reader_constants_come_from_the_table():
    """The key sets the reader (and the property tests) take from the table are what the page says."""
    assert configkeys.unsupported_children("models.<id>") == {"healthCheckTimeout"}
    assert configkeys.unsupported_children("") == {"logRequests"}
    model_keys = configkeys.children("models.<id>")
    assert {"memory", "timeouts", "compat", "capabilities"} <= model_keys
    assert configkeys.children("models.<id>.timeouts") == configkeys.children("peers.<peerId>.timeouts") == {
        "connect", "keepalive", "responseHeader", "tlsHandshake", "expectContinue", "idleConn"}
    assert configkeys.children("groups.<groupId>") == {"swap", "exclusive", "persistent", "members"}


def test_doc_is_valid_restructuredtext():
    """The page parses with docutils without warnings."""
    core = pytest.importorskip("docutils.core")
    stream = io.StringIO()
    core.publish_doctree(DOC.read_text(encoding="utf-8"), settings_overrides={
        "warning_stream": stream, "report_level": 2, "halt_level": 5, "syntax_highlight": "none"})
    assert stream.getvalue() == ""


def test_doc_cites_no_requirement_ids():
    """The page stands on its own: no behaviour ids (``CFG-3`` and the like) for readers to look up."""
    ids = re.compile(r"\b(?:CFG|CLI|CMD|COMPAT|EP|ERR|EVT|LOG|MAC|MET|PROC|PROXY|RT|SCHED|SEC|UI|RLD)-[\d*]")
    assert ids.findall(DOC.read_text(encoding="utf-8")) == []


def test_doc_mentions_every_key_once_as_a_heading():
    text = DOC.read_text(encoding="utf-8")
    for row in KEYS:
        heading = f"``{row.path}``\n" + "~" * (len(row.path) + 4) + "\n"
        assert text.count(heading) == 1, row.path
