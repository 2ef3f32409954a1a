"""The learner registry: the one place that maps a learner's name to its class.

A learner is one file in `pipeline/learners/` plus its test. The file defines

* its config, a frozen dataclass subclassing `pipeline.config.LearnerConfig` whose fields are
  `knob(default, rule)`s with docstrings (checks, errors and `anole train --help-config` come
  from them; a run sets them as `learner.FIELD=VALUE`);
* its class, a `Learner` subclass with `name`, `config_class` and `defaults` (the tuned run
  settings `anole train --learner NAME` starts from: TrainConfig fields, the learner's own under
  "learner_config"), decorated with `@register`; it may override the hooks of `Learner`
  (`has_head`, `build_model`, `param_template`, `initial_params`, `outer_optimizer`,
  `meta_step_size`, `evaluation_overrides`) where the defaults (a conv4 with a linear head, the
  run's meta-optimizer) do not fit;

and `pipeline/learners/__init__.py` imports the file (one line in `LEARNER_MODULES`). The
trainer, the Ray workers and parameter server, checkpoints, scoring, the CLI and the flows ask
the registry; none of them names a learner.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.learners.base import Learner

_REGISTRY: dict[str, type[Learner]] = {}


def register(cls: type[Learner]) -> type[Learner]:
    """Class decorator: add a learner under its `name` (once)."""
    name = cls.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"register: a learner named {name!r} is already registered")
    if not (dataclasses.is_dataclass(cls.config_class)):
        raise TypeError(f"register: {cls.__name__}.config_class must be a dataclass")
    _REGISTRY[name] = cls
    return cls


def names() -> tuple[str, ...]:
    """The registered learners' names, in registration order."""
    return tuple(_REGISTRY)


def learner_classes() -> tuple[type[Learner], ...]:
    return tuple(_REGISTRY.values())


def learner_class(name: str) -> type[Learner]:
    """The learner class registered as `name`; an unknown name is a one-line ConfigError that
    lists the accepted ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"config field 'learner' = {name!r}: must be one of {', '.join(_REGISTRY)}"
        ) from None


def config_class(name: str) -> type:
    """The config dataclass of learner `name`."""
    return learner_class(name).config_class


def all_learner_fields() -> frozenset[str]:
    """Every field of every registered learner's config (for migrating flat configs)."""
    return frozenset(
        f.name for cls in _REGISTRY.values() for f in dataclasses.fields(cls.config_class)
    )


__all__ = [
    "all_learner_fields", "config_class", "learner_class", "learner_classes", "names", "register",
]
