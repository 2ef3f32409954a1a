"""MAML (Finn et al. 2017): the meta-gradient flows through the inner SGD steps.

For each task, the fast weights are theta_t = phi - a * grad L_support(phi) (repeated
`inner_steps` times); the meta-objective is the query loss at theta_t, and its gradient with
respect to phi includes the second-order terms (Hessian-vector products of the support loss).
All tasks adapt in one call: `grad_and_value` of the summed query loss, taken over the
meta-parameters, with the inner gradients computed by a nested `grad` whose graph is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline.config import FLAG, LearnerConfig, Range, knob
from pipeline.episodes import Episodes
from pipeline.learners.base import (
    AUGMENT,
    BNMode,
    Learner,
    Params,
    add_into,
    grad_and_value,
    loss_sum,
    metrics_dict,
    predict,
    reference_forward,
    reference_metrics,
    reference_predict,
    reference_sgd,
    reference_start,
    sgd_adapt,
    task_start,
    zeros_like,
)
from pipeline.learners.registry import register


@dataclass(frozen=True)
class MAMLConfig(LearnerConfig):
    """Inner loop of MAML and first-order MAML (defaults: Finn et al.'s 5-way Omniglot)."""

    inner_lr: float = knob(0.4, Range(gt=0))
    """Fast (inner-loop) SGD learning rate, alpha."""
    inner_steps: int = knob(1, Range(ge=0))
    """SGD steps on the support set during meta-training."""
    eval_inner_steps: int = knob(3, Range(ge=0))
    """SGD steps on the support set at evaluation (unless `steps` is given)."""
    zero_head: bool = knob(False, FLAG)
    """Start every task from a zero linear head (Kao et al. 2022, "MAML is a Noisy Contrastive
    Learner"): the head stops memorising a label order, and the first inner step sets each
    class's weights to (a multiple of) its mean support feature. Meta-learns the body only."""
    first_order: bool = knob(False, FLAG)
    """MAML only: drop the second-order terms (treat inner gradients as constants). The
    result equals FOMAML's; the fomaml learner computes it faster (no graph through the inner
    loop)."""


MAML_DEFAULTS: dict[str, Any] = {
    "ways": 20, "shots": 1, "queries": 1, "meta_batch": 8, "eval_views": 8, **AUGMENT,
    "val_every": 100, "val_episodes": 100,
    "learner_config": {"zero_head": True, "inner_lr": 0.4, "inner_steps": 1,
                       "eval_inner_steps": 1},
}
"""Tuned run settings of MAML and FOMAML: a 20-way head matching the 20-way one-shot protocol,
started at zero for every task (Kao et al.'s zeroing trick): one inner step then turns it into
class-mean features; evaluation fine-tunes for as many steps as training did. Measured in a
15-core-minute budget (benchmarks/README.md, "Accuracy in a CPU budget")."""


@register
class MAML(Learner):
    """Second-order MAML. Config: `MAMLConfig`."""

    name = "maml"
    config_class = MAMLConfig
    config: MAMLConfig
    defaults = MAML_DEFAULTS

    def _meta_gradient(self, params: Params, episodes: Episodes) -> tuple[Params, dict[str, float]]:
        cfg, net, ep = self.config, self.net, episodes

        def query_loss(phi: Params) -> tuple[Tensor, tuple[Tensor, Tensor | None]]:
            theta, before = sgd_adapt(
                net,
                task_start(phi, ep.num_tasks, cfg.zero_head),
                ep.support_x,
                ep.support_y,
                lr=cfg.inner_lr,
                steps=cfg.inner_steps,
                second_order=not cfg.first_order,
            )
            logits = net(theta, ep.query_x)
            return loss_sum(logits, ep.query_y), (logits, before)

        grads, (_, (logits, before)) = grad_and_value(query_loss, has_aux=True)(params)
        return grads, metrics_dict(ep.num_tasks, logits, ep.query_y, (before, ep.support_y))

    def _adapt_and_predict(
        self, params: Params, episodes: Episodes, steps: int | None, bn_mode: BNMode
    ) -> Tensor:
        steps = self.config.eval_inner_steps if steps is None else steps
        theta, _ = sgd_adapt(
            self.net,
            task_start(params, episodes.num_tasks, self.config.zero_head),
            episodes.support_x,
            episodes.support_y,
            lr=self.config.inner_lr,
            steps=steps,
        )
        with torch.no_grad():
            return predict(self.net, theta, episodes, bn_mode)

    def reference_meta_gradient(
        self, params: Mapping[str, Tensor], episodes: Episodes
    ) -> tuple[Params, dict[str, float]]:
        cfg, ep = self.config, episodes
        phi = {k: v.detach().requires_grad_() for k, v in params.items()}
        total = zeros_like(phi)
        logits, before = [], []
        for t in range(ep.num_tasks):
            p = reference_start(phi, cfg.zero_head)  # learn2learn's clone()
            p, first = reference_sgd(
                self.model,
                p,
                ep.support_x[t],
                ep.support_y[t],
                lr=cfg.inner_lr,
                steps=cfg.inner_steps,
                create_graph=not cfg.first_order,
            )
            out = reference_forward(self.model, p, ep.query_x[t])
            loss = torch.nn.functional.cross_entropy(out, ep.query_y[t])
            add_into(total, torch.autograd.grad(loss, list(phi.values())))
            logits.append(out.detach())
            before.append(first)
        return total, reference_metrics(logits, ep.query_y, (before, ep.support_y))

    def reference_adapt_and_predict(
        self,
        params: Mapping[str, Tensor],
        episodes: Episodes,
        *,
        steps: int | None = None,
        bn_mode: BNMode = "transductive",
    ) -> Tensor:
        steps = self.config.eval_inner_steps if steps is None else steps
        out = []
        for t in range(episodes.num_tasks):
            p = reference_start(params, self.config.zero_head)
            p = {k: v.detach().requires_grad_() for k, v in p.items()}
            p, _ = reference_sgd(
                self.model,
                p,
                episodes.support_x[t],
                episodes.support_y[t],
                lr=self.config.inner_lr,
                steps=steps,
                create_graph=False,
            )
            with torch.no_grad():
                out.append(
                    reference_predict(
                        self.model, p, episodes.support_x[t], episodes.query_x[t], bn_mode
                    )
                )
        return torch.stack(out)
