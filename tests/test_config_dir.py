"""--config-dir: merging several config files as llama-swap's -config-dir does, the directory
watcher, and the options and service that use them."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger

from llamaswap import tap
from llamaswap.config import ConfigError, load_config_sources
from llamaswap.config.merge import list_config_files, load_sources, merge_documents, sources_label
from llamaswap.watch import ConfigDirWatcher, ConfigWatcher
from tests.test_plugin import parse

REPO = Path(__file__).resolve().parent.parent
FAKE_CMD = f"{sys.executable} {REPO / 'tests' / 'fake_llama_server.py'} --port ${{PORT}}"


def model(model_id: str, extra: str = "") -> str:
    """A ``models:`` entry (indented) whose cmd runs the fake upstream."""
    return f"  {model_id}:\n    cmd: {FAKE_CMD} --model {model_id}\n{extra}"


def write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(text)
    return str(path)


def load(config_path=None, config_dir=None, environ=None):
    return load_sources(None if config_path is None else str(config_path),
                        None if config_dir is None else str(config_dir),
                        environ={} if environ is None else environ, port_in_use=lambda port: False)


def errors_of(config_path=None, config_dir=None, environ=None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load(config_path, config_dir, environ)
    return e.value.errors


@pytest.fixture
def conf(tmp_path) -> Path:
    d = tmp_path / "conf.d"
    d.mkdir()
    return d


# -- which files, in which order -------------------------------------------------------------------


def test_dir_files_merge_in_file_name_order(conf):
    """Every *.yaml and *.yml file directly in the directory is read, in sorted name order,
    whatever order they were written in."""
    write(conf, "20-b.yml", "models:\n" + model("beta"))
    write(conf, "10-a.yaml", "models:\n" + model("alpha"))
    write(conf, "30-c.yaml", "models:\n" + model("gamma"))
    config = load(config_dir=conf)
    assert list(config.models) == ["alpha", "beta", "gamma"]
    assert config.source == str(conf) + os.sep


def test_other_files_and_subdirectories_are_ignored(conf):
    """Only the directory's own *.yml/*.yaml files count: not other suffixes, not
    subdirectories (even one named like a config file), not an upper-case suffix."""
    write(conf, "a.yaml", "models:\n" + model("alpha"))
    write(conf, "notes.txt", "models: {nope: 1}\n")
    write(conf, "b.yaml.bak", "models:\n" + model("bak"))
    write(conf, "c.YAML", "models:\n" + model("upper"))
    (conf / "sub").mkdir()
    write(conf / "sub", "d.yaml", "models:\n" + model("nested"))
    (conf / "e.yaml").mkdir()
    assert list_config_files(str(conf)) == [str(conf / "a.yaml")]
    assert list(load(config_dir=conf).models) == ["alpha"]


def test_config_file_comes_first_then_the_directory(tmp_path, conf):
    """--config and --config-dir add up; the file is merged first."""
    main = write(tmp_path, "main.yaml", "models:\n" + model("zeta"))
    write(conf, "a.yaml", "models:\n" + model("alpha"))
    config = load_config_sources(main, str(conf), port_in_use=lambda port: False)
    assert list(config.models) == ["zeta", "alpha"]
    assert config.source == f"{main} + {conf}{os.sep}"


def test_config_file_inside_the_directory_is_refused(conf):
    """A --config file that is also one of the directory's files would be read twice."""
    main = write(conf, "main.yaml", "models:\n" + model("alpha"))
    [line] = errors_of(main, conf)
    assert line == f"--config {main} is also in --config-dir {conf}; remove it from one"


def test_empty_files_are_skipped(tmp_path, conf):
    """An empty file, or one of comments only, adds nothing; a directory of only such files
    gives a config with no models."""
    write(conf, "a.yaml", "")
    write(conf, "b.yaml", "# nothing yet\n")
    write(conf, "c.yaml", "models:\n" + model("gamma"))
    assert list(load(config_dir=conf).models) == ["gamma"]
    os.remove(conf / "c.yaml")
    assert load(config_dir=conf).models == {}


def test_directory_without_config_files_is_an_error(tmp_path, conf):
    """With no --config, a directory that has no config file is an error (nothing to serve);
    with --config it adds nothing."""
    assert errors_of(config_dir=conf) == [f"--config-dir {conf}: no *.yaml or *.yml files in it"]
    main = write(tmp_path, "main.yaml", "models:\n" + model("alpha"))
    assert list(load(main, conf).models) == ["alpha"]


def test_missing_directory_and_no_source(tmp_path):
    """A directory that cannot be listed, and neither option, are errors."""
    [line] = errors_of(config_dir=tmp_path / "nope")
    assert line.startswith(f"--config-dir {tmp_path / 'nope'}: cannot read directory: ")
    assert errors_of() == ["at least one of --config or --config-dir must be given"]


# -- how documents merge ---------------------------------------------------------------------------


def test_duplicate_model_names_both_files(conf):
    """A model defined in two files is an error naming the model and both files."""
    a = write(conf, "a.yaml", "models:\n" + model("dup"))
    b = write(conf, "b.yaml", "models:\n" + model("dup"))
    assert errors_of(config_dir=conf) == [
        f"{b}: models.dup: already defined in {a}; each entry of 'models' must be defined in one file only"]


@pytest.mark.parametrize("section, first, second", [
    ("groups", "groups:\n  g1:\n    members: [alpha]\n", "groups:\n  g1:\n    members: [beta]\n"),
    ("peers", "peers:\n  remote:\n    proxy: http://x:1\n    models: [m1]\n",
     "peers:\n  remote:\n    proxy: http://x:2\n    models: [m2]\n"),
    ("profiles", "profiles:\n  p:\n    - alpha\n", "profiles:\n  p:\n    - beta\n"),
    ("routing.router.settings.groups",
     "routing:\n  router:\n    settings:\n      groups:\n        g:\n          members: [alpha]\n",
     "routing:\n  router:\n    settings:\n      groups:\n        g:\n          members: [beta]\n"),
])
def test_duplicate_entities_are_errors(conf, section, first, second):
    """Groups, peers, profiles, and groups under routing name entities too: one file each."""
    a = write(conf, "a.yaml", "models:\n" + model("alpha") + first)
    b = write(conf, "b.yaml", "models:\n" + model("beta") + second)
    errors = errors_of(config_dir=conf)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{b}: {section}.")
    assert f"already defined in {a}; each entry of '{section}' must be defined in one file only" in errors[0]


def test_distinct_entities_add_up(conf):
    """Groups from two files (top level or under routing) are both kept, and so are peers."""
    write(conf, "a.yaml", "models:\n" + model("alpha") +
          "routing:\n  router:\n    settings:\n      groups:\n        ga:\n          members: [alpha]\n"
          "peers:\n  p1:\n    proxy: http://127.0.0.1:1\n    models: [x]\n")
    write(conf, "b.yaml", "models:\n" + model("beta") +
          "routing:\n  router:\n    settings:\n      groups:\n        gb:\n          members: [beta]\n"
          "peers:\n  p2:\n    proxy: http://127.0.0.1:2\n    models: [y]\n")
    config = load(config_dir=conf)
    assert set(config.groups) == {"ga", "gb"}
    assert config.groups["gb"].members == ("beta",)
    assert set(config.peers) == {"p1", "p2"}


def test_scalar_conflict_names_file_path_and_values(conf):
    """A top-level setting given two different values is an error naming both files."""
    a = write(conf, "a.yaml", "globalTTL: 100\nmodels:\n" + model("alpha"))
    b = write(conf, "b.yaml", "globalTTL: 200\nmodels:\n" + model("beta"))
    assert errors_of(config_dir=conf) == [
        f"{b}: globalTTL: conflict: 200 here, 100 in {a}; set it in one file only"]


def test_same_scalar_in_two_files_is_fine(conf):
    """The same value in two files is no conflict; a value as written counts ('100' the
    string differs from 100 the number)."""
    write(conf, "a.yaml", "globalTTL: 100\nlogLevel: debug\nmodels:\n" + model("alpha"))
    write(conf, "b.yaml", "globalTTL: 100\nlogLevel: debug\nmodels:\n" + model("beta"))
    config = load(config_dir=conf)
    assert (config.global_ttl, config.log_level) == (100, "debug")
    write(conf, "b.yaml", "globalTTL: '100'\nmodels:\n" + model("beta"))
    [line] = errors_of(config_dir=conf)
    assert "globalTTL: conflict: '100' here, 100 in" in line


def test_lists_concatenate(conf):
    """Lists add up in file order (apiKeys, hooks preload)."""
    write(conf, "a.yaml", "apiKeys: [key-a]\nhooks:\n  on_startup:\n    preload: [alpha]\nmodels:\n"
          + model("alpha"))
    write(conf, "b.yaml", "apiKeys: [key-b]\nhooks:\n  on_startup:\n    preload: [beta]\nmodels:\n"
          + model("beta"))
    config = load(config_dir=conf)
    assert config.api_keys == ("key-a", "key-b")
    assert config.preload == ("alpha", "beta")


def test_macros_of_one_file_serve_another(conf):
    """Global macros merge key by key, and a macro from one file expands in another."""
    write(conf, "00-macros.yaml", "macros:\n  LOW: '1'\n")
    write(conf, "10-more.yaml", "macros:\n  HIGH: '2'\n")
    write(conf, "20-model.yaml", "models:\n  alpha:\n    cmd: echo ${LOW} ${HIGH} ${PORT}\n")
    config = load(config_dir=conf)
    assert config.models["alpha"].argv[:3] == ("echo", "1", "2")


def test_macro_conflict(conf):
    """One macro defined differently in two files is a conflict at its path."""
    write(conf, "a.yaml", "macros:\n  X: one\n")
    b = write(conf, "b.yaml", "macros:\n  X: two\nmodels:\n" + model("alpha"))
    [line] = errors_of(config_dir=conf)
    assert line.startswith(f"{b}: macros.X: conflict: 'two' here, 'one' in ")


def test_kind_mismatch_is_an_error(conf):
    """A value that is a scalar in one file and a list in another cannot be merged."""
    a = write(conf, "a.yaml", "startPort: 5800\nmodels:\n" + model("alpha"))
    b = write(conf, "b.yaml", "startPort: [5800, 5801]\nmodels:\n" + model("beta"))
    assert errors_of(config_dir=conf) == [
        f"{b}: startPort: conflict: {a} has a scalar, this file a list"]


def test_null_yields_to_a_value(conf):
    """An empty key (a mapping whose entries are all commented out) yields to the other
    file's value, for settings and for models alike."""
    write(conf, "a.yaml", "routing:\nmodels:\n#  old:\n#    cmd: x\n")
    write(conf, "b.yaml", "routing:\n  router:\n    settings:\n      groups:\n        g1:\n"
          "          members: [beta]\nmodels:\n" + model("beta"))
    config = load(config_dir=conf)
    assert list(config.models) == ["beta"] and set(config.groups) == {"g1"}


def test_every_conflict_is_reported(conf):
    """Conflicts do not stop at the first one, and the reading stage still runs."""
    write(conf, "a.yaml", "globalTTL: 1\nmodels:\n" + model("dup"))
    b = write(conf, "b.yaml", "globalTTL: 2\nmodels:\n" + model("dup") + model("beta", "    ttl: soon\n"))
    errors = errors_of(config_dir=conf)
    assert [line.split(": ", 2)[:2] for line in errors] == [
        [b, "globalTTL"], [b, "models.dup"], [b, "models.beta.ttl"]]


def test_merge_never_changes_a_shared_value():
    """A YAML anchor may share one value between two places: merging into one leaves the other."""
    shared = {"k": 1}
    errors: list[str] = []
    merged, _ = merge_documents([("a.yaml", {"x": shared, "y": shared}), ("b.yaml", {"y": {"j": 2}})], errors)
    assert errors == []
    assert merged == {"x": {"k": 1}, "y": {"k": 1, "j": 2}}
    assert shared == {"k": 1}


# -- every message names its file ---------------------------------------------------------------------


def test_reading_errors_name_the_file_of_the_entry(conf):
    """Errors found when the merged config is read name the file the entry came from."""
    a = write(conf, "a.yaml", "apiKeys: [good]\nmodels:\n" + model("alpha", "    ttl: -5\n"))
    b = write(conf, "b.yaml", "apiKeys: ['has space']\nmodels:\n" + model("beta", "    aliases: 5\n"))
    assert errors_of(config_dir=conf) == [
        f"{b}: apiKeys[1]: must be non-empty and contain no whitespace",
        f"{a}: models.alpha.ttl: must be a non-negative integer (got -5)",
        f"{b}: models.beta.aliases: must be a list of strings (got 5)"]


def test_yaml_errors_name_the_file(conf):
    """A syntax error names the file, line and column; the other files' problems come too."""
    write(conf, "a.yaml", "models:\n" + model("alpha", "    cmd: again\n"))
    b = write(conf, "b.yaml", "models: [unclosed\n")
    errors = errors_of(config_dir=conf)
    assert errors[0].startswith(f"{b}:2:1: ")
    assert errors[1] == f"{conf / 'a.yaml'}: models.alpha: duplicate key 'cmd' (line 4)"


def test_unreadable_and_non_mapping_files(conf):
    """A file that is not UTF-8, or whose top level is not a mapping, is named; both are reported."""
    a = conf / "a.yaml"
    a.write_bytes(b"models: \xff\n")
    b = write(conf, "b.yaml", "- just a list\n")
    errors = errors_of(config_dir=conf)
    assert errors[0].startswith(f"{a}: cannot read config: not valid UTF-8")
    assert errors[1:] == [f"{b}: the top level must be a mapping"]
    a.write_text("models:\n" + model("alpha"))
    assert errors_of(config_dir=conf) == [f"{b}: the top level must be a mapping"]


def test_env_is_substituted_per_file(conf):
    """${env.NAME} is replaced in each file, also inside a flow list; a missing variable names
    its file, line and column."""
    write(conf, "a.yaml", "models:\n" + model("alpha"))
    b = write(conf, "keys.yaml", "apiKeys: [${env.TEST_API_KEY}]\n")
    assert load(config_dir=conf, environ={"TEST_API_KEY": "secret123"}).api_keys == ("secret123",)
    assert errors_of(config_dir=conf) == [f"{b}:1:11: environment variable 'TEST_API_KEY' is not set"]


def test_warnings_name_the_file(conf):
    """A warning about a key names the file that holds it."""
    write(conf, "a.yaml", "models:\n" + model("alpha"))
    b = write(conf, "b.yaml", "models:\n" + model("beta", "    tll: 5\n"))
    warnings = load(config_dir=conf).warnings
    assert f"config: {b}: unknown key 'models.beta.tll' (ignored); did you mean 'ttl'?" in warnings


def test_ports_are_allocated_over_all_files(conf):
    """${PORT} is allocated across the merged models, in id order as for one file."""
    write(conf, "a.yaml", "startPort: 7000\nmodels:\n" + model("zeta"))
    write(conf, "b.yaml", "models:\n" + model("alpha"))
    config = load(config_dir=conf)
    assert (config.models["alpha"].port, config.models["zeta"].port) == (7000, 7001)


def test_sources_label():
    assert sources_label("c.yaml", None) == "c.yaml"
    assert sources_label(None, "conf.d") == "conf.d" + os.sep
    assert sources_label("c.yaml", "conf.d" + os.sep) == f"c.yaml + conf.d{os.sep}"


# -- the directory watcher --------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.changes = 0
        self.events: list[dict] = []
        self.log = Logger(observer=self.events.append)

    def __call__(self) -> None:
        self.changes += 1

    def warnings(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events]


def watching(directory: Path):
    clock, recorder = Clock(), Recorder()
    watcher = ConfigDirWatcher(str(directory), clock, recorder, recorder.log)
    watcher.startService()
    return clock, recorder, watcher


def test_dir_watcher_sees_added_changed_and_removed_files(conf):
    """A file added, changed or removed is one change at the next poll; other files are not."""
    write(conf, "a.yaml", "models: {}\n")
    clock, rec, watcher = watching(conf)
    clock.advance(2)
    assert rec.changes == 0
    write(conf, "b.yaml", "models: {}\n")
    clock.advance(1.9)
    assert rec.changes == 0                      # polled every 2 s
    clock.advance(0.1)
    assert rec.changes == 1
    write(conf, "b.yaml", "models: {b: {}}\n")
    write(conf, "c.yml", "x: 1\n")
    clock.advance(2)
    assert rec.changes == 2                      # two edits in one interval: one reload
    os.remove(conf / "c.yml")
    clock.advance(2)
    assert rec.changes == 3
    write(conf, "README.txt", "hello\n")
    (conf / "sub").mkdir()
    write(conf / "sub", "d.yaml", "x: 1\n")
    clock.advance(2)
    assert rec.changes == 3
    watcher.stopService()
    assert clock.getDelayedCalls() == []


def test_dir_watcher_sees_a_touched_file(conf):
    """A rewrite of the same size with a new mtime is a change."""
    path = write(conf, "a.yaml", "models: {}\n")
    clock, rec, watcher = watching(conf)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    clock.advance(2)
    assert rec.changes == 1
    watcher.stopService()


def test_dir_watcher_emptied_or_missing_keeps_the_config(conf):
    """An emptied or missing directory is warned about once and is no change; the files coming
    back are one."""
    write(conf, "a.yaml", "models: {}\n")
    clock, rec, watcher = watching(conf)
    os.remove(conf / "a.yaml")
    clock.advance(2)
    clock.advance(2)
    assert rec.changes == 0
    assert rec.warnings() == [f"config directory {conf} has no *.yaml or *.yml files; keeping the current config"]
    write(conf, "a.yaml", "models: {}\n")
    clock.advance(2)
    assert rec.changes == 1
    os.remove(conf / "a.yaml")
    conf.rmdir()
    clock.advance(2)
    assert rec.warnings()[-1] == f"config directory {conf} is missing; keeping the current config"
    conf.mkdir()
    write(conf, "a.yaml", "models: {}\n")
    clock.advance(2)
    assert rec.changes == 2
    watcher.stopService()


def test_dir_watcher_sees_changes_made_before_it_starts(conf):
    """The directory is looked at when the watcher is built, so an edit before the first poll counts."""
    write(conf, "a.yaml", "models: {}\n")
    clock, rec = Clock(), Recorder()
    watcher = ConfigDirWatcher(str(conf), clock, rec, rec.log)
    write(conf, "b.yaml", "models: {}\n")
    watcher.startService()
    clock.advance(2)
    assert rec.changes == 1
    watcher.stopService()


# -- options, service and reload ---------------------------------------------------------------------




def test_options_config_dir_alone_and_with_config(tmp_path, conf, monkeypatch):
    """--config-dir alone, or with --config; both paths are made absolute."""
    write(conf, "a.yaml", "models:\n" + model("alpha"))
    write(tmp_path, "main.yaml", "models:\n" + model("zeta"))
    monkeypatch.chdir(tmp_path)
    options, code, err = parse(["--config-dir", "conf.d", "--state-file", "s.json"])
    assert code == 0, err
    assert options["config-dir"] == str(conf) and options["config"] is None
    assert list(options["loaded_config"].models) == ["alpha"]
    options, code, err = parse(["-c", "main.yaml", "--config-dir", "conf.d", "--state-file", "s.json"])
    assert code == 0, err
    assert list(options["loaded_config"].models) == ["zeta", "alpha"]


def test_options_bad_config_dir_exits_1_naming_files(conf, tmp_path):
    """A bad directory stops startup: exit 1, the sources, then each problem with its file and path."""
    write(conf, "a.yaml", "models:\n" + model("dup"))
    b = write(conf, "b.yaml", "models:\n" + model("dup") + model("beta", "    ttl: soon\n"))
    options, code, err = parse(["--config-dir", str(conf), "--state-file", str(tmp_path / "s.json")])
    assert code == 1
    lines = err.splitlines()
    assert lines[0] == f"llamaswap: invalid config {conf}{os.sep}:"
    assert lines[1].startswith(f"  {b}: models.dup: already defined in ")
    assert lines[2] == f"  {b}: models.beta.ttl: must be a non-negative integer (got 'soon')"
    options, code, err = parse(["--state-file", str(tmp_path / "s.json")])
    assert code == 1 and "--config is required, unless --config-dir is given" in err


def make(tmp_path, argv):
    options, code, err = parse([*argv, "--listen", "tcp:0:interface=127.0.0.1",
                                "--state-file", str(tmp_path / "s.json")])
    assert code == 0, err
    reactor = MemoryReactorClock()
    return tap.make_service(options, reactor=reactor), reactor


def test_watch_config_watches_the_directory_and_reloads(tmp_path, conf):
    """With --watch-config, a file added to the directory is a reload at the next poll, and the
    new model is served; a conflicting file is a failed reload that keeps the config."""
    write(conf, "a.yaml", "models:\n" + model("alpha"))
    service, reactor = make(tmp_path, ["--config-dir", str(conf), "--watch-config"])
    watchers = [type(s) for s in service if isinstance(s, ConfigWatcher)]
    assert watchers == [ConfigDirWatcher]
    assert service.config_label == f"{conf}{os.sep}"
    service.privilegedStartService()
    service.startService()
    write(conf, "b.yaml", "models:\n" + model("beta"))
    reactor.advance(2)
    assert list(service.config.models) == ["alpha", "beta"]
    assert service.router.config.resolve("beta") == "beta"
    before = service.config
    write(conf, "c.yaml", "models:\n" + model("beta"))
    reactor.advance(2)
    assert service.config is before
    os.remove(conf / "c.yaml")
    os.remove(conf / "b.yaml")
    reactor.advance(2)
    assert list(service.config.models) == ["alpha"]
    service.stopService()


def test_config_and_dir_are_both_watched(tmp_path, conf):
    """--config with --config-dir: both are watched, and a reload reads both."""
    main = write(tmp_path, "main.yaml", "models:\n" + model("zeta"))
    write(conf, "a.yaml", "models:\n" + model("alpha"))
    service, reactor = make(tmp_path, ["--config", main, "--config-dir", str(conf), "--watch-config"])
    assert [type(s) for s in service if isinstance(s, ConfigWatcher)] == [ConfigWatcher, ConfigDirWatcher]
    write(tmp_path, "main.yaml", "models:\n" + model("zeta") + model("eta"))
    outcome = service.reload()
    assert outcome["added"] == ["eta"]
    assert list(service.config.models) == ["zeta", "eta", "alpha"]
    service.stopService()
