"""Tiny, deterministic GGUF models that a real ``llama-server`` can load.

They make the bundled demo (``examples/demo.yaml``) and the end-to-end tests run
real llama.cpp children without downloading any model from a hub::

    python -m llamaswap.demo.tinymodels [OUT_DIR]      # prints "<name> <path>" per model

or from Python::

    from llamaswap.demo.tinymodels import ensure_models
    paths = ensure_models()     # {"chat-a": Path(...), "chat-b": ..., "embed": ..., "rerank": ...}

Models are generated on first use into a cache directory
(``$XDG_CACHE_HOME/llamaswap/models``, else ``~/.cache/llamaswap/models``) and
reused afterwards; each file is written to a temporary name and renamed, so a
reader never sees a half-written model and two concurrent generators are
harmless (they write the same bytes). Generating all four takes about 3 s and
needs the ``gguf`` and ``numpy`` packages (``pip install 'llamaswap[llama]'``);
reading cached models needs neither.

===============  ========  ===========================================================
name             file      behaviour in ``llama-server``
===============  ========  ===========================================================
``chat-a``       4.2 MB    llama arch, chatml template, context 4096; answers
                           ``Hello! I am tiny chat model A.`` (10 tokens, finish ``stop``)
``chat-b``       4.2 MB    same shape, answers ``Hi there, this is model B speaking.``
``embed``        2.9 MB    bert, 64-dim embeddings; run with ``--embeddings --pooling mean``
``rerank``       2.9 MB    bert with a classifier head (pooling RANK); run with ``--reranking``
===============  ========  ===========================================================

How a chat model gives a fixed answer: the weights are random, but the token
embeddings and the output matrix turn the model into a bigram machine. Each
token's embedding puts its weight on one "channel": channel 0 for every
ordinary token, channel ``1+i`` for the i-th token of the answer. The output
matrix maps channel 0 to answer token 0, channel ``1+i`` to answer token ``i+1``
and the last channel to ``<|im_end|>``. The random attention and FFN layers
are scaled down so that they cannot change the top token. Whatever the prompt,
the reply is the answer followed by end-of-turn. With ``"ignore_eos": true`` the
sentence repeats back to back up to the context size, which gives long streams
(about 2000 tokens/s on 2 cores). Embedding and rerank scores are random but
deterministic.

The tokenizer tables come from two vocab-only GGUF files of llama.cpp (MIT)
shipped in ``llamaswap/demo/data/vocab/`` (see the LICENSE file there).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # gguf and numpy are optional: imported only when generating
    import gguf
    import numpy as np

__all__ = ["MODELS", "TinyModel", "default_cache_dir", "ensure_models", "generate_model", "model_path"]


class TinyModel:
    """One generated model: its short name, file name and how to build it."""

    def __init__(self, name: str, filename: str, kind: str, seed: int, answer: str | None = None):
        self.name = name
        self.filename = filename
        self.kind = kind  # "chat", "embed" or "rerank"
        self.seed = seed
        self.answer = answer

    def __repr__(self) -> str:
        return f"TinyModel({self.name!r}, {self.filename!r})"


#: The four models, by short name (the name ``--tiny`` of ``llamaswap.demo.llama_server`` takes).
MODELS: dict[str, TinyModel] = {
    m.name: m
    for m in (
        TinyModel("chat-a", "tiny-chat-a.gguf", "chat", 1001, "Hello! I am tiny chat model A."),
        TinyModel("chat-b", "tiny-chat-b.gguf", "chat", 2002, "Hi there, this is model B speaking."),
        TinyModel("embed", "tiny-embed.gguf", "embed", 3003),
        TinyModel("rerank", "tiny-rerank.gguf", "rerank", 4004),
    )
}

SPM_VOCAB = "ggml-vocab-llama-spm.gguf"  # SentencePiece, 32000 tokens: chat models
BERT_VOCAB = "ggml-vocab-bert-bge.gguf"  # WordPiece, 30522 tokens: embed and rerank

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# hyper-parameters of the chat (llama) models
CHAT_N_EMBD = 64
CHAT_N_LAYER = 2
CHAT_N_HEAD = 4
CHAT_N_FF = 128
CHAT_N_CTX = 4096  # room for long `ignore_eos` generations; the KV cache is only ~2 MB

# hyper-parameters of the bert models
BERT_N_EMBD = 64
BERT_N_LAYER = 2
BERT_N_HEAD = 4
BERT_N_FF = 128
BERT_N_CTX = 512


class MissingDependency(RuntimeError):
    """Generation needs ``gguf`` and ``numpy``, which are optional dependencies."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/llamaswap/models``, or ``~/.cache/llamaswap/models``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llamaswap" / "models"


def model_path(name: str, directory: str | os.PathLike[str] | None = None) -> Path:
    """Where model ``name`` lives (or will live) in ``directory``; nothing is generated.

    :raises KeyError: for an unknown name.
    """
    if name not in MODELS:
        raise KeyError(f"unknown tiny model {name!r}; choose from {', '.join(MODELS)}")
    base = Path(directory) if directory is not None else default_cache_dir()
    return base / MODELS[name].filename


def ensure_models(
    dir: str | os.PathLike[str] | None = None, names: list[str] | None = None  # noqa: A002 (public API name)
) -> dict[str, Path]:
    """Return ``{name: path}`` for the tiny models, generating the missing ones.

    :param dir: the cache directory; ``None`` means :func:`default_cache_dir`.
    :param names: only these models (default: all four).
    :raises MissingDependency: a model has to be generated but ``gguf``/``numpy`` are missing.
    """
    wanted = list(MODELS) if names is None else list(names)
    paths = {name: model_path(name, dir) for name in wanted}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        out = next(iter(paths.values())).parent
        out.mkdir(parents=True, exist_ok=True)
        vocabs: dict[str, dict[str, list[Any]]] = {}
        for name in missing:
            generate_model(MODELS[name], paths[name], vocabs)
    return paths


def generate_model(model: TinyModel, dest: Path, vocab_cache: dict | None = None) -> None:
    """Write ``model`` to ``dest`` atomically (a temporary file in the same directory, then a rename).

    :param vocab_cache: vocab tables already read, by file name; filled in as needed.
    """
    _import_deps()
    vocab_cache = {} if vocab_cache is None else vocab_cache
    vocab_file = SPM_VOCAB if model.kind == "chat" else BERT_VOCAB
    if vocab_file not in vocab_cache:
        vocab_cache[vocab_file] = _read_vocab(vocab_file)
    vocab = vocab_cache[vocab_file]
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        if model.kind == "chat":
            assert model.answer is not None
            _write_chat_model(Path(tmp), Path(model.filename).stem, model.seed, model.answer, vocab)
        else:
            _write_bert_model(Path(tmp), Path(model.filename).stem, model.seed, vocab, rerank=model.kind == "rerank")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should stay readable
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _import_deps() -> None:
    global gguf, np, QT  # noqa: PLW0603 (optional dependencies, imported on first generation)
    try:
        import gguf
        import numpy as np
        from gguf import GGMLQuantizationType as QT
    except ImportError as e:
        raise MissingDependency(
            f"generating the tiny models needs the gguf and numpy packages ({e}); "
            "install them with: pip install 'llamaswap[llama]'  (or: pip install gguf==0.19.0 numpy)"
        ) from None


def _read_vocab(filename: str) -> dict[str, list[Any]]:
    with resources.as_file(resources.files(__package__) / "data" / "vocab" / filename) as path:
        reader = gguf.GGUFReader(str(path))
        out = {}
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            field = reader.fields.get(key)
            out[key] = None if field is None else list(field.contents())
        return out


def _add(w: gguf.GGUFWriter, name: str, arr: np.ndarray | list[float], qtype: Any) -> None:
    if qtype == QT.F32:
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    elif qtype == QT.F16:
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float16))
    else:
        data = gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)
        w.add_tensor(name, data, raw_dtype=qtype)


def _tokenize_answer(text: str, tok2id: dict[str, int]) -> list[int]:
    """Greedy longest-match split of ``text`` into vocab pieces, SentencePiece style.

    A space becomes the ``\u2581`` prefix of the next piece; the first piece has
    none, so the answer starts without a blank. Every token must be distinct:
    the bigram trick maps each token to exactly one successor.
    """
    s = text.replace(" ", "\u2581")
    ids = []
    i = 0
    while i < len(s):
        for j in range(len(s), i, -1):
            if s[i:j] in tok2id:
                ids.append(tok2id[s[i:j]])
                i = j
                break
        else:
            raise ValueError(f"cannot tokenize {s[i:]!r} with this vocab")
    if len(set(ids)) != len(ids):
        raise ValueError(f"answer {text!r} repeats a token; pick words that are all different")
    return ids


def _write_chat_model(out: Path, name: str, seed: int, answer: str, vocab: dict) -> None:
    rng = np.random.default_rng(seed)
    d, n_ff = CHAT_N_EMBD, CHAT_N_FF

    tokens = list(vocab["tokenizer.ggml.tokens"])
    scores = list(vocab["tokenizer.ggml.scores"])
    ttypes = list(vocab["tokenizer.ggml.token_type"])
    # chatml control tokens appended after the 32000 SentencePiece tokens
    im_end = len(tokens) + 1
    tokens += ["<|im_start|>", "<|im_end|>"]
    scores += [0.0, 0.0]
    ttypes += [int(gguf.TokenType.CONTROL)] * 2
    n_vocab = len(tokens)
    tok2id = {t: i for i, t in enumerate(tokens) if ttypes[i] == gguf.TokenType.NORMAL}

    ans = _tokenize_answer(answer, tok2id)
    assert len(ans) + 1 < d, "answer too long for the embedding width"

    # token embeddings: one channel dimension of weight 1.0, plus small noise
    emb = rng.normal(0.0, 0.02, size=(n_vocab, d)).astype(np.float32)
    emb[:, 0] += 1.0
    for i, t in enumerate(ans):
        emb[t, 0] -= 1.0
        emb[t, 1 + i] += 1.0

    # output: channel -> next token, with a large margin (logit ~ 5 * 8 = 40)
    boost = 5.0
    outw = rng.normal(0.0, 0.02, size=(n_vocab, d)).astype(np.float32)
    outw[ans[0], 0] += boost
    for i in range(len(ans) - 1):
        outw[ans[i + 1], 1 + i] += boost
    outw[im_end, len(ans)] += boost
    # runner-up after the last answer token: start the sentence again (what
    # "ignore_eos": true picks once <|im_end|> is banned)
    outw[ans[0], len(ans)] += boost / 2

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(name)
    w.add_description(f"random-weight test model; fixed answer: {answer}")
    w.add_context_length(CHAT_N_CTX)
    w.add_embedding_length(d)
    w.add_block_count(CHAT_N_LAYER)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(CHAT_N_HEAD)
    w.add_head_count_kv(CHAT_N_HEAD)
    w.add_rope_dimension_count(d // CHAT_N_HEAD)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(ttypes)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_eot_token_id(im_end)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)

    _add(w, "token_embd.weight", emb, QT.Q8_0)
    _add(w, "output_norm.weight", np.ones(d), QT.F32)
    _add(w, "output.weight", outw, QT.Q4_0)  # 4-bit keeps the file < 5 MB; the margins are huge

    s_in = 1.0 / np.sqrt(d)
    for il in range(CHAT_N_LAYER):
        p = f"blk.{il}."
        _add(w, p + "attn_norm.weight", np.ones(d), QT.F32)
        _add(w, p + "attn_q.weight", rng.normal(0, s_in, (d, d)), QT.F16)
        _add(w, p + "attn_k.weight", rng.normal(0, s_in, (d, d)), QT.F16)
        _add(w, p + "attn_v.weight", rng.normal(0, s_in, (d, d)), QT.F16)
        _add(w, p + "attn_output.weight", rng.normal(0, 0.004, (d, d)), QT.F16)
        _add(w, p + "ffn_norm.weight", np.ones(d), QT.F32)
        _add(w, p + "ffn_gate.weight", rng.normal(0, s_in, (n_ff, d)), QT.F16)
        _add(w, p + "ffn_up.weight", rng.normal(0, s_in, (n_ff, d)), QT.F16)
        _add(w, p + "ffn_down.weight", rng.normal(0, 0.004, (d, n_ff)), QT.F16)

    _write(w)


def _write_bert_model(out: Path, name: str, seed: int, vocab: dict, rerank: bool) -> None:
    rng = np.random.default_rng(seed)
    d, n_ff = BERT_N_EMBD, BERT_N_FF
    tokens = list(vocab["tokenizer.ggml.tokens"])
    ttypes = list(vocab["tokenizer.ggml.token_type"])
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(str(out), "bert")
    w.add_name(name)
    w.add_description("random-weight test model (" + ("reranker" if rerank else "embeddings") + ")")
    w.add_context_length(BERT_N_CTX)
    w.add_embedding_length(d)
    w.add_block_count(BERT_N_LAYER)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(BERT_N_HEAD)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.RANK if rerank else gguf.PoolingType.MEAN)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    if rerank:
        w.add_classifier_output_labels(["score"])

    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("bert-bge")
    w.add_token_list(tokens)
    w.add_token_types(ttypes)
    w.add_token_type_count(2)
    w.add_unk_token_id(100)
    w.add_sep_token_id(102)
    w.add_pad_token_id(0)
    w.add_bos_token_id(101)  # [CLS]
    w.add_mask_token_id(103)

    s_in = 1.0 / np.sqrt(d)
    _add(w, "token_embd.weight", rng.normal(0, 1.0, (n_vocab, d)), QT.Q8_0)
    _add(w, "token_types.weight", rng.normal(0, 0.1, (2, d)), QT.F32)
    _add(w, "position_embd.weight", rng.normal(0, 0.1, (BERT_N_CTX, d)), QT.F16)
    _add(w, "token_embd_norm.weight", np.ones(d), QT.F32)
    _add(w, "token_embd_norm.bias", np.zeros(d), QT.F32)
    for il in range(BERT_N_LAYER):
        p = f"blk.{il}."
        for t in ("attn_q", "attn_k", "attn_v"):
            _add(w, p + t + ".weight", rng.normal(0, s_in, (d, d)), QT.F16)
            _add(w, p + t + ".bias", rng.normal(0, 0.02, d), QT.F32)
        _add(w, p + "attn_output.weight", rng.normal(0, s_in, (d, d)), QT.F16)
        _add(w, p + "attn_output.bias", rng.normal(0, 0.02, d), QT.F32)
        _add(w, p + "attn_output_norm.weight", np.ones(d), QT.F32)
        _add(w, p + "attn_output_norm.bias", np.zeros(d), QT.F32)
        _add(w, p + "ffn_up.weight", rng.normal(0, s_in, (n_ff, d)), QT.F16)
        _add(w, p + "ffn_up.bias", rng.normal(0, 0.02, n_ff), QT.F32)
        _add(w, p + "ffn_down.weight", rng.normal(0, 1.0 / np.sqrt(n_ff), (d, n_ff)), QT.F16)
        _add(w, p + "ffn_down.bias", rng.normal(0, 0.02, d), QT.F32)
        _add(w, p + "layer_output_norm.weight", np.ones(d), QT.F32)
        _add(w, p + "layer_output_norm.bias", np.zeros(d), QT.F32)
    if rerank:
        _add(w, "cls.weight", rng.normal(0, s_in, (d, d)), QT.F32)
        _add(w, "cls.bias", np.zeros(d), QT.F32)
        _add(w, "cls.output.weight", rng.normal(0, 1.0, (1, d)), QT.F32)
        _add(w, "cls.output.bias", np.zeros(1), QT.F32)

    _write(w)


def _write(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m llamaswap.demo.tinymodels [OUT_DIR] [--only NAME ...]``: print ``<name> <path>`` lines."""
    ap = argparse.ArgumentParser(
        prog="python -m llamaswap.demo.tinymodels",
        description="Generate (once, then reuse) the tiny GGUF models of the llamaswap demo and tests.",
    )
    ap.add_argument("out_dir", nargs="?", help=f"cache directory (default: {default_cache_dir()})")
    ap.add_argument("--only", action="append", choices=list(MODELS), metavar="NAME",
                    help="only this model (repeatable): " + ", ".join(MODELS))
    args = ap.parse_args(argv)
    try:
        paths = ensure_models(args.out_dir, args.only)
    except MissingDependency as e:
        print(f"llamaswap.demo.tinymodels: {e}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
