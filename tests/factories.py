"""Real config objects for the unit tests, without YAML.

``make_model`` and ``make_config`` build the frozen ``ModelConfig`` and ``Config`` that
``parse_config`` returns, with defaults that suit the fakes: a model's command is a Python that
does nothing and ends with ``--model <id>`` (``FakeProcessReactor`` tests find a child's model
there), and its proxy is ``http://127.0.0.1:5800``. Pass any field to override it; a changed
config is ``attr.evolve(config, ...)``.
"""
from __future__ import annotations

from typing import Any, Iterable

from llamaswap.config import Config, ModelConfig
from tests.fakes import EXE


def make_model(id: str = "m", **overrides: Any) -> ModelConfig:  # noqa: A002 (the field's name)
    """A ``ModelConfig``; ``cmd`` follows ``argv`` and ``cmd_stop`` follows ``cmd_stop_argv``."""
    argv = tuple(overrides.pop("argv", (EXE, "-c", "pass", "--model", id)))
    overrides.setdefault("cmd", " ".join(argv))
    stop_argv = tuple(overrides.get("cmd_stop_argv", ()))
    if stop_argv:
        overrides.setdefault("cmd_stop", " ".join(stop_argv))
    overrides.setdefault("proxy", "http://127.0.0.1:5800")
    return ModelConfig(id=id, argv=argv, **overrides)


def make_config(models: Iterable[ModelConfig] = (), **overrides: Any) -> Config:
    """A ``Config`` holding ``models`` in order; ``aliases`` are derived from the models' aliases."""
    models = list(models)
    overrides.setdefault("aliases", {alias: m.id for m in models for alias in m.aliases})
    overrides["profiles"] = {name: tuple(ids) for name, ids in overrides.get("profiles", {}).items()}
    return Config(models={m.id: m for m in models}, **overrides)
