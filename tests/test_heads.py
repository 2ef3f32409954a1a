"""MetaOptNet heads (pipeline/heads.py) against independent float64 references.

ridge: the naive primal solve (X^T X + lam I) W = X^T Y per task. svm: scipy's SLSQP on the
primal Crammer-Singer problem per task (a different formulation and a different solver from
ours, which works in the dual). Gradients: torch.autograd.gradcheck (central differences);
the SVM check is also run against deliberately wrong backwards, which it must reject.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

# scipy's bundled OpenBLAS reads this once, when it loads: one thread keeps SLSQP on these tiny
# problems from spinning against the shared cores (20x slower). Restored at once, so nothing
# else in the session (Ray workers, subprocesses) inherits it; a no-op if scipy loaded earlier.
_blas_threads = os.environ.get("OPENBLAS_NUM_THREADS")
os.environ["OPENBLAS_NUM_THREADS"] = "1"
from scipy.optimize import minimize  # noqa: E402

if _blas_threads is None:
    del os.environ["OPENBLAS_NUM_THREADS"]
else:
    os.environ["OPENBLAS_NUM_THREADS"] = _blas_threads

from pipeline import heads  # noqa: E402
from pipeline.heads import ridge_head, svm_head  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # These problems are tiny: extra intra-op threads only fight the shared cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _problem(seed: int, tasks: int, n: int, ways: int, d: int, n_query: int = 7):
    """Random support/labels/query in float64; every class has at least one support point."""
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(tasks, n, d, generator=g, dtype=F64)
    labels = torch.stack([torch.randperm(n, generator=g) % ways for _ in range(tasks)])
    query = torch.randn(tasks, n_query, d, generator=g, dtype=F64)
    return support, labels, query


# ------------------------------------------------------------------------------------ ridge


@pytest.mark.parametrize("n,d", [(7, 5), (6, 12)])  # more and fewer points than dimensions
def test_ridge_matches_naive_primal_solve(n, d):
    ways, lam, scale = 3, 0.7, 2.5
    support, labels, query = _problem(1, 3, n, ways, d)
    logits = ridge_head(support, labels, query, ways, lam=lam, scale=scale)
    for t in range(3):
        x, y = support[t], torch.nn.functional.one_hot(labels[t], ways).to(F64)
        w = torch.linalg.solve(x.T @ x + lam * torch.eye(d, dtype=F64), x.T @ y)  # [d, ways]
        torch.testing.assert_close(logits[t], scale * query[t] @ w, rtol=0, atol=1e-10)


def test_ridge_gradcheck():
    support, labels, query = _problem(2, 2, 4, 3, 3, n_query=2)
    scale = torch.tensor(1.7, dtype=F64, requires_grad=True)
    support.requires_grad_(True)
    query.requires_grad_(True)

    def f(s, q, c):
        return ridge_head(s, labels, q, 3, lam=0.3, scale=c)

    assert torch.autograd.gradcheck(f, (support, query, scale))


# -------------------------------------------------------------------------------------- SVM


def _scipy_primal(x: np.ndarray, y: np.ndarray, ways: int, C: float):
    """Crammer-Singer primal by SLSQP: variables (w [ways, d], xi [n]); returns (w, objective).

    min 1/2 ||w||^2 + C sum xi  s.t.  (w_{y_i} - w_k).x_i + xi_i >= 1 - [k == y_i].
    """
    n, d = x.shape
    nw = ways * d
    a = np.zeros((n * ways, nw + n))
    b = np.zeros(n * ways)
    for i in range(n):
        for k in range(ways):
            r = i * ways + k
            a[r, y[i] * d : (y[i] + 1) * d] += x[i]
            a[r, k * d : (k + 1) * d] -= x[i]
            a[r, nw + i] = 1.0
            b[r] = 1.0 - (k == y[i])
    cost = np.r_[np.zeros(nw), np.full(n, C)]

    def fun(v):
        return 0.5 * v[:nw] @ v[:nw] + cost @ v

    def jac(v):
        return np.r_[v[:nw], np.zeros(n)] + cost

    v0 = np.r_[np.zeros(nw), np.ones(n)]  # w = 0, xi = 1 is feasible
    res = minimize(
        fun,
        v0,
        jac=jac,
        method="SLSQP",
        constraints=[{"type": "ineq", "fun": lambda v: a @ v - b, "jac": lambda v: a}],
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    assert (a @ res.x - b).min() > -1e-8, res.message
    return res.x[:nw].reshape(ways, d), float(res.fun)


def _primal_objective(w: np.ndarray, x: np.ndarray, y: np.ndarray, C: float) -> float:
    """1/2 ||w||^2 + C sum_i max_k (1 - [k == y_i] + w_k.x_i - w_{y_i}.x_i) for w [ways, d]."""
    s = x @ w.T  # [n, ways]
    margins = 1.0 - np.eye(w.shape[0])[y] + s - s[np.arange(len(y)), y][:, None]
    return 0.5 * float((w * w).sum()) + C * float(margins.max(1).sum())


@pytest.mark.parametrize(
    "seed,n,ways,d,C",
    [
        (3, 5, 3, 4, 1.0),
        (4, 12, 4, 8, 0.5),
        (5, 25, 5, 16, 0.2),
        (6, 25, 5, 4, 2.0),  # more points than dimensions: K is singular
        (7, 20, 3, 10, 0.1),
        (13, 10, 3, 6, 0.5),  # once caught a CG drift that broke the row sums (gap lied)
    ],
)
def test_svm_matches_scipy(seed, n, ways, d, C):
    tasks, scale = 2, 1.3
    support, labels, query = _problem(seed, tasks, n, ways, d)
    # Querying the identity matrix reads the weight vectors off the logits: w = logits^T / scale.
    probe = torch.cat([torch.eye(d, dtype=F64).expand(tasks, d, d), query], 1)
    logits, info = svm_head(
        support, labels, probe, ways, C=C, max_iter=3000, tol=1e-12, scale=scale
    )
    assert bool(info.converged.all()), info
    assert float(info.rel_gap.max()) <= 1e-12
    for t in range(tasks):
        x, y = support[t].numpy(), labels[t].numpy()
        w_ref, _ = _scipy_primal(x, y, ways, C)
        # SLSQP's own value may sit on a slightly violated constraint: score both w exactly.
        obj_ref = _primal_objective(w_ref, x, y, C)
        w = logits[t, :d].numpy().T / scale
        obj = _primal_objective(w, x, y, C)
        assert abs(obj - obj_ref) <= 1e-6 * max(1.0, obj_ref), (obj, obj_ref)
        assert obj <= obj_ref + 1e-12 * max(1.0, obj_ref)  # ours is certified (gap ~ 0)
        np.testing.assert_allclose(
            logits[t, d:].numpy(), scale * query[t].numpy() @ w_ref.T, atol=1e-6
        )


def _svm_grad_problem():
    # C chosen so the solution has free (strictly inside the box) dual entries: the implicit
    # term of the gradient is then non-zero and the check below has something to test.
    # (Here 4 and 5 of the 10 dual entries per task are free, each >= 0.05 from its bound.)
    support, labels, query = _problem(17, 2, 5, 3, 3, n_query=2)
    support.requires_grad_(True)
    query.requires_grad_(True)
    scale = torch.tensor(0.8, dtype=F64, requires_grad=True)

    def f(s, q, c):
        kw = dict(C=0.7, max_iter=2000, tol=1e-13, scale=c, check_every=5)
        return svm_head(s, labels, q, 3, **kw)[0]

    return f, (support, query, scale)


def test_svm_gradcheck_and_it_detects_wrong_backwards(monkeypatch):
    f, inputs = _svm_grad_problem()
    # Central differences need the same active set at x +- eps: eps is far below the distance
    # to a face change here. Measured: analytic and numerical Jacobians agree to ~6e-10.
    kw = dict(eps=1e-6, atol=1e-6, rtol=1e-4)
    assert torch.autograd.gradcheck(f, inputs, **kw)

    original = heads._SVMDual.backward

    def detached(ctx, grad_alpha, *rest):  # the solver treated as a constant (off by ~0.9)
        grads = original(ctx, grad_alpha, *rest)
        return (torch.zeros_like(grads[0]),) + grads[1:]

    def flipped(ctx, grad_alpha, *rest):  # implicit term with the wrong sign
        grads = original(ctx, grad_alpha, *rest)
        return (-grads[0],) + grads[1:]

    # The same check must reject a wrong backward (fast mode: a random projection, enough to
    # expose an error this size and ~30x cheaper than the full Jacobian).
    for wrong in (detached, flipped):
        monkeypatch.setattr(heads._SVMDual, "backward", staticmethod(wrong))
        assert not torch.autograd.gradcheck(f, inputs, raise_exception=False, fast_mode=True, **kw)
        monkeypatch.setattr(heads._SVMDual, "backward", staticmethod(original))
        assert torch.autograd.gradcheck(f, inputs, fast_mode=True, **kw)


def test_svm_dual_ridge_is_the_svm_on_augmented_features():
    # K + eps I is the Gram matrix of the support points with sqrt(eps) * e_i appended.
    eps, ways, n, d = 0.5, 3, 9, 4
    support, labels, query = _problem(9, 2, n, ways, d)
    ridged, _ = svm_head(
        support, labels, query, ways, C=0.6, max_iter=3000, tol=1e-13, dual_ridge=eps
    )
    aug_s = torch.cat([support, eps**0.5 * torch.eye(n, dtype=F64).expand(2, n, n)], -1)
    aug_q = torch.cat([query, torch.zeros(2, query.shape[1], n, dtype=F64)], -1)
    plain, _ = svm_head(aug_s, labels, aug_q, ways, C=0.6, max_iter=3000, tol=1e-13)
    torch.testing.assert_close(ridged, plain, rtol=0, atol=1e-9)


def test_svm_not_converged_warns_with_the_residual():
    support, labels, query = _problem(10, 3, 25, 5, 4)
    with pytest.warns(
        RuntimeWarning, match=r"max_iter=1 .*relative duality gap \(residual\) [0-9.e+-]+"
    ):
        logits, info = svm_head(support, labels, query, 5, C=2.0, max_iter=1, tol=1e-10)
    assert not bool(info.converged.any())
    assert bool((info.rel_gap > 1e-10).all()) and bool((info.iterations == 1).all())
    assert torch.isfinite(logits).all()


def test_svm_converged_is_silent():
    support, labels, query = _problem(11, 2, 10, 3, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = svm_head(support, labels, query, 3, C=1.0, max_iter=2000, tol=1e-10)
    assert bool(info.converged.all())


def test_batching_equals_separate_calls():
    support, labels, query = _problem(12, 4, 15, 5, 8)
    for head, kw in (
        (ridge_head, dict(lam=0.4, scale=1.5)),
        (svm_head, dict(C=0.3, max_iter=3000, tol=1e-12, scale=1.5)),
    ):
        out = head(support, labels, query, 5, **kw)
        batched = out[0] if isinstance(out, tuple) else out
        for t in range(4):
            one = head(support[t : t + 1], labels[t : t + 1], query[t : t + 1], 5, **kw)
            one = one[0] if isinstance(one, tuple) else one
            torch.testing.assert_close(batched[t : t + 1], one, rtol=0, atol=1e-10)


def test_float32_embeddings_match_float64():
    support, labels, query = _problem(13, 2, 10, 3, 6)
    scale = torch.tensor(2.0, requires_grad=True)
    s32, q32 = support.float().requires_grad_(True), query.float()
    l32, info = svm_head(s32, labels, q32, 3, C=0.5, max_iter=2000, tol=1e-9, scale=scale)
    l64, _ = svm_head(support, labels, query, 3, C=0.5, max_iter=2000, tol=1e-9, scale=2.0)
    assert l32.dtype == torch.float32 and bool(info.converged.all())
    torch.testing.assert_close(l32.double(), l64, rtol=0, atol=1e-4)
    l32.sum().backward()
    assert s32.grad is not None and torch.isfinite(s32.grad).all() and scale.grad is not None
    r32 = ridge_head(s32, labels, q32, 3, lam=0.5, scale=scale)
    assert r32.dtype == torch.float32


def test_bad_arguments_are_named():
    support, labels, query = _problem(14, 1, 6, 3, 4)
    with pytest.raises(ValueError, match="lam"):
        ridge_head(support, labels, query, 3, lam=0.0)
    with pytest.raises(ValueError, match="C must"):
        svm_head(support, labels, query, 3, C=-1.0, max_iter=10, tol=1e-6)
    with pytest.raises(ValueError, match="max_iter"):
        svm_head(support, labels, query, 3, C=1.0, max_iter=0, tol=1e-6)
    with pytest.raises(ValueError, match="support_labels"):
        ridge_head(support, labels[:, :-1], query, 3, lam=1.0)
    with pytest.raises(ValueError, match="support_labels"):
        ridge_head(support, labels.double(), query, 3, lam=1.0)
