"""Tests for llamaswap.config: loading, validation, macros and command parsing (CFG-*, MAC-*, CMD-*)."""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaswap.config import (
    Config, ConfigError, GroupConfig, load_config, parse_config, parse_size, split_cmd)
from tests.test_matrix import EXAMPLE as MATRIX_EXAMPLE

DATA = Path(__file__).resolve().parent / "data"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _complete_example() -> str:
    """tests/data/complete.yaml: a config that uses most keys, with comments."""
    return (DATA / "complete.yaml").read_text(encoding="utf-8")


def parse(text: str, environ: dict | None = None) -> Config:
    return parse_config(textwrap.dedent(text), "f.yaml", environ or {})


def errors_of(text: str, environ: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, environ)
    return info.value.errors


# --------------------------------------------------------------------------------------------
# The complete example (tests/data/complete.yaml)


@pytest.fixture(scope="module")
def example() -> Config:
    return parse_config(_complete_example(), "example.yaml", {"LLAMASWAP_KEY": "sk-test"})


def test_example_ports(example):
    """MAC-5: ${PORT} goes to models in code-point order of id; rerank has none."""
    ports = {mid: m.port for mid, m in example.models.items()}
    assert ports == {"embed": 5800, "llama-8b": 5801, "qwen-7b": 5802, "whisper": 5803, "rerank": None}
    assert example.models["qwen-7b"].proxy == "http://localhost:5802"
    assert example.models["rerank"].proxy == "http://127.0.0.1:9100"


def test_example_models_in_file_order(example):
    """Config.models keeps the file order."""
    assert list(example.models) == ["qwen-7b", "llama-8b", "embed", "rerank", "whisper"]


def test_example_cmd_expansion(example):
    """Macros expand in cmd, comment lines are removed, argv is split."""
    qwen = example.models["qwen-7b"]
    assert qwen.argv == (
        "/opt/llama.cpp/bin/llama-server", "--host", "127.0.0.1", "--port", "5802", "-ngl", "99",
        "-m", "/models/qwen2.5-7b-instruct-q4_k_m.gguf", "-c", "16384")
    assert "#" not in qwen.cmd and "${" not in qwen.cmd
    whisper = example.models["whisper"]
    assert whisper.argv == ("docker", "run", "--rm", "--name", "whisper", "-p", "5803:8080",
                            "whisper-server:latest")
    assert whisper.cmd_stop_argv == ("docker", "stop", "whisper")
    assert whisper.unload_timeout == 30


def test_example_metadata_port_is_int(example):
    """MAC-4: a value that is exactly ${PORT} becomes the int."""
    assert example.models["qwen-7b"].metadata == {"family": "qwen", "port": 5802}
    assert type(example.models["qwen-7b"].metadata["port"]) is int


def test_example_aliases_and_filters(example):
    """setParamsByID keys are macro-expanded and become aliases (CFG-46)."""
    qwen = example.models["qwen-7b"]
    assert qwen.aliases == ("gpt-4o-mini", "qwen", "qwen-7b:creative")
    assert example.resolve("qwen-7b:creative") == "qwen-7b"
    assert example.resolve("qwen") == "qwen-7b"
    assert example.resolve("embed") == "embed"
    assert example.resolve("nope") is None
    assert qwen.strip_params == ("top_k", "mirostat")
    assert qwen.set_params == {"chat_template_kwargs.enable_thinking": False}
    assert qwen.set_params_by_id == {"qwen-7b:creative": {"temperature": 1.1}}
    assert qwen.ttl == 600 and qwen.name == "Qwen2.5 7B" and qwen.description == "general chat"


def test_example_other_fields(example):
    """Top-level values, groups, profiles, preload and later-phase keys."""
    assert example.api_keys == ("sk-test",)
    assert example.health_check_timeout == 120
    assert example.log_level == "info" and example.log_to_stdout == "proxy"
    assert example.max_wait == 30.0 and example.policy == "swap-aware"
    assert example.max_request_body == 2**30
    assert example.preload == ("embed",)
    assert example.profiles == {"coding": ("qwen-7b", "embed")}
    assert example.groups["helpers"] == GroupConfig("helpers", False, False, True, ("embed", "rerank"))
    assert example.group_of("llama-8b").id == "chat"
    assert example.group_of("whisper") == GroupConfig("(default)", True, True, False, ())
    llama = example.models["llama-8b"]
    assert llama.env == (("CUDA_VISIBLE_DEVICES", "0"),) and llama.env_dict() == {"CUDA_VISIBLE_DEVICES": "0"}
    assert llama.concurrency_limit == 4 and llama.use_model_name == "llama3.1"
    assert example.models["embed"].concurrency_limit == 10
    assert example.models["rerank"].unlisted is True
    assert example.warnings == ()
    assert example.later_keys == ()  # apiKeys, hooks, sendLoadingState: implemented


def test_example_missing_env_is_an_error():
    """MAC-7: the example needs LLAMASWAP_KEY."""
    with pytest.raises(ConfigError) as info:
        parse_config(_complete_example(), "example.yaml", {})
    assert len(info.value.errors) == 1
    assert info.value.errors[0].endswith(": environment variable 'LLAMASWAP_KEY' is not set")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_load_cleanly(path):
    """Every examples/*.yaml loads without errors or warnings."""
    config = load_config(str(path))
    assert config.models
    assert config.warnings == ()


# --------------------------------------------------------------------------------------------
# Bad configs: every problem is reported, with the exact text (CFG-3)

P = "cmd: srv --port ${PORT}"

BAD = [
    ("ttl string", f"models:\n  a:\n    {P}\n    ttl: '300'\n",
     ["models.a.ttl: must be a non-negative integer (got '300')"]),
    ("ttl float", f"models:\n  a:\n    {P}\n    ttl: 1.5\n",
     ["models.a.ttl: must be a non-negative integer (got 1.5)"]),
    ("ttl bool", f"models:\n  a:\n    {P}\n    ttl: true\n",
     ["models.a.ttl: must be a non-negative integer (got true)"]),
    ("ttl negative", f"models:\n  a:\n    {P}\n    ttl: -2\n",
     ["models.a.ttl: must be a non-negative integer (got -2)"]),
    ("globalTTL negative", "globalTTL: -1\n", ["globalTTL: must be a non-negative integer (got -1)"]),
    ("healthCheckTimeout string", "healthCheckTimeout: soon\n",
     ["healthCheckTimeout: must be a non-negative integer (got 'soon')"]),
    ("concurrencyLimit", f"models:\n  a:\n    {P}\n    concurrencyLimit: 2.0\n",
     ["models.a.concurrencyLimit: must be a non-negative integer (got 2.0)"]),
    ("unloadTimeout", f"unloadTimeout: x\nmodels:\n  a:\n    {P}\n    unloadTimeout: -3\n",
     ["unloadTimeout: must be a non-negative integer (got 'x')",
      "models.a.unloadTimeout: must be a non-negative integer (got -3)"]),
    ("name mapping", f"models:\n  a:\n    {P}\n    name: {{x: 1}}\n",
     ["models.a.name: must be a string (got a mapping)"]),
    ("useModelName list", f"models:\n  a:\n    {P}\n    useModelName: [x]\n",
     ["models.a.useModelName: must be a string (got a list)"]),
    ("cmd list", "models:\n  a:\n    cmd: [x, y]\n", ["models.a.cmd: must be a string (got a list)"]),
    ("unlisted", f"models:\n  a:\n    {P}\n    unlisted: maybe\n",
     ["models.a.unlisted: must be a boolean (got 'maybe')"]),
    ("includeAliasesInList", "includeAliasesInList: 1\n", ["includeAliasesInList: must be a boolean (got 1)"]),
    ("group swap", f"models:\n  a:\n    {P}\ngroups:\n  g: {{swap: 0, members: [a]}}\n",
     ["groups.g.swap: must be a boolean (got 0)"]),
    ("models list", "models: [a, b]\n", ["models: must be a mapping (got a list)"]),
    ("model scalar", "models:\n  a: srv\n", ["models.a: must be a mapping (got 'srv')"]),
    ("metadata list", f"models:\n  a:\n    {P}\n    metadata: [1]\n",
     ["models.a.metadata: must be a mapping (got a list)"]),
    ("macros list", "macros: [a]\n", ["macros: must be a mapping (got a list)"]),
    ("aliases string", f"models:\n  a:\n    {P}\n    aliases: b\n",
     ["models.a.aliases: must be a list of strings (got 'b')"]),
    ("apiKeys string", "apiKeys: k\n", ["apiKeys: must be a list of strings"]),
    ("apiKeys blank", "apiKeys: [good, 'has space', '']\n",
     ["apiKeys[1]: must be non-empty and contain no whitespace",
      "apiKeys[2]: must be non-empty and contain no whitespace"]),
    ("env list of maps", f"models:\n  a:\n    {P}\n    env: [{{A: 1}}]\n",
     ["models.a.env[0]: must be a string (got a mapping)"]),
    ("env without =", f"models:\n  a:\n    {P}\n    env: [A, =b]\n",
     ["models.a.env[0]: must be KEY=VALUE with a non-empty KEY",
      "models.a.env[1]: must be KEY=VALUE with a non-empty KEY"]),
    ("model in two groups", f"models:\n  a:\n    {P}\ngroups:\n  g: {{members: [a]}}\n  h: {{members: [a]}}\n",
     ["groups.h.members[0]: model 'a' is already in group 'g'"]),
    ("profile unknown", f"models:\n  a:\n    {P}\nprofiles:\n  p: [a, zz]\n",
     ["profiles.p[1]: unknown model 'zz'"]),
    ("profile name with colon", f"models:\n  a:\n    {P}\nprofiles:\n  'x:y': [a]\n",
     ["profiles.x:y: a profile name must be non-empty and must not contain ':'"]),
    ("alias used twice", f"models:\n  a:\n    {P}\n    aliases: [x]\n  b:\n    {P}\n    aliases: [x]\n",
     ["models.b.aliases[0]: alias 'x' already used by model 'a'"]),
    ("alias equals id", f"models:\n  a:\n    {P}\n  b:\n    {P}\n    aliases: [a]\n",
     ["models.b.aliases[0]: alias 'a' already used by model 'a'"]),
    ("setParamsByID alias clash",
     f"models:\n  a:\n    {P}\n    aliases: [x]\n  b:\n    {P}\n    filters:\n      setParamsByID:\n"
     "        x: {temperature: 1}\n",
     ["models.b.filters.setParamsByID.x: alias 'x' already used by model 'a'"]),
    ("proxy uses PORT", "models:\n  a:\n    cmd: srv --port 9000\n",
     ["models.a.proxy: proxy uses ${PORT} but cmd does not"]),
    ("explicit proxy uses PORT", "models:\n  a:\n    cmd: srv\n    proxy: http://h:${PORT}/v1\n",
     ["models.a.proxy: proxy uses ${PORT} but cmd does not"]),
    ("bad proxy url", f"models:\n  a:\n    {P}\n    proxy: ftp://h\n",
     ["models.a.proxy: must be an http or https URL with a host (got 'ftp://h')"]),
    ("unknown macro", "models:\n  a:\n    cmd: srv ${nope} --port ${PORT}\n",
     ["models.a.cmd: unknown macro '${nope}'"]),
    ("unknown macro in metadata", f"models:\n  a:\n    {P}\n    metadata:\n      x: [1, '${{y}}']\n",
     ["models.a.metadata.x[1]: unknown macro '${y}'"]),
    ("forward macro reference", "macros:\n  a: ${b}\n  b: x\nmodels:\n  m:\n    cmd: ${a} ${PORT}\n",
     ["models.m.cmd: unknown macro '${b}'"]),
    ("macro refers to itself", "macros:\n  a: x${a}\n",
     ["macros.a: value refers to itself"]),
    ("model macro refers to itself", f"models:\n  m:\n    {P}\n    macros:\n      b: '${{b}}'\n",
     ["models.m.macros.b: value refers to itself"]),
    ("reserved macro", "macros:\n  PORT: 1\n", ["macros.PORT: 'PORT' is a reserved macro name"]),
    ("macro not scalar", "macros:\n  a: [1]\n",
     ["macros.a: must be a scalar (string, number or boolean) (got a list)"]),
    ("PID outside cmdStop", "models:\n  a:\n    cmd: srv ${PID} ${PORT}\n",
     ["models.a.cmd: '${PID}' is only allowed in cmdStop"]),
    ("PORT in env without cmd port", "models:\n  a:\n    cmd: srv\n    proxy: http://h:1\n    env:\n      - P=${PORT}\n",
     ["models.a.env[0]: unknown macro '${PORT}'"]),
    ("unterminated quote", "models:\n  a:\n    cmd: srv --port ${PORT} 'open\n",
     ["models.a.cmd: unterminated quote"]),
    ("empty cmd", "models:\n  a:\n    cmd: |\n      # only a comment\n    proxy: http://h:1\n",
     ["models.a.cmd: must not be empty"]),
    ("missing cmd", "models:\n  a:\n    proxy: http://h:1\n", ["models.a.cmd: is required"]),
    ("duplicate key", f"models:\n  a:\n    {P}\n    ttl: 1\n    ttl: 2\n",
     ["models.a: duplicate key 'ttl' (line 5)"]),
    ("duplicate top key", "logLevel: info\nlogLevel: debug\n", ["f.yaml: duplicate key 'logLevel' (line 2)"]),
    ("duplicate model", f"models:\n  a:\n    {P}\n  a:\n    {P}\n", ["models: duplicate key 'a' (line 4)"]),
    ("yaml syntax", "models:\n  a: [1, 2\n", ["f.yaml:3:1: expected ',' or ']', but got '<stream end>'"]),
    ("yaml bad indentation", "a: 1\n b: 2\n", ["f.yaml:2:3: mapping values are not allowed here"]),
    ("not a mapping", "- a\n- b\n", ["f.yaml: the top level must be a mapping"]),
    ("logToStdout", "logToStdout: all\n", ["logToStdout: must be one of proxy, upstream, both, none (got 'all')"]),
    ("policy", "scheduler:\n  policy: lifo\n", ["scheduler.policy: must be 'swap-aware' or 'fifo' (got 'lifo')"]),
    ("maxWait", "scheduler:\n  maxWait: -1\n", ["scheduler.maxWait: must be a non-negative number (got -1)"]),
    ("startPort", "startPort: 70000\n", ["startPort: must be an integer from 1 to 65535 (got 70000)"]),
    ("maxRequestBody", "maxRequestBody: lots\n",
     ["maxRequestBody: must be a size (an integer number of bytes, or a string like '12GiB') (got 'lots')"]),
    ("both strip spellings", f"models:\n  a:\n    {P}\n    filters:\n      stripParams: a\n      strip_params: b\n",
     ["models.a.filters.strip_params: cannot be used together with stripParams"]),
    ("quoted key in path", "models:\n  qwen2.5:\n    cmd: srv ${PORT}\n    ttl: x\n",
     ['models["qwen2.5"].ttl: must be a non-negative integer (got \'x\')']),
    ("key with space in path", "models:\n  'my model':\n    cmd: srv ${PORT}\n    ttl: x\n",
     ['models["my model"].ttl: must be a non-negative integer (got \'x\')']),
    ("peer without proxy", "peers:\n  p:\n    models: [m]\n", ["peers.p.proxy: is required"]),
    ("memory bigger than budget", f"memory: {{budget: 1GiB}}\nmodels:\n  a:\n    {P}\n    memory: 2GiB\n",
     ["models.a.memory: must not exceed memory.budget '1GiB' (got '2GiB')"]),
    ("several at once",
     "globalTTL: x\nlogToStdout: loud\nmodels:\n  a:\n    cmd: srv ${PORT}\n    ttl: '5'\n    unlisted: 3\n"
     "  b:\n    cmd: run\n  c:\n    cmd: c ${PORT}\n    aliases: [a]\ngroups:\n  g: {members: [zz]}\n",
     ["globalTTL: must be a non-negative integer (got 'x')",
      "logToStdout: must be one of proxy, upstream, both, none (got 'loud')",
      "models.a.ttl: must be a non-negative integer (got '5')",
      "models.a.unlisted: must be a boolean (got 3)",
      "models.b.proxy: proxy uses ${PORT} but cmd does not",
      "models.c.aliases[0]: alias 'a' already used by model 'a'"]),
    ("an alias clash beside a broken cmd",
     "models:\n  a:\n    cmd: \"srv 'open --port ${PORT}\"\n    aliases: [b, x]\n  b:\n    cmd: b ${PORT}\n"
     "  c:\n    cmd: c ${PORT}\n    aliases: [x]\n",
     ["models.a.cmd: unterminated quote",
      "models.a.aliases[0]: alias 'b' already used by model 'b'",
      "models.c.aliases[0]: alias 'x' already used by model 'a'"]),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in BAD], ids=[n for n, _, _ in BAD])
def test_bad_config_errors(text, expected):
    """CFG-3: every problem is reported, each exactly as `<path>: <message>`."""
    assert sorted(errors_of(text)) == sorted(expected)


def test_error_message_lists_every_line():
    """ConfigError's text is its error lines, one per line."""
    with pytest.raises(ConfigError) as info:
        parse("globalTTL: x\nstartPort: 0\n")
    assert str(info.value).splitlines() == info.value.errors


def test_load_config_unreadable(tmp_path):
    """An unreadable file is a ConfigError naming the path."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(str(missing))
    assert info.value.errors[0].startswith(f"{missing}: cannot read config: ")


def test_load_config_reports_file_name_in_syntax_errors(tmp_path):
    """YAML syntax errors read <file>:<line>:<column>: <message>."""
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  a: {\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert re.match(rf"{re.escape(str(path))}:\d+:\d+: ", info.value.errors[0])


# --------------------------------------------------------------------------------------------
# Warnings (CFG-4 and friends)

WARN = [
    ("unknown model key", f"models:\n  a:\n    {P}\n    foo: 1\n",
     ["config: unknown key 'models.a.foo' (ignored)"]),
    ("unknown top key", "colour: red\n", ["config: unknown key 'colour' (ignored)"]),
    ("unknown filter key", f"models:\n  a:\n    {P}\n    filters: {{x: 1}}\n",
     ["config: unknown key 'models.a.filters.x' (ignored)"]),
    ("unsupported top key", "logRequests: true\nui: {}\n",
     ["config: llama-swap key 'logRequests' is not supported by llamaswap (ignored)"]),
    ("unsupported model key", f"models:\n  a:\n    {P}\n    timeouts: {{}}\n    healthCheckTimeout: 5\n",
     ["config: llama-swap key 'models.a.healthCheckTimeout' is not supported by llamaswap (ignored)"]),
    ("group unknown member", f"models:\n  a:\n    {P}\n    aliases: [al]\ngroups:\n  g:\n    members: [a, b, al]\n",
     ["config: 'groups.g.members[1]' names unknown model 'b' (ignored)",
      "config: 'groups.g.members[2]' names unknown model 'al' (ignored)"]),
    ("healthCheckTimeout low", "healthCheckTimeout: 5\n", ["config: healthCheckTimeout 5 is below 15; using 15"]),
    ("bad logLevel", "logLevel: LOUD\n",
     ["config: logLevel 'LOUD' is not one of debug, info, warn, error; using info"]),
    ("strip model", f"models:\n  a:\n    {P}\n    filters: {{stripParams: 'model, top_k'}}\n",
     ["config: 'models.a.filters.stripParams' cannot strip the protected key 'model' (ignored)"]),
    ("set model", f"models:\n  a:\n    {P}\n    filters: {{setParams: {{model: x}}}}\n",
     ["config: 'models.a.filters.setParams.model' cannot set the protected key 'model' (ignored)"]),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in WARN], ids=[n for n, _, _ in WARN])
def test_warnings(text, expected):
    """CFG-4: unknown and unsupported keys warn; the config still loads."""
    assert list(parse(text).warnings) == expected


SUGGEST = [
    ("model key typo", f"models:\n  a:\n    {P}\n    ttll: 5\n",
     "config: unknown key 'models.a.ttll' (ignored); did you mean 'ttl'?"),
    ("case only", f"models:\n  a:\n    {P}\n    cmdstop: x\n",
     "config: unknown key 'models.a.cmdstop' (ignored); did you mean 'cmdStop'?"),
    ("top key typo", "healthcheckTimeout: 30\n",
     "config: unknown key 'healthcheckTimeout' (ignored); did you mean 'healthCheckTimeout'?"),
    ("nested typo", "scheduler: {maxwait: 3}\n",
     "config: unknown key 'scheduler.maxwait' (ignored); did you mean 'maxWait'?"),
    ("filter typo", f"models:\n  a:\n    {P}\n    filters: {{setParam: {{}}}}\n",
     "config: unknown key 'models.a.filters.setParam' (ignored); did you mean 'setParams'?"),
    ("group typo", f"models:\n  a:\n    {P}\ngroups:\n  g: {{member: [a]}}\n",
     "config: unknown key 'groups.g.member' (ignored); did you mean 'members'?"),
    ("peer typo", "peers:\n  p: {proxy: 'https://x.example', models: [m], apikey: k}\n",
     "config: unknown key 'peers.p.apikey' (ignored); did you mean 'apiKey'?"),
    ("model key at top level", "ttl: 5\n",
     "config: unknown key 'ttl' (ignored); 'ttl' belongs under 'models.<id>'"),
    ("top key in a model", f"models:\n  a:\n    {P}\n    globalTTL: 5\n",
     "config: unknown key 'models.a.globalTTL' (ignored); 'globalTTL' belongs under the top level"),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in SUGGEST], ids=[n for n, _, _ in SUGGEST])
def test_unknown_key_suggestions(text, expected):
    """An unknown key close to a valid one (or valid elsewhere) says so; the config still loads."""
    assert list(parse(text).warnings) == [expected]


def test_error_values_are_shortened():
    """The offending value is shown repr-like, escaped, and cut to about 40 characters."""
    errors = errors_of(f"models:\n  a:\n    {P}\n    ttl: '{'x' * 100}'\n    unlisted: \"a\\nb\"\n"
                       "    useModelName: {k: v}\n    concurrencyLimit: 1.0e+3\n")
    assert sorted(errors) == [
        "models.a.concurrencyLimit: must be a non-negative integer (got 1.0e+3)",
        "models.a.ttl: must be a non-negative integer (got '" + "x" * 37 + "\u2026')",
        "models.a.unlisted: must be a boolean (got 'a\\nb')",
        "models.a.useModelName: must be a string (got a mapping)"]


def test_error_values_of_secrets_are_not_shown():
    """apiKeys, env and a peer's apiKey are never echoed (only 'a mapping', 'a list' or null)."""
    errors = errors_of(f"apiKeys: sk-top-secret\nmodels:\n  a:\n    {P}\n    env: TOKEN=hunter2\n"
                       "peers:\n  p: {proxy: 'https://x.example', models: [m], apiKey: 42}\n")
    assert sorted(errors) == ["apiKeys: must be a list of strings", "models.a.env: must be a list of strings"]
    errors = errors_of(f"apiKeys: [sk-1, {{a: 1}}, ~, 'has space']\nmodels:\n  a:\n    {P}\n    env: [X, 7]\n")
    assert sorted(errors) == [
        "apiKeys[1].key: is required", "apiKeys[2]: must be a string or a mapping (got null)",
        "apiKeys[3]: must be non-empty and contain no whitespace",
        "models.a.env[0]: must be KEY=VALUE with a non-empty KEY",
        "models.a.env[1]: must be KEY=VALUE with a non-empty KEY"]
    assert not any("sk-" in e or "hunter2" in e or "has space" in e for e in errors)


def test_warning_effects():
    """Low healthCheckTimeout is raised, bad logLevel becomes info, model is protected."""
    c = parse(f"""\
        healthCheckTimeout: 3
        logLevel: WARN
        models:
          a:
            {P}
            filters:
              stripParams: "model, top_k ,, min_p"
              setParams: {{model: x, temperature: 0.5}}
        """)
    assert c.health_check_timeout == 15 and c.log_level == "warn"
    assert c.models["a"].strip_params == ("top_k", "min_p")
    assert c.models["a"].set_params == {"temperature": 0.5}
    assert parse("logLevel: chatty\n").log_level == "info"


def test_empty_and_comment_only_files_are_valid():
    """CFG-1: an empty file (or only comments) is a config with no models."""
    for text in ("", "# nothing here\n", "\n\n"):
        c = parse(text)
        assert c.models == {} and c.warnings == () and c.start_port == 5800


def test_later_keys():
    """Later-phase keys present in the file are listed for the daemon's WARN."""
    c = parse(f"""\
        apiKeys: []
        sendLoadingState: true
        memory: {{budget: 10GiB}}
        peers:
          p: {{proxy: "https://x.example/api", models: [m1]}}
        routing:
          scheduler: {{settings: {{fifo: {{priority: {{a: 1}}}}}}}}
        models:
          a:
            {P}
            sendLoadingState: false
            memory: 1GiB
        """)
    # peers, sendLoadingState, memory and fifo priorities: all implemented now
    assert c.later_keys == ()
    assert c.scheduler_priority == {"a": 1}
    assert c.memory_budget == 10 * 2**30 and c.models["a"].memory == 2**30
    assert c.peers["p"].proxy == "https://x.example/api" and c.peers["p"].models == ("m1",)
    assert c.send_loading_state is True and c.models["a"].send_loading_state is False


# --------------------------------------------------------------------------------------------
# Memory (memory.*, models.<id>.memory)


def test_memory_defaults():
    """No memory section: accounting off, 1GiB overhead, the cost policy, no declared needs."""
    c = parse(f"models:\n  a:\n    {P}\n")
    assert (c.memory_budget, c.memory_overhead, c.memory_policy) == (None, 2**30, "cost")
    assert c.models["a"].memory is None


@pytest.mark.parametrize("text,value", [("24GiB", 24 * 2**30), ("512MB", 512 * 10**6), ("1073741824", 2**30),
                                        ("'2 gib'", 2 * 2**30), ("0", 0)])
def test_memory_sizes(text, value):
    """Sizes with a unit (powers of 1000 or 1024, any case) or plain bytes, for every memory key."""
    c = parse(f"memory:\n  budget: {text}\n  overhead: {text}\nmodels:\n  a:\n    {P}\n    memory: {text}\n")
    assert c.memory_budget == c.memory_overhead == c.models["a"].memory == value


@pytest.mark.parametrize("policy", ["cost", "lru"])
def test_memory_policy(policy):
    assert parse(f"memory: {{policy: {policy}}}\n").memory_policy == policy


def test_memory_without_budget_or_within_it():
    """A declared memory is fine without a budget, and up to the budget itself."""
    c = parse(f"models:\n  a:\n    {P}\n    memory: 64GiB\n")
    assert c.memory_budget is None and c.models["a"].memory == 64 * 2**30
    c = parse(f"memory: {{budget: 8GiB}}\nmodels:\n  a:\n    {P}\n    memory: 8192MiB\n")
    assert c.models["a"].memory == c.memory_budget == 8 * 2**30
    assert c.warnings == () and c.later_keys == ()


SIZE = "must be a size (an integer number of bytes, or a string like '12GiB')"

MEMORY_BAD = [
    ("budget", "memory: {budget: lots}\n", [f"memory.budget: {SIZE} (got 'lots')"]),
    ("budget negative", "memory: {budget: -1}\n", [f"memory.budget: {SIZE} (got -1)"]),
    ("budget float", "memory: {budget: 1.5}\n", [f"memory.budget: {SIZE} (got 1.5)"]),
    ("overhead", "memory: {overhead: 1XB}\n", [f"memory.overhead: {SIZE} (got '1XB')"]),
    ("policy", "memory: {policy: fifo}\n", ["memory.policy: must be 'cost' or 'lru' (got 'fifo')"]),
    ("policy case", "memory: {policy: LRU}\n", ["memory.policy: must be 'cost' or 'lru' (got 'LRU')"]),
    ("section", "memory: 48GiB\n", ["memory: must be a mapping (got '48GiB')"]),
    ("model memory", f"models:\n  a:\n    {P}\n    memory: [1]\n", [f"models.a.memory: {SIZE} (got a list)"]),
    ("model above budget in bytes", f"memory: {{budget: 1000}}\nmodels:\n  a:\n    {P}\n    memory: 1001\n"
     f"  b:\n    cmd: b ${{PORT}}\n    memory: 1KiB\n",
     ["models.a.memory: must not exceed memory.budget 1000 (got 1001)",
      "models.b.memory: must not exceed memory.budget 1000 (got '1KiB')"]),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in MEMORY_BAD], ids=[n for n, _, _ in MEMORY_BAD])
def test_memory_errors(text, expected):
    assert sorted(errors_of(text)) == sorted(expected)


# --------------------------------------------------------------------------------------------
# Routing (llama-swap's routing.router and routing.scheduler)

MODELS = f"models:\n  a:\n    {P}\n    aliases: [al]\n  b:\n    cmd: b ${{PORT}}\n  c:\n    cmd: c ${{PORT}}\n"
GROUPS = "  g1: {swap: false, members: [a, b]}\n  g2: {persistent: true, members: [c]}\n"


def routed(body: str) -> str:
    """``body`` (YAML under ``routing.router.settings``) after MODELS."""
    return MODELS + "routing:\n  router:\n    settings:\n" + textwrap.indent(body, "      ")


def test_routing_groups_equal_top_level_groups():
    """routing.router.settings.groups gives exactly the Config.groups the top-level groups give."""
    top = parse(MODELS + "groups:\n" + GROUPS)
    for use in ("", "    use: group\n", "    use: ''\n"):
        new = parse(MODELS + "routing:\n  router:\n" + use + "    settings:\n      groups:\n"
                    + textwrap.indent(GROUPS, "      "))
        assert new.groups == top.groups and new.router_use == top.router_use == "group"
        assert new.matrix is None and new.warnings == ()
    assert top.groups["g1"] == GroupConfig("g1", False, True, False, ("a", "b"))
    assert parse(routed("groups:\n" + GROUPS)).group_of("c") == top.group_of("c") == top.groups["g2"]


def test_routing_defaults():
    """No routing section: the group router, no matrix, no priorities."""
    c = parse(MODELS)
    assert (c.router_use, c.matrix, c.scheduler_priority, c.groups) == ("group", None, {}, {})
    c = parse(MODELS + "routing: {router: {use: group}, scheduler: {use: fifo}}\n")
    assert (c.router_use, c.matrix, c.scheduler_priority, c.warnings) == ("group", None, {}, ())


def test_routing_matrix():
    """use: matrix compiles settings.matrix onto Config.matrix; its groups are checked but not used."""
    c = parse(MODELS + "routing:\n  router:\n    use: matrix\n    settings:\n"
              "      groups: {g: {members: [a]}}\n"
              "      matrix:\n        vars: {x: a}\n        evict_costs: {x: 5}\n"
              "        sets: {pair: 'x & b', solo: c}\n")
    assert c.router_use == "matrix" and c.groups == {} and c.warnings == ()
    assert [s.name for s in c.matrix.sets] == ["pair", "solo"] and c.matrix.evict_cost("a") == 5
    assert c.matrix.solve("b", ["a"]) == frozenset() and c.matrix.solve("c", ["a", "b"]) == {"a", "b"}
    assert c.group_of("a").id == "(default)"


def test_top_level_matrix():
    """llama-swap's older top-level matrix: the same keys, and it turns the matrix on."""
    c = parse(MODELS + "matrix:\n  sets: {pair: 'a & b'}\n")
    assert c.router_use == "matrix" and c.groups == {} and c.warnings == ()
    assert c.matrix.solve("b", ["a"]) == frozenset()


def test_inactive_router_settings_are_not_checked():
    """As in llama-swap, only the router in use is checked: the other's settings may name any model;
    only their unknown keys warn."""
    c = parse(routed("groups: {g: {members: [a]}}\nmatrix: {sets: {s: 'a & zz'}, var: {}}\n"))
    assert c.router_use == "group" and c.matrix is None and list(c.groups) == ["g"]
    assert c.warnings == ("config: unknown key 'routing.router.settings.matrix.var' (ignored); "
                          "did you mean 'vars'?",)
    c = parse(routed("groups: {g: {swap: 2, members: [a, a], wap: 1}}\nmatrix: {sets: {s: 'a & c'}}\n")
              .replace("  router:\n", "  router:\n    use: matrix\n"))
    assert c.router_use == "matrix" and c.groups == {} and c.matrix.solve("c", ["a"]) == frozenset()
    assert c.warnings == ("config: unknown key 'routing.router.settings.groups.g.wap' (ignored); "
                          "did you mean 'swap'?",)
    assert errors_of(routed("matrix: {sets: {s: 'a & zz'}}\n").replace("  router:\n", "  router:\n    use: matrix\n")) \
        == ["routing.router.settings.matrix.sets.s: unknown var or model 'zz' at position 4"]


ROUTING_BAD = [
    ("use matrix without settings", MODELS + "routing: {router: {use: matrix}}\n",
     ["routing.router.settings.matrix: is required when routing.router.use is 'matrix'"]),
    ("use matrix with groups only", routed("groups: {g: {members: [a]}}\n").replace(
        "  router:\n", "  router:\n    use: matrix\n"),
     ["routing.router.settings.matrix: is required when routing.router.use is 'matrix'"]),
    ("unknown router", MODELS + "routing: {router: {use: matrix2}}\n",
     ["routing.router.use: must be 'group' or 'matrix' (got 'matrix2')"]),
    ("router use list", MODELS + "routing: {router: {use: [group]}}\n",
     ["routing.router.use: must be a string (got a list)"]),
    ("routing scalar", MODELS + "routing: fifo\n", ["routing: must be a mapping (got 'fifo')"]),
    ("settings list", MODELS + "routing: {router: {settings: [groups]}}\n",
     ["routing.router.settings: must be a mapping (got a list)"]),
    ("top-level groups and matrix", MODELS + "groups: {g: {members: [a]}}\nmatrix: {sets: {s: a}}\n",
     ["matrix: cannot be used together with groups"]),
    ("top-level groups and routing.router", MODELS + "groups:\n" + GROUPS + "routing: {router: {use: group}}\n",
     ["groups: cannot be used together with routing.router (move it to routing.router.settings.groups)"]),
    ("top-level matrix and routing groups", routed("groups: {g: {members: [a]}}\n") + "matrix: {sets: {s: a}}\n",
     ["matrix: cannot be used together with routing.router (move it to routing.router.settings.matrix)"]),
    ("both legacy keys and routing.router",
     MODELS + "groups: {g: {members: [a]}}\nmatrix: {sets: {s: a}}\nrouting: {router: {use: matrix}}\n",
     ["groups: cannot be used together with routing.router (move it to routing.router.settings.groups)",
      "matrix: cannot be used together with routing.router (move it to routing.router.settings.matrix)"]),
    ("routing group errors name their path", routed("groups:\n  g: {swap: 2, members: [a, b, b]}\n"
                                                    "  h: {members: [a]}\n"),
     ["routing.router.settings.groups.g.swap: must be a boolean (got 2)",
      "routing.router.settings.groups.g.members[2]: model 'b' is listed twice",
      "routing.router.settings.groups.h.members[0]: model 'a' is already in group 'g'"]),
    ("matrix errors name their path", routed(
        "matrix:\n  vars: {x: al, 'bad name': a}\n  evict_costs: {b: 0, zz: 1}\n"
        "  sets: {s: 'a & (b', t: '+nope', u: '+v', v: '+u'}\n").replace("  router:\n", "  router:\n    use: matrix\n"),
     ["routing.router.settings.matrix.vars.x: unknown model 'al'",
      "routing.router.settings.matrix.vars[\"bad name\"]: a var name must be 1-32 letters, digits, '-' or '.'",
      "routing.router.settings.matrix.evict_costs.b: must be a positive integer (got 0)",
      "routing.router.settings.matrix.evict_costs.zz: unknown var or model 'zz'",
      "routing.router.settings.matrix.sets.s: missing closing parenthesis for '(' at position 4",
      "routing.router.settings.matrix.sets.t: reference to undefined set 'nope' at position 0",
      "routing.router.settings.matrix.sets.u: circular reference u -> v -> u"]),
    ("matrix without sets", routed("matrix: {vars: {x: a}}\n").replace("  router:\n", "  router:\n    use: matrix\n"),
     ["routing.router.settings.matrix.sets: must define at least one set"]),
    ("matrix not a mapping", routed("matrix: [a]\n"),
     ["routing.router.settings.matrix: must be a mapping (got a list)"]),
    ("top-level matrix errors", MODELS + "matrix:\n  sets: {s: 'a & zz'}\n",
     ["matrix.sets.s: unknown var or model 'zz' at position 4"]),
    ("unknown scheduler", MODELS + "routing: {scheduler: {use: lifo}}\n",
     ["routing.scheduler.use: must be 'fifo' (got 'lifo')"]),
    ("priorities", MODELS + "routing:\n  scheduler:\n    settings:\n      fifo:\n        priority:\n"
     "          a: 1\n          al: 2\n          zz: 3\n          b: '4'\n          c: 1.5\n",
     ["routing.scheduler.settings.fifo.priority.al: model 'a' already has a priority (as 'a')",
      "routing.scheduler.settings.fifo.priority.b: must be an integer (got '4')",
      "routing.scheduler.settings.fifo.priority.c: must be an integer (got 1.5)"]),
    ("priority not a mapping", MODELS + "routing: {scheduler: {settings: {fifo: {priority: [a]}}}}\n",
     ["routing.scheduler.settings.fifo.priority: must be a mapping (got a list)"]),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in ROUTING_BAD], ids=[n for n, _, _ in ROUTING_BAD])
def test_routing_errors(text, expected):
    """llama-swap's load.go checks, as `<path>: <message>` lines."""
    assert sorted(errors_of(text)) == sorted(expected)


def test_scheduler_priority():
    """Priorities are keyed by model id (aliases resolved); any integer; unlisted models are absent (0)."""
    c = parse(MODELS + "routing:\n  scheduler:\n    use: fifo\n    settings:\n      fifo:\n"
              "        priority: {al: 10, b: -3}\n")
    assert c.scheduler_priority == {"a": 10, "b": -3}
    assert c.later_keys == () and c.warnings == ()


def test_routing_unknown_keys_warn():
    """Every level of routing warns about keys it does not know; a matrix too."""
    c = parse(MODELS + "routing:\n  zz: 1\n  router:\n    Use: group\n    settings:\n      group: {}\n"
              "      matrix: {sets: {s: a}, var: {}}\n  scheduler:\n    settings:\n      lifo: {}\n"
              "      fifo: {priorities: {}}\n")
    assert sorted(c.warnings) == sorted([
        "config: unknown key 'routing.zz' (ignored)",
        "config: unknown key 'routing.router.Use' (ignored); did you mean 'use'?",
        "config: unknown key 'routing.router.settings.group' (ignored); did you mean 'groups'?",
        "config: unknown key 'routing.router.settings.matrix.var' (ignored); did you mean 'vars'?",
        "config: unknown key 'routing.scheduler.settings.lifo' (ignored); did you mean 'fifo'?",
        "config: unknown key 'routing.scheduler.settings.fifo.priorities' (ignored); did you mean 'priority'?"])


# The routing block of llama-swap's config.example.yaml at the HEAD of github.com/mostlygeek/llama-swap,
# copied unchanged (llama-swap is MIT-licensed, Copyright (c) 2024 Benson Wong). Its matrix settings
# are tests/test_matrix.py's EXAMPLE (the same text, dedented there), indented back into place.
LLAMA_SWAP_ROUTING = r"""
# routing:
# Controls how llama-swap decides which models can run at the same time and
# which get swapped out. Choose one of two swap engines:
#
# - group:  the default engine. Simpler to configure. You define groups of
#           models that run together, and loading one group typically unloads
#           the others.
#
# - matrix: the newer engine. More involved to configure, but far more
#           flexible. It uses a small expression language to describe which
#           model combinations are allowed to run concurrently, enabling
#           setups that groups cannot express.
#
# The routing section is optional.
routing:
  router:
    # use: a string defining which engine to use
    # - optional, default: "group"
    # - valid values: group, matrix
    use: group

    # settings: a dictionary of settings for the specific engines
    settings:
      # groups: a dictionary of named groups
      # - optional, default: empty dictionary
      # - lets you keep some models loaded while others swap out
      # - every member must be a model ID defined in the models section
      # - a model can belong to only one group
      # - behaviour is set per group with the `swap`, `exclusive` and
      #   `persistent` fields
      # - see issue #109 for details
      #
      # NOTE: the model names below are illustrative and are not defined above.
      groups:
        # group1 reproduces llama-swap's default behaviour: only one model
        # runs at a time across the entire instance.
        "group1":
          # swap: how members of this group swap among themselves
          # - optional, default: true
          # - true:  only one member runs at a time
          # - false: all members can run together, no swapping
          swap: true

          # exclusive: how this group affects other groups
          # - optional, default: true
          # - true:  running a member unloads every other group
          # - false: running a member leaves other groups untouched
          exclusive: true

          # members: the model IDs in this group
          # required
          members:
            - "llama"
            - "qwen-unlisted"

        # group2: members all run together, but loading any other group
        # unloads them.
        "group2":
          # swap: false lets all members stay loaded at once
          swap: false

          # exclusive: false means requesting a member loads it without
          # unloading any other group
          exclusive: false
          members:
            - "docker-llama"
            - "modelA"
            - "modelB"

        # forever: a persistent group that other groups can never unload.
        "forever":
          # persistent: other groups cannot unload this group's members
          # - optional, default: false
          # - has no effect on swapping within the group
          persistent: true

          # swap/exclusive: false keeps all members loaded and avoids
          # unloading other groups
          swap: false
          exclusive: false
          members:
            - "forever-modelA"
            - "forever-modelB"
            - "forever-modelc"

""" + textwrap.indent(MATRIX_EXAMPLE, " " * 6) + r"""
  # scheduler: how queued requests are ordered.
  # The default and only valid scheduler is "fifo"
  scheduler:
    use: fifo
    settings:
      fifo:
        # priority: a dictionary of model ID -> priority
        # - optional, default: empty dictionary
        # - models default to priority 0
        # - higher priority requests are serviced first in the queue
        priority:
          A: 10
          B: 5
          C: 5
          D: 1
"""

#: the models its block names (it says they are illustrative; llama-swap checks them against models)
LLAMA_SWAP_ROUTING_MODELS = [
    "llama", "qwen-unlisted", "docker-llama", "modelA", "modelB", "forever-modelA", "forever-modelB",
    "forever-modelc", "gemma-model", "qwen-model", "mistral-model", "voxtral-model", "reranker-model",
    "stable-diffusion", "llama-70B", "A", "B", "C", "D"]


def _llama_swap_routing(use: str = "group") -> Config:
    models = "".join(f"  {m}:\n    cmd: srv --port ${{PORT}}\n" for m in LLAMA_SWAP_ROUTING_MODELS)
    block = LLAMA_SWAP_ROUTING.replace("    use: group\n", f"    use: {use}\n", 1)
    return parse_config("models:\n" + models + block, "llama-swap.yaml", {})


def test_llama_swap_example_routing_block():
    """llama-swap's example routing block loads with no warning: its groups, scheduler and priorities."""
    c = _llama_swap_routing()
    assert c.warnings == () and c.router_use == "group" and c.matrix is None
    assert c.later_keys == ()
    assert c.groups == {
        "group1": GroupConfig("group1", True, True, False, ("llama", "qwen-unlisted")),
        "group2": GroupConfig("group2", False, False, False, ("docker-llama", "modelA", "modelB")),
        "forever": GroupConfig("forever", False, False, True,
                               ("forever-modelA", "forever-modelB", "forever-modelc"))}
    assert c.scheduler_priority == {"A": 10, "B": 5, "C": 5, "D": 1}


def test_llama_swap_example_routing_block_with_matrix():
    """The same block with use: matrix gives its matrix (and no groups)."""
    c = _llama_swap_routing("matrix")
    assert c.warnings == () and c.router_use == "matrix" and c.groups == {}
    assert [s.name for s in c.matrix.sets] == ["standard", "with_rerank", "creative", "full"]
    assert c.matrix.solve("stable-diffusion", ["gemma-model", "voxtral-model"]) == {"voxtral-model"}
    assert c.matrix.solve("llama-70B", ["qwen-model", "voxtral-model"]) == {"qwen-model", "voxtral-model"}


# --------------------------------------------------------------------------------------------
# YAML 1.2 scalars (CFG-1, CFG-5)


def test_yaml12_scalars():
    """Only true/false are bools; 010 is decimal 10; 12:30 stays a string; yes/on stay strings."""
    c = parse(f"""\
        models:
          a:
            {P}
            metadata: {{a: 010, b: 12:30, c: yes, d: on, e: True, f: FALSE, g: 0x10, h: 1.50, i: ~, j: no}}
        """)
    assert c.models["a"].metadata == {"a": 10, "b": "12:30", "c": "yes", "d": "on", "e": True, "f": False,
                                      "g": 16, "h": 1.5, "i": None, "j": "no"}


def test_bool_keys_accept_yes_no_on_off():
    """CFG-1: keys typed bool accept yes/no/on/off."""
    c = parse(f"""\
        includeAliasesInList: yes
        sendLoadingState: On
        models:
          a:
            {P}
            unlisted: on
        groups:
          g: {{swap: no, exclusive: off, persistent: YES, members: [a]}}
        """)
    assert c.include_aliases_in_list is True and c.send_loading_state is True
    assert c.models["a"].unlisted is True
    assert c.groups["g"] == GroupConfig("g", False, False, True, ("a",))


def test_strings_accept_scalars_as_written():
    """CFG-5: a number or bool where a string is expected is taken as its text as written."""
    c = parse(f"""\
        models:
          a:
            {P}
            useModelName: 010
            name: 1.50
            description: true
        """)
    m = c.models["a"]
    assert (m.use_model_name, m.name, m.description) == ("010", "1.50", "true")


def test_anchors_and_merge_keys():
    """CFG-1: anchors, aliases and << merge keys work; explicit keys win over merged ones."""
    c = parse("""\
        x-base: &base
          cmd: srv --port ${PORT}
          ttl: 5
        models:
          a:
            <<: *base
            ttl: 6
          b: *base
        """)
    assert c.models["a"].ttl == 6 and c.models["b"].ttl == 5
    assert c.models["a"].argv == ("srv", "--port", "5800") and c.models["b"].argv == ("srv", "--port", "5801")
    assert c.warnings == ("config: unknown key 'x-base' (ignored)",)


def test_ttl_defaults():
    """CFG-37/CFG-14: ttl -1 or unset uses globalTTL; 0 means never."""
    c = parse("""\
        globalTTL: 300
        models:
          a: {cmd: 'a ${PORT}', ttl: -1}
          b: {cmd: 'b ${PORT}'}
          c: {cmd: 'c ${PORT}', ttl: 0}
        """)
    assert [m.ttl for m in c.models.values()] == [300, 300, 0]


def test_model_defaults():
    """Defaults for a bare model: proxy, checkEndpoint, unloadTimeout, concurrency."""
    c = parse("unloadTimeout: 0\nmodels:\n  a:\n    cmd: srv --port ${PORT}\n    checkEndpoint: ' ready '\n"
              "  b:\n    cmd: srv2 ${PORT}\n    checkEndpoint: ' none '\n    unloadTimeout: 0\n")
    a, b = c.models["a"], c.models["b"]
    assert a.proxy == "http://localhost:5800" and a.check_endpoint == "/ready"
    assert b.check_endpoint is None and b.unload_timeout == 10 and c.unload_timeout == 10
    assert a.cmd_stop == "" and a.cmd_stop_argv == ()
    assert a.process_key() == (a.argv, (), a.proxy, (), "/ready")


# --------------------------------------------------------------------------------------------
# ${env.NAME} (MAC-7)


def test_env_substitution_into_list():
    """${env.X} is replaced in the raw text, so it can expand into several list items."""
    c = parse("apiKeys: [${env.KEYS}]\n", {"KEYS": "k1, k2"})
    assert c.api_keys == ("k1", "k2")


def test_env_values_are_escaped_for_double_quotes():
    """Backslashes and double quotes come out exactly inside a double-quoted scalar."""
    c = parse('apiKeys: ["${env.K}"]\n', {"K": 'a\\b"c'})
    assert c.api_keys == ('a\\b"c',)


def test_env_in_comments_is_ignored():
    """Occurrences in YAML comments are neither substituted nor checked."""
    c = parse(f"""\
        # apiKeys: [${{env.UNSET}}]
        models:
          a:
            {P}   # ${{env.ALSO_UNSET}}
            name: "x # ${{env.NAME}}"
        """, {"NAME": "n"})
    assert c.models["a"].name == "x # n"


def test_env_in_block_scalar_hash_lines_is_substituted():
    """A '#' line inside a block scalar is content (CMD-1), not a YAML comment."""
    c = parse("""\
        models:
          a:
            cmd: |
              srv --port ${PORT}
              --key ${env.K}
              # --other ${env.K}
        """, {"K": "secret"})
    assert c.models["a"].argv == ("srv", "--port", "5800", "--key", "secret")


def test_env_errors():
    """Unset variables and values with newlines, CR or NUL are errors."""
    errors = errors_of("a: ${env.A}\nb: ${env.B}\nc: ${env.C}\n", {"B": "x\ny", "C": "x\0"})
    assert errors == [
        "f.yaml:1:4: environment variable 'A' is not set",
        "f.yaml:2:4: environment variable 'B' contains a newline, carriage return or NUL",
        "f.yaml:3:4: environment variable 'C' contains a newline, carriage return or NUL"]


# --------------------------------------------------------------------------------------------
# Macros (MAC-*)


def test_macros_order_scope_and_types():
    """MAC-2..4: earlier macros usable in later ones, model macros override in place, whole-string keeps type."""
    c = parse("""\
        startPort: ${base}
        macros:
          base: 7000
          bin: /usr/bin/srv
          args: --port ${PORT} --name ${MODEL_ID}
          flag: true
          ratio: 0.50
        models:
          a:
            cmd: ${bin} ${args} --flag ${flag} --ratio ${ratio}
            macros:
              bin: /opt/srv
              extra: ${bin}-x
            metadata: {n: "${base}", f: "${flag}", s: "v${base}", e: "${extra}", id: "${MODEL_ID}", r: "${ratio}"}
        """)
    a = c.models["a"]
    assert c.start_port == 7000
    assert a.argv == ("/opt/srv", "--port", "7000", "--name", "a", "--flag", "true", "--ratio", "0.5")
    assert a.metadata == {"n": 7000, "f": True, "s": "v7000", "e": "/opt/srv-x", "id": "a", "r": 0.5}


def test_macros_not_applied_to_keys_except_set_params_by_id():
    """MAC-2: map keys are never substituted, except setParamsByID keys."""
    c = parse("""\
        macros: {k: key}
        models:
          a:
            cmd: srv ${PORT}
            metadata: {"${k}": 1}
            filters:
              setParamsByID:
                "${k}-${MODEL_ID}": {top_p: 0.9}
        """)
    a = c.models["a"]
    assert a.metadata == {"${k}": 1}
    assert a.set_params_by_id == {"key-a": {"top_p": 0.9}}
    assert a.aliases == ("key-a",) and c.resolve("key-a") == "a"


def test_comment_lines_hide_macros():
    """CMD-1: macros in cmd comment lines are never expanded or validated."""
    c = parse("""\
        models:
          a:
            cmd: |
              srv --port ${PORT}
              # --x ${undefined}
            cmdStop: |
              # ${also_undefined}
              kill -TERM ${PID}
        """)
    a = c.models["a"]
    assert a.argv == ("srv", "--port", "5800")
    assert a.cmd_stop_argv == ("kill", "-TERM", "${PID}")


def test_port_everywhere_in_model():
    """MAC-5: ${PORT} replaces in proxy, checkEndpoint, env and metadata."""
    c = parse("""\
        startPort: 9000
        models:
          b:
            cmd: srv --port ${PORT}
            proxy: http://127.0.0.1:${PORT}/base
            checkEndpoint: /health?p=${PORT}
            env:
              - PORT=${PORT}
          a:
            cmd: srv --port ${PORT}
        """)
    b = c.models["b"]
    assert b.port == 9001 and c.models["a"].port == 9000
    assert b.proxy == "http://127.0.0.1:9001/base"
    assert b.check_endpoint == "/health?p=9001"
    assert b.env == (("PORT", "9001"),)


def test_port_order_is_code_point_order():
    """MAC-5: ids sorted by code point (uppercase before lowercase)."""
    c = parse("models:\n  b: {cmd: 'x ${PORT}'}\n  B: {cmd: 'x ${PORT}'}\n  a: {cmd: 'x ${PORT}'}\n")
    assert {m: c.models[m].port for m in c.models} == {"B": 5800, "a": 5801, "b": 5802}


def test_profiles_resolve_aliases_and_drop_duplicates():
    """CFG-53: entries stored as ids, duplicates dropped."""
    c = parse(f"models:\n  a:\n    {P}\n    aliases: [x]\nprofiles:\n  p: [x, a, a]\n")
    assert c.profiles == {"p": ("a",)}


# --------------------------------------------------------------------------------------------
# Command parsing (CMD-*)

CMD4 = """\
python model1.py \\
    -a "double quotes" \\
    --arg2 'single quotes'
    -s
    # comment 1
    --arg3 123 \\

      # comment 2
    --arg4 '"string in string"'
    -c "'single quoted'"
"""


def test_cmd4_normative_example():
    """CMD-4: the normative example splits exactly."""
    assert split_cmd(CMD4) == ["python", "model1.py", "-a", "double quotes", "--arg2", "single quotes", "-s",
                               "--arg3", "123", "--arg4", '"string in string"', "-c", "'single quoted'"]


@pytest.mark.parametrize("text,argv", [
    (r'a "x\$y\`z\"w\\v\n"', ["a", 'x$y`z"w\\v\\n']),
    (r"a \"b c\ d", ["a", '"b', "c d"]),
    ("a 'it''s' \"\"", ["a", "its", ""]),
    ("a#b # c", ["a#b", "#", "c"]),
    ("  \t\n ", []),
    ("a\tb\nc", ["a", "b", "c"]),
])
def test_split_cmd_quoting(text, argv):
    """CMD-3: POSIX quoting with no expansion."""
    assert split_cmd(text) == argv


@pytest.mark.parametrize("text", ["a 'b", 'a "b', 'a "b\\"'])
def test_split_cmd_unterminated(text):
    """CMD-3: an unterminated quote raises ValueError."""
    with pytest.raises(ValueError, match="unterminated quote"):
        split_cmd(text)


@settings(max_examples=200)
@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\x00\n",
                                               blacklist_categories=("Cs",))), max_size=8))
def test_split_cmd_round_trips_shlex_join(argv):
    """split_cmd(shlex.join(argv)) == argv."""
    assert split_cmd(shlex.join(argv)) == argv


# --------------------------------------------------------------------------------------------
# parse_size


@pytest.mark.parametrize("value,size", [
    (0, 0), (1024, 1024), ("1024", 1024), ("12GiB", 12 * 2**30), ("1gb", 10**9), ("512 MiB", 512 * 2**20),
    ("1.5KiB", 1536), ("2TB", 2 * 10**12), ("7b", 7)])
def test_parse_size(value, size):
    """Sizes: integers or strings with a unit (case-insensitive)."""
    assert parse_size(value) == size


@pytest.mark.parametrize("value", [-1, True, 1.5, "12XB", "", "GiB", None, [1]])
def test_parse_size_rejects(value):
    """Anything else is a ValueError."""
    with pytest.raises(ValueError):
        parse_size(value)


# --------------------------------------------------------------------------------------------
# Robustness

_FRAGMENTS = st.sampled_from([
    "models:", "  a:", "    cmd: srv ${PORT}", "    ttl: 5", "    ttl: x", "  - x", "macros:", "  m: ${m}",
    "groups:", "  g: {members: [a]}", "profiles:", "  p: [a]", "    aliases: [b]", "apiKeys: [${env.K}]",
    "{", "]", "'", '"', "&x", "*x", "<<: *x", "key: value", "# c", "  ", "\t", "a: |", "  # x", "%YAML 1.2", "---",
])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), st.lists(_FRAGMENTS, max_size=12).map("\n".join)))
def test_any_text_gives_config_or_config_error(text):
    """Any input either loads or raises ConfigError with at least one line; nothing else escapes."""
    try:
        config = parse_config(text, "h.yaml", {"K": "k"})
    except ConfigError as e:
        assert e.errors and all(isinstance(line, str) and line for line in e.errors)
    else:
        assert isinstance(config, Config)


@settings(max_examples=100)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"),
                                      blacklist_characters="\ufeff\x85"), max_size=40))
def test_env_value_round_trips_in_double_quotes(value):
    """MAC-7: any printable single-line value comes out exactly inside a double-quoted scalar."""
    c = parse_config('models:\n  a:\n    cmd: srv ${PORT}\n    useModelName: "${env.V}"\n', "f.yaml", {"V": value})
    assert c.models["a"].use_model_name == value
