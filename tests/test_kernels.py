"""The fused CPU kernels (pipeline/kernels) against PyTorch's own ops, and their derivatives.

Values are checked bit for bit against the stock ops where the kernels promise that (pooling,
its argmax and ties, unpooling, gathering, re-layouts), and first and second derivatives of
every autograd wrapper with `gradcheck` / `gradgradcheck` in float64. The learners' reference
tests (tests/test_learners.py) run through these kernels too, and once more with the kernels
switched off (ANOLE_KERNELS=0, `test_learners_equal_reference_without_kernels`) to keep the
fallback honest.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from pipeline.kernels import cpu_kernels, enabled
from pipeline.kernels.fused import affine_relu, fused_pool, stem_pool, usable

CL = torch.channels_last


@pytest.fixture(scope="module")
def kernels():
    """The compiled module; a build failure fails the test when ANOLE_REQUIRE_KERNELS=1 (CI)."""
    module = cpu_kernels()
    if module is None:
        if os.environ.get("ANOLE_REQUIRE_KERNELS") == "1":
            pytest.fail("the fused kernels did not build (see the RuntimeWarning above)")
        pytest.skip("fused kernels unavailable here (no C++ toolchain?)")
    return module


def activation(shape, dtype, *, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(shape, generator=g, dtype=torch.float64)
    if ties:
        h = h.round(decimals=1)  # many equal values inside pooling windows
    return h.to(dtype).contiguous(memory_format=CL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 8, 7, 7), (2, 5, 6, 9), (2, 16, 28, 28)])
def test_pool_stats_match_torch(kernels, dtype, shape) -> None:
    h = activation(shape, dtype, ties=True)
    y, phase, mean, var = kernels.pool_stats_forward(h, True)
    ref, idx = F.max_pool2d_with_indices(h, 2)
    assert torch.equal(y, ref) and y.is_contiguous(memory_format=CL)
    # the phase names the same winner as PyTorch's argmax (first maximum on ties)
    w = shape[3]
    corner = torch.arange(shape[2] // 2)[:, None] * 2 * w + torch.arange(shape[3] // 2) * 2
    offset = idx - corner
    assert torch.equal(phase, ((offset // w) * 2 + offset % w).to(torch.uint8))
    ref_var, ref_mean = torch.var_mean(h.double(), (0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-6, atol=1e-6)

    gy = activation(y.shape, dtype, seed=1)
    unpooled = torch.ops.aten.max_pool2d_with_indices_backward(
        gy, h, [2, 2], [2, 2], [0, 0], [1, 1], False, idx
    )
    assert torch.equal(kernels.pool_backward(gy, phase, shape[2], shape[3], None, None, None), unpooled)
    assert torch.equal(kernels.pool_gather(unpooled, phase), gy)
    c, off = torch.randn(shape[1]), torch.randn(shape[1])
    with_stats = kernels.pool_backward(gy, phase, shape[2], shape[3], h, c, off)
    expected = unpooled.double() + c.double()[:, None, None] * h.double() + off.double()[:, None, None]
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(with_stats.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 8, 7, 7), (2, 5, 6, 9), (2, 16, 28, 28)])
def test_pool_backward_backward_matches_torch(kernels, dtype, shape) -> None:
    h = activation(shape, dtype, ties=True)
    _, phase = kernels.pool_stats_forward(h, False)
    ggx = activation(shape, dtype, seed=2)
    c = torch.randn(shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    c = c.to(torch.float64 if dtype == torch.float64 else torch.float32)
    ggy, gh, gc, goffset = kernels.pool_backward_backward(ggx, phase, h, c, True, True)
    assert torch.equal(ggy, kernels.pool_gather(ggx, phase)) and ggy.is_contiguous(memory_format=CL)
    assert gh.dtype == dtype and gh.is_contiguous(memory_format=CL)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    expected = ggx.double() * c.double()[:, None, None]
    torch.testing.assert_close(gh.double(), expected, rtol=tol, atol=tol)
    # bfloat16 products are exact in float: only the summation rounds
    sums_tol = 1e-9 if dtype == torch.float64 else 1e-5
    expected = (ggx.double() * h.double()).sum((0, 2, 3))
    torch.testing.assert_close(gc.double(), expected, rtol=sums_tol, atol=sums_tol)
    expected = ggx.double().sum((0, 2, 3))
    torch.testing.assert_close(goffset.double(), expected, rtol=sums_tol, atol=sums_tol)
    ggy2, gh2, gc2, goffset2 = kernels.pool_backward_backward(ggx, phase, h, c, False, False)
    assert ggy2 is None and gh2 is None
    assert torch.equal(gc2, gc) and torch.equal(goffset2, goffset)


def test_nan_wins_the_window_as_in_torch(kernels) -> None:
    h = activation((1, 4, 4, 4), torch.float32)
    h[0, 1, 0, 1] = float("nan")
    y, _, _, _ = kernels.pool_stats_forward(h, True)
    assert torch.equal(y.isnan(), F.max_pool2d(h, 2).isnan())


def test_fused_pool_derivatives(kernels) -> None:
    h = activation((2, 3, 5, 6), torch.float64).requires_grad_()
    assert usable(h)

    def pooled_and_stats(h):
        y, mean, var = fused_pool(h, stats=True)
        return y, mean, var

    assert gradcheck(pooled_and_stats, (h,))
    assert gradgradcheck(pooled_and_stats, (h,))
    assert gradgradcheck(lambda h: fused_pool(h, stats=False)[0], (h,))
    y, mean, var = fused_pool(h, stats=True)
    torch.testing.assert_close(y, F.max_pool2d(h, 2))
    torch.testing.assert_close(mean, h.mean((0, 2, 3)))
    torch.testing.assert_close(var, h.var((0, 2, 3), unbiased=False))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_affine_relu_matches_torch_and_its_derivatives(kernels, dtype) -> None:
    p = activation((2, 6, 3, 4), dtype).requires_grad_()
    scale = torch.rand(6, dtype=dtype).add(0.5).requires_grad_()
    shift = torch.randn(6, dtype=dtype).requires_grad_()
    out = affine_relu(p, scale, shift, dtype)
    ref = F.relu(p * scale[:, None, None] + shift[:, None, None])
    torch.testing.assert_close(out, ref)
    if dtype == torch.float64:
        fn = lambda p, s, b: affine_relu(p, s, b, torch.float64)  # noqa: E731
        assert gradcheck(fn, (p, scale, shift))
        assert gradgradcheck(fn, (p, scale, shift))


def test_affine_relu_writes_bfloat16_like_a_cast(kernels) -> None:
    p = activation((2, 8, 5, 5), torch.bfloat16)
    scale, shift = torch.rand(8) + 0.5, torch.randn(8)
    out = affine_relu(p, scale, shift, torch.bfloat16)
    ref = F.relu(p.float() * scale[:, None, None] + shift[:, None, None]).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()


@pytest.mark.parametrize("size", [(8, 8), (7, 9)])
def test_stem_equals_conv_then_pool_with_derivatives(kernels, size) -> None:
    tasks, c_in, c_out, n = 3, 1, 5, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, tasks * c_in, *size, generator=g, dtype=torch.float64)
    x = x.contiguous(memory_format=CL)
    w = torch.randn(tasks, c_out, c_in, 3, 3, generator=g, dtype=torch.float64).requires_grad_()
    ref = F.max_pool2d(F.conv2d(x, w.reshape(-1, c_in, 3, 3), padding=1, groups=tasks), 2)
    torch.testing.assert_close(stem_pool(x, w, tasks), ref)
    assert gradcheck(lambda w: stem_pool(x, w, tasks), (w,))
    assert gradgradcheck(lambda w: stem_pool(x, w, tasks), (w,))


def test_affine_relu_sums_over_many_rows(kernels) -> None:
    # 2 x 13 x 11 = 286 positions: the per-channel sums cross several float-partial flushes
    g = torch.Generator().manual_seed(1)
    p = activation((2, 9, 13, 11), torch.float32).requires_grad_()
    scale = (torch.rand(9, generator=g) + 0.5).requires_grad_()
    shift = torch.randn(9, generator=g).requires_grad_()
    gy = torch.randn(2, 9, 13, 11, generator=g).contiguous(memory_format=CL)
    got = torch.autograd.grad(affine_relu(p, scale, shift, torch.float32), (p, scale, shift), gy)
    p64, s64, b64 = (t.detach().double().requires_grad_() for t in (p, scale, shift))
    ref = F.relu(p64 * s64[:, None, None] + b64[:, None, None])
    want = torch.autograd.grad(ref, (p64, s64, b64), gy.double())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)]
)
@pytest.mark.parametrize("size", [(7, 7), (3, 5), (1, 1)])
def test_conv3x3_weight_grad_equals_convolution_backward(kernels, dtype, tol, size) -> None:
    n, groups, c_in, c_out = 3, 4, 5, 6
    x = activation((n, groups * c_in, *size), dtype, seed=2)
    gy = activation((n, groups * c_out, *size), dtype, seed=3)
    w = torch.empty(groups * c_out, c_in, 3, 3, dtype=dtype).contiguous(memory_format=CL)
    ref = torch.ops.aten.convolution_backward(
        gy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], groups, [False, True, False]
    )[1]
    got = kernels.conv3x3_weight_grad(x, gy, groups)
    assert got.shape == ref.shape and got.dtype == dtype
    assert got.is_contiguous(memory_format=CL)
    err = (got.double() - ref.double()).norm() / ref.double().norm()
    assert err <= tol


def test_relayout_equals_torch_copies(kernels) -> None:
    w = torch.randn(12, 7, 3, 3)
    to_cl = kernels.relayout(w, torch.bfloat16, True)
    assert torch.equal(to_cl, w.to(torch.bfloat16).contiguous(memory_format=CL))
    assert to_cl.is_contiguous(memory_format=CL)
    back = kernels.relayout(to_cl, torch.float32, False)
    assert torch.equal(back, to_cl.float().contiguous()) and back.is_contiguous()


def test_kill_switch(monkeypatch) -> None:
    monkeypatch.setenv("ANOLE_KERNELS", "0")
    assert not enabled() and cpu_kernels() is None
    assert not usable(activation((1, 2, 4, 4), torch.float32))
