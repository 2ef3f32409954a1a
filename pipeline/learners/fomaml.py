"""First-order MAML (Finn et al. 2017, section 5.2): MAML without the second-order terms.

The fast weights theta_t come from `inner_steps` SGD steps on the support set with no graph
kept; the meta-gradient contribution of a task is the gradient of its query loss AT theta_t,
applied to phi. Uses `MAMLConfig` (its `first_order` field is irrelevant here).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from pipeline.episodes import Episodes
from pipeline.learners.base import (
    HEAD,
    Params,
    add_into,
    grad_and_value,
    loss_sum,
    metrics_dict,
    reference_forward,
    reference_metrics,
    reference_sgd,
    reference_start,
    sgd_adapt,
    task_start,
    zeros_like,
)
from pipeline.learners.maml import MAML, MAMLConfig
from pipeline.learners.registry import register


@register
class FOMAML(MAML):
    """First-order MAML. Config: `MAMLConfig`. Evaluation is MAML's."""

    name = "fomaml"
    config: MAMLConfig

    def _meta_gradient(self, params: Params, episodes: Episodes) -> tuple[Params, dict[str, float]]:
        cfg, net, ep = self.config, self.net, episodes
        theta0 = task_start(params, ep.num_tasks, cfg.zero_head)
        theta, before = sgd_adapt(
            net, theta0, ep.support_x, ep.support_y, lr=cfg.inner_lr, steps=cfg.inner_steps
        )

        def query_loss(th: Params) -> tuple[Tensor, Tensor]:
            logits = net(th, ep.query_x)
            return loss_sum(logits, ep.query_y), logits

        grads, (_, logits) = grad_and_value(query_loss, has_aux=True)(theta)
        if cfg.zero_head:  # the head's start does not depend on the meta-parameters
            grads = {k: g.zero_() if k in HEAD else g for k, g in grads.items()}
        return {k: g.sum(0) for k, g in grads.items()}, metrics_dict(
            ep.num_tasks, logits, ep.query_y, (before, ep.support_y)
        )

    def reference_meta_gradient(
        self, params: Mapping[str, Tensor], episodes: Episodes
    ) -> tuple[Params, dict[str, float]]:
        cfg, ep = self.config, episodes
        total = zeros_like(params)
        logits, before = [], []
        for t in range(ep.num_tasks):
            p = reference_start(params, cfg.zero_head)
            p = {k: v.detach().requires_grad_() for k, v in p.items()}
            p, first = reference_sgd(
                self.model,
                p,
                ep.support_x[t],
                ep.support_y[t],
                lr=cfg.inner_lr,
                steps=cfg.inner_steps,
                create_graph=False,
            )
            p = {k: v.detach().requires_grad_() for k, v in p.items()}
            out = reference_forward(self.model, p, ep.query_x[t])
            loss = torch.nn.functional.cross_entropy(out, ep.query_y[t])
            g = dict(zip(p, torch.autograd.grad(loss, list(p.values())), strict=True))
            add_into(total, {k: v * 0.0 if cfg.zero_head and k in HEAD else v for k, v in g.items()})
            logits.append(out.detach())
            before.append(first)
        return total, reference_metrics(logits, ep.query_y, (before, ep.support_y))
