"""llamaswap.footprint: GGUF-header estimates, /proc + nvidia-smi measurements, the NeedBook, OOM lines.

Expected figures are worked out by hand from the models' architecture; the llama-server log lines quoted
next to some come from the bundled llama-server run on the tiny chat model.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time

import gguf
import numpy as np
import pytest
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from llamaswap import footprint as fp

try:
    from llamaswap.demo import tinymodels  # type: ignore[attr-defined]
except ImportError:
    from llamaswap import tinymodels  # type: ignore[no-redef]

GiB = 1 << 30


@pytest.fixture(scope="module")
def tiny():
    return tinymodels.ensure_models(names=["chat-a", "embed"])


# ---------------------------------------------------------------- tiny models

# chat-a: llama, 2 layers, 4 heads, 4 KV heads, embedding 64 -> head dim 16 (no key/value_length keys),
# context_length 4096. One cell of f16 K+V over all layers: 2 * 4 * (16 + 16) * 2 = 512 bytes.
CHAT_CELL_F16 = 2 * 4 * (16 + 16) * 2


def test_tiny_chat_default_context(tiny):
    path = str(tiny["chat-a"])
    e = fp.try_estimate(["llama-server", "-m", path, "--port", "9000"], overhead=GiB)
    assert isinstance(e, fp.Estimate)
    assert e.weights == os.path.getsize(path)
    # llama_kv_cache: size = 2.00 MiB (4096 cells, 2 layers, 4/1 seqs), K (f16): 1.00 MiB, V (f16): 1.00 MiB
    assert e.kv == 4096 * CHAT_CELL_F16 == 2 * 1024 * 1024
    assert (e.context, e.kv_cells, e.overhead) == (4096, 4096, GiB)
    assert e.total == e.weights + e.kv + GiB
    assert e.files == (path,) and e.notes == ()


@pytest.mark.parametrize("args, cells, kv", [
    # size = 0.50 MiB (1024 cells, 2 layers, 4/1 seqs): padded to 256, -np auto is unified
    (["-c", "1000"], 1024, 1024 * CHAT_CELL_F16),
    # size = 0.75 MiB (512 cells, 2 layers, 3/3 seqs): 1000 // 3 = 333 -> 512 cells a slot
    (["-c", "1000", "-np", "3"], 1536, 1536 * CHAT_CELL_F16),
    # size = 0.50 MiB (1024 cells, 2 layers, 3/1 seqs)
    (["-c", "1000", "-np", "3", "-kvu"], 1024, 1024 * CHAT_CELL_F16),
    # size = 2.00 MiB (2048 cells, 2 layers, 2/2 seqs): -c from the model
    (["-np", "2"], 4096, 4096 * CHAT_CELL_F16),
    # size = 1.12 MiB (768 cells, 2 layers, 3/3 seqs)
    (["-np", "3", "--kv-unified-per-slot", "700"], 2304, 2304 * CHAT_CELL_F16),
    # size = 0.38 MiB (512 cells), K (f32): 0.25 MiB, V (f16): 0.12 MiB
    (["-c", "300", "-ctk", "f32"], 512, 512 * 2 * 4 * 16 * (4 + 2)),
    (["--ctx-size=0"], 4096, 4096 * CHAT_CELL_F16),
])
def test_tiny_chat_context_and_slots(tiny, args, cells, kv):
    e = fp.estimate_need(["llama-server", "-m", str(tiny["chat-a"]), *args])
    assert (e.kv_cells, e.kv) == (cells, kv)


def test_tiny_embedder_has_no_kv_cache(tiny):
    # bert with attention.causal = false: llama-server logs no llama_kv_cache line at all
    e = fp.estimate_need(["llama-server", "-m", str(tiny["embed"]), "--embeddings"], overhead=5)
    assert (e.kv, e.context, e.weights, e.total) == (0, 512, os.path.getsize(tiny["embed"]),
                                                    os.path.getsize(tiny["embed"]) + 5)
    assert e.notes == ("non-causal model: no KV cache",)


def test_tiny_launcher_flag(tiny):
    cmd = ["llamaswap-llama-server", "--tiny", "chat-a", "--tiny-dir", str(tiny["chat-a"].parent), "--port", "1"]
    assert fp.estimate_need(cmd).files == (str(tiny["chat-a"]),)
    assert "unknown tiny model" in fp.try_estimate(["x", "--tiny=nope"]).reason


def test_estimate_is_cheap(tiny):
    cmd = ["llama-server", "-m", str(tiny["chat-a"])]
    fp.estimate_need(cmd)
    t = time.perf_counter()
    for _ in range(10):
        fp.estimate_need(cmd)
    assert (time.perf_counter() - t) / 10 < 0.1  # ~6 ms; gguf.GGUFReader takes ~1 s on this file
    meta = fp.read_gguf_meta(str(tiny["chat-a"]))
    assert meta.header_bytes < os.path.getsize(tiny["chat-a"]) / 4
    assert meta.values["general.architecture"] == "llama"
    assert "tokenizer.ggml.tokens" not in meta.values  # skipped, not decoded


# ---------------------------------------------------------------- synthetic headers

def write_gguf(path, *, block_count=3, head_count=8, head_count_kv=2, key_length=128, value_length=64,
               context_length=1024, embedding_length=512, split=False, endianess=gguf.GGUFEndian.LITTLE):
    w = gguf.GGUFWriter(str(path), "llama", split_max_tensors=1 if split else 0, endianess=endianess)
    w.add_block_count(block_count)
    w.add_head_count(head_count)
    if head_count_kv is not None:
        w.add_head_count_kv(head_count_kv)
    if key_length is not None:
        w.add_key_length(key_length)
        w.add_value_length(value_length)
    w.add_context_length(context_length)
    w.add_embedding_length(embedding_length)
    w.add_token_list([f"t{i}" for i in range(5000)])  # a vocab to skip
    for i in range(3 if split else 1):
        w.add_tensor(f"t{i}", np.zeros(1000 * (i + 1), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# 3 layers x 2 KV heads, key 128 / value 64, context 1024 (-np auto: unified, 1024 cells)
F16_KV = 3 * 1024 * 2 * (128 * 2 + 64 * 2)
Q8_K = 1024 * 2 * 128 * 34 // 32   # 278528 a layer
Q4_V = 1024 * 2 * 64 * 18 // 32    # 73728 a layer


@pytest.fixture
def split_model(tmp_path):
    write_gguf(tmp_path / "big.gguf", split=True)
    shards = [tmp_path / f"big-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert all(s.is_file() for s in shards)
    return tmp_path, [str(s) for s in shards]


def test_split_shards_and_quantized_kv(split_model):
    d, shards = split_model
    sizes = sum(os.path.getsize(s) for s in shards)
    e = fp.estimate_need(["llama-server", "-m", "big-00001-of-00003.gguf"], cwd=str(d), overhead=7)
    assert (e.weights, e.kv, e.context, e.files) == (sizes, F16_KV, 1024, tuple(shards))
    assert e.total == sizes + F16_KV + 7
    e = fp.estimate_need(["llama-server", "-m", shards[0], "-ctk", "q8_0", "--cache-type-v=Q4_0"])
    assert e.kv == 3 * (Q8_K + Q4_V) == 1056768
    e = fp.estimate_need(["llama-server", "-m", shards[0], "-ctk", "q4_0", "-ctv", "q8_0", "-c", "2048"])
    assert e.kv == 3 * 2 * (1024 * 2 * 128 * 18 // 32 + 1024 * 2 * 64 * 34 // 32)


def test_any_shard_reads_the_first_header_and_missing_shards_are_noted(split_model):
    d, shards = split_model
    e = fp.estimate_need(["llama-server", "--model", shards[1]])
    assert e.kv == F16_KV and e.files == tuple(shards)
    os.unlink(shards[2])
    e = fp.estimate_need(["llama-server", "--model", shards[0]])
    assert e.weights == os.path.getsize(shards[0]) + os.path.getsize(shards[1])
    assert e.notes == (f"missing {shards[2]}",)


def test_mmproj_and_draft_are_added(split_model, tmp_path):
    d, shards = split_model
    (tmp_path / "proj.gguf").write_bytes(b"x" * 1234)
    (tmp_path / "draft.gguf").write_bytes(b"y" * 777)
    base = fp.estimate_need(["s", "-m", shards[0]])
    for extra in (["--mmproj", "proj.gguf", "-md", "draft.gguf"], ["-mm=proj.gguf", "--spec-draft-model", "draft.gguf"],
                  ["--mmproj", "proj.gguf", "--model-draft=draft.gguf"]):
        e = fp.estimate_need(["s", "-m", shards[0], *extra], cwd=str(tmp_path))
        assert e.weights == base.weights + 1234 + 777
        assert e.files[-2:] == (str(tmp_path / "proj.gguf"), str(tmp_path / "draft.gguf"))
    e = fp.estimate_need(["s", "-m", shards[0], "--mmproj", "gone.gguf"], cwd=str(tmp_path))
    assert e.weights == base.weights and e.notes == (f"missing {tmp_path / 'gone.gguf'}",)


def test_per_layer_kv_heads_and_default_head_dim(tmp_path):
    # no key/value_length: 512 / 8 heads = 64; KV heads per layer 2, 0, 4; -c 512 -> 512 cells
    write_gguf(tmp_path / "m.gguf", head_count_kv=[2, 0, 4], key_length=None)
    e = fp.estimate_need(["s", "-m", str(tmp_path / "m.gguf"), "-c", "512"])
    assert e.kv == (2 + 0 + 4) * (64 + 64) * 512 * 2 == 786432


def test_absent_head_count_kv_means_head_count(tmp_path):
    write_gguf(tmp_path / "m.gguf", block_count=1, head_count_kv=None, key_length=None, embedding_length=256,
               context_length=256)
    assert fp.estimate_need(["s", "-m", str(tmp_path / "m.gguf")]).kv == 8 * (32 + 32) * 256 * 2


def test_big_endian_header(tmp_path):
    write_gguf(tmp_path / "be.gguf", endianess=gguf.GGUFEndian.BIG)
    assert fp.estimate_need(["s", "-m", str(tmp_path / "be.gguf")]).kv == F16_KV


def test_unknown_cache_type_counts_as_f16(tmp_path):
    write_gguf(tmp_path / "m.gguf")
    e = fp.estimate_need(["s", "-m", str(tmp_path / "m.gguf"), "-ctk", "q9_9"])
    assert e.kv == F16_KV and "unknown cache type 'q9_9' for K" in e.notes[0]


def test_tensor_data_is_never_read(tmp_path):
    path = tmp_path / "huge.gguf"
    write_gguf(path)
    with open(path, "r+b") as f:
        f.truncate(64 * GiB)  # sparse: reading the data would take minutes
    t = time.perf_counter()
    e = fp.estimate_need(["s", "-m", str(path)])
    assert time.perf_counter() - t < 0.5
    assert (e.weights, e.kv) == (64 * GiB, F16_KV)


def test_bad_files_give_a_reason(tmp_path, tiny):
    def reason(path):
        assert fp.estimate_need(["s", "-m", str(path)]) is None
        return fp.try_estimate(["s", "-m", str(path)]).reason

    assert "not found" in reason(tmp_path / "nope.gguf")
    assert "not found" in reason(tmp_path)  # a directory
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert "cannot read" in reason(tmp_path / "empty.gguf")
    (tmp_path / "text.gguf").write_bytes(b"hello world, not a model\n" * 10)
    assert "bad magic" in reason(tmp_path / "text.gguf")
    (tmp_path / "cut.gguf").write_bytes(tiny["chat-a"].read_bytes()[:5000])
    assert "runs past the end" in reason(tmp_path / "cut.gguf")
    (tmp_path / "v9.gguf").write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(16))
    assert "unsupported GGUF version" in reason(tmp_path / "v9.gguf")
    (tmp_path / "kv.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(8) + (2**63).to_bytes(8, "little"))
    assert "runs past the end" in reason(tmp_path / "kv.gguf")
    bad_type = b"GGUF" + (3).to_bytes(4, "little") + bytes(8) + (1).to_bytes(8, "little")
    bad_type += (1).to_bytes(8, "little") + b"k" + (99).to_bytes(4, "little")
    (tmp_path / "type.gguf").write_bytes(bad_type)
    assert "unknown value type 99" in reason(tmp_path / "type.gguf")
    unreadable = tmp_path / "locked.gguf"
    unreadable.write_bytes(tiny["chat-a"].read_bytes()[:64])
    unreadable.chmod(0)
    if not os.access(unreadable, os.R_OK):  # root reads anything
        assert "cannot read" in reason(unreadable)
    assert fp.try_estimate(["llama-server", "--port", "1"]).reason == "no -m/--model in the command"
    assert not fp.try_estimate(["llama-server", "-hf", "org/model"])


# ---------------------------------------------------------------- argv

@pytest.mark.parametrize("argv, model", [
    (["s", "-m", "a.gguf"], "a.gguf"), (["s", "--model", "a.gguf"], "a.gguf"),
    (["s", "-m=a.gguf"], "a.gguf"), (["s", "--model=a=b.gguf"], "a=b.gguf"),
    (["s", "-m", "a.gguf", "--model", "b.gguf"], "b.gguf"),  # the last wins, as in llama-server
    (["s", "-m"], None), (["s", "--alias", "-m", "x"], "x"), (["s", "-mm", "p.gguf"], None),
    (["s", "--", "-m", "a.gguf"], "a.gguf"),  # the launcher passes what follows -- to llama-server
])
def test_model_flag(argv, model):
    assert fp.parse_model_args(argv).model == model


def test_other_flags_and_environment():
    a = fp.parse_model_args(["s", "-c", "8192", "-ctk", "Q8_0", "-ctv=q4_0", "-np", "2", "-no-kvu",
                             "-md", "d.gguf", "--mmproj=p.gguf", "--tiny", "chat-a", "--", "--tiny-dir", "x"])
    assert a == fp.ModelArgs(model=None, mmproj="p.gguf", draft="d.gguf", ctx_size=8192, cache_type_k="q8_0",
                             cache_type_v="q4_0", parallel=2, kv_unified=False, tiny="chat-a")
    assert fp.parse_model_args(["s", "-c", "lots"]).ctx_size is None
    env = {"LLAMA_ARG_MODEL": "env.gguf", "LLAMA_ARG_CTX_SIZE": "2048", "LLAMA_ARG_CACHE_TYPE_K": "q8_0",
           "LLAMA_ARG_KV_UNIFIED": "true", "LLAMA_ARG_MODEL_DRAFT": "old-draft.gguf"}
    a = fp.parse_model_args(["s", "-c", "4096"], env)
    assert (a.model, a.ctx_size, a.cache_type_k, a.kv_unified, a.draft) == ("env.gguf", 4096, "q8_0", True,
                                                                          "old-draft.gguf")


def test_relative_and_home_paths(tmp_path, monkeypatch):
    write_gguf(tmp_path / "m.gguf")
    assert fp.estimate_need(["s", "-m", "m.gguf"], cwd=str(tmp_path)).files == (str(tmp_path / "m.gguf"),)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fp.estimate_need(["s", "-m", "~/m.gguf"], cwd="/").files == (str(tmp_path / "m.gguf"),)
    monkeypatch.chdir(tmp_path)
    assert fp.estimate_need(["s", "-m", "m.gguf"]).kv == F16_KV


def test_shard_paths():
    assert fp.shard_paths("/m/x-00002-of-00003.gguf") == tuple(f"/m/x-0000{i}-of-00003.gguf" for i in (1, 2, 3))
    assert fp.shard_paths("/m/x-00001-of-00001.gguf") == ("/m/x-00001-of-00001.gguf",)
    assert fp.shard_paths("/m/x-1-of-3.gguf") == ("/m/x-1-of-3.gguf",)
    assert fp.shard_paths("/m/x-00001-of-00000.gguf") == ("/m/x-00001-of-00000.gguf",)


def test_kv_cells():
    assert fp.kv_cells(4096) == 4096 and fp.kv_cells(1) == 256 and fp.kv_cells(0) == 0
    assert fp.kv_cells(1000, 3) == 1536 and fp.kv_cells(1000, 3, unified=True) == 1024
    assert fp.kv_cells(1000, None, unified=False) == 4 * 256  # auto: 4 slots
    assert fp.kv_cells(1000, -1) == 1024


# ---------------------------------------------------------------- /proc

def test_rss_of_own_group():
    pgid = os.getpgrp()
    assert os.getpid() in fp.group_pids(pgid)
    assert fp.group_rss(pgid) >= fp.process_rss(os.getpid()) > 1024 * 1024
    assert fp.process_rss(2**22 + 12345) is None


def fake_proc(root):
    def proc(pid, stat_line, status=None, statm=None):
        d = root / str(pid)
        d.mkdir()
        (d / "stat").write_text(stat_line)
        if status is not None:
            (d / "status").write_text(status)
        if statm is not None:
            (d / "statm").write_text(statm)

    proc(100, "100 (llama-server) S 1 100 100 0 -1 4194560 1 0 0 0", "Name:\tllama-server\nVmRSS:\t    1000 kB\n")
    proc(101, "101 (odd) name) S 100 100 100 0", "Name:\todd\nVmRSS:\t 2048 kB\n")  # ")" in comm
    proc(102, "102 (no status) S 100 100 100 0", statm="900 25 10 1 0 50 0\n")
    proc(103, "103 (kthread) S 2 100 100 0", "Name:\tkthread\n", "0 0 0 0 0 0 0\n")  # no VmRSS
    proc(104, "104 (other) S 1 999 999 0", "VmRSS:\t 5000 kB\n")
    proc(105, "105 (gone) S 1 100 100 0")  # no status, no statm: exited meanwhile
    (root / "106").mkdir()  # no stat
    (root / "sys").mkdir()
    (root / "107").write_text("not a directory")
    return str(root)


def test_rss_of_fake_proc(tmp_path):
    proc = fake_proc(tmp_path)
    assert fp.group_pids(100, proc) == (100, 101, 102, 103, 105)
    assert fp.group_rss(100, proc, page_size=4096) == 1000 * 1024 + 2048 * 1024 + 25 * 4096
    assert fp.group_rss(999, proc) == 5000 * 1024
    assert fp.group_rss(100, str(tmp_path / "nope")) == 0


def test_parse_nvidia_smi():
    out = "1234, 512\n1234, 256\n99, 1\n\n[N/A], 5\n77, [N/A]\n88, [Not Supported]\nNo running processes found\n"
    assert fp.parse_nvidia_smi_apps(out) == {1234: 768 * 2**20, 99: 2**20}
    assert fp.parse_nvidia_smi_apps("") == {}


def fake_nvidia_smi(directory, body):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "nvidia-smi")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return directory + os.pathsep + os.environ.get("PATH", "")


class GpuTests(TestCase):
    """Real reactor, real child processes (a shell script standing in for nvidia-smi)."""

    def mktemp(self):  # trial's own makes directories under the current one
        d = tempfile.mkdtemp(prefix="footprint-")
        self.addCleanup(shutil.rmtree, d, True)
        return os.path.join(d, "t")

    def test_group_with_gpu(self):
        args = self.mktemp() + ".args"
        path = fake_nvidia_smi(self.mktemp(), f'echo "$@" > {args}\necho "{os.getpid()}, 300"\n'
                                              f'echo "1, 4000"\necho "{os.getpid()}, 20"')

        def check(m):
            assert m.gpu_known and m.gpu == 320 * 2**20
            assert m.rss > 0 and os.getpid() in m.pids and m.total == m.rss + m.gpu
            with open(args) as f:
                assert f.read().split() == list(fp.NVIDIA_SMI_ARGS)
        return fp.measure_group(os.getpgrp(), reactor, path=path).addCallback(check)

    def test_no_nvidia_smi(self):
        d = fp.measure_group(os.getpgrp(), reactor, path=self.mktemp())
        m = self.successResultOf(d)  # fires at once
        assert not m.gpu_known and m.gpu == 0 and m.rss > 0
        m = self.successResultOf(fp.measure_group(os.getpgrp(), gpu=False))
        assert not m.gpu_known

    def test_failing_nvidia_smi(self):
        path = fake_nvidia_smi(self.mktemp(), 'echo "NVIDIA-SMI has failed"; exit 9')
        return fp.query_gpu_memory(reactor, path=path).addCallback(self.assertIsNone)

    def test_hanging_nvidia_smi_is_killed(self):
        path = fake_nvidia_smi(self.mktemp(), "exec sleep 30")
        started = time.monotonic()

        def check(result):
            assert result is None and time.monotonic() - started < 5
        return fp.query_gpu_memory(reactor, path=path, timeout=0.2).addCallback(check)


# ---------------------------------------------------------------- NeedBook

def test_needbook_keeps_the_largest_and_persists(tmp_path):
    path = fp.needbook_path(str(tmp_path / "children.json"))
    assert path == str(tmp_path / "children.needs.json")
    assert fp.needbook_path("/run/x.pid.children") == "/run/x.pid.children.needs.json"
    book = fp.NeedBook.load(path)
    assert book.get("cmd a") is None and book.last_error is None
    assert book.record("cmd a", 100 * 2**20 + 1)
    assert book.get("cmd a") == 101 * 2**20  # rounded up to a MiB
    assert not book.record("cmd a", 50 * 2**20)
    assert not book.record("cmd a", 101 * 2**20)
    assert book.record("cmd b", 1)
    assert os.listdir(tmp_path) == ["children.needs.json"]  # no temporary file left
    with open(path) as f:
        assert json.load(f) == {"version": 1, "needs": {"cmd a": 101 * 2**20, "cmd b": 2**20}}
    again = fp.NeedBook.load(path)
    assert again.as_dict() == {"cmd a": 101 * 2**20, "cmd b": 2**20}
    assert again.raise_to("cmd a", 3 * GiB) == 3 * GiB
    assert again.raise_to("cmd a", GiB) == 3 * GiB  # never lowered
    assert again.raise_to("cmd c", 5) == 2**20
    again.prune(k for k in ("cmd a", "cmd z"))
    assert fp.NeedBook.load(path).as_dict() == {"cmd a": 3 * GiB}


def test_needbook_bad_files(tmp_path):
    path = tmp_path / "needs.json"
    for text in ("{not json", "[]", '{"needs": 5}', '{"version": 1}'):
        path.write_text(text)
        book = fp.NeedBook.load(str(path))
        assert book.as_dict() == {} and book.last_error.startswith("cannot read")
    path.write_text('{"needs": {"ok": 1048576, "neg": -1, "str": "5", "float": 1.5, "bool": true}}')
    assert fp.NeedBook.load(str(path)).as_dict() == {"ok": 2**20}
    book = fp.NeedBook(str(tmp_path / "missing-dir" / "needs.json"))
    assert book.record("k", 10)  # kept in memory even when it cannot be written
    assert book.last_error.startswith("cannot write") and book.get("k") == 2**20
    assert os.listdir(tmp_path) == ["needs.json"]
    memory_only = fp.NeedBook(None, autosave=True)
    assert memory_only.record("k", 1) and memory_only.save() is None
    manual = fp.NeedBook(str(tmp_path / "manual.json"), autosave=False)
    manual.record("k", 1)
    assert not (tmp_path / "manual.json").exists()
    assert manual.save() is None and fp.NeedBook.load(str(tmp_path / "manual.json")).get("k") == 2**20


# ---------------------------------------------------------------- OOM lines, resolution

@pytest.mark.parametrize("line, amount", [
    ("ggml_backend_cuda_buffer_type_alloc_buffer: allocating 144817.04 MiB on device 0: cudaMalloc failed: "
     "out of memory", int(144817.04 * 2**20)),
    ("alloc_tensor_range: failed to allocate CUDA0 buffer of size 151851674624", 151851674624),
    ("ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of size 137438953504", 137438953504),
    ("llama_model_load: error loading model: unable to allocate CUDA0 buffer", None),
    ("CUDA error: out of memory", None),
    ("error:failed to allocate buffer, size = 33074.89 MiB", int(33074.89 * 2**20)),
    ("ggml_aligned_malloc: insufficient memory (attempted to allocate 2048.00 MB)", 2048 * 2**20),
    ("llama_init_from_model: failed to allocate 1.5 GiB for the KV cache", int(1.5 * GiB)),
    ("ggml_vulkan: Device memory allocation of size 1000 failed: ErrorOutOfDeviceMemory", 1000),
])
def test_oom_lines(line, amount):
    oom = fp.find_oom(["srv load: loading model", line, "main: exiting"])
    assert oom == fp.OutOfMemory((line,), amount)


def test_oom_tail():
    tail = ("llama_kv_cache: CPU KV buffer size = 2.00 MiB\n"
            "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 1024.00 MiB on device 0: cudaMalloc failed: "
            "out of memory\n"
            "ggml_gallocr_reserve_n: failed to allocate CUDA0 buffer of size 2147483648\n"
            "llama_init_from_model: failed to allocate compute buffers\n")
    oom = fp.find_oom(tail)
    assert len(oom.lines) == 3 and oom.amount == 2 * GiB
    assert fp.find_oom("srv main: server is listening\nllama_kv_cache: size = 2.00 MiB\n") is None
    assert fp.find_oom(["ggml_cuda_host_malloc: failed to allocate 512.00 MiB of pinned memory: out of memory"]) is None
    assert fp.find_oom([]) is None


def test_resolve_need(tmp_path):
    write_gguf(tmp_path / "m.gguf")
    est = fp.estimate_need(["s", "-m", str(tmp_path / "m.gguf")])
    assert fp.resolve_need(8 * GiB, declared=GiB, measured=2 * GiB, estimated=est) == (GiB, "declared")
    assert fp.resolve_need(8 * GiB, measured=2 * GiB, estimated=est) == (2 * GiB, "measured")
    assert fp.resolve_need(8 * GiB, measured=5, estimated=est) == (5, "measured")  # below the estimate too
    assert fp.resolve_need(8 * GiB, estimated=est) == (est.total, "estimated")
    assert fp.resolve_need(8 * GiB, estimated=123) == (123, "estimated")
    assert fp.resolve_need(8 * GiB) == (8 * GiB, "unknown")
    assert {s for _, s in [fp.resolve_need(1, declared=0), fp.resolve_need(1)]} <= set(fp.SOURCES)
