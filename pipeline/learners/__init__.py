"""Meta-learners: Reptile, first-order MAML, MAML, Prototypical Networks.

    learner = make_learner("maml", MAMLConfig(inner_lr=0.4), ways=5)
    params = learner.init_params()                       # dict[str, Tensor]
    grads, metrics = learner.meta_gradient(params, episodes)   # sums over tasks
    # meta-optimizer step on {k: g / metrics["tasks"]} (or / total tasks over shards)
    logits = learner.adapt_and_predict(params, test_episodes, bn_mode="transductive")

See pipeline/learners/base.py for the contract.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from pipeline.learners.base import BN_MODES, METRICS, PRECISIONS, BNMode, Learner, Precision
from pipeline.learners.fomaml import FOMAML
from pipeline.learners.maml import MAML, MAMLConfig
from pipeline.learners.protonet import ProtoNet, ProtoNetConfig
from pipeline.learners.reptile import Reptile, ReptileConfig, reptile_meta_step_size
from pipeline.models import conv4

LEARNERS: dict[str, tuple[type[Learner], type]] = {
    "reptile": (Reptile, ReptileConfig),
    "fomaml": (FOMAML, MAMLConfig),
    "maml": (MAML, MAMLConfig),
    "protonet": (ProtoNet, ProtoNetConfig),
}
"""name -> (learner class, config class)."""

LearnerConfig = MAMLConfig | ReptileConfig | ProtoNetConfig


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
    """The learner called `name` ("reptile", "fomaml", "maml", "protonet").

    `config`: that learner's config (`LEARNERS[name][1]`; default: its defaults). `model`:
    the network (default: `conv4(in_channels, ways, hidden, image_size)`, without head for
    "protonet"; build it under a torch seed for reproducible initial weights). `backend`,
    `max_tasks_per_call` and `precision`: see `Learner.__init__`.
    """
    if name not in LEARNERS:
        raise ValueError(
            f"make_learner: unknown learner {name!r}; choose one of {sorted(LEARNERS)}"
        )
    cls, config_cls = LEARNERS[name]
    if config is None:
        config = config_cls()
    if not isinstance(config, config_cls):
        raise ValueError(
            f"make_learner: {name!r} takes a {config_cls.__name__}, got {type(config).__name__}"
        )
    if model is None:
        model = conv4(in_channels, None if name == "protonet" else ways, hidden, image_size)
    return cls(
        model, config, backend=backend, max_tasks_per_call=max_tasks_per_call, precision=precision
    )


__all__ = [
    "BN_MODES",
    "FOMAML",
    "LEARNERS",
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
    "reptile_meta_step_size",
]
