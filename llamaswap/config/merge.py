"""A config read from several files: ``--config FILE`` and/or ``--config-dir DIR``, as llama-swap's
``-config``/``-config-dir`` read them (``internal/config/merge.go``).

The sources are ``--config`` first, then the ``*.yml``/``*.yaml`` files directly in the directory
(subdirectories are not read) in sorted file-name order. Each file gets ``${env.NAME}`` and is
parsed on its own; an empty file (or one of comments only) is skipped. The documents are then
merged into one, which is read exactly as a single file would be (macros, ``${PORT}``, typed
reading, cross-checks), so a macro defined in one file can be used in another.

Merging, key by key (llama-swap's rules):

* a key in one source only is kept;
* the children of an *identity map* (``models``, ``groups``, ``profiles``, ``selectors``,
  ``peers``, ``matrix``, ``routing.router.settings.groups``, ``routing.router.settings.matrix``)
  name entities: the same child in two files is an error naming both files;
* any other mapping (``macros``, ``routing``, ``hooks``, ...) is merged recursively;
* lists are concatenated (``apiKeys``, ``hooks.on_startup.preload``, ...);
* a scalar may be repeated with the same value; a different value is an error;
* an empty (null) value yields to the other source's value; other mixed kinds are an error.

Unlike llama-swap, a null identity map (``models:`` with every entry commented out) yields to the
other file's mapping instead of being an error, and all problems are reported together.

Every message names the file: merge problems and YAML problems directly, and the errors and
warnings of the reading stage through :class:`Provenance`, which remembers which file each part
of the merged document came from.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

import attr

from llamaswap.config import Config, ConfigError, read_config_text

__all__ = ["CONFIG_SUFFIXES", "IDENTITY_MAPS", "Provenance", "is_config_file", "list_config_files",
           "load_sources", "merge_documents", "sources_label"]

#: The files ``--config-dir`` reads (case-sensitive, as llama-swap's ``strings.HasSuffix``).
CONFIG_SUFFIXES = (".yml", ".yaml")

#: Dotted paths whose children are entities: a child defined in two files is an error.
IDENTITY_MAPS = frozenset({
    "models", "groups", "profiles", "selectors", "peers", "matrix",
    "routing.router.settings.groups", "routing.router.settings.matrix"})

_SECRET_KEYS = frozenset({"apiKeys", "apiKey", "env"})


def is_config_file(name: str) -> bool:
    """True for a file name ``--config-dir`` reads."""
    return name.endswith(CONFIG_SUFFIXES)


def list_config_files(directory: str) -> list[str]:
    """The ``*.yml``/``*.yaml`` files directly in ``directory``, sorted by name (subdirectories,
    and anything that is a directory, are skipped).

    :raises ConfigError: when the directory cannot be listed.
    """
    try:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries if is_config_file(e.name) and not _is_dir(e)]
    except OSError as e:
        raise ConfigError([f"--config-dir {directory}: cannot read directory: {e.strerror or e}"]) from None
    return [os.path.join(directory, name) for name in sorted(names)]


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def sources_label(config_path: Optional[str], config_dir: Optional[str]) -> str:
    """How messages name the sources: ``config.yaml``, ``conf.d/`` or ``config.yaml + conf.d/``."""
    parts = []
    if config_path:
        parts.append(config_path)
    if config_dir:
        parts.append(config_dir if config_dir.endswith(os.sep) else config_dir + os.sep)
    return " + ".join(parts)


# --------------------------------------------------------------------------------------------
# Reading the sources


def _parse_source(path: str, environ: Mapping[str, str], errors: list[str]) -> Optional[dict]:
    """One file's document (None when empty); its problems, each naming the file, go to ``errors``.

    :raises ConfigError: when the file cannot be read or parsed at all.
    """
    from llamaswap.config import envsubst, yaml12

    text = envsubst.substitute_env(read_config_text(path), path, environ)
    try:
        node = yaml12.compose(text, path)
    except RecursionError:
        raise ConfigError([f"{path}: the YAML is nested too deeply"]) from None
    if node is None:
        return None
    found: list[str] = []
    try:
        data = yaml12.build(node, found, path)
    except RecursionError:
        raise ConfigError([f"{path}: the YAML is nested too deeply"]) from None
    errors.extend(line if line.startswith(path) else f"{path}: {line}" for line in found)
    if data is None:
        return None
    if not isinstance(data, dict):
        errors.append(f"{path}: the top level must be a mapping")
        return None
    return data


def _sources(config_path: Optional[str], config_dir: Optional[str]) -> list[str]:
    if not config_path and not config_dir:
        raise ConfigError(["at least one of --config or --config-dir must be given"])
    paths = [config_path] if config_path else []
    if config_dir:
        files = list_config_files(config_dir)
        if config_path:
            for f in files:
                if _same_file(config_path, f):
                    raise ConfigError([f"--config {config_path} is also in --config-dir {config_dir}; "
                                       "remove it from one"])
        elif not files:
            raise ConfigError([f"--config-dir {config_dir}: no *.yaml or *.yml files in it"])
        paths += files
    return paths


def _same_file(a: str, b: str) -> bool:
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Merging


class Provenance:
    """Which file each part of a merged document came from, keyed by config path
    (``models.llama``, ``apiKeys[2]``, as messages write paths).

    The most specific recorded path that starts a message decides its file.
    """

    def __init__(self) -> None:
        self.files: dict[str, str] = {}

    def record(self, path: str, source: str) -> None:
        self.files[path] = source

    def file_of(self, path: str) -> Optional[str]:
        """The file the value at ``path`` (or the closest recorded part above it) came from."""
        best = None
        for recorded, source in self.files.items():
            if _starts_path(path, recorded) and (best is None or len(recorded) > len(best[0])):
                best = (recorded, source)
        return best[1] if best else None

    def error(self, line: str) -> str:
        """``<file>: <path>: <message>`` for a ``<path>: <message>`` line of the reading stage."""
        path = line.split(": ", 1)[0]
        source = self.file_of(path)
        return f"{source}: {line}" if source else line

    def warning(self, line: str) -> str:
        """``config: <file>: ...`` for a warning that quotes a path of one file."""
        for quoted in line.split("'")[1::2]:
            source = self.file_of(quoted)
            if source:
                head, sep, rest = line.partition("config: ")
                return f"{head}{sep}{source}: {rest}" if sep and not head else f"{source}: {line}"
        return line


def _starts_path(path: str, prefix: str) -> bool:
    return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] in ".[")


class _Merger:
    """Merges documents into a new one, never changing them (a YAML anchor may share a value)."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        self.provenance = Provenance()
        self.origin: dict[str, str] = {}     # the file that set each merged scalar or entity

    def add(self, merged: dict, doc: dict, source: str) -> dict:
        return self._mapping(merged, doc, "", "", source)

    def _mapping(self, dst: dict, src: dict, path: str, dotted: str, source: str) -> dict:
        from llamaswap.config.yaml12 import key_path

        out = dict(dst)
        for key, value in src.items():
            child, child_dotted = key_path(path, key), f"{dotted}.{key}" if dotted else str(key)
            if key not in out:
                out[key] = value
                self._inserted(child, source)
            elif child_dotted in IDENTITY_MAPS:
                out[key] = self._identity(out[key], value, child, source)
            else:
                out[key] = self._value(out[key], value, child, child_dotted, source)
        return out

    def _inserted(self, path: str, source: str) -> None:
        self.provenance.record(path, source)
        self.origin[path] = source

    def _identity(self, dst: Any, src: Any, path: str, source: str) -> Any:
        from llamaswap.config.yaml12 import key_path

        if src is None:
            return dst
        if dst is None:
            self._inserted(path, source)
            return src
        if not isinstance(dst, dict) or not isinstance(src, dict):
            self.errors.append(f"{source}: {path}: conflict: must be a mapping in every file to merge "
                               f"({self._first(path)} has {_kind(dst)}, this file {_kind(src)})")
            return dst
        out = dict(dst)
        for key, value in src.items():
            child = key_path(path, key)
            if key in out:
                self.errors.append(f"{source}: {child}: already defined in {self._first(child)}; "
                                   f"each entry of '{path}' must be defined in one file only")
                continue
            out[key] = value
            self._inserted(child, source)
        return out

    def _value(self, dst: Any, src: Any, path: str, dotted: str, source: str) -> Any:
        from llamaswap.config.yaml12 import index_path

        if src is None:
            return dst
        if dst is None:
            self._inserted(path, source)
            return src
        if isinstance(dst, dict) and isinstance(src, dict):
            return self._mapping(dst, src, path, dotted, source)
        if isinstance(dst, list) and isinstance(src, list):
            for i in range(len(src)):
                self.provenance.record(index_path(path, len(dst) + i), source)
            return dst + src
        if isinstance(dst, (dict, list)) or isinstance(src, (dict, list)):
            self.errors.append(f"{source}: {path}: conflict: {self._first(path)} has {_kind(dst)}, "
                               f"this file {_kind(src)}")
            return dst
        if _same_scalar(dst, src):
            return dst
        secret = bool(_SECRET_KEYS & set(dotted.split(".")))
        self.errors.append(f"{source}: {path}: conflict: {_shown(src, secret)} here, "
                           f"{_shown(dst, secret)} in {self._first(path)}; set it in one file only")
        return dst

    def _first(self, path: str) -> str:
        """The file that set ``path`` (or the part above it) first."""
        best = ""
        for recorded in self.origin:
            if _starts_path(path, recorded) and len(recorded) > len(best):
                best = recorded
        return self.origin.get(best, "an earlier file")


def _same_scalar(a: Any, b: Any) -> bool:
    from llamaswap.config.yaml12 import scalar_text

    return type(a) is type(b) and scalar_text(a) == scalar_text(b)


def _shown(value: Any, secret: bool) -> str:
    from llamaswap.config.yaml12 import shown

    return "a different value" if secret else shown(value)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return "a scalar"


def merge_documents(documents: list[tuple[str, dict]], errors: list[str]) -> tuple[dict, Provenance]:
    """Merge ``(source, document)`` pairs in order; conflicts are appended to ``errors`` (the
    earlier value is kept) and the merge goes on, so every conflict is reported."""
    merger = _Merger(errors)
    merged: dict = {}
    for source, doc in documents:
        merged = merger.add(merged, doc, source)
    return merged, merger.provenance


# --------------------------------------------------------------------------------------------
# Loading


def load_sources(config_path: Optional[str], config_dir: Optional[str],
                 environ: Optional[Mapping[str, str]] = None,
                 port_in_use: Optional[Callable[[int], bool]] = None) -> Config:
    """Read ``config_path`` (optional) and every config file of ``config_dir`` (optional) as one config.

    ``port_in_use`` is as for :func:`llamaswap.config.load_config` (default: ports something
    on this machine listens on). ``Config.source`` is the :func:`sources_label`.

    :raises ConfigError: with every problem found, each naming its file.
    """
    from llamaswap.config import schema

    environ = os.environ if environ is None else environ
    if port_in_use is None:
        from llamaswap.ports import port_in_use
    errors: list[str] = []
    fatal: list[str] = []
    documents: list[tuple[str, dict]] = []
    for path in _sources(config_path, config_dir):
        try:
            doc = _parse_source(path, environ, errors)
        except ConfigError as e:
            fatal.extend(e.errors)
            continue
        if doc is not None:
            documents.append((path, doc))
    if fatal:
        raise ConfigError(fatal + errors)
    merged, provenance = merge_documents(documents, errors)
    read_errors: list[str] = []
    warnings: list[str] = []
    label = sources_label(config_path, config_dir)
    try:
        config = schema.read_config(merged, label, read_errors, warnings, port_in_use)
    except ConfigError as e:
        raise ConfigError(errors + [provenance.error(line) for line in e.errors]) from None
    if errors:
        raise ConfigError(errors)
    return attr.evolve(config, warnings=tuple(provenance.warning(w) for w in config.warnings))
