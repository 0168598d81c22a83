"""Tests for llamaswap.demo.tinymodels: deterministic generation, the cache, and loading in a real llama-server."""

from __future__ import annotations

import hashlib
import importlib.metadata
import sys
from pathlib import Path

import pytest

from llamaswap.demo import tinymodels
from llamaswap.demo.tinymodels import MODELS, MissingDependency, default_cache_dir, ensure_models
from tests.daemon import http_request
from tests.real_llama import ANSWER_A, ANSWER_B, LlamaServer, requires_llama_server

# The bytes of the rig's reference generator (gguf 0.19.0, numpy 2.x); the models are byte-identical to it.
REFERENCE_SHA256 = {
    "chat-a": "13b3ed0107415eafc11a1a14096a84bbd202498cb84a93a69c1006529bc4ce7f",
    "chat-b": "b135cc32d840666421dd9871d34b531ddceb1c3d090d674f3b6496ca68b8e470",
    "embed": "b624cd41df2f4841754b0b50ccec6012506bebdf2ac7958201e4dfce6436b0cc",
    "rerank": "e98c731bd29f4746dcdc00fae614eaff9fd484697e86b9d14bee664259aad503",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The four models, generated once for this module into a fresh directory."""
    return ensure_models(tmp_path_factory.mktemp("tiny"))


def test_generates_all_four(models):
    """ensure_models returns the four models by short name, each a GGUF file in the directory given."""
    assert list(models) == ["chat-a", "chat-b", "embed", "rerank"]
    for name, path in models.items():
        assert path.name == MODELS[name].filename
        assert path.read_bytes()[:4] == b"GGUF"
        assert 2_000_000 < path.stat().st_size < 5_000_000


def test_deterministic(models, tmp_path):
    """A second generation in another directory gives byte-identical files."""
    again = ensure_models(tmp_path / "again")
    assert {n: sha256(p) for n, p in again.items()} == {n: sha256(p) for n, p in models.items()}


@pytest.mark.skipif(importlib.metadata.version("gguf") != "0.19.0", reason="reference bytes are for gguf 0.19.0")
def test_matches_reference_bytes(models):
    """With gguf 0.19.0 the files are the rig's reference models, byte for byte."""
    assert {n: sha256(p) for n, p in models.items()} == REFERENCE_SHA256


def test_cache_reused(models, monkeypatch):
    """Models already in the directory are returned as they are, without generating anything."""
    stats = {n: (p.stat().st_ino, p.stat().st_mtime_ns) for n, p in models.items()}

    def refuse(*args):
        raise AssertionError("regenerated a cached model")

    monkeypatch.setattr(tinymodels, "generate_model", refuse)
    again = ensure_models(next(iter(models.values())).parent)
    assert again == models
    assert {n: (p.stat().st_ino, p.stat().st_mtime_ns) for n, p in again.items()} == stats


def test_only_missing_regenerated(models, tmp_path, monkeypatch):
    """A missing file is regenerated; the others are left alone."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, path in models.items():
        if name != "embed":
            (cache / path.name).write_bytes(path.read_bytes())
    generated = []
    real = tinymodels.generate_model
    monkeypatch.setattr(tinymodels, "generate_model", lambda m, d, v=None: (generated.append(m.name), real(m, d, v)))
    paths = ensure_models(cache)
    assert generated == ["embed"]
    assert sha256(paths["embed"]) == sha256(models["embed"])


def test_names_subset(tmp_path):
    """names= generates and returns only those models."""
    paths = ensure_models(tmp_path, ["rerank"])
    assert list(paths) == ["rerank"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-rerank.gguf"]


def test_unknown_name(tmp_path):
    """An unknown model name is a KeyError naming the valid ones."""
    with pytest.raises(KeyError, match="chat-a"):
        ensure_models(tmp_path, ["nope"])


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """A generation that fails midway leaves neither the model nor a temporary file behind."""

    def half_write(out, *args, **kw):
        Path(out).write_bytes(b"GGUF partial")
        raise OSError("disk full")

    monkeypatch.setattr(tinymodels, "_write_bert_model", half_write)
    with pytest.raises(OSError, match="disk full"):
        ensure_models(tmp_path, ["embed"])
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir(monkeypatch, tmp_path):
    """The cache is $XDG_CACHE_HOME/llamaswap/models, else ~/.cache/llamaswap/models."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "llamaswap" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "llamaswap" / "models"


def test_ensure_models_default_dir(monkeypatch, tmp_path, models):
    """Without a directory, ensure_models uses the default cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "llamaswap" / "models"
    cache.mkdir(parents=True)
    (cache / "tiny-chat-b.gguf").write_bytes(models["chat-b"].read_bytes())
    assert ensure_models(names=["chat-b"]) == {"chat-b": cache / "tiny-chat-b.gguf"}


def test_missing_dependency(monkeypatch, tmp_path, models):
    """Without gguf, generating fails with a message saying what to install; cached models still work."""
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes "import gguf" raise ImportError
    with pytest.raises(MissingDependency, match=r"llamaswap\[llama\]"):
        ensure_models(tmp_path, ["chat-a"])
    assert ensure_models(models["chat-a"].parent, ["chat-a"]) == {"chat-a": models["chat-a"]}


def test_command_line(models, capsys):
    """python -m llamaswap.demo.tinymodels DIR prints '<name> <path>' per model."""
    assert tinymodels.main([str(models["chat-a"].parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{n} {p}" for n, p in models.items()]


def test_vocab_files_are_package_data():
    """The two vocab files and their licence ship inside the package."""
    vocab = Path(tinymodels.__file__).parent / "data" / "vocab"
    assert (vocab / tinymodels.SPM_VOCAB).stat().st_size == 723_869
    assert (vocab / tinymodels.BERT_VOCAB).stat().st_size == 627_549
    assert "MIT License" in (vocab / "LICENSE").read_text()


# -- the models in a real llama-server ------------------------------------------------------------------


@pytest.fixture
def start_server():
    started: list[LlamaServer] = []

    def start(model, *args):
        server = LlamaServer(model, *args)
        started.append(server)
        server.wait_listening()
        return server

    yield start
    for server in started:
        server.close()


@requires_llama_server
@pytest.mark.parametrize("name, answer", [("chat-a", ANSWER_A), ("chat-b", ANSWER_B)])
def test_chat_model_answers(models, start_server, name, answer):
    """llama-server loads a chat model, answers with its fixed sentence, and exits 0 on SIGTERM."""
    server = start_server(models[name])
    r = http_request(server.port, "POST", "/v1/chat/completions",
                     {"messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 200, r
    choice = r.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (answer, "stop")
    assert server.terminate() == 0


@requires_llama_server
def test_embed_model(models, start_server):
    """The embed model serves 64-dim embeddings with --embeddings --pooling mean."""
    server = start_server(models["embed"], "--embeddings", "--pooling", "mean")
    r = http_request(server.port, "POST", "/v1/embeddings", {"input": ["hello world", "goodbye"]})
    assert r.status == 200, r
    data = r.json()["data"]
    assert [len(d["embedding"]) for d in data] == [64, 64]
    assert server.terminate() == 0


@requires_llama_server
def test_rerank_model(models, start_server):
    """The rerank model ranks documents with --reranking."""
    server = start_server(models["rerank"], "--reranking")
    r = http_request(server.port, "POST", "/v1/rerank",
                     {"query": "What is a panda?", "documents": ["hi", "The giant panda is a bear", "it is"]})
    assert r.status == 200, r
    assert sorted(x["index"] for x in r.json()["results"]) == [0, 1, 2]
    assert server.terminate() == 0
