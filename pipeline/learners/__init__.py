"""Meta-learners: Prototypical Networks, Reptile, MAML, first-order MAML, MetaOptNet (ridge, SVM).

    learner = make_learner("maml", MAMLConfig(inner_lr=0.4), ways=5)
    params = learner.init_params()                       # dict[str, Tensor]
    grads, metrics = learner.meta_gradient(params, episodes)   # sums over tasks
    # meta-optimizer step on {k: g / metrics["tasks"]} (or / total tasks over shards)
    logits = learner.adapt_and_predict(params, test_episodes, bn_mode="transductive")

See pipeline/learners/base.py for the contract and pipeline/learners/registry.py for how a
learner plugs in: one file here (its config, its class, `@register`), one line in
`LEARNER_MODULES`, and its test.
"""

from __future__ import annotations

import importlib
from typing import Literal

from torch import nn

from pipeline.config import LearnerConfig
from pipeline.learners import registry
from pipeline.learners.base import BN_MODES, METRICS, PRECISIONS, BNMode, Learner, Precision

LEARNER_MODULES = ("protonet", "reptile", "maml", "fomaml", "metaopt")
"""The learner files, imported (and so registered) in this order: the order of `--learner`'s
accepted values."""

for _module in LEARNER_MODULES:
    importlib.import_module(f"pipeline.learners.{_module}")

from pipeline.learners.fomaml import FOMAML  # noqa: E402
from pipeline.learners.maml import MAML, MAMLConfig  # noqa: E402
from pipeline.learners.protonet import ProtoNet, ProtoNetConfig  # noqa: E402
from pipeline.learners.reptile import Reptile, ReptileConfig, reptile_meta_step_size  # noqa: E402

LEARNERS: dict[str, tuple[type[Learner], type]] = {
    cls.name: (cls, cls.config_class) for cls in registry.learner_classes()
}
"""name -> (learner class, config class), from the registry."""


def make_learner(
    name: str,
    config: LearnerConfig | None = None,
    *,
    model: nn.Module | None = None,
    ways: int = 5,
    in_channels: int = 1,
    image_size: int = 28,
    hidden: int = 64,
    backend: Literal["grouped", "vmap"] = "grouped",
    max_tasks_per_call: int | Literal["auto"] | None = "auto",
    precision: Precision = "float32",
) -> Learner:
    """The learner registered as `name` (`registry.names()`).

    `config`: that learner's config (its `config_class`; default: its defaults). `model`:
    the network (default: the learner's `build_model` for a conv4 of these sizes: with a
    `ways`-way head where the learner has one; build it under a torch seed for reproducible
    initial weights). `backend`, `max_tasks_per_call` and `precision`: see `Learner.__init__`.
    """
    if name not in registry.names():
        raise ValueError(
            f"make_learner: unknown learner {name!r}; choose one of {sorted(registry.names())}"
        )
    cls = registry.learner_class(name)
    config_cls = cls.config_class
    if config is None:
        config = config_cls()
    if not isinstance(config, config_cls):
        raise ValueError(
            f"make_learner: {name!r} takes a {config_cls.__name__}, got {type(config).__name__}"
        )
    if model is None:
        from types import SimpleNamespace

        model = cls.build_model(SimpleNamespace(  # type: ignore[arg-type]
            channels=in_channels, ways=ways, hidden=hidden, image_size=image_size))
    return cls(
        model, config, backend=backend, max_tasks_per_call=max_tasks_per_call, precision=precision
    )


__all__ = [
    "BN_MODES",
    "FOMAML",
    "LEARNERS",
    "LEARNER_MODULES",
    "MAML",
    "METRICS",
    "PRECISIONS",
    "BNMode",
    "Learner",
    "LearnerConfig",
    "MAMLConfig",
    "Precision",
    "ProtoNet",
    "ProtoNetConfig",
    "Reptile",
    "ReptileConfig",
    "make_learner",
    "registry",
    "reptile_meta_step_size",
]
