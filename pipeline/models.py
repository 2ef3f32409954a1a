"""Networks for few-shot learners, and a task-batched way to run them.

* `Conv4` (`conv4(...)`) is an ordinary `nn.Module`: Finn et al. 2017's backbone, 4 x [3x3 conv,
  BatchNorm, ReLU, 2x2 max-pool], flatten, optional linear head. With
  `torch.func.functional_call` it runs one task at a time: the per-task reference path.
* A `TaskNet` runs a network for T tasks at once, each task with its OWN parameters (every
  parameter carries a leading task dimension [T, ...]). Two implementations compute the same
  function:
  - `GroupedConv4` (the fast path): the tasks become the groups of grouped convolutions and the
    channels of one normalisation, so a meta-batch costs one kernel per layer instead of T.
  - `VmapNet`: `torch.func.vmap` over `functional_call(model, ...)`, for any module whose
    `forward(x, bn_stats=None)` and `batch_norm_stats(x)` behave like `Conv4`'s.

BatchNorm never keeps running statistics. It normalises with the statistics of the images it is
given: over the task's batch (`norm="batch"`), over each image alone (`norm="image"`), or with
statistics passed in (`norm=<BNStats>`, e.g. those of the support set). Its affine parameters
are learnable. Convolutions have no bias (BatchNorm would cancel it).

Parameters travel as `dict[str, Tensor]` keyed like `Conv4.named_parameters()`;
`flatten_params` / `unflatten_params` turn such a dict into one flat vector and back (the
parameter server ships weights as one array).

How `GroupedConv4` is fast on CPU (each point measured; see benchmarks/README.md):
activations live as [N, T*C, H, W] in channels_last memory (pooling and per-channel
statistics vectorise over T*C); ReLU(BN(.)) is monotone per channel when the BN scale is
positive, so max-pooling runs BEFORE the affine map and ReLU, which then touch a quarter of the
data; the convolution and the BN statistics are custom autograd functions whose backward passes
are themselves differentiable, so second-order MAML never falls into PyTorch's grouped-conv
double-backward (which loops over groups) or the generic BatchNorm double-backward. Weights
that every task shares (the meta-parameters, before any inner step) run as ONE dilated
convolution over the same memory (`conv3x3`): faster than the grouped one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

from pipeline.kernels import cpu_kernels
from pipeline.kernels import for_tensor as kernels_for
from pipeline.kernels.fused import affine_relu, fused_pool, stem_pool, usable

BN_EPS = 1e-5
"""BatchNorm epsilon (PyTorch's default), shared by every path so they agree."""

BNStats = list[tuple[Tensor, Tensor]]
"""Per BatchNorm layer, (mean, biased variance) over batch and spatial dims: [C] for one task
(`Conv4`), [T, C] for a task batch (`TaskNet`)."""

Norm = Literal["batch", "image"] | BNStats
"""How a `TaskNet` normalises: "batch" (statistics of each task's images together), "image"
(each image alone, over its spatial positions), or given per-layer statistics."""


class Conv4(nn.Module):
    """Four conv blocks, then a linear head (or none: the flattened embedding, for ProtoNets).

    Parameter names: `blocks.{i}.conv.weight` [hidden, c_in, 3, 3], `blocks.{i}.norm.weight` and
    `blocks.{i}.norm.bias` [hidden] for i in 0..3; `head.weight` [out_features, embedding_size]
    and `head.bias` [out_features] unless `out_features` is None.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_features: int | None = 5,
        hidden: int = 64,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(
                f"conv4: image_size={image_size} shrinks to nothing after four 2x2 max-pools; "
                "use image_size >= 16"
            )
        self.in_channels = in_channels
        self.out_features = out_features
        self.hidden = hidden
        self.image_size = image_size
        self.embedding_size = hidden * side * side
        blocks = []
        for i in range(4):
            block = nn.Module()
            block.conv = nn.Conv2d(
                in_channels if i == 0 else hidden, hidden, 3, padding=1, bias=False
            )
            block.norm = nn.BatchNorm2d(hidden, eps=BN_EPS, track_running_stats=False)
            blocks.append(block)
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(self.embedding_size, out_features) if out_features else None

    def forward(
        self, x: Tensor, bn_stats: BNStats | None = None, *, return_bn_stats: bool = False
    ) -> Tensor | tuple[Tensor, BNStats]:
        """Logits [N, out_features] (or embeddings [N, embedding_size]) for images [N, C, H, W].

        BatchNorm uses the statistics of `x` (so one image's output depends on the others in
        the batch), or `bn_stats` when given. `return_bn_stats=True` also returns the statistics
        used, per layer (mean, biased variance) [hidden].
        """
        h = x
        used: BNStats = []
        for i, block in enumerate(self.blocks):
            h = F.conv2d(h, block.conv.weight, padding=1)
            if bn_stats is None and not return_bn_stats:
                h = F.batch_norm(
                    h, None, None, block.norm.weight, block.norm.bias, True, 0.0, BN_EPS
                )
            else:
                if bn_stats is None:
                    mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
                else:
                    mean, var = bn_stats[i]
                used.append((mean, var))
                h = _normalize(h, mean, var, block.norm.weight, block.norm.bias)
            h = F.max_pool2d(F.relu(h), 2)
        h = h.flatten(1)
        out = self.head(h) if self.head is not None else h
        return (out, used) if return_bn_stats else out

    def batch_norm_stats(self, x: Tensor) -> BNStats:
        """The (mean, biased variance) [hidden] each BatchNorm layer computes on batch `x`."""
        return self(x, return_bn_stats=True)[1]


def _normalize(h: Tensor, mean: Tensor, var: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """BatchNorm of h [N, C, H, W] with given per-channel statistics [C]."""
    scale = gamma * torch.rsqrt(var + BN_EPS)
    return h * scale[:, None, None] + (beta - mean * scale)[:, None, None]


def conv4(
    in_channels: int = 1, out_features: int | None = 5, hidden: int = 64, image_size: int = 28
) -> Conv4:
    """Finn et al.'s conv4 (default: Omniglot, 28x28 grey, 5-way head, 64 filters).

    `out_features=None` drops the head (the embedding network of ProtoNets). miniImageNet's
    84x84 RGB variant is `conv4(3, 5, 32, 84)`.
    """
    return Conv4(in_channels, out_features, hidden, image_size)


# ---------------------------------------------------------------------------------------------
# Task-batched networks


class TaskNet(Protocol):
    """A network applied to T tasks at once, each with its own parameters."""

    def __call__(self, params: Mapping[str, Tensor], x: Tensor, *, norm: Norm = "batch") -> Tensor:
        """Outputs [T, N, out] for images x [T, N, C, H, W] and parameters with leading dim T."""
        ...

    def bn_stats(self, params: Mapping[str, Tensor], x: Tensor) -> BNStats:
        """Per layer (mean, var) [T, C] that norm="batch" computes on x (for norm=<BNStats>)."""
        ...


class VmapNet:
    """`TaskNet` by `torch.func.vmap` over `functional_call(model, params[t], x[t])`.

    Works for any module whose `forward(x, bn_stats=None, *, return_bn_stats=False)` behaves
    like `Conv4`'s; norm="image" forwards each image as its own batch of one (a nested vmap).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def _one(self, params: Mapping[str, Tensor], x: Tensor, stats: BNStats | None) -> Tensor:
        kwargs = {} if stats is None else {"bn_stats": stats}  # any network takes plain x
        return torch.func.functional_call(self.model, dict(params), (x,), kwargs)

    def __call__(self, params: Mapping[str, Tensor], x: Tensor, *, norm: Norm = "batch") -> Tensor:
        if norm == "batch":
            return torch.func.vmap(lambda p, xt: self._one(p, xt, None))(dict(params), x)
        if norm == "image":

            def per_image(p: Mapping[str, Tensor], xt: Tensor) -> Tensor:
                one = torch.func.vmap(lambda xi: self._one(p, xi[None], None)[0])
                return one(xt)

            return torch.func.vmap(per_image)(dict(params), x)
        return torch.func.vmap(self._one)(dict(params), x, list(norm))

    def bn_stats(self, params: Mapping[str, Tensor], x: Tensor) -> BNStats:
        def one(p: Mapping[str, Tensor], xt: Tensor) -> BNStats:
            kwargs = {"return_bn_stats": True}
            return torch.func.functional_call(self.model, dict(p), (xt,), kwargs)[1]

        return torch.func.vmap(one)(dict(params), x)


class GroupedConv4:
    """`TaskNet` for `Conv4`: tasks as convolution groups, activations [N, T*C, H, W] channels_last.

    Equal (to float rounding) to `functional_call(Conv4, params[t], x[t])` for every task t.
    Differentiable to any order (second-order MAML), also under `torch.func.grad`.

    `compute_dtype=torch.bfloat16` is mixed precision: the convolutions (forward and every
    backward) take bfloat16 inputs and weights, and their outputs, the largest activations,
    stay bfloat16 through pooling; parameters, BatchNorm statistics, the affine maps, the head
    and the loss stay float32. On CPUs with AMX (and on recent GPUs) bfloat16 convolutions are
    several times faster (a [320, 64, 14, 14] 3x3 convolution: 13.9 ms -> 1.6 ms, 2 threads,
    `benchmarks/bench_kernels.py`).
    """

    def __init__(self, compute_dtype: torch.dtype | None = None) -> None:
        self.compute_dtype = compute_dtype

    def __call__(self, params: Mapping[str, Tensor], x: Tensor, *, norm: Norm = "batch") -> Tensor:
        return self._run(params, x, norm, None)

    def bn_stats(self, params: Mapping[str, Tensor], x: Tensor) -> BNStats:
        stats: BNStats = []
        self._run(params, x, "batch", stats)
        return stats

    def _run(
        self, params: Mapping[str, Tensor], x: Tensor, norm: Norm, record: BNStats | None
    ) -> Tensor:
        t, n = x.shape[:2]
        low = self.compute_dtype
        h = x.transpose(0, 1).reshape(n, t * x.shape[2], *x.shape[3:])
        # Explicit channels_last strides: with one channel in all (a grey image, one task) the
        # usual .contiguous(channels_last) is a no-op, oneDNN then writes the first conv's
        # output as NCHW, and pooling it is ~4x slower.
        h = torch.empty(
            h.shape, dtype=low or h.dtype, device=h.device, memory_format=torch.channels_last
        ).copy_(h)
        for i in range(4):
            weight = params[f"blocks.{i}.conv.weight"]  # [T, C, C_in, 3, 3]
            gamma = params[f"blocks.{i}.norm.weight"].reshape(-1)
            beta = params[f"blocks.{i}.norm.bias"].reshape(-1)
            positive = bool((gamma > 0).all())
            # patch moments are cheaper only when 9*C_in << hidden (Omniglot: 9 vs 64)
            patch_stats = (
                i == 0 and norm == "batch" and 36 * x.shape[2] <= weight.shape[1]
                and not x.requires_grad
            )
            pooled = None
            if low is not None:
                h = h.to(low)  # a no-op where already low
            if patch_stats and positive and usable(h):
                # the first convolution and its pooling as one kernel (pipeline/kernels): the
                # largest activation of the network is never written
                pooled, fused = stem_pool(h, weight, t), True
            else:
                h = conv3x3(h, weight, low)
                fused = usable(h)  # one pass for pooling + statistics (pipeline/kernels)
            if norm == "batch":
                if patch_stats:
                    mean, var = _first_layer_stats(x, weight)
                elif fused:
                    pooled, mean, var = fused_pool(h, stats=True)
                    mean, var = mean.to(x.dtype), var.to(x.dtype)
                else:
                    mean, var = (s.to(x.dtype) for s in _MeanVar.apply(h))
                if record is not None:
                    record.append((mean.view(t, -1), var.view(t, -1)))
            elif norm == "image":
                hf = h.to(x.dtype)
                mean = hf.mean((2, 3), keepdim=True)
                var = (hf - mean).square().mean((2, 3), keepdim=True)
            else:
                mean, var = (s.reshape(-1) for s in norm[i])
            if mean.dim() == 1:
                mean, var = mean[:, None, None], var[:, None, None]
            scale = gamma[:, None, None] * torch.rsqrt(var + BN_EPS)
            shift = beta[:, None, None] - mean * scale
            if positive:
                # ReLU(scale*h + shift) is non-decreasing in h: pooling first gives the same
                # values (and the same argmax), and the affine map + ReLU touch 1/4 of the data.
                if pooled is None:
                    pooled = fused_pool(h, stats=False)[0] if fused else max_pool2x2(h)
                if fused and scale.dim() == 3:
                    # one pass, written in the next convolution's dtype (the last block's
                    # features stay in the parameters' dtype for the head)
                    out_dtype = low if low is not None and i < 3 else x.dtype
                    h = affine_relu(pooled, scale.reshape(-1), shift.reshape(-1), out_dtype)
                else:
                    h = torch.addcmul(shift, pooled, scale).relu_()
            else:
                h = max_pool2x2(F.relu(h * scale + shift))
        h = h.reshape(n, t, -1).transpose(0, 1)  # [T, N, C*h*w], per-task flatten order
        if "head.weight" in params:
            h = torch.baddbmm(
                params["head.bias"].unsqueeze(1), h, params["head.weight"].transpose(1, 2)
            )
        return h


def conv3x3(h: Tensor, w: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Each task's 3x3 convolution (padding 1): h [N, T*C_in, H, W] channels_last, per-task
    weights w [T, C_out, C_in, 3, 3] (cast to `dtype`, default w's), differentiable to any order.

    Weights that all tasks share (an expanded view, stride 0 over T: the meta-parameters, before
    an inner step) take ONE dilated convolution instead of a grouped one (`_SharedConv3x3`).
    """
    if w.stride(0) == 0:
        return _SharedConv3x3.apply(h, w, dtype or w.dtype)
    return _Conv3x3.apply(h, _conv_weights(w, dtype), w.shape[0])


def _conv_weights(w: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Per-task weights [T, C_out, C_in, 3, 3] as grouped-conv weights [T*C_out, C_in, 3, 3] in
    `dtype`, channels_last: what oneDNN converts them to for channels_last activations anyway
    (once here rather than inside every convolution and its backward), cast in the same copy.
    """
    return _Cast.apply(w.reshape(-1, *w.shape[2:]), dtype or w.dtype, torch.channels_last)


def _first_layer_stats(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """BatchNorm (mean, biased var) [T*C] of the first conv's output, without touching it.

    The output at a position is w_c . patch (patch: the 3x3xC_in input neighbourhood, zero
    padded), so over a task's images and positions mean_c = w_c . mu and var_c = w_c' S w_c,
    with mu and S (covariance) the moments of the input patches: data only, (9*C_in)^2 values.
    When 9*C_in is small next to the number of filters (Omniglot: 9 vs 64) this replaces two
    passes over the largest activation, and their backward, by a few small matrix products.
    """
    t, n, c_in, hh, ww = x.shape
    k = 9 * c_in
    with torch.no_grad():
        xp = F.pad(x.reshape(t * n, c_in, hh, ww), (1, 1, 1, 1))
        shifts = [xp[:, :, i : i + hh, j : j + ww] for i in range(3) for j in range(3)]
        patches = torch.stack(shifts, 2).view(t * n, k, hh * ww)  # unfold's (c, i, j) order
        count = n * hh * ww
        # per-image sums in x's dtype (as precise as the bmm's second moments; a float64
        # reduction over the patches is 8x slower), totals and the covariance in float64
        mu = patches.sum(2).double().view(t, n, k).sum(1) / count
        second = torch.bmm(patches, patches.transpose(1, 2)).view(t, n, k, k).sum(1)
        cov = second.double() / count - mu.unsqueeze(2) * mu.unsqueeze(1)
        mu, cov = mu.to(x.dtype), cov.to(x.dtype)
    w = w.reshape(t, w.shape[1], k)  # [T, C, 9*C_in]
    mean = (w @ mu.unsqueeze(2)).reshape(-1)
    var = ((w @ cov) * w).sum(2).reshape(-1)
    return mean, var


def task_net(
    model: nn.Module,
    backend: Literal["grouped", "vmap"] = "grouped",
    compute_dtype: torch.dtype | None = None,
) -> TaskNet:
    """The task-batched form of `model`: the fast `GroupedConv4` for a `Conv4` unless
    backend="vmap"; any other network falls back to `VmapNet` (torch.func.vmap over
    `functional_call`), so a learner may bring its own network.

    `compute_dtype`: bfloat16 for mixed-precision convolutions (`GroupedConv4` only; the vmap
    fallback runs in the parameters' dtype).
    """
    if backend == "grouped":
        if not isinstance(model, Conv4):
            return VmapNet(model)
        return GroupedConv4(compute_dtype)
    if backend == "vmap":
        if compute_dtype is not None:
            raise ValueError("task_net: compute_dtype needs backend='grouped'")
        return VmapNet(model)
    raise ValueError(f"task_net: backend must be 'grouped' or 'vmap', got {backend!r}")


# ---------------------------------------------------------------------------------------------
# Differentiable-to-any-order building blocks of GroupedConv4.
# A 3x3 convolution y = C(x, w) is bilinear; its two adjoints are Cx(gy, w) = dL/dx and
# Cw(x, gy) = dL/dw. Each of the three is differentiable in terms of the others, so every order
# of derivative runs on oneDNN's forward / backward-data / backward-weight kernels.

_STRIDE, _PAD, _DIL, _OUT_PAD = [1, 1], [1, 1], [1, 1], [0, 0]


class _Conv3x3(Function):
    """y = conv2d(x, w, padding=1, groups=groups)."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, groups: int) -> Tensor:
        return F.conv2d(x, w, padding=1, groups=groups)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        x, w, groups = inputs
        ctx.save_for_backward(x, w)
        ctx.groups = groups

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # noqa: ANN001
        x, w = ctx.saved_tensors
        gx = _Conv3x3InputGrad.apply(gy, w, ctx.groups) if ctx.needs_input_grad[0] else None
        gw = _Conv3x3WeightGrad.apply(x, gy, ctx.groups) if ctx.needs_input_grad[1] else None
        return gx, gw, None


class _Conv3x3InputGrad(Function):
    """gx = Cx(gy, w), the gradient of <gy, C(x, w)> with respect to x."""

    @staticmethod
    def forward(gy: Tensor, w: Tensor, groups: int) -> Tensor:
        shape = (gy.shape[0], w.shape[1] * groups, *gy.shape[2:])
        x_like = torch.empty(
            shape, dtype=gy.dtype, device=gy.device, memory_format=torch.channels_last
        )
        return torch.ops.aten.convolution_backward(
            gy, x_like, w, None, _STRIDE, _PAD, _DIL, False, _OUT_PAD, groups, [True, False, False]
        )[0]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        gy, w, groups = inputs
        ctx.save_for_backward(gy, w)
        ctx.groups = groups

    @staticmethod
    def backward(ctx, ggx: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # noqa: ANN001
        gy, w = ctx.saved_tensors
        dgy = _Conv3x3.apply(ggx, w, ctx.groups) if ctx.needs_input_grad[0] else None
        dw = _Conv3x3WeightGrad.apply(ggx, gy, ctx.groups) if ctx.needs_input_grad[1] else None
        return dgy, dw, None


class _Conv3x3WeightGrad(Function):
    """gw = Cw(x, gy), the gradient of <gy, C(x, w)> with respect to w."""

    @staticmethod
    def forward(x: Tensor, gy: Tensor, groups: int) -> Tensor:
        if _small_weight_grad(x, gy):
            return cpu_kernels().conv3x3_weight_grad(x, gy, groups)
        # (oneDNN reads only its shape, but would copy an expanded placeholder to channels_last)
        w_like = torch.empty(
            (gy.shape[1], x.shape[1] // groups, 3, 3),
            dtype=gy.dtype, device=gy.device, memory_format=torch.channels_last,
        )
        return torch.ops.aten.convolution_backward(
            gy, x, w_like, None, _STRIDE, _PAD, _DIL, False, _OUT_PAD, groups, [False, True, False]
        )[1]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        x, gy, groups = inputs
        ctx.save_for_backward(x, gy)
        ctx.groups = groups

    @staticmethod
    def backward(ctx, ggw: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # noqa: ANN001
        x, gy = ctx.saved_tensors
        dx = _Conv3x3InputGrad.apply(gy, ggw, ctx.groups) if ctx.needs_input_grad[0] else None
        dgy = _Conv3x3.apply(x, ggw, ctx.groups) if ctx.needs_input_grad[1] else None
        return dx, dgy, None


# Weights shared by all tasks. In the [N, T*C, H, W] channels_last layout, memory runs
# [N][H][W][T][C]: the same bytes are [N, C, H, W*T] channels_last, every task's image side
# by side with the tasks interleaved along the width. A 3x3 convolution with dilation T along
# the width (padding T) then sees exactly each task's own neighbours: one plain convolution
# computes every task's, which oneDNN runs faster than the grouped one (32 tasks, bfloat16,
# 2-core Zen 4: 14x14 7.2 -> 5.7 ms, 7x7 1.7 -> 1.3, 3x3 0.49 -> 0.26; forward and
# backward-data alike). The weight gradient stays per task (the grouped kernel): an inner loop
# differentiates with respect to each task's copy.


def _tasks_as_width(h: Tensor, tasks: int) -> Tensor:
    """[N, T*C, H, W] channels_last -> the same memory as [N, C, H, W*T] channels_last."""
    n, tc, hh, ww = h.shape
    return h.permute(0, 2, 3, 1).reshape(n, hh, ww * tasks, tc // tasks).permute(0, 3, 1, 2)


def _width_as_tasks(h: Tensor, tasks: int) -> Tensor:
    """The inverse of `_tasks_as_width`."""
    n, c, hh, wt = h.shape
    return h.permute(0, 2, 3, 1).reshape(n, hh, wt // tasks, tasks * c).permute(0, 3, 1, 2)


def _shared_weight(w: Tensor, dtype: torch.dtype) -> Tensor:
    """Task 0's weights [C_out, C_in, 3, 3] of an expanded [T, ...] view, cast, channels_last."""
    return w[0].to(dtype, memory_format=torch.channels_last)


def _per_task_weight_grad(x: Tensor, gy: Tensor, w: Tensor) -> Tensor:
    """Each task's weight gradient [T, C_out, C_in, 3, 3] (w's dtype) of <gy, conv(x, w_t)>."""
    t = w.shape[0]
    gw = _Conv3x3WeightGrad.apply(x.contiguous(memory_format=torch.channels_last), gy, t)
    return _Cast.apply(gw, w.dtype, torch.contiguous_format).view(w.shape)


class _SharedWeightFunction(Function):
    """Inputs (activation or gradient, expanded weights w, compute dtype): saves the first two."""

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        a, w, dtype = inputs
        ctx.save_for_backward(a, w)
        ctx.dtype = dtype


class _SharedConv3x3(_SharedWeightFunction):
    """y = every task's conv2d(x_t, w_0, padding=1), w [T, C_out, C_in, 3, 3] with stride 0
    over T, as one dilated convolution; its gradient in w is per task."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, dtype: torch.dtype) -> Tensor:
        t = w.shape[0]
        y = F.conv2d(_tasks_as_width(x, t), _shared_weight(w, dtype), padding=(1, t),
                     dilation=(1, t))
        return _width_as_tasks(y, t)

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # noqa: ANN001
        x, w = ctx.saved_tensors
        gy = gy.contiguous(memory_format=torch.channels_last)
        gx = _SharedConv3x3InputGrad.apply(gy, w, ctx.dtype) if ctx.needs_input_grad[0] else None
        gw = _per_task_weight_grad(x, gy, w) if ctx.needs_input_grad[1] else None
        return gx, gw, None


class _SharedConv3x3InputGrad(_SharedWeightFunction):
    """gx = Cx(gy, w_0) for every task (the shared weights' backward-data, dilated)."""

    @staticmethod
    def forward(gy: Tensor, w: Tensor, dtype: torch.dtype) -> Tensor:
        t, _, c_in = w.shape[:3]
        n, _, hh, ww = gy.shape
        x_like = torch.empty(
            (n, c_in, hh, ww * t), dtype=gy.dtype, device=gy.device,
            memory_format=torch.channels_last,
        )
        gx = torch.ops.aten.convolution_backward(
            _tasks_as_width(gy, t), x_like, _shared_weight(w, dtype), None, _STRIDE, [1, t],
            [1, t], False, _OUT_PAD, 1, [True, False, False],
        )[0]
        return _width_as_tasks(gx, t)

    @staticmethod
    def backward(ctx, ggx: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # noqa: ANN001
        gy, w = ctx.saved_tensors
        ggx = ggx.contiguous(memory_format=torch.channels_last)
        dgy = _SharedConv3x3.apply(ggx, w, ctx.dtype) if ctx.needs_input_grad[0] else None
        dw = _per_task_weight_grad(ggx, gy, w) if ctx.needs_input_grad[1] else None
        return dgy, dw, None


SMALL_WEIGHT_GRAD_PIXELS = 49
"""Images of at most this many pixels (7x7) take the gather + matrix-product weight gradient
(`conv3x3_weight_grad` in pipeline/kernels) instead of oneDNN's backward-weights kernel, whose
fixed cost dominates at these sizes: 32 tasks, 5 images, 64 -> 64 channels, bfloat16, 2-core
Zen 4, `benchmarks/bench_kernels.py`: see benchmarks/README.md."""


def _small_weight_grad(x: Tensor, gy: Tensor) -> bool:
    return (
        x.shape[2] * x.shape[3] <= SMALL_WEIGHT_GRAD_PIXELS
        and x.device.type == "cpu"
        and x.is_contiguous(memory_format=torch.channels_last)
        and gy.is_contiguous(memory_format=torch.channels_last)
        and x.dtype == gy.dtype
        and cpu_kernels() is not None
    )


class _Cast(Function):
    """x.to(dtype, memory_format=...); its gradient comes back in x's dtype and layout.

    (A plain `.to` hands back channels_last gradients for contiguous parameters, and every later
    op on the parameter gradients would mix layouts, which PyTorch runs on a slow strided path.
    Second-order MAML differentiates the cast of a weight gradient back to the convolution's
    layout: channels_last, which oneDNN would otherwise copy the weights into at every call.)
    """

    @staticmethod
    def forward(x: Tensor, dtype: torch.dtype, memory_format: torch.memory_format) -> Tensor:
        if x.is_contiguous(memory_format=memory_format):
            return x.to(dtype, copy=True)  # the layout is already right: a plain cast
        # the device first: the CPU extension is never loaded for a CUDA tensor
        kernels = kernels_for(x) if x.dim() == 4 else None
        if kernels is not None:
            # one pass: a small transpose per output channel (pipeline/kernels)
            return kernels.relayout(x, dtype, memory_format == torch.channels_last)
        return x.to(dtype).contiguous(memory_format=memory_format)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        x = inputs[0]
        ctx.dtype = x.dtype
        ctx.memory_format = (
            torch.channels_last
            if x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001
        return _Cast.apply(g, ctx.dtype, ctx.memory_format), None, None


def max_pool2x2(x: Tensor) -> Tensor:
    """`F.max_pool2d(x, 2)` for channels_last x, with derivatives of every order that stay
    channels_last.

    PyTorch's own second derivative of max-pooling gathers into a contiguous (NCHW) tensor and
    materialises a zero gradient for the pooled input; every later op on that gradient then
    mixes memory formats, which is several times slower on large activations.
    """
    return _MaxPool2x2.apply(x)[0]


_POOL = ([2, 2], [2, 2], [0, 0], [1, 1], False)  # kernel, stride, padding, dilation, ceil_mode


class _MaxPool2x2(Function):
    """(y, argmax) = max_pool2d_with_indices(x, 2); the argmax is a flat H*W index per plane."""

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ops.aten.max_pool2d_with_indices(x, *_POOL[:2])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero gradient for the argmax output
        ctx.save_for_backward(output[1])
        ctx.shape = inputs[0].shape

    @staticmethod
    def backward(ctx, gy: Tensor | None, _: None) -> Tensor | None:  # noqa: ANN001
        (idx,) = ctx.saved_tensors
        return None if gy is None else _Unpool2x2.apply(gy, idx, ctx.shape)


class _Unpool2x2(Function):
    """gx: gy scattered to each window's argmax, zeros elsewhere (max-pooling's backward)."""

    @staticmethod
    def forward(gy: Tensor, idx: Tensor, shape: torch.Size) -> Tensor:
        x_like = torch.empty(
            shape, dtype=gy.dtype, device=gy.device, memory_format=torch.channels_last
        )
        return torch.ops.aten.max_pool2d_with_indices_backward(gy, x_like, *_POOL, idx)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, ggx: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001
        (idx,) = ctx.saved_tensors
        return _PoolGather.apply(ggx, idx), None, None


class _PoolGather(Function):
    """y = x at each window's argmax (the adjoint of `_Unpool2x2`), gathered channels_last."""

    @staticmethod
    def forward(x: Tensor, idx: Tensor) -> Tensor:
        n, c, hh, ww = x.shape
        h, w = idx.shape[2:]
        flat = x.permute(0, 2, 3, 1).reshape(n, hh * ww, c)  # a view when x is channels_last
        picks = idx.permute(0, 2, 3, 1).reshape(n, h * w, c)
        return torch.gather(flat, 1, picks).view(n, h, w, c).permute(0, 3, 1, 2)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        ctx.save_for_backward(inputs[1])
        ctx.shape = inputs[0].shape

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        (idx,) = ctx.saved_tensors
        return _Unpool2x2.apply(gy, idx, ctx.shape), None


class _MeanVar(Function):
    """Per-channel mean and biased variance of h [N, C, H, W] over (N, H, W).

    Forward: PyTorch's fused BatchNorm statistics kernel (one pass over channels_last data).
    Backward: d/dh = gm/m + 2*gv*(h - mean)/m as ONE fused pass, written with
    differentiable ops (and the saved output `mean`), so it can be differentiated again.
    """

    @staticmethod
    def forward(h: Tensor) -> tuple[Tensor, Tensor]:
        # One vectorised pass (PyTorch's BatchNorm statistics kernel); returns the biased var.
        mean, var = torch.batch_norm_update_stats(h, None, None, 0.0)
        return mean, var

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        ctx.save_for_backward(inputs[0], output[0])

    @staticmethod
    def backward(ctx, gm: Tensor, gv: Tensor) -> Tensor:  # noqa: ANN001
        h, mean = ctx.saved_tensors
        m = h.numel() // h.shape[1]
        c = gv * (2.0 / m)
        offset = (gm / m - c * mean).view(1, -1, 1, 1)
        return torch.addcmul(offset, h, c.view(1, -1, 1, 1)).to(h.dtype)


def native_bfloat16(device: torch.device | str = "cpu") -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware (CPU: AMX or AVX512-BF16;
    CUDA: compute capability 8.0 or newer). Elsewhere bfloat16 is emulated, and slower."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        try:
            return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
        except AttributeError:  # older torch: no probe, so no claim
            return False
    return False


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; "cpu" / "cuda" (or a torch.device) as given."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            from pipeline.errors import ConfigError

            raise ConfigError("device 'cuda': no CUDA device is available here; use "
                              "device=cpu or device=auto")
        return torch.device(device)
    raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")


def resolve_precision(
    precision: str, device: torch.device | str = "cpu"
) -> Literal["float32", "bfloat16"]:
    """"auto" -> "bfloat16" where `native_bfloat16(device)`, else "float32"; others unchanged."""
    if precision == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    if precision in ("float32", "bfloat16"):
        return precision  # type: ignore[return-value]
    raise ValueError(f"precision must be auto, float32 or bfloat16, got {precision!r}")


# ---------------------------------------------------------------------------------------------
# Parameter dicts


def params_of(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters as a dict of detached clones (safe to mutate; no autograd)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def expand_params(params: Mapping[str, Tensor], tasks: int) -> dict[str, Tensor]:
    """One parameter set shared by `tasks` tasks: a [tasks, ...] view of each tensor (no copy)."""
    return {k: v.expand(tasks, *v.shape) for k, v in params.items()}


def flatten_params(params: Mapping[str, Tensor]) -> Tensor:
    """All tensors of `params`, in dict order, concatenated into one 1-D tensor."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten_params(flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `flatten_params`: split `flat` into views shaped (and keyed) like `like`."""
    expected = sum(p.numel() for p in like.values())
    if flat.dim() != 1 or flat.numel() != expected:
        raise ValueError(
            f"unflatten_params: got a tensor of shape {tuple(flat.shape)}, expected 1-D with "
            f"{expected} elements (the size of `like`)"
        )
    out: dict[str, Tensor] = {}
    offset = 0
    for name, p in like.items():
        out[name] = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return out
