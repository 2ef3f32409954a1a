"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

Each task trains its own copy of the weights for `inner_steps` steps of SGD or Adam, starting
from phi: full-batch steps, or steps on `inner_batches` class-balanced minibatches in turn. A task's meta-gradient contribution is phi - theta_t, so an SGD
meta-optimizer with step size epsilon on the MEAN contribution performs Reptile's update
phi <- phi + epsilon * mean_t(theta_t - phi). `reptile_meta_step_size` gives the linearly
annealed epsilon of the paper.

Inner-loop data: by default each task trains on its support AND query images together
(`train_on_query=True`): like supervised-reptile, which trains on every sampled example of the
task, Reptile has no held-out loss, so sampling ways*(shots+queries) images and keeping some
back would waste them. At evaluation (`adapt_and_predict`) only the support set is used.

Inner Adam is functional and batched: per-task first/second moments [T, ...] advance with the
parameters; a fresh state per task and per call, as supervised-reptile resets its inner Adam
for every task. Its default beta1 = 0 follows supervised-reptile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.episodes import Episodes
from pipeline.learners.base import (
    HEAD,
    BNMode,
    Learner,
    Params,
    grad_and_value,
    loss_sum,
    metrics_dict,
    predict,
    reference_forward,
    reference_metrics,
    reference_predict,
    reference_start,
    sgd_step,
    task_start,
    zeros_like,
)
from pipeline.models import TaskNet


@dataclass(frozen=True)
class ReptileConfig:
    """Inner loop of Reptile (defaults: supervised-reptile's Omniglot settings)."""

    inner_lr: float = 1e-3
    """Fast (inner-loop) learning rate of the inner optimizer."""
    inner_steps: int = 5
    """Inner optimizer steps per task during meta-training."""
    eval_inner_steps: int = 50
    """Inner optimizer steps on the support set in `adapt_and_predict` (unless `steps` given)."""
    inner_optimizer: Literal["sgd", "adam"] = "adam"
    """"sgd" or "adam" (functional, one state per task, reset for every task)."""
    adam_betas: tuple[float, float] = (0.0, 0.999)
    """Inner Adam's (beta1, beta2); supervised-reptile uses beta1 = 0."""
    adam_eps: float = 1e-8
    """Inner Adam's epsilon (added to sqrt of the bias-corrected second moment)."""
    zero_head: bool = False
    """Start every task from a zero linear head (as `MAMLConfig.zero_head`); the head then
    gets no meta-update."""
    inner_batches: int = 1
    """Meta-training: split each task's images into this many class-balanced minibatches and
    take the inner steps on them in turn (supervised-reptile's inner minibatches). With more
    than one, consecutive steps see different images, which is where Reptile's
    generalisation term (the inner product of gradients on different batches) comes from;
    with 1-shot support + 1 query per class, 2 alternates support and query sets."""
    train_on_query: bool = True
    """Meta-training inner loop uses support AND query images (True) or the support set only."""


def reptile_meta_step_size(
    step: int, total_steps: int, start: float = 1.0, end: float = 0.0
) -> float:
    """Reptile's outer step size epsilon at meta-iteration `step` of `total_steps`.

    Linear annealing from `start` (step 0) to `end` (step total_steps), as in the paper
    (supervised-reptile: start = 1.0, end = 0).
    """
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return (1.0 - frac) * start + frac * end


def class_balanced_batches(
    x: Tensor, y: Tensor, ways: int, batches: int
) -> list[tuple[Tensor, Tensor]]:
    """Split way-major task images x [T, ways*n, ...] (labels [T, ways*n]) into `batches`
    minibatches; minibatch b holds every class's images b, b + batches, ... (n >= batches)."""
    if batches == 1:
        return [(x, y)]
    t, total = y.shape
    per_class = total // ways
    if per_class * ways != total or per_class < batches:
        raise ValueError(
            f"inner_batches={batches} needs at least that many images per class, got {per_class}"
        )
    xs = x.reshape(t, ways, per_class, *x.shape[2:])
    ys = y.reshape(t, ways, per_class)
    return [
        (xs[:, :, b::batches].flatten(1, 2), ys[:, :, b::batches].flatten(1, 2))
        for b in range(batches)
    ]


def inner_train(
    net: TaskNet,
    theta: Mapping[str, Tensor],
    batches: list[tuple[Tensor, Tensor]],
    cfg: ReptileConfig,
    steps: int,
) -> tuple[Params, Tensor | None]:
    """`steps` SGD/Adam steps for every task at once, step i on minibatch i mod len(batches);
    no autograd graph is kept. Also returns the first step's logits on its minibatch at the
    starting parameters (None when steps=0): the "before" metrics."""
    theta = {k: v.detach() for k, v in theta.items()}
    m: Params = {}
    v2: Params = {}
    beta1, beta2 = cfg.adam_betas
    first = None
    for i in range(1, steps + 1):
        x, y = batches[(i - 1) % len(batches)]

        def loss(th: Params, x: Tensor = x, y: Tensor = y) -> tuple[Tensor, Tensor]:
            logits = net(th, x)
            return loss_sum(logits, y), logits

        grads, (_, logits) = grad_and_value(loss, has_aux=True)(theta)
        if first is None:
            first = logits.detach()
        if cfg.inner_optimizer == "sgd":
            theta = sgd_step(theta, grads, cfg.inner_lr)
            continue
        with torch.no_grad():  # in place where the tensors are ours: fewer passes
            for k, g in grads.items():
                if i == 1:
                    m[k], v2[k] = (1 - beta1) * g, (1 - beta2) * g * g
                else:
                    m[k].mul_(beta1).add_(g, alpha=1 - beta1)
                    v2[k].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = v2[k].sqrt().div_(math.sqrt(1 - beta2**i)).add_(cfg.adam_eps)
                theta[k] = theta[k].addcdiv(m[k], denom, value=-cfg.inner_lr / (1 - beta1**i))
    return theta, first


class Reptile(Learner):
    """Reptile. Config: `ReptileConfig`."""

    name = "reptile"
    config: ReptileConfig

    def _inner_data(self, ep: Episodes) -> list[tuple[Tensor, Tensor]]:
        """The meta-training inner loop's minibatches (way-major within each)."""
        if not self.config.train_on_query:
            x, y = ep.support_x, ep.support_y
        else:  # per class: its support images, then its query images
            t, ways = ep.num_tasks, ep.ways
            x = torch.cat(
                [
                    ep.support_x.reshape(t, ways, ep.shots, *ep.support_x.shape[2:]),
                    ep.query_x.reshape(t, ways, ep.queries, *ep.query_x.shape[2:]),
                ],
                2,
            ).flatten(1, 2)
            y = torch.arange(ways, device=ep.support_y.device)
            y = y.repeat_interleave(ep.shots + ep.queries).expand(t, -1)
        return class_balanced_batches(x, y, ep.ways, self.config.inner_batches)

    def _meta_gradient(self, params: Params, episodes: Episodes) -> tuple[Params, dict[str, float]]:
        cfg, net, ep = self.config, self.net, episodes
        start = task_start(params, ep.num_tasks, cfg.zero_head)
        batches = self._inner_data(ep)
        theta, before = inner_train(net, start, batches, cfg, cfg.inner_steps)
        grads = {
            k: torch.zeros_like(params[k])
            if cfg.zero_head and k in HEAD
            else ep.num_tasks * params[k] - theta[k].sum(0)
            for k in params
        }
        with torch.no_grad():
            after = net(theta, ep.query_x)
        return grads, metrics_dict(ep.num_tasks, after, ep.query_y, (before, batches[0][1]))

    def _adapt_and_predict(
        self, params: Params, episodes: Episodes, steps: int | None, bn_mode: BNMode
    ) -> Tensor:
        steps = self.config.eval_inner_steps if steps is None else steps
        ep = episodes
        start = task_start(params, ep.num_tasks, self.config.zero_head)
        theta, _ = inner_train(self.net, start, [(ep.support_x, ep.support_y)], self.config, steps)
        with torch.no_grad():
            return predict(self.net, theta, ep, bn_mode)

    def _reference_batches(self, ep: Episodes, t: int) -> list[tuple[Tensor, Tensor]]:
        """Task t's inner minibatches, picked image by image."""
        per_class: list[list[Tensor]] = [[] for _ in range(ep.ways)]
        sets = [(ep.support_x[t], ep.support_y[t])]
        if self.config.train_on_query:
            sets.append((ep.query_x[t], ep.query_y[t]))
        for images, labels in sets:
            for image, label in zip(images, labels.tolist(), strict=True):
                per_class[label].append(image)
        n = self.config.inner_batches
        batches = []
        for b in range(n):
            chosen = [(img, c) for c in range(ep.ways) for img in per_class[c][b::n]]
            batches.append(
                (torch.stack([img for img, _ in chosen]), torch.tensor([c for _, c in chosen]))
            )
        return batches

    def _reference_train(
        self, params: Mapping[str, Tensor], batches: list[tuple[Tensor, Tensor]], steps: int
    ) -> tuple[Params, Tensor | None]:
        """One task, hand-written SGD / Adam (same formulas as torch.optim's); also the first
        step's logits, as `inner_train`."""
        cfg = self.config
        p = {k: v.detach() for k, v in reference_start(params, cfg.zero_head).items()}
        m, v2 = zeros_like(p), zeros_like(p)
        beta1, beta2 = cfg.adam_betas
        first = None
        for i in range(1, steps + 1):
            x, y = batches[(i - 1) % len(batches)]
            leaf = {k: t.requires_grad_() for k, t in p.items()}
            logits = reference_forward(self.model, leaf, x)
            if first is None:
                first = logits.detach()
            loss = F.cross_entropy(logits, y)
            grads = torch.autograd.grad(loss, list(leaf.values()))
            with torch.no_grad():
                for (k, t), g in zip(leaf.items(), grads, strict=True):
                    if cfg.inner_optimizer == "sgd":
                        p[k] = t - cfg.inner_lr * g
                        continue
                    m[k] = beta1 * m[k] + (1 - beta1) * g
                    v2[k] = beta2 * v2[k] + (1 - beta2) * g * g
                    denom = v2[k].sqrt() / math.sqrt(1 - beta2**i) + cfg.adam_eps
                    p[k] = t - cfg.inner_lr / (1 - beta1**i) * m[k] / denom
        return p, first

    def reference_meta_gradient(
        self, params: Mapping[str, Tensor], episodes: Episodes
    ) -> tuple[Params, dict[str, float]]:
        ep = episodes
        total = zeros_like(params)
        after, before, before_labels = [], [], []
        for t in range(ep.num_tasks):
            batches = self._reference_batches(ep, t)
            theta, first = self._reference_train(params, batches, self.config.inner_steps)
            for k in total:
                if not (self.config.zero_head and k in HEAD):
                    total[k] += params[k].detach() - theta[k]
            with torch.no_grad():
                after.append(reference_forward(self.model, theta, ep.query_x[t]))
            before.append(first)
            before_labels.append(batches[0][1])
        labels = torch.stack(before_labels)
        return total, reference_metrics(after, ep.query_y, (before, labels))

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
            support = [(episodes.support_x[t], episodes.support_y[t])]
            theta, _ = self._reference_train(params, support, steps)
            with torch.no_grad():
                out.append(
                    reference_predict(
                        self.model, theta, episodes.support_x[t], episodes.query_x[t], bn_mode
                    )
                )
        return torch.stack(out)
