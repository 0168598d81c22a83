"""The keys of llama-swap v250's config: its own config.example.yaml, then each key and each check.

tests/data/llama-swap-v250-config.example.yaml is llama-swap's example, unchanged (its header names
the source and licence). llama-swap itself rejects it as it stands, so :func:`prepared_example`
prepares it the way a user moving from llama-swap would: the environment variables it names are
set, ``unlisted-model`` gets a ``${PORT}``, and every command runs the fake upstream.
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
from pathlib import Path

import pytest

from llamaswap.config import (
    DEFAULT_SESSION_ID_HEADERS, DEFAULT_UPSTREAM_IGNORE_PATHS, Capabilities, Config, ConfigError, GroupConfig,
    ProfileConfig, SelectorConfig, Timeouts, parse_config)
from llamaswap.config.sections import parse_go_duration
from tests.daemon import fake_cmd

EXAMPLE = Path(__file__).resolve().parent / "data" / "llama-swap-v250-config.example.yaml"
EXAMPLE_ENV = {"API_KEY_1": "sk-env-one", "API_KEY_2": "sk-env-two", "OPENROUTER_API_KEY": "sk-or-test"}
P = "cmd: srv --port ${PORT}"


def parse(text: str, environ: dict | None = None) -> Config:
    return parse_config(textwrap.dedent(text), "f.yaml", environ or {})


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value.errors


# --------------------------------------------------------------------------------------------
# llama-swap's example config


def replace_commands(text: str) -> str:
    """Every model's ``cmd`` (one line or a block scalar) runs the fake upstream; ``cmdStop`` goes."""
    out: list[str] = []
    lines = text.split("\n")
    model = None
    in_models = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if re.match(r"^\S", line):
            in_models = line.startswith("models:")
        heading = re.match(r'^  "?([^"#\s][^"]*?)"?:\s*$', line) if in_models else None
        if heading:
            model = heading.group(1)
        command = re.match(r"^    (cmd|cmdStop):(.*)$", line) if in_models else None
        if not command:
            out.append(line)
            i += 1
            continue
        i += 1
        if command.group(2).strip() in ("|", ">"):           # skip the block scalar's lines
            while i < len(lines) and next((x for x in lines[i:] if x.strip()), "").startswith("      "):
                i += 1
        if command.group(1) == "cmd":
            out.append(f"    cmd: {fake_cmd(model)}")
    return "\n".join(out)


def prepared_example() -> tuple[str, dict[str, str]]:
    """llama-swap's example config, prepared as its issue says, and the environment to load it with."""
    text = EXAMPLE.read_text(encoding="utf-8")
    text = text.replace("    cmd: some-upstream-server\n", "    cmd: some-upstream-server --port ${PORT}\n")
    environ = {"HOME": "/home/tester", **os.environ, **EXAMPLE_ENV}
    return replace_commands(text), environ


@pytest.fixture(scope="module")
def example() -> Config:
    text, environ = prepared_example()
    return parse_config(text, str(EXAMPLE), environ)


def test_example_preparation_replaces_every_command():
    """Only the commands change: each model runs the fake upstream, nothing else of the file moves."""
    original = EXAMPLE.read_text(encoding="utf-8")
    text, _ = prepared_example()
    assert text.count(str(Path(sys.executable))) == 3 and not re.search(r"^\s+cmdStop:", text, re.M)
    assert "docker run" not in text and "${latest-llama}\n" not in text
    assert text.split("\nmodels:")[0] == original.split("\nmodels:")[0]


def test_example_loads_without_unsupported_keys(example):
    """Every key of llama-swap v250's example is read: no "not supported" and no unknown-key warning.

    What remains are the names the example uses without defining them (it says they are
    illustrative), each a warning where llama-swap would have refused the file.
    """
    assert not [w for w in example.warnings if "not supported" in w or "unknown key" in w]
    assert sorted(example.warnings) == sorted([
        *(f"config: 'routing.router.settings.groups.{where}' names unknown model '{name}' (ignored)"
          for where, name in [("group1.members[0]", "llama"), ("group1.members[1]", "qwen-unlisted"),
                              ("group2.members[1]", "modelA"), ("group2.members[2]", "modelB"),
                              ("forever.members[0]", "forever-modelA"), ("forever.members[1]", "forever-modelB"),
                              ("forever.members[2]", "forever-modelc")]),
        *(f"config: 'routing.scheduler.settings.fifo.priority.{m}' names unknown model '{m}' (ignored)"
          for m in "ABCD"),
        "config: 'selectors.coding-model.targets[1]' names unknown model 'qwen-unlisted' (ignored)",
        "config: 'selectors.llama.targets[1]' names unknown model 'modelA' (ignored)",
        "config: 'selectors.llama.targets[2]' names unknown model 'modelB' (ignored)",
        "config: 'profiles.coding.pins.llm-plan' names unknown model 'qwen-unlisted'",
        "config: 'hooks.on_startup.preload' names selector 'llama', which cannot be preloaded (ignored)"])
    assert example.later_keys == ()


def test_example_top_level(example):
    assert example.health_check_timeout == 500 and example.log_level == "info" and example.log_time_format == ""
    assert example.log_to_stdout == "proxy" and example.metrics_max_in_memory == 1000
    assert example.capture_buffer_mb == 15 and example.store_path == ""
    assert example.session_id_headers == ("X-Session-ID", "X-Litellm-Session-Id")
    assert example.performance_disabled is False and example.performance_every == 15.0
    assert example.start_port == 10001 and example.send_loading_state is True
    assert example.include_aliases_in_list is False and example.global_ttl == 0 and example.unload_timeout == 10
    assert example.api_keys == (
        "sk-hunter2", "sk-gyCPiKUcIfPlaM4OSMZekkprgijPx6+OsmQs8Rsg0xZ9qpy6gKWsIKqHOk+cgXVx", "sk-env-one",
        "sk-env-two")
    assert example.upstream_ignore_paths == (r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$", r"^\/ws$|^\/api\/jobs$")
    assert example.preload == ()


def test_example_profiles_and_selectors(example):
    assert example.profiles == {}
    assert example.pin_profiles == {"coding": ProfileConfig(
        "coding", "Coding-focused model routing",
        {"llm-code": "gpt-oss-120b", "llm-plan": "qwen-unlisted", "image-gen": None})}
    assert example.selectors == {
        "coding-model": SelectorConfig("coding-model", "warm", ("gpt-oss-120b",), name="Coding Model",
                                       description="Best currently loaded coding model",
                                       metadata={"purpose": "coding"}),
        "llm-plan": SelectorConfig("llm-plan", "pin", ("gpt-oss-120b", "z-ai/glm-4.7")),
        "llama": SelectorConfig("llama", "spillover", ("docker-llama",), spillover=4)}


def test_example_models(example):
    assert list(example.models) == ["gpt-oss-120b", "unlisted-model", "docker-llama"]
    gpt = example.models["gpt-oss-120b"]
    assert gpt.timeouts == Timeouts(connect=30, keepalive=0, response_header=60, tls_handshake=10,
                                    expect_continue=1, idle_conn=90)
    assert gpt.capabilities == Capabilities(("text", "audio", "image"), ("text", "audio", "image"), tools=True,
                                            reranker=False, context=32000)
    assert gpt.ignore_websockets is True and gpt.ttl == 60 and gpt.proxy == "http://127.0.0.1:8999"
    assert gpt.check_endpoint == "/custom-endpoint" and gpt.use_model_name == "openai/gpt-oss-120B"
    assert gpt.aliases == ("gpt-4o-mini", "gpt-oss-120b:high", "gpt-oss-120b:low")
    assert gpt.metadata["port"] == gpt.port and gpt.metadata["temperature"] == 0.7
    assert gpt.metadata["an_obj"]["c"] == [0.7, False, "model: gpt-oss-120b"]
    assert gpt.argv[:2] == (sys.executable, str(Path(__file__).resolve().parent / "fake_llama_server.py"))
    for model_id in ("unlisted-model", "docker-llama"):
        model = example.models[model_id]
        assert model.argv[0] == sys.executable and model.timeouts == Timeouts() and not model.ignore_websockets
        assert model.capabilities.empty() and model.cmd_stop == ""
    assert example.models["unlisted-model"].unlisted is True
    assert example.models["docker-llama"].proxy == f"http://127.0.0.1:{example.models['docker-llama'].port}"


def test_example_routing_and_peers(example):
    assert example.router_use == "group" and example.matrix is None and example.scheduler_priority == {}
    assert example.groups == {
        "group1": GroupConfig("group1", True, True, False, ()),
        "group2": GroupConfig("group2", False, False, False, ("docker-llama",)),
        "forever": GroupConfig("forever", False, False, True, ())}
    openrouter = example.peers["openrouter"]
    assert openrouter.api_key == "sk-or-test" and len(openrouter.models) == 6
    assert openrouter.timeouts == Timeouts(30, 30, 60, 10, 1, 90)
    assert openrouter.strip_params == ("temperature", "top_p")
    assert example.peers["llama-swap-peer"].timeouts == Timeouts(response_header=60.0)


def test_example_with_the_matrix_router():
    """With use: matrix, the example's matrix is the one checked (it names its own models)."""
    text, environ = prepared_example()
    text = text.replace("    use: group\n", "    use: matrix\n", 1)
    matrix_models = ["gemma-model", "qwen-model", "mistral-model", "voxtral-model", "reranker-model",
                     "stable-diffusion", "llama-70B"]
    text = text.replace("\nmodels:\n", "\nmodels:\n" + "".join(
        f"  {m}:\n    cmd: {fake_cmd(m)}\n" for m in matrix_models), 1)
    c = parse_config(text, "matrix.yaml", environ)
    assert c.router_use == "matrix" and c.groups == {}
    assert [s.name for s in c.matrix.sets] == ["standard", "with_rerank", "creative", "full"]
    assert not [w for w in c.warnings if "groups" in w]      # the inactive groups are not checked


# --------------------------------------------------------------------------------------------
# Defaults


def test_defaults_are_llama_swaps():
    c = parse(f"models:\n  a:\n    {P}\npeers:\n  p: {{proxy: 'http://h', models: [m]}}\n")
    assert c.upstream_ignore_paths == DEFAULT_UPSTREAM_IGNORE_PATHS
    assert c.session_id_headers == DEFAULT_SESSION_ID_HEADERS == ("X-Session-ID", "X-Litellm-Session-Id")
    assert (c.log_time_format, c.metrics_max_in_memory, c.capture_buffer_mb, c.store_path) == ("", 1000, 5, "")
    assert (c.performance_disabled, c.performance_every) == (False, 5.0)
    assert c.pin_profiles == {} and c.selectors == {}
    a = c.models["a"]
    assert a.timeouts == Timeouts(30, 30, 0, 10, 1, 90) and a.capabilities == Capabilities()
    assert a.ignore_websockets is False
    assert c.peers["p"].timeouts == Timeouts(30, 30, 60, 10, 1, 90)


# --------------------------------------------------------------------------------------------
# Each key


def test_timeouts_override_one_by_one():
    c = parse(f"""\
        models:
          a:
            {P}
            timeouts: {{connect: 5, responseHeader: 600, idleConn: 0}}
        peers:
          p:
            proxy: http://h
            models: [m]
            timeouts: {{responseHeader: 0, keepalive: 7, tlsHandshake: 3, expectContinue: 2}}
        """)
    assert c.models["a"].timeouts == Timeouts(connect=5, keepalive=30, response_header=600, tls_handshake=10,
                                              expect_continue=1, idle_conn=0)
    assert c.peers["p"].timeouts == Timeouts(connect=30, keepalive=7, response_header=0, tls_handshake=3,
                                             expect_continue=2, idle_conn=90)


def test_compat_and_capabilities():
    c = parse(f"""\
        models:
          a:
            {P}
            compat: {{ignoreWebsockets: true}}
            capabilities: {{in: [text, image], out: [text], tools: yes, reranker: true, context: 8192}}
          b:
            {P}
            capabilities: {{}}
        """)
    assert c.models["a"].ignore_websockets is True
    assert c.models["a"].capabilities == Capabilities(("text", "image"), ("text",), True, True, 8192)
    assert c.models["a"].capabilities.as_json() == {"in": ["text", "image"], "out": ["text"], "tools": True,
                                                    "reranker": True, "context": 8192}
    assert c.models["b"].capabilities.empty()


def test_top_level_keys():
    c = parse("""\
        logTimeFormat: " RFC3339Nano "
        metricsMaxInMemory: 50
        captureBuffer: 0
        store: {path: /var/lib/llamaswap/a.sqlite}
        ui: {activity: {session_id: [' X-Trace-ID ', '', x-trace-id, X-Session-ID]}}
        performance: {disabled: true, every: 1m30s}
        upstream: {ignorePaths: ['^/ws$', '.*\\.ico$']}
        """)
    assert c.log_time_format == "rfc3339nano" and c.metrics_max_in_memory == 50 and c.capture_buffer_mb == 0
    assert c.store_path == "/var/lib/llamaswap/a.sqlite"
    assert c.session_id_headers == ("X-Trace-ID", "X-Session-ID")
    assert c.performance_disabled is True and c.performance_every == 90.0
    assert c.upstream_ignore_paths == ("^/ws$", r".*\.ico$") and c.warnings == ()


@pytest.mark.parametrize("text,expected", [
    ("ui: {activity: {session_id: []}}\n", ()),
    ("ui: {activity: {}}\n", DEFAULT_SESSION_ID_HEADERS),
    ("upstream: {ignorePaths: []}\n", None),
    ("performance: {every: 0s}\n", 5.0),
    ("performance: {every: 0}\n", 5.0),
    ("performance: {every: 5s}\n", 5.0),
    ("performance: {every: 2h}\n", 7200.0),
])
def test_edge_values(text, expected):
    """[] turns session ids off; an empty ignorePaths is the default; 0 means the default interval."""
    c = parse(text)
    if text.startswith("ui"):
        assert c.session_id_headers == expected
    elif text.startswith("upstream"):
        assert c.upstream_ignore_paths == DEFAULT_UPSTREAM_IGNORE_PATHS
    else:
        assert c.performance_every == expected


@pytest.mark.parametrize("text,seconds", [
    ("15s", 15), ("1m30s", 90), ("1.5m", 90), ("500ms", 0.5), ("2h10s", 7210), ("0", 0), ("+3s", 3),
    ("-2s", -2), ("1us", 1e-6), ("1\u00b5s", 1e-6), ("10ns", 1e-8), (".5s", 0.5), ("1.s", 1)])
def test_go_durations(text, seconds):
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "15", "s", ".s", "1 s", "1d", "1s ", "--1s", "1S"])
def test_go_duration_errors(text):
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_log_time_format_unknown_warns():
    c = parse("logTimeFormat: iso\n")
    assert c.log_time_format == ""
    assert c.warnings == ("config: logTimeFormat 'iso' is not one of ansic, unixdate, rubydate, rfc822, "
                          "rfc822z, rfc850, rfc1123, rfc1123z, rfc3339, rfc3339nano, kitchen, stamp, "
                          "stampmilli, stampmicro, stampnano; log lines get no timestamp",)


# --------------------------------------------------------------------------------------------
# Profiles and selectors

NAMES = f"""\
models:
  a:
    {P}
    aliases: [al]
    filters:
      setParamsByID:
        "a:hot": {{temperature: 1}}
  b:
    {P}
  c:
    {P}
peers:
  p:
    proxy: http://h
    models: [pm, shared]
  q:
    proxy: http://h2
    models: [shared]
"""


def test_pin_profiles():
    """Targets may be an id, an alias, a setParamsByID name, a peer model or a selector; ~ and "" disable."""
    c = parse(NAMES + """\
profiles:
  plain: [a, al]
  work:
    description: "  For work  "
    pins: {x: a, y: al, z: "a:hot", w: pm, v: q/shared, u: sel, off: ~, off2: "", 3: b}
selectors:
  sel: {strategy: pin, targets: [b]}
""")
    assert c.warnings == ()
    assert c.profiles == {"plain": ("a",)}
    assert c.pin_profiles == {"work": ProfileConfig("work", "For work", {
        "x": "a", "y": "al", "z": "a:hot", "w": "pm", "v": "q/shared", "u": "sel", "off": None, "off2": None,
        "3": "b"})}


def test_pin_to_an_unknown_or_ambiguous_name_warns_and_is_kept():
    c = parse(NAMES + "profiles:\n  work:\n    pins: {x: nope, y: shared}\n")
    assert c.pin_profiles["work"].pins == {"x": "nope", "y": "shared"}
    assert c.warnings == ("config: 'profiles.work.pins.x' names unknown model 'nope'",
                          "config: 'profiles.work.pins.y' names unknown model 'shared'")


def test_selectors():
    c = parse(NAMES + """\
groups:
  side: {swap: false, members: [a, b]}
selectors:
  s1:
    strategy: spillover
    targets: [al, b, p/pm, q/shared]
    settings: {spillover: 3}
    name: " Spill "
    description: d
    unlisted: true
    metadata: {x: [1, 2]}
  s2: {strategy: warm, targets: [a, c, "a:hot"]}
  s3: {strategy: failover, targets: [c, pm], settings: {failures: 2, cooldown: 7.5}}
  s4: {strategy: pin, targets: [pm, a]}
""")
    assert c.warnings == ()
    assert c.selectors == {
        "s1": SelectorConfig("s1", "spillover", ("al", "b", "p/pm", "q/shared"), spillover=3, name="Spill",
                             description="d", unlisted=True, metadata={"x": [1, 2]}),
        "s2": SelectorConfig("s2", "warm", ("a", "c", "a:hot")),
        "s3": SelectorConfig("s3", "failover", ("c", "pm"), failures=2, cooldown=7.5),
        "s4": SelectorConfig("s4", "pin", ("pm", "a"))}


def test_spillover_targets_that_run_together():
    """Side by side: one group with swap: false, one matrix set, or no group under memory.budget."""
    sel = "selectors:\n  s: {strategy: spillover, targets: [a, b]}\n"
    assert "s" in parse(NAMES + "groups:\n  g: {swap: false, members: [a, b]}\n" + sel).selectors
    assert "s" in parse(NAMES + "matrix: {sets: {ab: 'a & b'}}\n" + sel).selectors
    assert "s" in parse(NAMES + "memory: {budget: 8GiB}\n" + sel).selectors
    one = "selectors:\n  s: {strategy: spillover, targets: [a, al, p/pm]}\n"
    assert errors_of(NAMES + one) == ["selectors.s.targets[1]: model 'a' is already a target (as 'a')"]


def test_selector_drops_unknown_targets():
    c = parse(NAMES + "selectors:\n  s: {strategy: pin, targets: [zz, b, shared]}\n")
    assert c.selectors["s"].targets == ("b",)
    assert c.warnings == ("config: 'selectors.s.targets[0]' names unknown model 'zz' (ignored)",
                          "config: 'selectors.s.targets[2]' names unknown model 'shared' (ignored)")


def test_preload_drops_selectors():
    c = parse(NAMES + "hooks: {on_startup: {preload: [a, s, al]}}\n"
              "selectors:\n  s: {strategy: pin, targets: [b]}\n")
    assert c.preload == ("a", "al")
    assert c.warnings == ("config: 'hooks.on_startup.preload' names selector 's', which cannot be preloaded "
                          "(ignored)",)


def test_list_and_mapping_profiles_together():
    c = parse(NAMES + "profiles:\n  old: [a, b]\n  new:\n    pins: {x: c}\n")
    assert c.profiles == {"old": ("a", "b")} and list(c.pin_profiles) == ["new"]


# --------------------------------------------------------------------------------------------
# Mistakes: every one is reported, each naming its path

SEL = "selectors:\n  s:\n"
BAD = [
    ("timeouts not a mapping", f"models:\n  a:\n    {P}\n    timeouts: 5\n",
     ["models.a.timeouts: must be a mapping (got 5)"]),
    ("negative timeout", f"models:\n  a:\n    {P}\n    timeouts: {{connect: -1, idleConn: 1.5}}\n",
     ["models.a.timeouts.connect: must be a non-negative integer (got -1)",
      "models.a.timeouts.idleConn: must be a non-negative integer (got 1.5)"]),
    ("peer timeout", "peers:\n  p: {proxy: 'http://h', models: [m], timeouts: {responseHeader: x}}\n",
     ["peers.p.timeouts.responseHeader: must be a non-negative integer (got 'x')"]),
    ("compat", f"models:\n  a:\n    {P}\n    compat: {{ignoreWebsockets: maybe}}\n",
     ["models.a.compat.ignoreWebsockets: must be a boolean (got 'maybe')"]),
    ("capabilities", f"models:\n  a:\n    {P}\n    capabilities:\n      in: [text, video]\n      out: text\n"
     "      tools: 1\n      context: -1\n",
     ["models.a.capabilities.in[1]: must be one of text, audio, image (got 'video')",
      "models.a.capabilities.out: must be a list of strings (got 'text')",
      "models.a.capabilities.tools: must be a boolean (got 1)",
      "models.a.capabilities.context: must be a non-negative integer (got -1)"]),
    ("ignorePaths", "upstream: {ignorePaths: ['(', '^ok$', '[a-']}\n",
     ["upstream.ignorePaths[0]: invalid regular expression: missing ), unterminated subpattern at position 0 "
      "(got '(')",
      "upstream.ignorePaths[2]: invalid regular expression: unterminated character set at position 0 "
      "(got '[a-')"]),
    ("ignorePaths string", "upstream: {ignorePaths: '.*'}\n",
     ["upstream.ignorePaths: must be a list of strings (got '.*')"]),
    ("counts", "metricsMaxInMemory: -5\ncaptureBuffer: 10MB\n",
     ["metricsMaxInMemory: must be a non-negative integer (got -5)",
      "captureBuffer: must be a non-negative integer (got '10MB')"]),
    ("store without path", "store: {}\n", ["store.path: must not be empty when store is set"]),
    ("store blank path", "store: {path: ' '}\n", ["store.path: must not be empty when store is set"]),
    ("store scalar", "store: /tmp/x\n", ["store: must be a mapping (got '/tmp/x')"]),
    ("session ids", "ui: {activity: {session_id: X-Session-ID}}\n",
     ["ui.activity.session_id: must be a list of strings (got 'X-Session-ID')"]),
    ("performance", "performance: {disabled: 2, every: 2s}\n",
     ["performance.disabled: must be a boolean (got 2)", "performance.every: must be at least 5s (got '2s')"]),
    ("performance nanoseconds", "performance: {every: 10}\n",
     ["performance.every: must be at least 5s (got 10); a bare number is nanoseconds, write '10s'"]),
    ("performance words", "performance: {every: fast}\n",
     ["performance.every: must be a duration like '15s' or '1m30s' (got 'fast')"]),
    ("performance float", "performance: {every: 7.5}\n",
     ["performance.every: must be a duration like '15s' or '1m30s' (got 7.5)"]),
    # profiles
    ("pins missing", NAMES + "profiles:\n  w: {description: x}\n",
     ["profiles.w.pins: must contain at least one entry"]),
    ("pins empty", NAMES + "profiles:\n  w: {pins: {}}\n", ["profiles.w.pins: must contain at least one entry"]),
    ("pins list", NAMES + "profiles:\n  w: {pins: [a]}\n", ["profiles.w.pins: must be a mapping (got a list)"]),
    ("pin target list", NAMES + "profiles:\n  w: {pins: {x: [a]}, description: [d]}\n",
     ["profiles.w.pins.x: must be a model name, or empty to disable the id (got a list)",
      "profiles.w.description: must be a string (got a list)"]),
    ("pin on a peer name", NAMES + "profiles:\n  w: {pins: {p/pm: a, ' ': b}}\n",
     ["profiles.w.pins.p/pm: the pinned id is already the name of peer model 'p/pm'",
      "profiles.w.pins[\" \"]: a pinned id must not be empty"]),
    ("profile without a name", NAMES + "profiles:\n  '': {pins: {x: a}}\n",
     ["profiles[\"\"]: a profile name must not be empty"]),
    # selectors
    ("selector not a mapping", NAMES + "selectors:\n  s: [a]\n", ["selectors.s: must be a mapping (got a list)"]),
    ("selector without strategy or targets", NAMES + SEL + "    name: x\n",
     ["selectors.s.strategy: is required (one of pin, warm, spillover, failover)",
      "selectors.s.targets: must contain at least one entry"]),
    ("unknown strategy", NAMES + SEL + "    strategy: random\n    targets: []\n",
     ["selectors.s.strategy: must be one of pin, warm, spillover, failover (got 'random')",
      "selectors.s.targets: must contain at least one entry"]),
    ("selector chaining",
     NAMES + "selectors:\n  s: {strategy: pin, targets: [a, t]}\n  t: {strategy: pin, targets: [b]}\n",
     ["selectors.s.targets[1]: 't' is a selector; a selector cannot target another selector"]),
    ("warm needs local targets", NAMES + SEL + "    strategy: warm\n    targets: [a, pm]\n",
     ["selectors.s.targets[1]: strategy 'warm' needs a local model or alias (got peer model 'p/pm')"]),
    ("duplicate spillover target", NAMES + "groups:\n  g: {swap: false, members: [a, b]}\n" + SEL
     + "    strategy: spillover\n    targets: [a, b, al, pm, p/pm]\n",
     ["selectors.s.targets[2]: model 'a' is already a target (as 'a')",
      "selectors.s.targets[4]: model 'p/pm' is already a target (as 'pm')"]),
    ("duplicate failover target", NAMES + SEL + "    strategy: failover\n    targets: [a, 'a:hot']\n",
     ["selectors.s.targets[1]: model 'a' is already a target (as 'a')"]),
    ("no target left", NAMES + SEL + "    strategy: pin\n    targets: [zz, shared]\n",
     ["selectors.s.targets: no target names a configured model"]),
    ("settings", NAMES + SEL + "    strategy: failover\n    targets: [a]\n"
     "    settings: {spillover: 0, failures: 0, cooldown: -1}\n",
     ["selectors.s.settings.spillover: must be an integer of at least 1 (got 0)",
      "selectors.s.settings.failures: must be an integer of at least 1 (got 0)",
      "selectors.s.settings.cooldown: must be a non-negative number of seconds (got -1)"]),
    ("selector id clashes", NAMES + "selectors:\n  a: {strategy: pin, targets: [b]}\n"
     "  al: {strategy: pin, targets: [b]}\n  p/pm: {strategy: pin, targets: [b]}\n"
     "  ' ': {strategy: pin, targets: [b]}\n",
     ["selectors.a: the selector id is already the id of model 'a'",
      "selectors.al: the selector id is already an alias of model 'a'",
      "selectors.p/pm: the selector id is already the name of peer model 'p/pm'",
      "selectors[\" \"]: a selector id must not be empty"]),
    ("spillover across groups",
     NAMES + "groups:\n  g: {swap: false, members: [a]}\n  h: {swap: false, members: [b]}\n"
     + SEL + "    strategy: spillover\n    targets: [a, b]\n",
     ["selectors.s.targets: spillover targets must all be members of one group with swap: false"]),
    ("spillover in a swapping group", NAMES + "groups:\n  g: {members: [a, b]}\n" + SEL
     + "    strategy: spillover\n    targets: [a, b]\n",
     ["selectors.s.targets: spillover targets must all be members of one group with swap: false"]),
    ("spillover without groups", NAMES + SEL + "    strategy: spillover\n    targets: [a, b]\n",
     ["selectors.s.targets: spillover targets must all be members of one group with swap: false"]),
    ("spillover outside a matrix set", NAMES + "matrix: {sets: {one: 'a | b'}}\n" + SEL
     + "    strategy: spillover\n    targets: [a, b]\n",
     ["selectors.s.targets: spillover targets must all appear together in one set of the matrix"]),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in BAD], ids=[n for n, _, _ in BAD])
def test_mistakes(text, expected):
    assert sorted(errors_of(text)) == sorted(expected)


def test_every_mistake_is_reported_beside_a_broken_cmd():
    """A model whose cmd has an unterminated quote still claims its aliases: a clash with one of them,
    or of one of them with another model's id, is reported with the quote."""
    errors = errors_of("""\
        models:
          a:
            cmd: "srv 'open --port ${PORT}"
            aliases: [b, x]
            filters: {setParamsByID: {y: {temperature: 1}}}
          b:
            cmd: b ${PORT}
            ttl: soon
          c:
            cmd: c ${PORT}
            aliases: [x, y, a]
        """)
    assert errors == [
        "models.a.cmd: unterminated quote",
        "models.b.ttl: must be a non-negative integer (got 'soon')",
        "models.a.aliases[0]: alias 'b' already used by model 'b'",
        "models.c.aliases[0]: alias 'x' already used by model 'a'",
        "models.c.aliases[1]: alias 'y' already used by model 'a'",
        "models.c.aliases[2]: alias 'a' already used by model 'a'"]
