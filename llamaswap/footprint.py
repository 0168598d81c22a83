"""A model's memory need: estimated from its GGUF header (:func:`try_estimate`: weights of the model,
its split shards, ``--mmproj`` and draft + KV cache + overhead; tensor data is never read), measured on its
process group (:func:`measure_group`: /proc RSS + nvidia-smi, in ``llamaswap.procmem``), remembered (:class:`NeedBook`), raised after an
out-of-memory start (:func:`find_oom`), and chosen (:func:`resolve_need`).

KV cache as llama.cpp allocates it (checked against the bundled llama-server): a cell holds, per layer,
``head_count_kv * (key_length * bytes(type_k) + value_length * bytes(type_v))``. ``-np`` slots share the
``-c`` context (:func:`kv_cells`: unified -> ``pad256(n_ctx)`` cells, else ``np * pad256(n_ctx // np)``).
Sliding-window layers count at full context, MLA/recurrent state is not modelled, non-causal models
(bert-like embedders) have no KV cache, and ``--fit`` may shrink an unset context on a GPU: an upper
bound there. Compute buffers and the draft model's KV cache belong in the overhead.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import attrs

# measurement moved to llamaswap.procmem; its names stay importable from here
from llamaswap.procmem import (  # noqa: F401
    NVIDIA_SMI_ARGS, GroupMemory, group_pids, group_rss, measure_group, parse_nvidia_smi_apps, process_rss,
    query_gpu_memory)

MiB = 1 << 20
#: bytes per 32 elements of each KV cache type (ggml block sizes)
KV_TYPE_BYTES_PER_32 = {"f32": 128, "f16": 64, "bf16": 64, "q8_0": 34, "q4_0": 18, "q4_1": 20,
                        "q5_0": 22, "q5_1": 24, "iq4_nl": 18}
SOURCES = ("declared", "measured", "estimated", "unknown")


# ---------------------------------------------------------------- GGUF header

class GGUFError(ValueError):
    """Not a GGUF file, or a truncated or corrupt header."""

@attrs.frozen
class GGUFMeta:
    """The key/value section of a GGUF header; ``tokenizer.*`` and long arrays are skipped, not kept."""
    version: int
    tensor_count: int
    values: Mapping[str, Any]
    header_bytes: int  #: bytes parsed, from the magic to the end of the key/value section

    def hparam(self, name: str, default: Any = None) -> Any:
        """``<general.architecture>.<name>``, e.g. ``hparam("attention.head_count_kv")``."""
        return self.values.get(f"{self.values.get('general.architecture')}.{name}", default)


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _KEEP_ARRAY = 8, 9, 4096


class _Header:
    def __init__(self, buf: Any) -> None:
        self.buf, self.off, self.end, self.e, self.lf = buf, 0, len(buf), "<", "Q"

    def take(self, fmt: str) -> Any:
        s = struct.Struct(self.e + fmt)
        self.off += s.size
        return s.unpack_from(self.buf, self.off - s.size)[0]

    def count(self) -> int:
        n = self.take(self.lf)
        if n > self.end - self.off:  # every element takes at least a byte
            raise GGUFError(f"count {n} at byte {self.off} runs past the end of the file")
        return n

    def string(self) -> str:
        n = self.count()
        self.off += n
        return bytes(self.buf[self.off - n:self.off]).decode("utf-8", "replace")

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise GGUFError(f"unknown value type {vtype} at byte {self.off}")
        etype, n = self.take("I"), self.count()
        keep = keep and n <= _KEEP_ARRAY
        if etype in _SCALARS:
            s = struct.Struct(f"{self.e}{n}{_SCALARS[etype]}")
            if self.off + s.size > self.end:
                raise GGUFError("an array runs past the end of the file")
            self.off += s.size
            return s.unpack_from(self.buf, self.off - s.size) if keep else None
        if etype == _STRING and keep:
            return tuple(self.string() for _ in range(n))
        if etype == _STRING:  # a vocab: walk the length prefixes only
            ln, buf, off = struct.Struct(self.e + self.lf), self.buf, self.off
            for _ in range(n):
                off += ln.size + ln.unpack_from(buf, off)[0]
            if off > self.end:
                raise GGUFError("a string array runs past the end of the file")
            self.off = off
            return None
        for _ in range(n):
            self.value(etype, False)
        return None


def read_gguf_meta(path: str) -> GGUFMeta:
    """Parse the header of GGUF file ``path`` (memory-mapped: only the header's pages are read).
    :raises GGUFError: not GGUF, truncated or corrupt. :raises OSError: unreadable."""
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # an empty file
            raise GGUFError(str(e)) from None
    try:
        h = _Header(buf)
        if buf[:4] != b"GGUF":
            raise GGUFError("not a GGUF file (bad magic)")
        h.off, version = 4, struct.unpack_from("<I", buf, 4)[0]
        if version not in (1, 2, 3):  # a big-endian file
            h.e, version = ">", struct.unpack_from(">I", buf, 4)[0]
            if version not in (1, 2, 3):
                raise GGUFError("unsupported GGUF version")
        h.off, h.lf = 8, "I" if version == 1 else "Q"
        tensors, n_kv = h.take(h.lf), h.count()
        values: dict[str, Any] = {}
        for _ in range(n_kv):
            key = h.string()
            v = h.value(h.take("I"), not key.startswith("tokenizer."))
            if v is not None:
                values[key] = v
        return GGUFMeta(version, tensors, values, h.off)
    except (struct.error, OverflowError, MemoryError) as e:
        raise GGUFError(f"truncated or corrupt header ({e})") from None
    finally:
        buf.close()


# ---------------------------------------------------------------- argv

@attrs.frozen
class ModelArgs:
    """What a llama-server argv says about memory (paths as given)."""
    model: Optional[str] = None
    mmproj: Optional[str] = None
    draft: Optional[str] = None
    ctx_size: Optional[int] = None
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    parallel: Optional[int] = None
    kv_per_slot: Optional[int] = None
    kv_unified: Optional[bool] = None  #: ``-kvu`` / ``-no-kvu``; None: llama-server's default
    tiny: Optional[str] = None  #: ``--tiny NAME`` of ``llamaswap-llama-server``
    tiny_dir: Optional[str] = None


#: field: (flags, environment variables of llama-server)
_FLAGS = {"model": ("-m --model", "LLAMA_ARG_MODEL"), "mmproj": ("-mm --mmproj", "LLAMA_ARG_MMPROJ"),
          "draft": ("-md --model-draft --spec-draft-model", "LLAMA_ARG_SPEC_DRAFT_MODEL LLAMA_ARG_MODEL_DRAFT"),
          "ctx_size": ("-c --ctx-size", "LLAMA_ARG_CTX_SIZE"),
          "cache_type_k": ("-ctk --cache-type-k", "LLAMA_ARG_CACHE_TYPE_K"),
          "cache_type_v": ("-ctv --cache-type-v", "LLAMA_ARG_CACHE_TYPE_V"),
          "parallel": ("-np --parallel", "LLAMA_ARG_N_PARALLEL"),
          "kv_per_slot": ("--kv-unified-per-slot", "LLAMA_ARG_KV_UNIFIED_PER_SLOT"),
          "kv_unified": ("", "LLAMA_ARG_KV_UNIFIED"), "tiny": ("--tiny", ""), "tiny_dir": ("--tiny-dir", "")}
_BY_FLAG = {flag: field for field, (flags, _) in _FLAGS.items() for flag in flags.split()}
_SWITCHES = {"-kvu": "1", "--kv-unified": "1", "-no-kvu": "0", "--no-kv-unified": "0"}


def parse_model_args(argv: Sequence[str], env: Optional[Mapping[str, str]] = None) -> ModelArgs:
    """``-m X``/``--model X``/``--model=X`` and friends in ``argv`` (the last wins), else ``env``'s
    ``LLAMA_ARG_*``; ``--tiny``/``--tiny-dir`` count before a ``--`` only, as the launcher reads them.
    A Python interpreter's own ``-m MODULE`` (``python -m launcher ...``) names a module, not a model."""
    if argv and os.path.basename(argv[0]).startswith("python"):
        for k in range(1, len(argv) - 1):
            if argv[k] == "-m":
                argv = argv[k + 2:]
                break
            if not argv[k].startswith("-"):
                break
    found: dict[str, str] = {}
    dashdash, i = False, 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        name, eq, value = arg.partition("=") if arg.startswith("-") else (arg, "", "")
        field = "kv_unified" if arg in _SWITCHES else _BY_FLAG.get(name)
        if arg == "--":
            dashdash = True
        elif field == "kv_unified":
            found[field] = _SWITCHES[arg]
        elif field and not (dashdash and field.startswith("tiny")):
            if not eq:
                if i >= len(argv):
                    break
                value, i = argv[i], i + 1
            found[field] = value
    for field, (_, names) in _FLAGS.items():
        for name in names.split():
            if field not in found and env and env.get(name):
                found[field] = env[name]
    out: dict[str, Any] = {}
    for field, value in found.items():
        if field == "kv_unified":
            out[field] = value.lower() in ("1", "true", "on", "enabled")
        elif field in ("ctx_size", "parallel", "kv_per_slot"):
            try:
                out[field] = int(value)
            except ValueError:
                pass
        else:
            out[field] = value.lower() if field.startswith("cache_type") else value
    return ModelArgs(**out)


_SHARD = re.compile(r"^(?P<stem>.*)-\d{5}-of-(?P<n>\d{5})\.gguf$")


def shard_paths(path: str) -> tuple[str, ...]:
    """All shards of a split model (``x-00001-of-00003.gguf`` ...), else ``(path,)``."""
    m = _SHARD.match(os.path.basename(path))
    if not m or int(m["n"]) < 1:
        return (path,)
    d, n = os.path.dirname(path), int(m["n"])
    return tuple(os.path.join(d, f"{m['stem']}-{k:05d}-of-{n:05d}.gguf") for k in range(1, n + 1))


def _tinymodels() -> Any:
    try:
        from llamaswap.demo import tinymodels  # type: ignore[attr-defined]
    except ImportError:
        from llamaswap import tinymodels  # type: ignore[no-redef]
    return tinymodels


# ---------------------------------------------------------------- estimate

@attrs.frozen
class Estimate:
    """An estimated need in bytes: ``total = weights + kv + overhead``."""
    total: int
    weights: int
    kv: int
    overhead: int
    context: int  #: the context size (``-c``, else the model's)
    kv_cells: int  #: KV cells over all streams, after llama.cpp's padding
    files: tuple[str, ...]  #: every file whose size was summed; the header was read from the first
    notes: tuple[str, ...] = ()  #: what was assumed or left out


@attrs.frozen
class NoEstimate:
    """No estimate (the model file is missing, unreadable or not GGUF), and why. False as a bool."""
    reason: str

    def __bool__(self) -> bool:
        return False


def kv_cells(n_ctx: int, parallel: Optional[int] = None, unified: Optional[bool] = None) -> int:
    """The KV cells llama-server allocates for ``-c n_ctx -np parallel``: ``-np`` auto means 4 slots and
    a unified cache (unless ``-no-kvu``), an explicit ``-np`` one stream a slot (unless ``-kvu``)."""
    slots = parallel if parallel and parallel > 0 else None
    streams = 1 if (slots is None if unified is None else unified) else (slots or 4)
    return -(-(n_ctx // streams) // 256) * 256 * streams


def _kv(meta: GGUFMeta, args: ModelArgs, notes: list[str]) -> tuple[int, int, int]:
    """``(bytes, context, cells)`` of the KV cache of ``meta`` run with ``args``."""
    ctx = args.ctx_size or 0
    if ctx <= 0 and args.kv_per_slot and args.parallel and args.parallel > 0:
        ctx = args.parallel * args.kv_per_slot  # --kv-unified-per-slot without -c
    if ctx <= 0:
        ctx = int(meta.hparam("context_length", 0) or 0)
    layers, heads = meta.hparam("block_count"), meta.hparam("attention.head_count")
    if meta.hparam("attention.causal") is False:
        notes.append("non-causal model: no KV cache")
        return 0, ctx, 0
    if not isinstance(layers, int) or layers <= 0 or not heads or not ctx:
        notes.append("no block_count, head_count or context size: KV cache not counted")
        return 0, ctx, 0
    per32 = []
    for which, t in (("K", args.cache_type_k), ("V", args.cache_type_v)):
        if t not in KV_TYPE_BYTES_PER_32:
            notes.append(f"unknown cache type {t!r} for {which}: counted as f16")
        per32.append(KV_TYPE_BYTES_PER_32.get(t, 64))

    def per_layer(v: Any) -> list[int]:  # an int, or an array of one value a layer
        return [int(x) for x in v][:layers] if isinstance(v, tuple) else [int(v)] * layers

    n_head0 = per_layer(heads)[0]
    head_dim = int(meta.hparam("embedding_length", 0) or 0) // n_head0 if n_head0 else 0
    k_len = int(meta.hparam("attention.key_length", head_dim) or 0)
    v_len = int(meta.hparam("attention.value_length", head_dim) or 0)
    cells, total = kv_cells(ctx, args.parallel, args.kv_unified), 0
    for n_kv in per_layer(meta.hparam("attention.head_count_kv", heads)):  # ggml rows: n / 32 * block
        total += math.ceil(cells * n_kv * k_len * per32[0] / 32) + math.ceil(cells * n_kv * v_len * per32[1] / 32)
    return total, ctx, cells


def _sizes(path: str, notes: list[str]) -> tuple[int, list[str]]:
    total, files = 0, []
    for p in shard_paths(path):
        try:
            total, files = total + os.stat(p).st_size, files + [p]
        except OSError:
            notes.append(f"missing {p}")
    return total, files


def try_estimate(argv: Sequence[str], *, overhead: int = 0, cwd: Optional[str] = None,
                 env: Optional[Mapping[str, str]] = None) -> Union[Estimate, NoEstimate]:
    """Estimate the need of the llama-server ``argv`` runs (never raises on a bad file). ``overhead``: bytes
    added; ``cwd``: the child's directory (relative paths); ``env``: the child's environment."""
    args = parse_model_args(argv, env)
    model = args.model
    if model is None and args.tiny:
        try:
            model = str(_tinymodels().model_path(args.tiny, args.tiny_dir))
        except KeyError as e:
            return NoEstimate(str(e.args[0]))
    if model is None:
        return NoEstimate("no -m/--model in the command")

    def resolve(p: str) -> str:
        return os.path.join(cwd or os.getcwd(), os.path.expanduser(p))

    model = resolve(model)
    if not os.path.isfile(model):
        return NoEstimate(f"model file {model} not found")
    first = shard_paths(model)[0]
    header = first if os.path.isfile(first) else model
    try:
        meta = read_gguf_meta(header)
    except (OSError, GGUFError) as e:
        return NoEstimate(f"cannot read {header}: {e}")
    notes: list[str] = []
    weights, files = _sizes(model, notes)
    for extra in (args.mmproj, args.draft):
        if extra:
            size, more = _sizes(resolve(extra), notes)
            weights, files = weights + size, files + more
    kv, ctx, cells = _kv(meta, args, notes)
    return Estimate(weights + kv + overhead, weights, kv, overhead, ctx, cells, tuple(files), tuple(notes))


def estimate_need(argv: Sequence[str], *, overhead: int = 0, cwd: Optional[str] = None,
                  env: Optional[Mapping[str, str]] = None) -> Optional[Estimate]:
    """:func:`try_estimate`, with None for a :class:`NoEstimate`."""
    e = try_estimate(argv, overhead=overhead, cwd=cwd, env=env)
    return e if isinstance(e, Estimate) else None


# ---------------------------------------------------------------- the book of needs

def needbook_path(state_file: str) -> str:
    """The needs file beside the daemon's state file: ``children.json`` -> ``children.needs.json``."""
    return (state_file[:-5] if state_file.endswith(".json") else state_file) + ".needs.json"


class NeedBook:
    """The largest need seen per key (a model's expanded command), in bytes rounded up to a MiB. Values only
    grow; each change is written at once (``autosave``) to ``path`` atomically (temporary file + rename)."""

    def __init__(self, path: Optional[str], needs: Optional[Mapping[str, int]] = None, autosave: bool = True):
        self.path, self.autosave, self._needs = path, autosave, dict(needs or {})
        self.last_error: Optional[str] = None  #: the last load or save failure

    @classmethod
    def load(cls, path: str, autosave: bool = True) -> "NeedBook":
        """Read ``path``; a missing or corrupt file gives an empty book (``last_error`` says why)."""
        book = cls(path, autosave=autosave)
        try:
            with open(path, encoding="utf-8") as f:
                needs = json.load(f)["needs"]
            book._needs = {str(k): v for k, v in needs.items() if type(v) is int and v > 0}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            book.last_error = f"cannot read {path}: {e!r}"
        return book

    def get(self, key: str) -> Optional[int]:
        return self._needs.get(key)

    def as_dict(self) -> dict[str, int]:
        return dict(self._needs)

    def record(self, key: str, measured: int) -> bool:
        """Keep ``measured`` if it is the largest for ``key`` yet; True when the book changed."""
        value = -(-int(measured) // MiB) * MiB
        if value <= self._needs.get(key, 0):
            return False
        self._needs[key] = value
        if self.autosave:
            self.save()
        return True

    def raise_to(self, key: str, at_least: int) -> int:
        """A start of ``key`` ran out of memory: its need is at least ``at_least``. Returns the need."""
        self.record(key, at_least)
        return self._needs[key]

    def prune(self, keep: Iterable[str]) -> None:
        """Forget the keys not in ``keep`` (commands no longer configured)."""
        keep = set(keep)
        kept = {k: v for k, v in self._needs.items() if k in keep}
        if kept != self._needs:
            self._needs = kept
            if self.autosave:
                self.save()

    def save(self) -> Optional[str]:
        """Write the book; returns (and keeps in ``last_error``) an error message instead of raising."""
        if self.path is None:
            return None
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "needs": self._needs}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
            self.last_error = None
        except OSError as e:
            self.last_error = f"cannot write {self.path}: {e}"
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return self.last_error


# ---------------------------------------------------------------- out of memory; which need counts

_OOM = re.compile(r"failed to allocate|out of memory|unable to allocate|insufficient memory"
                  r"|alloc_buffer: allocating .* failed|ErrorOutOfDeviceMemory", re.IGNORECASE)
_AMOUNT = re.compile(r"(?:allocating|allocate|size)\s*=?\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|kB)?\b", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}  # ggml's "MB" means MiB


@attrs.frozen
class OutOfMemory:
    """llama.cpp's out-of-memory lines; ``amount``: the largest failed allocation printed (bytes), if any."""
    lines: tuple[str, ...]
    amount: Optional[int]


def find_oom(tail: Union[str, Iterable[str]]) -> Optional[OutOfMemory]:
    """The out-of-memory lines of llama-server in a log tail (a string or lines); None when there are none.
    Pinned host memory failures are left out: llama.cpp falls back to ordinary memory after them."""
    lines = tail.splitlines() if isinstance(tail, str) else list(tail)
    hits = tuple(ln for ln in lines if _OOM.search(ln) and "pinned memory" not in ln)
    amounts = [int(float(m[1]) * _UNITS[(m[2] or "")[:1].lower()]) for ln in hits for m in _AMOUNT.finditer(ln)]
    return OutOfMemory(hits, max(amounts, default=None)) if hits else None


def resolve_need(budget: int, *, declared: Optional[int] = None, measured: Optional[int] = None,
                 estimated: Union[Estimate, int, None] = None) -> tuple[int, str]:
    """``(bytes, source)``, source in :data:`SOURCES`: the configured ``memory`` > the largest measured
    (above or below the estimate, it replaces it) > the estimate > the whole ``budget`` ("unknown")."""
    if declared is not None:
        return int(declared), "declared"
    if measured is not None:
        return int(measured), "measured"
    if estimated is not None:
        return int(estimated.total if isinstance(estimated, Estimate) else estimated), "estimated"
    return int(budget), "unknown"
