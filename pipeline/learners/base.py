"""The learner contract, and the pieces the learners share.

Every learner is a pure function of a parameter dict (it holds no weights):

    meta_gradient(params, episodes) -> (grads, metrics)
        grads: the meta-gradient contribution SUMMED over the T tasks in `episodes` (so shards
        from several workers add up); the caller divides by the total number of tasks and steps
        its meta-optimizer. metrics: sums over tasks too, with "tasks" = T (see `METRICS`).
    adapt_and_predict(params, episodes, *, steps=None, bn_mode="transductive") -> logits
        query logits [T, ways*queries, ways] after adapting to each task's support set.

Batched paths run all T tasks in one call: parameters get a leading task dimension
([T, ...], `expand_params`), the network is a `TaskNet` (pipeline.models), and per-task
gradients are the gradient of the loss SUMMED over tasks (tasks do not interact, so the
gradient with respect to task t's slice is task t's own gradient), taken with `grad` /
`grad_and_value` below: torch.func's signatures, on plain torch.autograd. Each learner also
has a `reference_*` per-task loop (plain autograd on `functional_call`, learn2learn style)
that computes the same numbers; tests and benchmarks compare the two.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from pipeline.allocator import keep_large_allocations
from pipeline.episodes import Episodes
from pipeline.models import Norm, TaskNet, conv4, expand_params, params_of, task_net

if TYPE_CHECKING:
    from pipeline.config import LearnerConfig, TrainConfig

Params = dict[str, Tensor]
BNMode = Literal["transductive", "per_image", "support"]
"""How BatchNorm normalises query images at evaluation (training is always transductive):
"transductive": statistics of the whole query set of the task;
"per_image": each query image normalised alone (statistics over its spatial positions);
"support": statistics of the task's support set, reused for every query image, so a query
prediction does not depend on the other query images."""
BN_MODES: tuple[BNMode, ...] = ("transductive", "per_image", "support")
Precision = Literal["float32", "bfloat16"]
PRECISIONS: tuple[Precision, ...] = ("float32", "bfloat16")

METRICS = ("tasks", "loss", "accuracy", "loss_before", "accuracy_before")
"""Keys of the metrics dict, each a SUM over tasks: "tasks" (T); "loss" and "accuracy": mean
query cross-entropy / accuracy of each task after adaptation; "loss_before" and
"accuracy_before": mean cross-entropy / accuracy of each task at the meta-parameters, before
adaptation, on the images of its first inner step (the support set; Reptile: its first inner
minibatch), read off that step's forward pass, as MAML's reference code reports its
pre-update loss: free, where a query forward at the meta-parameters cost MAML 8% of a
meta-gradient. Support and query images are drawn alike, so before adaptation the two
estimate the same figure. Learners without an inner loop report "loss" and "accuracy" again.
Divide by "tasks" for means."""

AUGMENT: dict[str, float] = {
    "augment_rotate_deg": 10.0, "augment_translate": 0.1, "augment_scale": 0.1,
}
"""The small affine augmentation every learner's tuned defaults train with (only six training
alphabets in the Omniglot minimal splits); also the limits of the 8 test-time views."""

CPU_CHUNK_BYTES = 64 * 2**20
"""Budget for max_tasks_per_call="auto" on CPU: as many tasks per call as keep the first
block's activation for the support + query images of the call (images x hidden x H x W, in
float32) within 64 MiB: 32 tasks of 5-way 1-shot with one query per class at 28x28, 8 of
20-way 1-shot. Bigger calls amortise the per-call work (Python, operator dispatch, small
per-layer ops, thread wake-ups), which is a large share of a meta-gradient at these sizes. On
the 2-core AMD EPYC (Zen 4), 32 tasks, bfloat16, medians of 10 side-by-side iterations
(/ chunks of 16 tasks): MAML 204 / 222 ms, FOMAML-5 309 / 350, Reptile-5 524 / 542, ProtoNets
126 / 138; 64 MAML tasks in one call 430 ms vs two calls of 32, 464 ms. Chunks then mostly
bound memory. (`Learner` raises glibc's mmap threshold, `pipeline.allocator`, so these large
temporaries are reused, not re-faulted.)"""


class Learner(ABC):
    """Base of all learners: holds the model skeleton, its `TaskNet` and a frozen config.

    The class-level hooks below are what the platform (trainer, Ray workers and parameter
    server, checkpoints, scoring, CLI, flows) asks of a learner; a new learner overrides the
    ones whose defaults do not fit and registers itself (`pipeline.learners.registry`)."""

    name: ClassVar[str]
    """The registered name (`anole train --learner NAME`)."""
    config_class: ClassVar[type[LearnerConfig]]
    """Its own config dataclass (`TrainConfig.learner_config`)."""
    defaults: ClassVar[dict[str, Any]] = {}
    """Tuned run settings `config_for(name)` starts from: TrainConfig fields, and the learner's
    own under "learner_config"."""
    has_head: ClassVar[bool] = True
    """Whether the network ends in a `ways`-way linear head (False: an embedding)."""
    evaluation_overrides: ClassVar[tuple[str, ...]] = ()
    """Fields of its config that `anole evaluate` may override and reports (e.g. ProtoNets'
    refine_steps)."""

    # --- meta-parameters: the network, its template and its initialisation ------------------
    @classmethod
    def build_model(cls, run: TrainConfig) -> nn.Module:
        """The network for a run: conv4, with a `ways`-way head when `has_head`."""
        return conv4(in_channels=run.channels, out_features=run.ways if cls.has_head else None,
                     hidden=run.hidden, image_size=run.image_size)

    @classmethod
    def param_template(cls, run: TrainConfig) -> Params:
        """Names and shapes of the meta-parameters, on the meta device (no memory, no RNG)."""
        with torch.device("meta"):
            return dict(cls.build_model(run).named_parameters())

    @classmethod
    def initial_params(cls, run: TrainConfig) -> Params:
        """Freshly initialised meta-parameters (CPU), a pure function of `run.seed` (seeds
        torch's global generator with it, as the trainer always has)."""
        torch.manual_seed(run.seed)
        return params_of(cls.build_model(run))

    # --- the outer update ---------------------------------------------------------------
    @classmethod
    def outer_optimizer(cls, config: Any, configured: str) -> str:
        """The meta-optimizer ("adam" or "sgd") for this learner; default: the run's."""
        return configured

    @classmethod
    def meta_step_size(cls, config: Any, step: int, total_steps: int) -> float | None:
        """The outer step size at `step` when the learner sets its own (Reptile's anneal);
        None: the run's meta_lr and lr_schedule."""
        return None

    def __init__(
        self,
        model: nn.Module,
        config: object,
        *,
        backend: Literal["grouped", "vmap"] = "grouped",
        max_tasks_per_call: int | Literal["auto"] | None = "auto",
        precision: Precision = "float32",
    ) -> None:
        """`backend`: how tasks are batched (`pipeline.models.task_net`).

        `precision`: "bfloat16" runs the convolutions of the batched path in bfloat16 (mixed
        precision, `pipeline.models.GroupedConv4`); the reference loops always run in the
        parameters' dtype.

        `max_tasks_per_call`: larger meta-batches run in chunks of that many tasks (results
        summed; same numbers up to float rounding). Bounds memory. None: never chunk. "auto":
        `CPU_CHUNK_BYTES` decides on CPU, no chunking elsewhere.
        """
        keep_large_allocations()  # activations are tens of MiB: reuse them, don't re-fault
        self.model = model
        self.config = config
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        low = torch.bfloat16 if precision == "bfloat16" else None
        self.net: TaskNet = task_net(model, backend, low)
        self.max_tasks_per_call = max_tasks_per_call

    def init_params(self) -> Params:
        """The model's current (initial) parameters, as a fresh dict."""
        return params_of(self.model)

    def meta_gradient(
        self, params: Mapping[str, Tensor], episodes: Episodes
    ) -> tuple[Params, dict[str, float]]:
        """Meta-gradient summed over the tasks of `episodes`, and summed metrics (`METRICS`)."""
        params = {k: v.detach() for k, v in params.items()}
        total: Params | None = None
        metrics = dict.fromkeys(METRICS, 0.0)
        for chunk in self._chunks(episodes):
            grads, m = self._meta_gradient(params, chunk)
            total = grads if total is None else {k: total[k] + grads[k] for k in total}
            for k in METRICS:
                metrics[k] += m[k]
        assert total is not None
        return total, metrics

    def adapt_and_predict(
        self,
        params: Mapping[str, Tensor],
        episodes: Episodes,
        *,
        steps: int | None = None,
        bn_mode: BNMode = "transductive",
    ) -> Tensor:
        """Query logits [T, ways*queries, ways] after adapting to each support set.

        `steps`: inner steps (default: the config's eval_inner_steps). No autograd graph is kept.
        """
        check_bn_mode(bn_mode)
        params = {k: v.detach() for k, v in params.items()}
        outs = [
            self._adapt_and_predict(params, chunk, steps, bn_mode)
            for chunk in self._chunks(episodes)
        ]
        return torch.cat(outs).detach()

    def _chunks(self, episodes: Episodes) -> list[Episodes]:
        size = self.max_tasks_per_call
        if size == "auto":
            size = None
            if episodes.support_x.device.type == "cpu":
                ep = episodes
                images = ep.support_x.shape[1] + ep.query_x.shape[1]
                per_task = (
                    images * getattr(self.model, "hidden", 64) * ep.support_x[0, 0, 0].numel()
                )
                size = max(1, CPU_CHUNK_BYTES // (per_task * ep.support_x.element_size()))
        t = episodes.num_tasks
        if size is None or size >= t:
            return [episodes]
        return [episodes[i : i + size] for i in range(0, t, size)]

    @abstractmethod
    def _meta_gradient(
        self, params: Params, episodes: Episodes
    ) -> tuple[Params, dict[str, float]]: ...

    @abstractmethod
    def _adapt_and_predict(
        self, params: Params, episodes: Episodes, steps: int | None, bn_mode: BNMode
    ) -> Tensor: ...

    @abstractmethod
    def reference_meta_gradient(
        self, params: Mapping[str, Tensor], episodes: Episodes
    ) -> tuple[Params, dict[str, float]]:
        """`meta_gradient` computed by a plain per-task loop (the naive reference)."""

    @abstractmethod
    def reference_adapt_and_predict(
        self,
        params: Mapping[str, Tensor],
        episodes: Episodes,
        *,
        steps: int | None = None,
        bn_mode: BNMode = "transductive",
    ) -> Tensor:
        """`adapt_and_predict` computed by a plain per-task loop (the naive reference)."""


# ---------------------------------------------------------------------------------------------
# Batched helpers: parameters [T, ...], images [T, N, C, H, W], labels [T, N]


class NoInnerLoopLearner(Learner):
    """A learner whose task adaptation is a closed-form function of the support embeddings
    (prototypes, a ridge or SVM head): no inner loop, so the meta-gradient is the gradient of
    the query loss. A subclass gives `_logits` (batched) and `_reference_logits` (one task);
    `evaluating` is False for the training loss and True at `adapt_and_predict`."""

    @abstractmethod
    def _logits(self, params: Mapping[str, Tensor], ep: Episodes, bn_mode: BNMode, *,
                evaluating: bool) -> Tensor:
        """Query logits [T, Q, ways] of every task of `ep`."""

    @abstractmethod
    def _reference_logits(self, params: Mapping[str, Tensor], ep: Episodes, t: int,
                          bn_mode: BNMode, *, evaluating: bool) -> Tensor:
        """Query logits [Q, ways] of task `t` alone (plain autograd, the test oracle)."""

    def _meta_gradient(self, params: Params, episodes: Episodes) -> tuple[Params, dict[str, float]]:
        def query_loss(phi: Params) -> tuple[Tensor, Tensor]:
            logits = self._logits(phi, episodes, "transductive", evaluating=False)
            return loss_sum(logits, episodes.query_y), logits

        grads, (_, logits) = grad_and_value(query_loss, has_aux=True)(params)
        return grads, metrics_dict(episodes.num_tasks, logits, episodes.query_y)

    def _adapt_and_predict(
        self, params: Params, episodes: Episodes, steps: int | None, bn_mode: BNMode
    ) -> Tensor:
        with torch.no_grad():
            return self._logits(params, episodes, bn_mode, evaluating=True)

    def reference_meta_gradient(
        self, params: Mapping[str, Tensor], episodes: Episodes
    ) -> tuple[Params, dict[str, float]]:
        phi = {k: v.detach().requires_grad_() for k, v in params.items()}
        total = zeros_like(phi)
        logits = []
        for t in range(episodes.num_tasks):
            out = self._reference_logits(phi, episodes, t, "transductive", evaluating=False)
            loss = F.cross_entropy(out, episodes.query_y[t])
            add_into(total, torch.autograd.grad(loss, list(phi.values())))
            logits.append(out.detach())
        return total, reference_metrics(logits, episodes.query_y)

    def reference_adapt_and_predict(
        self,
        params: Mapping[str, Tensor],
        episodes: Episodes,
        *,
        steps: int | None = None,
        bn_mode: BNMode = "transductive",
    ) -> Tensor:
        with torch.no_grad():
            return torch.stack([
                self._reference_logits(params, episodes, t, bn_mode, evaluating=True)
                for t in range(episodes.num_tasks)
            ])


def loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum over tasks of each task's mean cross-entropy. logits [T, N, ways], labels [T, N]."""
    return (
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / labels.shape[1]
    )


def task_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Each task's mean cross-entropy, [T]."""
    per = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return per.view(labels.shape).mean(1)


def accuracy_sum(logits: Tensor, labels: Tensor) -> float:
    """Sum over tasks of each task's query accuracy."""
    return (logits.argmax(-1) == labels).double().mean(1).sum().item()


def metrics_dict(
    tasks: int,
    logits: Tensor,
    labels: Tensor,
    before: tuple[Tensor | None, Tensor] | None = None,
) -> dict[str, float]:
    """The `METRICS` sums from query logits after adaptation, and from (logits, labels) of the
    first inner step before it (None, or no logits: no inner step, the query figures again)."""
    with torch.no_grad():
        if before is None or before[0] is None:
            before = (logits, labels)
        logits_before, labels_before = before
        return {
            "tasks": float(tasks),
            "loss": loss_sum(logits, labels).item(),
            "accuracy": accuracy_sum(logits, labels),
            "loss_before": loss_sum(logits_before, labels_before).item(),
            "accuracy_before": accuracy_sum(logits_before, labels_before),
        }


def grad_and_value(
    fn: Callable[..., Tensor | tuple[Tensor, object]], *, has_aux: bool = False
) -> Callable[..., tuple[Params, object]]:
    """`torch.func.grad_and_value` for a scalar function of a parameter dict, on torch.autograd.

    `grad_and_value(fn, has_aux=...)(params, *args)` returns ({name: d fn / d params[name]},
    fn's output). Nesting works like torch.func's: when `params` already carry an autograd
    graph (an outer call is differentiating through this one, as in second-order MAML), the
    gradient is taken with `create_graph=True` and stays differentiable; otherwise the
    parameters are detached and the gradient is plain. Same results as torch.func, but
    torch.func wraps every tensor and every custom autograd.Function (GroupedConv4's
    convolutions) at each call: ~20% of a MAML meta-gradient on the 2-core CPU.
    """

    def wrapped(params: Mapping[str, Tensor], *args: object) -> tuple[Params, object]:
        nested = any(p.requires_grad for p in params.values())
        leaves = (
            dict(params) if nested else {k: p.detach().requires_grad_() for k, p in params.items()}
        )
        with torch.enable_grad():
            out = fn(leaves, *args)
            loss = out[0] if has_aux else out
            grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=nested)
        return dict(zip(leaves, grads, strict=True)), out

    return wrapped


def grad(fn: Callable[..., Tensor]) -> Callable[..., Params]:
    """`torch.func.grad` for a scalar function of a parameter dict (see `grad_and_value`)."""
    with_value = grad_and_value(fn)
    return lambda params, *args: with_value(params, *args)[0]


def sgd_adapt(
    net: TaskNet,
    theta: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    lr: float,
    steps: int,
    second_order: bool = False,
) -> tuple[Params, Tensor | None]:
    """`steps` SGD steps of each task's parameters on its own (x, y), all tasks at once.

    Returns the adapted parameters, and the first step's logits on x at the starting
    parameters [T, N, ways] (detached; None when steps=0): the "before" metrics.

    With `second_order=True`, call inside a `grad` / `grad_and_value` over the
    meta-parameters: each step's gradient stays differentiable (full MAML). Otherwise the
    inner gradients are treated as constants (first-order).
    """

    def scaled_loss(th: Params) -> tuple[Tensor, Tensor]:
        logits = net(th, x)
        return loss_sum(logits, y) * -lr, logits

    theta, first = dict(theta), None
    for _ in range(steps):
        # the step -lr * grad, as the gradient of -lr * loss: theta + step then has a free
        # backward, where theta - lr * grad multiplied every per-task weight gradient by -lr
        step, (_, logits) = grad_and_value(scaled_loss, has_aux=True)(theta)
        if first is None:
            first = logits.detach()
        if not second_order:
            step = {k: s.detach() for k, s in step.items()}
        theta = {k: theta[k] + step[k] for k in theta}
    return theta, first


def predict(
    net: TaskNet, theta: Mapping[str, Tensor], episodes: Episodes, bn_mode: BNMode
) -> Tensor:
    """Query logits [T, ways*queries, ways] with per-task parameters `theta` under `bn_mode`."""
    norm: Norm
    if bn_mode == "transductive":
        norm = "batch"
    elif bn_mode == "per_image":
        norm = "image"
    else:
        norm = net.bn_stats(theta, episodes.support_x)
    return net(theta, episodes.query_x, norm=norm)


def shared(params: Mapping[str, Tensor], tasks: int) -> Params:
    """Meta-parameters as the starting parameters of `tasks` tasks (views, no copy)."""
    return expand_params(params, tasks)


HEAD = ("head.weight", "head.bias")
"""Names of the linear head's parameters (absent for ProtoNets' embedding network)."""


def task_start(params: Mapping[str, Tensor], tasks: int, zero_head: bool) -> Params:
    """Each of `tasks` tasks' starting parameters: the meta-parameters (views, no copy), with
    the linear head at zero when `zero_head` (Kao et al. 2022's "zeroing trick").

    A zero head carries no label permutation from task to task, and one inner SGD step on it
    gives class-mean features as class weights. The zeroed head stays in the autograd graph
    (times 0), so its meta-gradient is exactly zero rather than missing.
    """
    theta = shared(params, tasks)
    if zero_head:
        for k in HEAD:
            if k in theta:
                theta[k] = theta[k] * 0.0
    return theta


def reference_start(params: Mapping[str, Tensor], zero_head: bool) -> Params:
    """One task's starting parameters (learn2learn's `clone()`), head zeroed as `task_start`."""
    return {k: v * 0.0 if zero_head and k in HEAD else v.clone() for k, v in params.items()}


def check_bn_mode(bn_mode: str) -> None:
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")


# ---------------------------------------------------------------------------------------------
# Per-task reference helpers (one task: images [N, C, H, W], labels [N]; plain autograd)


def reference_forward(
    model: nn.Module, params: Mapping[str, Tensor], x: Tensor, **kwargs: object
) -> Tensor:
    """`model` evaluated with `params` (a plain `functional_call`)."""
    return functional_call(model, dict(params), (x,), kwargs)


def reference_sgd(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    lr: float,
    steps: int,
    create_graph: bool,
) -> tuple[Params, Tensor | None]:
    """`steps` SGD steps on one task, as learn2learn's `adapt` does (autograd.grad per step).
    Also returns the first step's logits (detached; None when steps=0), as `sgd_adapt`."""
    p, first = dict(params), None
    for _ in range(steps):
        logits = reference_forward(model, p, x)
        if first is None:
            first = logits.detach()
        loss = F.cross_entropy(logits, y)
        grads = torch.autograd.grad(loss, list(p.values()), create_graph=create_graph)
        p = {k: v - lr * g for (k, v), g in zip(p.items(), grads, strict=True)}
    return p, first


def reference_predict(
    model: nn.Module,
    params: Mapping[str, Tensor],
    support_x: Tensor,
    query_x: Tensor,
    bn_mode: BNMode,
) -> Tensor:
    """One task's query logits under `bn_mode`, written the obvious way."""
    if bn_mode == "transductive":
        return reference_forward(model, params, query_x)
    if bn_mode == "per_image":
        return torch.cat(
            [reference_forward(model, params, query_x[i : i + 1]) for i in range(len(query_x))]
        )
    stats = reference_forward(model, params, support_x, return_bn_stats=True)[1]
    return reference_forward(model, params, query_x, bn_stats=stats)


def reference_metrics(
    logits: list[Tensor],
    labels: Tensor,
    before: tuple[list[Tensor | None], Tensor] | None = None,
) -> dict[str, float]:
    """`metrics_dict` from per-task lists of logits (and of the first inner step's, with
    their labels [T, N])."""
    if before is None or any(b is None for b in before[0]):
        return metrics_dict(len(logits), torch.stack(logits), labels)
    firsts = [b for b in before[0] if b is not None]  # all of them (narrows the type)
    return metrics_dict(len(logits), torch.stack(logits), labels, (torch.stack(firsts), before[1]))


def add_into(total: Params, grads: Mapping[str, Tensor] | list[Tensor]) -> None:
    """total[k] += grads[k] (grads as a dict, or a list in total's key order)."""
    values = grads.values() if isinstance(grads, Mapping) else grads
    for k, g in zip(total, values, strict=True):
        total[k] += g


def zeros_like(params: Mapping[str, Tensor]) -> Params:
    return {k: torch.zeros_like(v) for k, v in params.items()}


ModelFactory = Callable[[], nn.Module]
