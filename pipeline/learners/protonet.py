"""Prototypical Networks (Snell, Swersky & Zemel 2017).

The network is an embedding (conv4 without head). A class prototype is the mean embedding of
its support images; a query's logits are minus its squared Euclidean distances to the
prototypes (divided by `temperature`). There is no inner loop: the meta-gradient is the
gradient of the query cross-entropy summed over tasks, and `adapt_and_predict` just classifies.

At evaluation under bn_mode="transductive" the prototypes can also be refined with the query
set (`refine_steps`): soft k-means with the support images as labelled points (Ren et al. 2018,
"Meta-Learning for Semi-Supervised Few-Shot Classification"). Each step moves every prototype
to the mean of its support embeddings and of all query embeddings weighted by their softmax
assignment to it. Training always uses the support means.

Support and query images are embedded as two batches (BatchNorm statistics of the support set
for the support images; the query images under `bn_mode`, transductive during training).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import LearnerConfig, Range, knob
from pipeline.episodes import Episodes
from pipeline.learners.base import (
    AUGMENT,
    BNMode,
    NoInnerLoopLearner,
    predict,
    reference_forward,
    reference_predict,
    shared,
)
from pipeline.learners.registry import register


@dataclass(frozen=True)
class ProtoNetConfig(LearnerConfig):
    """Prototypical Networks' knobs."""

    temperature: float = knob(1.0, Range(gt=0))
    """Logits are -squared distance / temperature (1.0: the paper's)."""
    refine_steps: int = knob(0, Range(ge=0))
    """At evaluation: soft k-means steps refining the prototypes with the query embeddings
    (Ren et al. 2018). Transductive, so applied only under bn_mode=transductive; 0 keeps the
    support means."""


def proto_logits(
    support: Tensor,
    support_y: Tensor,
    query: Tensor,
    ways: int,
    temperature: float,
    refine_steps: int = 0,
) -> Tensor:
    """Logits [..., Q, ways] from embeddings support [..., S, D] (labels [..., S]), query [..., Q, D].

    `refine_steps` > 0: the prototypes first take that many soft k-means steps over the query
    embeddings, each query weighted per class by its softmax over the current logits.
    """
    one_hot = F.one_hot(support_y, ways).to(support.dtype)  # [..., S, ways]
    sums, counts = one_hot.mT @ support, one_hot.sum(-2)  # [..., ways, D], [..., ways]
    logits = _neg_sq_distances(query, sums / counts.unsqueeze(-1)) / temperature
    for _ in range(refine_steps):
        soft = logits.softmax(-1)  # [..., Q, ways]
        prototypes = (sums + soft.mT @ query) / (counts + soft.sum(-2)).unsqueeze(-1)
        logits = _neg_sq_distances(query, prototypes) / temperature
    return logits


def _neg_sq_distances(query: Tensor, prototypes: Tensor) -> Tensor:
    """-||q - p||^2 [..., Q, ways] for query [..., Q, D] and prototypes [..., ways, D]."""
    sq = (query * query).sum(-1, keepdim=True) - 2 * query @ prototypes.mT
    return -(sq + (prototypes * prototypes).sum(-1).unsqueeze(-2))


def reference_proto_logits(
    support: Tensor,
    support_y: Tensor,
    query: Tensor,
    ways: int,
    temperature: float,
    refine_steps: int = 0,
) -> Tensor:
    """`proto_logits` for one task, written out class by class (the reference)."""

    def logits_to(prototypes: list[Tensor]) -> Tensor:
        return -torch.stack([((query - p) ** 2).sum(-1) for p in prototypes], -1) / temperature

    members = [support[support_y == c] for c in range(ways)]
    prototypes = [m.mean(0) for m in members]
    for _ in range(refine_steps):
        soft = logits_to(prototypes).softmax(-1)
        prototypes = [
            (m.sum(0) + (soft[:, c, None] * query).sum(0)) / (len(m) + soft[:, c].sum())
            for c, m in enumerate(members)
        ]
    return logits_to(prototypes)


@register
class ProtoNet(NoInnerLoopLearner):
    """Prototypical Networks. Config: `ProtoNetConfig`. The model must have no head."""

    name = "protonet"
    config_class = ProtoNetConfig
    config: ProtoNetConfig
    has_head = False
    evaluation_overrides = ("refine_steps",)
    # Snell et al.'s Omniglot recipe (60-way episodes, rotations, Adam) plus small affine
    # augmentation (only six training alphabets), a 128-filter conv4 (+1 point of held-out
    # accuracy over 64), 8 test-time views (+1.5 points) and 3 soft k-means refinement steps
    # of the prototypes at evaluation (+1 to +1.5 points). Measured in a 15-core-minute budget
    # (benchmarks/README.md, "Accuracy in a CPU budget").
    defaults = {
        "ways": 60, "shots": 1, "queries": 5, "meta_batch": 1, "hidden": 128, "eval_views": 8,
        **AUGMENT, "val_every": 200, "checkpoint_every": 200, "val_episodes": 100,
        "learner_config": {"refine_steps": 3},
    }

    def _refine_steps(self, bn_mode: BNMode, evaluating: bool) -> int:
        # Refinement is transductive and a test-time step: never in the training loss.
        return self.config.refine_steps if evaluating and bn_mode == "transductive" else 0

    def _logits(
        self, params: Mapping[str, Tensor], ep: Episodes, bn_mode: BNMode, *, evaluating: bool
    ) -> Tensor:
        theta = shared(params, ep.num_tasks)
        support = self.net(theta, ep.support_x)
        query = predict(self.net, theta, ep, bn_mode)
        return proto_logits(support, ep.support_y, query, ep.ways, self.config.temperature,
                            self._refine_steps(bn_mode, evaluating))

    def _reference_logits(
        self, params: Mapping[str, Tensor], ep: Episodes, t: int, bn_mode: BNMode, *,
        evaluating: bool,
    ) -> Tensor:
        support = reference_forward(self.model, params, ep.support_x[t])
        query = reference_predict(self.model, params, ep.support_x[t], ep.query_x[t], bn_mode)
        return reference_proto_logits(support, ep.support_y[t], query, ep.ways,
                                      self.config.temperature,
                                      self._refine_steps(bn_mode, evaluating))
