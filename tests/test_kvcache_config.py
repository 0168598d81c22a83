"""keepCache, ${CACHE_DIR} and a model's hooks in the config (llamaswap.config.keepcache)."""
from __future__ import annotations

import os
import sys

import pytest

from llamaswap.config import ConfigError, load_config, parse_config
from llamaswap.config.keepcache import (
    DEFAULT_MAX_BYTES, Hook, KeepCache, cache_root_for, default_cache_root, model_dir_name, rebase_cache_root,
    slot_save_path)
from llamaswap.statefile import default_state_file

ROOT = default_cache_root()


def parse(text: str):
    return parse_config(text, "c.yaml", environ={})


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(text)
    return e.value.errors


def test_default_root_is_beside_the_default_state_file(monkeypatch):
    """The cache root follows the state file: children.json -> children.kvcache, same directory."""
    for runtime in ("/run/user/1000", None):
        if runtime:
            monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
        else:
            monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        assert default_cache_root() == cache_root_for(default_state_file(None))
        assert os.path.dirname(default_cache_root()) == os.path.dirname(default_state_file(None))
    assert cache_root_for("/srv/x/twistd.pid.children.json") == "/srv/x/twistd.pid.children.kvcache"


def test_cache_dir_macro():
    """${CACHE_DIR} is <root>/<model>, <top-level keepCache.dir>/<model>, or <model keepCache.dir>/<model>;
    a global macro may use it."""
    config = parse("""
macros: {kv: "--slot-save-path ${CACHE_DIR}"}
models:
  a: {cmd: "srv --port ${PORT} --slot-save-path ${CACHE_DIR}"}
  b: {cmd: "srv --port ${PORT} ${kv}", keepCache: {dir: /fast}}
  "org/x:q4": {cmd: "srv --slot-save-path=${CACHE_DIR}", proxy: "http://127.0.0.1:9"}
""")
    assert config.models["a"].argv[-1] == f"{ROOT}/a"
    assert config.models["b"].argv[-1] == "/fast/b"
    assert config.models["org/x:q4"].argv[-1] == f"--slot-save-path={ROOT}/{model_dir_name('org/x:q4')}"
    config = parse("""
keepCache: {dir: ~/kv, enabled: false}
models:
  a: {cmd: "srv --port ${PORT} --slot-save-path ${CACHE_DIR}"}
""")
    assert config.models["a"].argv[-1] == os.path.expanduser("~/kv/a")
    assert config.models["a"].keep_cache is None


def test_model_dir_name():
    """Safe ids are kept; others get their unsafe characters replaced and a hash, so two never meet."""
    assert model_dir_name("qwen-2.5_7b") == "qwen-2.5_7b"
    assert model_dir_name("org/x:q4") != model_dir_name("org_x_q4")
    assert model_dir_name("org/x:q4").startswith("org_x_q4-")
    assert model_dir_name("..") != ".." and "/" not in model_dir_name("../../etc")


def test_model_keepcache_needs_slot_save_path():
    """A model that sets keepCache without --slot-save-path in its cmd: an error naming the path."""
    for value in ("true", "{maxBytes: 1GiB}", "{enabled: true}"):
        assert errors_of(f"""
models:
  llama:
    cmd: llama-server --port ${{PORT}}
    keepCache: {value}
""") == ["models.llama.keepCache: needs --slot-save-path in models.llama.cmd "
         "(add '--slot-save-path ${CACHE_DIR}' to it)"]


def test_global_default_applies_only_with_slot_save_path():
    """The top-level keepCache reaches the llama-server models only: a whisper model beside them is
    no error and gets none; a model may turn it off."""
    config = parse("""
keepCache: {maxBytes: 1GiB, saveTimeout: 3}
models:
  llama: {cmd: "llama-server --port ${PORT} --slot-save-path ${CACHE_DIR}"}
  whisper: {cmd: "whisper-server --port ${PORT}"}
  off: {cmd: "llama-server --port ${PORT} --slot-save-path ${CACHE_DIR}", keepCache: false}
  own:
    cmd: "llama-server --port ${PORT} --slot-save-path ${CACHE_DIR}"
    keepCache: {restoreTimeout: 5}
""")
    assert config.keep_cache == KeepCache(True, ROOT, 2**30, 3.0, 30.0)
    assert config.models["llama"].keep_cache == KeepCache(True, f"{ROOT}/llama", 2**30, 3.0, 30.0)
    assert config.models["whisper"].keep_cache is None
    assert config.models["off"].keep_cache is None
    assert config.models["own"].keep_cache == KeepCache(True, f"{ROOT}/own", 2**30, 3.0, 5.0)


def test_defaults():
    """keepCache: true gives 4 GiB, 10 s to save, 30 s to restore; without it nothing is on."""
    config = parse("""
models:
  a: {cmd: "srv --port ${PORT} --slot-save-path ${CACHE_DIR}", keepCache: true}
  b: {cmd: "srv --port ${PORT} --slot-save-path ${CACHE_DIR}"}
""")
    assert config.models["a"].keep_cache == KeepCache(True, f"{ROOT}/a", DEFAULT_MAX_BYTES, 10.0, 30.0)
    assert config.models["b"].keep_cache is None
    assert config.keep_cache.enabled is False


def test_bad_values():
    """Every mistake is reported with its path."""
    assert errors_of("""
keepCache: {dir: rel/dir, maxBytes: 0, saveTimeout: -1, restoreTimeout: "x"}
models:
  a:
    cmd: srv --port ${PORT} --slot-save-path rel
    keepCache: {enabled: maybe}
  b:
    cmd: srv --port ${PORT} --slot-save-path /x
    keepCache: [1]
""") == [
        "keepCache.dir: must be an absolute path (got 'rel/dir')",
        "keepCache.maxBytes: must be more than 0 (got 0)",
        "keepCache.saveTimeout: must be a positive number of seconds (got -1)",
        "keepCache.restoreTimeout: must be a positive number of seconds (got 'x')",
        "models.a.keepCache.enabled: must be a boolean (got 'maybe')",
        "models.b.keepCache: must be a boolean or a mapping (got a list)",
    ]
    assert errors_of("""
models:
  a: {cmd: "srv --slot-save-path kv", keepCache: true, proxy: "http://127.0.0.1:9"}
""") == ["models.a.cmd: --slot-save-path must be an absolute path when keepCache is on (got 'kv')"]
    assert errors_of("""
macros: {CACHE_DIR: /x}
models: {}
""") == ["macros.CACHE_DIR: 'CACHE_DIR' is a reserved macro name"]


def test_unknown_keys_warn():
    """Unknown keys inside keepCache and a hook call are reported, with a suggestion."""
    config = parse("""
models:
  a:
    cmd: srv --port ${PORT} --slot-save-path ${CACHE_DIR}
    keepCache: {maxbytes: 1}
    hooks: {beforeStop: [{path: /x, bdy: 1}], before: []}
""")
    assert config.warnings == (
        "config: unknown key 'models.a.keepCache.maxbytes' (ignored); did you mean 'maxBytes'?",
        "config: unknown key 'models.a.hooks.before' (ignored); did you mean 'beforeStop'?",
        "config: unknown key 'models.a.hooks.beforeStop[0].bdy' (ignored)",
    )


def test_hooks():
    """hooks.beforeStop / hooks.afterReady: method (default POST), path, JSON body, timeout (default 10)."""
    config = parse("""
models:
  vllm:
    cmd: vllm serve m --port ${PORT}
    hooks:
      beforeStop:
        - {path: "/sleep?level=1"}
      afterReady:
        - {method: post, path: /wake_up, body: {tags: [weights]}, timeout: 2.5}
        - {method: GET, path: /health}
""")
    model = config.models["vllm"]
    assert model.keep_cache is None
    assert model.hooks_before_stop == (Hook("POST", "/sleep?level=1", None, 10.0),)
    assert model.hooks_after_ready == (Hook("POST", "/wake_up", {"tags": ["weights"]}, 2.5),
                                       Hook("GET", "/health", None, 10.0))


def test_bad_hooks():
    assert errors_of("""
models:
  a:
    cmd: srv --port ${PORT}
    hooks:
      beforeStop: [{method: TRACE, path: /x}, 3, {path: "x"}, {body: 1}, {path: /y, timeout: 0}]
      afterReady: {path: /x}
""") == [
        "models.a.hooks.beforeStop[0].method: must be one of GET, POST, PUT, PATCH, DELETE (got 'TRACE')",
        "models.a.hooks.beforeStop[1]: must be a mapping with method, path, body and timeout (got 3)",
        "models.a.hooks.beforeStop[2].path: must start with '/' (got 'x')",
        "models.a.hooks.beforeStop[3].path: is required",
        "models.a.hooks.beforeStop[4].timeout: must be a positive number of seconds (got 0)",
        "models.a.hooks.afterReady: must be a list of HTTP calls ({method, path, body, timeout}) (got a mapping)",
    ]


def test_slot_save_path():
    """Found as a word, as --slot-save-path=DIR, or inside an sh -c command; the last one wins."""
    assert slot_save_path(["srv", "--slot-save-path", "/a"]) == "/a"
    assert slot_save_path(["srv", "--slot-save-path=/b", "--slot-save-path", "/c"]) == "/c"
    assert slot_save_path(["sh", "-c", "exec srv --slot-save-path '/d e' --port 1"]) == "/d"
    assert slot_save_path(["sh", "-c", "exec srv --slot-save-path /d --port 1"]) == "/d"
    assert slot_save_path(["srv", "--slot-save-path"]) is None
    assert slot_save_path(["srv"]) is None


def test_rebase_moves_the_default_root_only():
    """The daemon moves ${CACHE_DIR} paths from the default root to the one beside its state file;
    a config with keepCache.dir keeps its paths."""
    config = parse("""
keepCache: true
models:
  a:
    cmd: srv --port ${PORT} --slot-save-path ${CACHE_DIR}
    env: ["KV=${CACHE_DIR}"]
    metadata: {where: "${CACHE_DIR}"}
  b: {cmd: "sh -c 'exec srv --slot-save-path=${CACHE_DIR} --port ${PORT}'"}
""")
    moved = rebase_cache_root(config, "/state/children.kvcache")
    a, b = moved.models["a"], moved.models["b"]
    assert a.argv[-1] == "/state/children.kvcache/a"
    assert a.cmd.endswith("--slot-save-path /state/children.kvcache/a")
    assert a.keep_cache.dir == "/state/children.kvcache/a"
    assert a.env == (("KV", "/state/children.kvcache/a"),)
    assert a.metadata == {"where": "/state/children.kvcache/a"}
    assert b.argv[-1] == "exec srv --slot-save-path=/state/children.kvcache/b --port 5801"
    assert moved.keep_cache.dir == "/state/children.kvcache"
    assert rebase_cache_root(moved, "/state/children.kvcache") is moved
    own = parse("""
keepCache: {dir: /mine}
models:
  a: {cmd: "srv --port ${PORT} --slot-save-path ${CACHE_DIR}"}
""")
    assert rebase_cache_root(own, "/state/children.kvcache") is own


def test_service_puts_cache_dirs_beside_its_state_file(tmp_path):
    """The daemon's models get ${CACHE_DIR} under <state file>.kvcache, at start and at reload."""
    from llamaswap.service import LlamaSwapService
    from tests.fakes import FakeProcessReactor

    path = tmp_path / "config.yaml"
    cmd = f"{sys.executable} --port ${{PORT}} --slot-save-path ${{CACHE_DIR}}"
    path.write_text(f'keepCache: true\nmodels:\n  a: {{cmd: "{cmd}"}}\n')
    state = tmp_path / "run" / "children.json"
    service = LlamaSwapService(load_config(str(path)), FakeProcessReactor(), "tcp:0", str(state),
                               install_signals=False, config_path=str(path))
    want = str(tmp_path / "run" / "children.kvcache" / "a")
    assert service.router.process("a").model.keep_cache.dir == want
    assert service.router.process("a").model.argv[-1] == want
    path.write_text(f'keepCache: true\nmodels:\n  a: {{cmd: "{cmd}"}}\n  b: {{cmd: "{cmd}"}}\n')
    outcome = service.reload()
    assert outcome["unchanged"] == ["a"], outcome
    assert service.router.process("b").model.argv[-1] == str(tmp_path / "run" / "children.kvcache" / "b")
