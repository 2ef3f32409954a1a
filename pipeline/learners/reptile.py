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

The inner optimizer is `pipeline.learners.optim`'s SGD or Adam, functional and batched:
per-task first/second moments [T, ...] advance with the parameters; a fresh state per task and
per call, as supervised-reptile resets its inner Adam for every task. Its default beta1 = 0
follows supervised-reptile. The batched path and the per-task reference use the same type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import FLAG, LearnerConfig, OneOf, Range, UnitPair, knob
from pipeline.episodes import Episodes
from pipeline.learners.base import (
    AUGMENT,
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
    task_start,
    zeros_like,
)
from pipeline.learners.optim import SGD, Adam, inner_optimizer
from pipeline.learners.registry import register
from pipeline.models import TaskNet


@dataclass(frozen=True)
class ReptileConfig(LearnerConfig):
    """Inner loop and outer update of Reptile (defaults: supervised-reptile's Omniglot settings)."""

    inner_lr: float = knob(1e-3, Range(gt=0))
    """Fast (inner-loop) learning rate of the inner optimizer."""
    inner_steps: int = knob(5, Range(ge=0))
    """Inner optimizer steps per task during meta-training."""
    eval_inner_steps: int = knob(50, Range(ge=0))
    """Inner optimizer steps on the support set at evaluation (unless `steps` is given)."""
    inner_optimizer: str = knob("adam", OneOf(("sgd", "adam")))
    """Inner optimizer: sgd or adam (functional, one state per task, reset for every task)."""
    adam_betas: tuple[float, float] = knob((0.0, 0.999), UnitPair())
    """Inner Adam's (beta1, beta2); supervised-reptile uses beta1 = 0."""
    adam_eps: float = knob(1e-8, Range(gt=0))
    """Inner Adam's epsilon (added to sqrt of the bias-corrected second moment)."""
    zero_head: bool = knob(False, FLAG)
    """Start every task from a zero linear head (as MAML's zero_head); the head then gets no
    meta-update."""
    inner_batches: int = knob(1, Range(ge=1))
    """Meta-training: split each task's images into this many class-balanced minibatches and
    take the inner steps on them in turn (supervised-reptile's inner minibatches; 2 with 1 shot
    + 1 query alternates support and query sets); 1 is full-batch."""
    train_on_query: bool = knob(True, FLAG)
    """Meta-training inner loop uses support AND query images (true) or the support set only."""
    reptile_outer: str = knob("anneal", OneOf(("anneal", "adam")))
    """The meta-update of the mean (phi - theta) over tasks: anneal (plain steps with the
    linearly annealed meta step of Nichol et al.) or adam (Adam with meta_lr and lr_schedule:
    step sizes that do not depend on how far the inner loop moved)."""
    meta_step_start: float = knob(1.0, Range(gt=0, le=1))
    """Meta step size at the first step (linearly annealed, Nichol et al.)."""
    meta_step_end: float = knob(0.0, Range(ge=0, le=1))
    """Meta step size at the last step."""

    def optimizer(self) -> SGD | Adam:
        """The inner optimizer these settings describe."""
        return inner_optimizer(self.inner_optimizer, self.inner_lr, betas=self.adam_betas,
                               eps=self.adam_eps)


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
    opt = cfg.optimizer()
    state = opt.init(theta)
    first = None
    for i in range(steps):
        x, y = batches[i % len(batches)]

        def loss(th: Params, x: Tensor = x, y: Tensor = y) -> tuple[Tensor, Tensor]:
            logits = net(th, x)
            return loss_sum(logits, y), logits

        grads, (_, logits) = grad_and_value(loss, has_aux=True)(theta)
        if first is None:
            first = logits.detach()
        theta, state = opt.update(grads, state, theta)
    return theta, first


@register
class Reptile(Learner):
    """Reptile. Config: `ReptileConfig`."""

    name = "reptile"
    config_class = ReptileConfig
    config: ReptileConfig
    # A 20-way head matching the 20-way one-shot protocol, started at zero for every task;
    # 4 inner SGD steps alternating support and query sets; evaluation fine-tunes 10 steps.
    # Measured in a 15-core-minute budget (benchmarks/README.md, "Accuracy in a CPU budget").
    defaults = {
        "ways": 20, "shots": 1, "queries": 1, "meta_batch": 8, "eval_views": 8, **AUGMENT,
        "val_every": 100, "val_episodes": 100,
        "learner_config": {"zero_head": True, "inner_optimizer": "sgd", "inner_lr": 0.1,
                           "inner_steps": 4, "inner_batches": 2, "eval_inner_steps": 10},
    }

    @classmethod
    def outer_optimizer(cls, config: ReptileConfig, configured: str) -> str:
        """Plain steps (SGD on the mean phi - theta) under the anneal, else Adam."""
        return "adam" if config.reptile_outer == "adam" else "sgd"

    @classmethod
    def meta_step_size(cls, config: ReptileConfig, step: int, total_steps: int) -> float | None:
        if config.reptile_outer != "anneal":
            return None
        return reptile_meta_step_size(step, total_steps, config.meta_step_start,
                                      config.meta_step_end)

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
        """One task, one step at a time with the inner optimizer (the same `SGD` / `Adam` type
        as the batched path, tested against torch.optim); also the first step's logits, as
        `inner_train`."""
        cfg = self.config
        p = {k: v.detach() for k, v in reference_start(params, cfg.zero_head).items()}
        opt = cfg.optimizer()
        state = opt.init(p)
        first = None
        for i in range(steps):
            x, y = batches[i % len(batches)]
            leaf = {k: t.requires_grad_() for k, t in p.items()}
            logits = reference_forward(self.model, leaf, x)
            if first is None:
                first = logits.detach()
            loss = F.cross_entropy(logits, y)
            grads = dict(zip(leaf, torch.autograd.grad(loss, list(leaf.values())), strict=True))
            p, state = opt.update(grads, state, {k: t.detach() for k, t in leaf.items()})
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
