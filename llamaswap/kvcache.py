"""``keepCache``: llama-server's KV cache saved at a planned stop and restored at the next start.

:class:`KvCache` is the ``lifecycle`` of every ``UpstreamProcess`` (one object for all models):

* :meth:`~KvCache.prepare`, before each spawn: the ``--slot-save-path`` directory is created
  (llama-server refuses to start without it).
* :meth:`~KvCache.after_ready`, once the health check passes and before the model counts as
  ready: the slots saved for this very command are restored (``POST /slots/<id>?action=restore``),
  then ``hooks.afterReady`` runs. The process stays ``starting`` meanwhile, so requests that
  queued during the start wait for it and the first of them finds the cache; the time counts in
  the load time the router, the scheduler and ``/metrics`` see. The restores are bounded by
  ``restoreTimeout``; a failure is logged and the model starts cold.
* :meth:`~KvCache.before_stop`, on a planned stop of a ready model (swap, ttl, unload, a reload
  that restarts it, shutdown) and before ``cmdStop``/SIGTERM: every slot holding tokens
  (``GET /slots``) is saved (``POST /slots/<id>?action=save``), bounded by ``saveTimeout``, then
  ``hooks.beforeStop`` runs. A crash never gets here: there is nothing to save.

Files are named ``kv-<model tag>-<command key>-slot<id>.bin`` in the model's directory: the tag
is a hash of the model id, the key a hash of the expanded command and environment, so a changed
command never restores the files of another, and a directory shared by two models keeps their
files apart. After each save the model's files are pruned, oldest first, to ``maxBytes``; a
model removed from the config by a reload loses its files once it has stopped
(:meth:`~KvCache.observe`). The files hold users' conversations: their names and contents are
never logged, and nothing here serves them. Each save and each restore logs one line.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional

import attr
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger

from llamaswap.config.keepcache import KeepCache, model_dir_name, slot_save_path
from llamaswap.hooks import TimedOut, answer_message, bounded, call_hooks, describe_failure, send_json
from llamaswap.observe import ModelEvent, Reloaded, Removed

__all__ = ["KvCache", "KvStats", "SavedFile", "command_key", "file_name", "list_files", "prune", "slots_to_save"]

_FILE = re.compile(r"^kv-([0-9a-f]{8})-([0-9a-f]{16})-slot(\d+)\.bin$")
#: /slots fields that tell how many tokens a slot holds (they differ between llama-server versions)
_TOKEN_FIELDS = ("n_past", "n_prompt_tokens", "n_prompt_tokens_cache", "n_cache_tokens", "n_tokens")


# -- files ----------------------------------------------------------------------------------------

def _tag(model_id: str) -> str:
    return hashlib.sha256(model_id.encode("utf-8")).hexdigest()[:8]


def command_key(model: Any) -> str:
    """The hash of a model's expanded command and environment: its files' key."""
    text = json.dumps([list(model.argv), [list(e) for e in model.env]], separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_name(model_id: str, key: str, slot: int) -> str:
    """The file name llama-server is asked to save slot ``slot`` under (no directory part)."""
    return f"kv-{_tag(model_id)}-{key}-slot{slot}.bin"


@attr.s(frozen=True, auto_attribs=True)
class SavedFile:
    path: str
    name: str
    key: str
    slot: int
    size: int
    mtime: float


def list_files(directory: str, model_id: str) -> list[SavedFile]:
    """The saved files of ``model_id`` in ``directory`` (no other file), oldest first."""
    tag = _tag(model_id)
    found = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for entry in entries:
        m = _FILE.match(entry.name)
        if m is None or m.group(1) != tag:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if entry.is_file(follow_symlinks=False):
            found.append(SavedFile(entry.path, entry.name, m.group(2), int(m.group(3)), st.st_size, st.st_mtime))
    return sorted(found, key=lambda f: (f.mtime, f.name))


def prune(directory: str, model_id: str, max_bytes: int) -> tuple[int, int]:
    """Delete ``model_id``'s files in ``directory``, oldest first, until they take at most
    ``max_bytes``; return ``(files deleted, bytes freed)``."""
    files = list_files(directory, model_id)
    total = sum(f.size for f in files)
    deleted = freed = 0
    for f in files:
        if total <= max_bytes:
            break
        if _unlink(f.path):
            deleted, freed, total = deleted + 1, freed + f.size, total - f.size
    return deleted, freed


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def slots_to_save(slots: list) -> list[int]:
    """The ids of the slots of a ``GET /slots`` answer that hold tokens and are idle.

    Where no slot reports a token count (an unknown llama-server version), every idle slot is
    saved: llama-server then says how many tokens each held, and empty ones are dropped. A slot
    still processing is not saved: its request is being cut off by the stop (llama-server would
    hold the save until it ends).
    """
    known = any(field in s for s in slots if isinstance(s, dict) for field in _TOKEN_FIELDS)
    ids = []
    for s in slots:
        if not isinstance(s, dict) or not isinstance(s.get("id"), int) or s.get("is_processing"):
            continue
        if not known or any(_int(s.get(field)) > 0 for field in _TOKEN_FIELDS):
            ids.append(s["id"])
    return ids


# -- what happened -----------------------------------------------------------------------------------

@attr.s(auto_attribs=True)
class KvStats:
    """A model's last save and last restore, for ``/running`` and ``/api/models``.

    :ivar saved_bytes: bytes written by the last save (None: no save yet).
    :ivar restored_tokens: tokens restored at the last start (0: a cold start; None: no start yet).
    """

    saved_bytes: Optional[int] = None
    saved_tokens: Optional[int] = None
    restored_tokens: Optional[int] = None


@attr.s(auto_attribs=True)
class _Outcome:
    slots: int = 0
    tokens: int = 0
    bytes: int = 0
    failures: list = attr.Factory(list)


class _Refused(Exception):
    """The server answered a slot action with an error."""


# -- the lifecycle ------------------------------------------------------------------------------------

class KvCache:
    """Saves and restores llama-server's slots around planned stops and starts; runs hooks.

    :param clock: ``IReactorTime`` for the bounds and the durations.
    :param log: where the save, restore and hook lines go.
    :param models: the models of the config at start (a reload's are learnt from ``Reloaded``).
    :param on_saved: ``(model id, bytes, seconds)`` after each save attempt that had slots to save.
    :param on_restored: ``(model id, tokens, seconds)`` after each restore attempt that had files.
    """

    def __init__(self, clock: Any, log: Optional[Logger] = None, models: Mapping[str, Any] = (),
                 on_saved: Optional[Callable[[str, int, float], None]] = None,
                 on_restored: Optional[Callable[[str, int, float], None]] = None) -> None:
        self.clock = clock
        self.log = log or Logger(namespace="llamaswap.kvcache")
        self._models: dict[str, Any] = dict(models or {})
        self._stats: dict[str, KvStats] = {}
        self._on_saved = on_saved or (lambda model_id, nbytes, seconds: None)
        self._on_restored = on_restored or (lambda model_id, tokens, seconds: None)

    def stats(self, model_id: str) -> Optional[KvStats]:
        """The model's last save and restore, or None before either."""
        return self._stats.get(model_id)

    def _stats_of(self, model_id: str) -> KvStats:
        return self._stats.setdefault(model_id, KvStats())

    # -- UpstreamProcess.lifecycle ----------------------------------------------------------------

    def prepare(self, model: Any) -> None:
        """Before a spawn: create the ``--slot-save-path`` directory (only the owner may read it).

        :raises OSError: when it cannot be created (the start fails with that reason).
        """
        directory = slot_save_path(model.argv)
        if directory and os.path.isabs(directory) and not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        self._models.setdefault(model.id, model)

    def after_ready(self, proc: Any) -> Optional[Deferred]:
        """Restore, then ``hooks.afterReady``; None when the model has neither. The Deferred never
        fails; cancelling it (the start is abandoned) stops the calls."""
        model = proc.model
        if model.keep_cache is None and not model.hooks_after_ready:
            return None
        return ensureDeferred(self._after_ready(proc.http, model))

    def before_stop(self, proc: Any) -> Optional[Deferred]:
        """Save, then ``hooks.beforeStop``; None when the model has neither. The Deferred never
        fails and fires within the bounds (``saveTimeout``, each hook's ``timeout``)."""
        model = proc.model
        if model.keep_cache is None and not model.hooks_before_stop:
            return None
        return ensureDeferred(self._before_stop(proc.http, model))

    async def _after_ready(self, http: Any, model: Any) -> None:
        if model.keep_cache is not None:
            await self._restore(http, model, model.keep_cache)
        if model.hooks_after_ready:
            await call_hooks(http, self.clock, model.proxy, model.hooks_after_ready, model.id, "afterReady",
                             self.log)

    async def _before_stop(self, http: Any, model: Any) -> None:
        if model.keep_cache is not None:
            await self._save(http, model, model.keep_cache)
        if model.hooks_before_stop:
            await call_hooks(http, self.clock, model.proxy, model.hooks_before_stop, model.id, "beforeStop",
                             self.log)

    # -- restore ------------------------------------------------------------------------------------

    async def _restore(self, http: Any, model: Any, kc: KeepCache) -> None:
        key = command_key(model)
        files = [f for f in list_files(kc.dir, model.id) if f.key == key]
        stats = self._stats_of(model.id)
        stats.restored_tokens = 0
        if not files:
            self.log.info("{model}: no saved KV cache for its command; starting cold", model=model.id)
            return
        started = self.clock.seconds()
        outcome = _Outcome()
        why = await self._bounded(self._restore_files(http, model, files, outcome), kc.restore_timeout)
        seconds = self.clock.seconds() - started
        stats.restored_tokens = outcome.tokens
        self._on_restored(model.id, outcome.tokens, seconds)
        fields = dict(model=model.id, tokens=outcome.tokens, slots=outcome.slots, seconds=seconds)
        failures = outcome.failures + ([why] if why else [])
        if not failures:
            self.log.info("{model}: restored KV cache: {tokens} tokens in {slots} slot(s) in {seconds:.3f}s",
                          **fields)
        else:
            self.log.warn("{model}: KV cache restore failed ({why}); restored {tokens} tokens in {slots} "
                          "slot(s) in {seconds:.3f}s, the rest starts cold", why="; ".join(failures), **fields)

    async def _restore_files(self, http: Any, model: Any, files: list[SavedFile], outcome: _Outcome) -> None:
        base = model.proxy.rstrip("/")
        for f in files:
            try:
                status, answer = await send_json(http, "POST", f"{base}/slots/{f.slot}?action=restore",
                                                 {"filename": f.name})
                if status != 200:
                    raise _Refused(f"slot {f.slot}: answered {status}"
                                   + (f": {answer_message(answer)}" if answer_message(answer) else ""))
            except CancelledError:
                raise
            except Exception as e:
                outcome.failures.append(str(e) if isinstance(e, _Refused) else f"slot {f.slot}: "
                                        + describe_failure(e))
                continue
            outcome.slots += 1
            outcome.tokens += _int(answer.get("n_restored")) if isinstance(answer, dict) else 0

    # -- save ---------------------------------------------------------------------------------------

    async def _save(self, http: Any, model: Any, kc: KeepCache) -> None:
        started = self.clock.seconds()
        outcome = _Outcome()
        asked: list[int] = []
        why = await self._bounded(self._save_slots(http, model, kc, outcome, asked), kc.save_timeout)
        seconds = self.clock.seconds() - started
        deleted, freed = prune(kc.dir, model.id, kc.max_bytes)
        fields = dict(model=model.id, tokens=outcome.tokens, slots=outcome.slots, bytes=outcome.bytes,
                      seconds=seconds, pruned=f"; pruned {deleted} older file(s), {freed} bytes" if deleted else "")
        failures = outcome.failures + ([why] if why else [])
        if asked or failures:
            stats = self._stats_of(model.id)
            stats.saved_bytes, stats.saved_tokens = outcome.bytes, outcome.tokens
            self._on_saved(model.id, outcome.bytes, seconds)
        if failures:
            self.log.warn("{model}: KV cache save failed ({why}); saved {tokens} tokens of {slots} slot(s), "
                          "{bytes} bytes, in {seconds:.3f}s{pruned}", why="; ".join(failures), **fields)
        elif not outcome.slots:
            self.log.info("{model}: no slot holds tokens; no KV cache saved{pruned}", **fields)
        else:
            self.log.info("{model}: saved KV cache: {tokens} tokens of {slots} slot(s), {bytes} bytes, "
                          "in {seconds:.3f}s{pruned}", **fields)

    async def _save_slots(self, http: Any, model: Any, kc: KeepCache, outcome: _Outcome, asked: list) -> None:
        base = model.proxy.rstrip("/")
        status, slots = await send_json(http, "GET", f"{base}/slots")
        if status != 200 or not isinstance(slots, list):
            raise _Refused(f"GET /slots answered {status}" + (f": {answer_message(slots)}"
                                                               if answer_message(slots) else ""))
        key = command_key(model)
        for slot in slots_to_save(slots):
            asked.append(slot)
            name = file_name(model.id, key, slot)
            status, answer = await send_json(http, "POST", f"{base}/slots/{slot}?action=save", {"filename": name})
            if status != 200 or not isinstance(answer, dict):
                message = answer_message(answer)
                outcome.failures.append(f"slot {slot}: answered {status}" + (f": {message}" if message else ""))
                continue
            self._saved(kc, name, slot, answer, outcome)

    def _saved(self, kc: KeepCache, name: str, slot: int, answer: dict, outcome: _Outcome) -> None:
        path = os.path.join(kc.dir, name)
        tokens = _int(answer.get("n_saved"))
        if tokens <= 0:
            _unlink(path)  # an empty slot: nothing worth restoring
            return
        try:
            os.chmod(path, 0o600)
            size = os.path.getsize(path)
        except OSError:
            size = _int(answer.get("n_written"))
        outcome.slots += 1
        outcome.tokens += tokens
        outcome.bytes += size

    # -- bounds -------------------------------------------------------------------------------------

    async def _bounded(self, work: Any, seconds: float) -> Optional[str]:
        """Await the coroutine ``work`` for at most ``seconds``; None, or why it did not end well.

        :raises CancelledError: when the caller cancels (not when the bound cuts it short).
        """
        try:
            await bounded(self.clock, seconds, work)
        except CancelledError:
            raise
        except TimedOut as e:
            return str(e)
        except _Refused as e:
            return str(e)
        except Exception as e:
            return describe_failure(e)
        return None

    # -- reloads (IModelObserver) -------------------------------------------------------------------

    def observe(self, event: ModelEvent) -> None:
        """Learn a reload's models; delete the files of a model removed from the config once it
        has stopped (``Removed``)."""
        if isinstance(event, Reloaded):
            self._models.update(event.models)  # a removed model keeps its last config until Removed
        elif isinstance(event, Removed):
            self.forget(event.model)

    def forget(self, model_id: str) -> tuple[int, int]:
        """Delete every saved file of ``model_id`` (a model removed from the config); return
        ``(files, bytes)`` deleted."""
        model = self._models.pop(model_id, None)
        self._stats.pop(model_id, None)
        directories = {slot_save_path(model.argv)} if model is not None else set()
        if model is not None and model.keep_cache is not None:
            directories.add(model.keep_cache.dir)
        files = freed = 0
        for directory in _absolute(directories):
            for f in list_files(directory, model_id):
                if _unlink(f.path):
                    files, freed = files + 1, freed + f.size
            if os.path.basename(directory.rstrip("/")) == model_dir_name(model_id):
                try:
                    os.rmdir(directory)  # ours (${CACHE_DIR}), and empty now
                except OSError:
                    pass
        if files:
            self.log.info("{model}: removed from the config; deleted its {files} saved KV cache file(s), "
                          "{bytes} bytes", model=model_id, files=files, bytes=freed)
        return files, freed


def _absolute(directories: Iterable[Optional[str]]) -> list[str]:
    return sorted({os.path.normpath(d) for d in directories if d and os.path.isabs(d)})
