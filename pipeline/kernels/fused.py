"""Autograd over the fused CPU kernels of `cpu.cpp`, each differentiable to any order.

* `fused_pool(h, stats)`: `F.max_pool2d(h, 2)` and, with `stats`, h's per-channel batch mean
  and biased variance, in one pass over h. Its backward is one pass too: gx = unpool(gy) +
  c * h + offset, the statistics' gradient folded into c and offset per channel.
* `affine_relu(p, scale, shift, dtype)`: relu(scale * p + shift) written straight in the next
  convolution's dtype; its backward reads the output gradient once for all three gradients.
* `stem_pool(x, w, tasks)`: the first block's convolution fused with its pooling.

Each kernel's derivative is written with the others (unpool <-> gather, stem <-> its weight
gradient), so second-order MAML runs on them as well. `usable(h)` says when they apply; the
callers (`pipeline.models.GroupedConv4`) fall back to PyTorch ops otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function

from pipeline.kernels import cpu_kernels


def usable(h: Tensor) -> bool:
    """Whether `fused_pool` takes h: a CPU, channels_last, >= 2x2 activation, kernels built."""
    return (
        h.device.type == "cpu"
        and h.dim() == 4
        and h.shape[2] >= 2
        and h.shape[3] >= 2
        and h.dtype in (torch.float32, torch.float64, torch.bfloat16)
        and h.is_contiguous(memory_format=torch.channels_last)
        and cpu_kernels() is not None
    )


def fused_pool(h: Tensor, stats: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(2x2 max-pool of h, and when `stats` its BatchNorm mean and biased var [C], else None).

    The statistics come in float32 (float64 for float64 h). Check `usable(h)` first.
    """
    y, _, mean, var = _FusedPool.apply(h, stats)
    return (y, mean, var) if stats else (y, None, None)


class _FusedPool(Function):
    """(y, phase, mean, var): pooled h, winner phase (uint8), statistics (empty if not asked)."""

    @staticmethod
    def forward(h: Tensor, stats: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = cpu_kernels().pool_stats_forward(h, stats)
        if not stats:
            none = h.new_empty(0, dtype=torch.float64 if h.dtype == torch.float64 else torch.float32)
            out = [*out, none, none]
        return tuple(out)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        h, _ = inputs
        _, phase, mean, _ = output
        ctx.mark_non_differentiable(phase)
        ctx.set_materialize_grads(False)  # absent gradients stay None: no zero tensors
        ctx.save_for_backward(h, phase, mean)
        ctx.pooled_shape = output[0].shape

    @staticmethod
    def backward(ctx, gy, _, gm, gv):  # noqa: ANN001, ANN205
        h, phase, mean = ctx.saved_tensors
        if gm is None and gv is None:
            gx = None if gy is None else _Unpool.apply(gy, phase, h.shape, None, None, None)
            return gx, None
        if gy is None:
            gy = torch.empty(
                ctx.pooled_shape, dtype=h.dtype, memory_format=torch.channels_last
            ).zero_()
        m = h.numel() // h.shape[1]
        gm = torch.zeros_like(mean) if gm is None else gm
        gv = torch.zeros_like(mean) if gv is None else gv
        # d/dh of (mean, var): gm/m + 2 gv (h - mean)/m = c * h + offset, per channel
        c = gv * (2.0 / m)
        offset = gm / m - c * mean
        return _Unpool.apply(gy, phase, h.shape, h, c, offset), None


class _Unpool(Function):
    """gx = gy scattered to each window's winner (zeros elsewhere) [+ c * h + offset]."""

    @staticmethod
    def forward(gy, phase, shape, h, c, offset):  # noqa: ANN001, ANN205
        gy = gy.contiguous(memory_format=torch.channels_last)
        return cpu_kernels().pool_backward(gy, phase, shape[2], shape[3], h, c, offset)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        _, phase, shape, h, c, _ = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(phase, h, c)
        ctx.shape = shape

    @staticmethod
    def backward(ctx, ggx):  # noqa: ANN001, ANN205
        phase, h, c = ctx.saved_tensors
        if ggx is None:
            return (None,) * 6
        need = ctx.needs_input_grad
        if h is None or not (need[3] or need[4] or need[5]):
            return _Gather.apply(ggx, phase) if need[0] else None, *(None,) * 5
        if need[0] and torch.is_grad_enabled():  # a third derivative: ggy through _Gather
            ggy = _Gather.apply(ggx, phase)
            _, gh, gc, goffset = _UnpoolGrad.apply(ggx, phase, h, c, False, need[3])
        else:  # one pass over ggx for all four (pipeline/kernels)
            ggy, gh, gc, goffset = _UnpoolGrad.apply(ggx, phase, h, c, need[0], need[3])
        return ggy, None, None, gh, gc.to(c.dtype), goffset.to(c.dtype)


class _UnpoolGrad(Function):
    """(ggy, gh, gc, goffset): `_Unpool`'s derivatives in ggx, h, c and offset, one pass.

    ggy (the gather) is returned only when asked, and is not differentiable here (the caller
    takes it from `_Gather` when a higher derivative needs it); gh = c * ggx, gc = sum of
    ggx * h and goffset = sum of ggx per channel are, through the ops they are made of.
    """

    @staticmethod
    def forward(ggx, phase, h, c, want_ggy, want_gh):  # noqa: ANN001, ANN205
        ggy, gh, gc, goffset = cpu_kernels().pool_backward_backward(
            ggx, phase, h, c, want_ggy, want_gh
        )
        return ggy if want_ggy else None, gh if want_gh else None, gc, goffset

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        ggx, _, h, c, _, _ = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(ggx, h, c)

    @staticmethod
    def backward(ctx, _, dgh, dgc, dgoffset):  # noqa: ANN001, ANN205
        ggx, h, c = ctx.saved_tensors
        per_channel = (1, -1, 1, 1)
        terms_x, dh, dc = [], None, None
        if dgh is not None:
            terms_x.append(dgh * c.to(dgh.dtype).view(per_channel))
            dc = torch.sum(dgh * ggx, (0, 2, 3), dtype=c.dtype)
        if dgc is not None:
            terms_x.append(h * dgc.to(h.dtype).view(per_channel))
            dh = ggx * dgc.to(h.dtype).view(per_channel)
        if dgoffset is not None:
            terms_x.append(dgoffset.to(ggx.dtype).view(per_channel).expand(ggx.shape))
        dx = sum(terms_x[1:], terms_x[0]).to(ggx.dtype) if terms_x else None
        return dx, None, dh, dc, None, None


class _Gather(Function):
    """y = x at each window's winner: the adjoint of `_Unpool` in gy."""

    @staticmethod
    def forward(x, phase):  # noqa: ANN001, ANN205
        x = x.contiguous(memory_format=torch.channels_last)
        return cpu_kernels().pool_gather(x, phase)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        ctx.save_for_backward(inputs[1])
        ctx.shape = inputs[0].shape

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        (phase,) = ctx.saved_tensors
        return _Unpool.apply(gy, phase, ctx.shape, None, None, None), None


def affine_relu(p: Tensor, scale: Tensor, shift: Tensor, out_dtype: torch.dtype) -> Tensor:
    """relu(scale * p + shift) per channel (scale, shift [C]), computed in float and written as
    `out_dtype` in the same pass. Check `usable(p)` first."""
    return _AffineReLU.apply(p, scale, shift, out_dtype)


class _AffineReLU(Function):
    @staticmethod
    def forward(p, scale, shift, out_dtype):  # noqa: ANN001, ANN205
        return cpu_kernels().affine_relu_forward(p, scale, shift, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        p, scale, _, _ = inputs
        ctx.save_for_backward(p, scale, output)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        p, scale, out = ctx.saved_tensors
        gp, gscale, gshift = _AffineReLUGrad.apply(g, out, p, scale)
        return gp, gscale.to(scale.dtype), gshift.to(scale.dtype), None


class _AffineReLUGrad(Function):
    """(gp, gscale, gshift) of out = relu(scale * p + shift) for the out-gradient g; the ReLU
    mask (out > 0) is piecewise constant, so the derivatives are those of bilinear maps."""

    @staticmethod
    def forward(g, out, p, scale):  # noqa: ANN001, ANN205
        return tuple(cpu_kernels().affine_relu_backward(g, out, p, scale))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        g, out, p, scale = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(g, out, p, scale)

    @staticmethod
    def backward(ctx, ggp, ggscale, ggshift):  # noqa: ANN001, ANN205
        g, out, p, scale = ctx.saved_tensors
        if ggp is not None:  # one fused pass (out gets no gradient: the mask is flat)
            zeros = torch.zeros_like(scale)
            dg, dp, dscale = cpu_kernels().affine_relu_double_backward(
                g, out, p, scale, ggp,
                zeros if ggscale is None else ggscale,
                zeros if ggshift is None else ggshift,
            )
            return dg, None, dp, dscale.to(scale.dtype)
        mask = out > 0
        per_channel = (1, -1, 1, 1)
        dg = dp = dscale = None
        if ctx.needs_input_grad[0]:
            terms = []
            if ggp is not None:
                terms.append(ggp * scale.view(per_channel))
            if ggscale is not None:
                terms.append(p * ggscale.view(per_channel))
            if ggshift is not None:
                terms.append(ggshift.view(per_channel).expand(p.shape))
            if terms:
                dg = (sum(terms[1:], terms[0]) * mask).to(g.dtype)
        if ctx.needs_input_grad[2] and ggscale is not None:
            dp = (g * mask * ggscale.view(per_channel)).to(p.dtype)
        if ctx.needs_input_grad[3] and ggp is not None:
            dscale = torch.sum(ggp * g * mask, (0, 2, 3), dtype=scale.dtype)
        return dg, None, dp, dscale


def stem_pool(x: Tensor, w: Tensor, tasks: int) -> Tensor:
    """2x2 max-pool of the first block's grouped 3x3 convolution, never writing its output.

    x: the input as [N, T*C_in, H, W] (no gradient), in the convolution's dtype;
    w: per-task weights [T, C, C_in, 3, 3]. Returns [N, T*C, H/2, W/2] in x's dtype, each
    convolution value rounded to that dtype before the max (as a stored convolution output
    would be). Differentiable in w to any order.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    t, c = w.shape[:2]
    n, channels, height, width = x.shape
    padded = torch.empty(
        (n, channels, height + 2, width + 2), dtype=x.dtype, memory_format=torch.channels_last
    ).zero_()
    padded[:, :, 1:-1, 1:-1] = x  # the kernels read patches without bounds checks
    # [T, C_in*9, C], channel-contiguous; rounded to x's dtype as the convolution would
    wk = w.to(x.dtype).to(compute).reshape(t, c, -1).transpose(1, 2).contiguous()
    return _Stem.apply(padded, wk, tasks)[0]


class _Stem(Function):
    @staticmethod
    def forward(x, wk, tasks):  # noqa: ANN001, ANN205
        return tuple(cpu_kernels().stem_run(x, wk, tasks, None, x.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        x, wk, tasks = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, output[1])
        ctx.tasks, ctx.channels, ctx.w_dtype = tasks, wk.shape[2], wk.dtype

    @staticmethod
    def backward(ctx, gy, _):  # noqa: ANN001, ANN205
        x, phase = ctx.saved_tensors
        if gy is None:
            return None, None, None
        return None, _StemWeightGrad.apply(gy, x, phase, ctx.tasks, ctx.channels, ctx.w_dtype), None


class _StemWeightGrad(Function):
    """gw = sum over windows of gy * (the winner's input patch): linear in gy."""

    @staticmethod
    def forward(gy, x, phase, tasks, channels, w_dtype):  # noqa: ANN001, ANN205
        return cpu_kernels().stem_weight_grad(gy, x, phase, tasks, channels, w_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        gy, x, phase, tasks, _, _ = inputs
        ctx.save_for_backward(x, phase)
        ctx.tasks, ctx.gy_dtype = tasks, gy.dtype

    @staticmethod
    def backward(ctx, ggw):  # noqa: ANN001, ANN205
        x, phase = ctx.saved_tensors
        return _StemSelect.apply(x, ggw, phase, ctx.tasks, ctx.gy_dtype), *(None,) * 5


class _StemSelect(Function):
    """y = the convolution at each window's given winner: the adjoint of `_StemWeightGrad`."""

    @staticmethod
    def forward(x, wk, phase, tasks, out_dtype):  # noqa: ANN001, ANN205
        return cpu_kernels().stem_run(x, wk.contiguous(), tasks, phase, out_dtype)[0]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        x, wk, phase, tasks, _ = inputs
        ctx.save_for_backward(x, phase)
        ctx.tasks, ctx.channels, ctx.w_dtype = tasks, wk.shape[2], wk.dtype

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        x, phase = ctx.saved_tensors
        gw = _StemWeightGrad.apply(gy, x, phase, ctx.tasks, ctx.channels, ctx.w_dtype)
        return None, gw, None, None, None


__all__ = ["affine_relu", "fused_pool", "stem_pool", "usable"]
