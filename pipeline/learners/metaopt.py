"""MetaOptNet (Lee, Maji, Ravichandran & Soatto 2019): a differentiable linear base learner.

The network is an embedding (conv4 without head), as for ProtoNets. Each task fits a linear
classifier on its support embeddings inside the autograd graph, and the query logits are that
classifier's scores times a learnable logit scale:

* `metaopt-ridge`: ridge regression to one-hot targets in closed form (`pipeline.heads.ridge_head`,
  Woodbury / Cholesky in the support x support space; R2-D2, Bertinetto et al. 2019);
* `metaopt-svm`: the Crammer-Singer multi-class SVM solved in its dual
  (`pipeline.heads.svm_head`, FISTA + polish, implicit differentiation of the KKT conditions).
  When the solver does not reach `tol` within `max_iter` iterations, the head's RuntimeWarning
  (naming the worst relative duality gap) reaches the caller unchanged.

The logit scale is a meta-parameter owned by the learner, "head.scale" (shape [1]), beside the
conv4's parameters: initialised to 1.0 as in MetaOptNet's code (`ClassificationHead`,
`enable_scale=True`), trained by the outer optimizer with the rest. The network never sees it.
There is no inner loop in parameter space: the meta-gradient is the gradient of the query
cross-entropy summed over tasks, and `adapt_and_predict` just fits and classifies.

Support and query images are embedded as two batches (BatchNorm statistics of the support set
for the support images; the query images under `bn_mode`, transductive during training), as
ProtoNets' are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import LearnerConfig, Range, knob
from pipeline.episodes import Episodes
from pipeline.heads import ridge_head, svm_head
from pipeline.learners.base import (
    AUGMENT,
    BNMode,
    NoInnerLoopLearner,
    Params,
    predict,
    reference_forward,
    reference_predict,
    shared,
)
from pipeline.learners.registry import register

SCALE = "head.scale"
"""Name of the learnable logit scale among the meta-parameters (shape [1])."""
SCALE_INIT = 1.0
"""Its initial value: MetaOptNet's (`nn.Parameter(torch.FloatTensor([1.0]))`)."""


@dataclass(frozen=True)
class MetaOptRidgeConfig(LearnerConfig):
    """MetaOptNet-RR's knobs."""

    lam: float = knob(50.0, Range(gt=0))
    """Ridge penalty lambda on the classifier weights (the support Gram matrix gets + lambda I).
    50.0: MetaOptNet's R2D2Head default (`l2_regularizer_lambda=50.0`). It keeps the Cholesky
    solve well conditioned in float32; the overall shrinkage of the logits it causes is
    what the learnable logit scale compensates. Not tuned here for Omniglot."""


@dataclass(frozen=True)
class MetaOptSVMConfig(LearnerConfig):
    """MetaOptNet-SVM's knobs."""

    C: float = knob(0.1, Range(gt=0))
    """Crammer-Singer SVM slack penalty C (0.1: MetaOptNet's `C_reg`)."""
    max_iter: int = knob(500, Range(ge=1))
    """Iteration bound of the dual solver (FISTA iterations per task); a task not converged by
    then raises a RuntimeWarning giving its relative duality gap."""
    tol: float = knob(1e-6, Range(gt=0))
    """Convergence tolerance: relative duality gap gap / primal at which a task's solve stops
    (1e-6 to 1e-9 suits training; below ~1e-11 is under float64 rounding)."""
    dual_ridge: float = knob(0.0, Range(ge=0))
    """eps added to the dual's Gram matrix (K + eps I; the SVM on support features augmented
    with sqrt(eps) e_i): makes the dual strictly convex. 0.0: the exact SVM; MetaOptNet's code
    adds 1.0."""


class _MetaOpt(NoInnerLoopLearner):
    """Common part: conv4 embedding, learnable logit scale, a linear head fitted per task."""

    has_head = False
    # Untuned: ProtoNets' Omniglot recipe (its augmentation, 128 filters, 8 test-time views),
    # with the episode shape set per head below.
    _common: ClassVar[dict[str, Any]] = {
        "meta_batch": 1, "hidden": 128, "eval_views": 8, **AUGMENT,
        "val_every": 200, "checkpoint_every": 200, "val_episodes": 100,
    }

    # --- meta-parameters: the conv4's plus the logit scale --------------------------------
    @classmethod
    def param_template(cls, run: Any) -> Params:
        template = super().param_template(run)
        template[SCALE] = torch.empty(1, device="meta")
        return template

    @classmethod
    def initial_params(cls, run: Any) -> Params:
        params = super().initial_params(run)
        params[SCALE] = torch.full((1,), SCALE_INIT)
        return params

    def init_params(self) -> Params:
        params = super().init_params()
        dtype = next(iter(params.values())).dtype
        params[SCALE] = torch.full((1,), SCALE_INIT, dtype=dtype)
        return params

    # --- the head ---------------------------------------------------------------------------
    def _head(
        self, support: Tensor, support_y: Tensor, query: Tensor, ways: int, scale: Tensor
    ) -> Tensor:
        """Query logits [T, Q, ways] from embeddings [T, S, D], labels [T, S], [T, Q, D]."""
        raise NotImplementedError

    def _logits(
        self, params: Mapping[str, Tensor], ep: Episodes, bn_mode: BNMode, *, evaluating: bool
    ) -> Tensor:
        scale = params[SCALE]
        body = {k: v for k, v in params.items() if k != SCALE}
        theta = shared(body, ep.num_tasks)
        support = self.net(theta, ep.support_x).to(scale.dtype)
        query = predict(self.net, theta, ep, bn_mode).to(scale.dtype)
        return self._head(support, ep.support_y, query, ep.ways, scale)

    # --- the per-task reference loop --------------------------------------------------------
    def _reference_head(
        self, support: Tensor, support_y: Tensor, query: Tensor, ways: int, scale: Tensor
    ) -> Tensor:
        """One task's query logits [Q, ways] from embeddings [S, D], labels [S], [Q, D]."""
        raise NotImplementedError

    def _reference_logits(
        self, params: Mapping[str, Tensor], ep: Episodes, t: int, bn_mode: BNMode, *,
        evaluating: bool,
    ) -> Tensor:
        scale = params[SCALE]
        body = {k: v for k, v in params.items() if k != SCALE}
        support = reference_forward(self.model, body, ep.support_x[t]).to(scale.dtype)
        query = reference_predict(self.model, body, ep.support_x[t], ep.query_x[t], bn_mode)
        return self._reference_head(support, ep.support_y[t], query.to(scale.dtype), ep.ways, scale)


@register
class MetaOptRidge(_MetaOpt):
    """MetaOptNet-RR: ridge-regression head. Config: `MetaOptRidgeConfig`."""

    name = "metaopt-ridge"
    config_class = MetaOptRidgeConfig
    config: MetaOptRidgeConfig
    # ProtoNets' 60-way 1-shot episodes: the S x S Cholesky solve (S = 60) costs nothing
    # beside the conv4. Untuned (no accuracy measured yet).
    defaults = {"ways": 60, "shots": 1, "queries": 5, **_MetaOpt._common}

    def _head(self, support, support_y, query, ways, scale):
        return ridge_head(support, support_y, query, ways, lam=self.config.lam, scale=scale)

    def _reference_head(self, support, support_y, query, ways, scale):
        # the primal normal equations, a D x D solve (the batched head solves in S x S)
        y = F.one_hot(support_y, ways).to(support.dtype)
        eye = torch.eye(support.shape[1], dtype=support.dtype)
        w = torch.linalg.solve(support.T @ support + self.config.lam * eye, support.T @ y)
        return scale * (query @ w)


@register
class MetaOptSVM(_MetaOpt):
    """MetaOptNet-SVM: Crammer-Singer SVM head. Config: `MetaOptSVMConfig`."""

    name = "metaopt-svm"
    config_class = MetaOptSVMConfig
    config: MetaOptSVMConfig
    # 20-way 1-shot episodes: the dual solve is iterative (up to max_iter FISTA iterations on
    # an S x ways problem per task), so fewer ways than ProtoNets' 60 keep it cheap on CPU.
    # Untuned (no accuracy measured yet).
    defaults = {"ways": 20, "shots": 1, "queries": 5, **_MetaOpt._common}

    def _head(self, support, support_y, query, ways, scale):
        c = self.config
        logits, _ = svm_head(support, support_y, query, ways, C=c.C, max_iter=c.max_iter,
                             tol=c.tol, scale=scale, dual_ridge=c.dual_ridge)
        return logits

    def _reference_head(self, support, support_y, query, ways, scale):
        # one task at a time (T = 1); the solver itself is tested against scipy in test_heads
        return self._head(support[None], support_y[None], query[None], ways, scale)[0]


__all__ = ["SCALE", "MetaOptRidge", "MetaOptRidgeConfig", "MetaOptSVM", "MetaOptSVMConfig"]
