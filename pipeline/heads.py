"""MetaOptNet's differentiable base learners (Lee, Maji, Ravichandran & Soatto 2019).

A pure functional core, batched over tasks: each head takes support embeddings [T, S, D] with
integer labels [T, S] and query embeddings [T, Q, D], fits a linear classifier on the support
set inside the autograd graph, and returns query logits [T, Q, ways] multiplied by a (possibly
learnable) `scale`, as in the paper. The kernel is linear; both heads work through the S x S
support Gram matrix and the Q x S query/support Gram matrix, so beyond those two products the
cost does not depend on the embedding dimension D.

- `ridge_head`: ridge regression to one-hot targets in closed form (Woodbury identity, a
  Cholesky solve in the S x S space). Differentiated by autograd through the Cholesky solve.
- `svm_head`: the multi-class Crammer-Singer SVM solved in its dual by batched FISTA with an
  exact projection, an active-set "polish" step, and a duality-gap certificate. Differentiated
  by implicit differentiation of the KKT conditions at the solution (a custom autograd.Function
  whose backward solves the adjoint system restricted to the active face).

No learner, config or model code lives here; the learners wrap these functions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SVMInfo", "ridge_head", "svm_head"]


def _check_shapes(support: Tensor, support_labels: Tensor, query: Tensor, ways: int) -> None:
    if support.dim() != 3 or query.dim() != 3:
        raise ValueError(
            f"support and query must be [T, n, d]; got {tuple(support.shape)} and "
            f"{tuple(query.shape)}"
        )
    if support_labels.shape != support.shape[:2]:
        raise ValueError(
            f"support_labels must be [T, n_support] = {tuple(support.shape[:2])}; "
            f"got {tuple(support_labels.shape)}"
        )
    if query.shape[0] != support.shape[0] or query.shape[2] != support.shape[2]:
        raise ValueError(
            f"query {tuple(query.shape)} does not match support {tuple(support.shape)} "
            "in tasks or embedding size"
        )
    if support_labels.dtype.is_floating_point or support_labels.dtype == torch.bool:
        raise ValueError(
            f"support_labels must be integer class indices; got {support_labels.dtype}"
        )
    if ways < 2:
        raise ValueError(f"ways must be >= 2; got {ways}")


# ------------------------------------------------------------------------------------ ridge


def ridge_head(
    support: Tensor,
    support_labels: Tensor,
    query: Tensor,
    ways: int,
    *,
    lam: float,
    scale: Tensor | float = 1.0,
) -> Tensor:
    """Ridge-regression head (MetaOptNet-RR / R2D2): query logits [T, Q, ways].

    Shapes: support [T, S, D], support_labels [T, S] (int in [0, ways)), query [T, Q, D].

    Math: W = argmin ||X W - Y||^2 + lam ||W||^2 = (X^T X + lam I)^-1 X^T Y
            = X^T (X X^T + lam I)^-1 Y          (Woodbury; an S x S solve instead of D x D),
    logits = scale * Q W = scale * (Q X^T) (K + lam I)^-1 Y with K = X X^T, Y one-hot.

    K + lam I is symmetric positive definite for lam > 0, so it is factored by Cholesky.
    Gradients w.r.t. support, query and scale flow by ordinary autograd through the Gram
    products and `torch.cholesky_solve`.
    """
    _check_shapes(support, support_labels, query, ways)
    if not lam > 0:
        raise ValueError(f"lam must be > 0; got {lam}")
    n = support.shape[1]
    targets = F.one_hot(support_labels, ways).to(support.dtype)  # [T, S, ways]
    gram = support @ support.mT  # [T, S, S]
    eye = torch.eye(n, dtype=support.dtype, device=support.device)
    chol = torch.linalg.cholesky(gram + lam * eye)
    coef = torch.cholesky_solve(targets, chol)  # (K + lam I)^-1 Y, [T, S, ways]
    return scale * ((query @ support.mT) @ coef)


# -------------------------------------------------------------------------------------- SVM


@dataclass(frozen=True)
class SVMInfo:
    """What the dual solver reached, per task (tensors of shape [T], on the input's device).

    gap: duality gap P(w) - D(alpha) >= 0 at the returned alpha (0 at the optimum). Since the
        primal is 1-strongly convex in w, ||w - w*||_F^2 <= 2 * gap, so a query's logits are
        within scale * ||q|| * sqrt(2 * gap) of the exact ones.
    rel_gap: gap / P(w), the quantity compared with `tol`.
    converged: rel_gap <= tol.
    iterations: FISTA iterations run for this task (it is frozen once converged).
    """

    gap: Tensor
    rel_gap: Tensor
    converged: Tensor
    iterations: Tensor


def svm_head(
    support: Tensor,
    support_labels: Tensor,
    query: Tensor,
    ways: int,
    *,
    C: float,
    max_iter: int,
    tol: float,
    scale: Tensor | float = 1.0,
    dual_ridge: float = 0.0,
    check_every: int = 10,
) -> tuple[Tensor, SVMInfo]:
    """Crammer-Singer multi-class SVM head (MetaOptNet-SVM): (query logits [T, Q, ways], info).

    Shapes: support [T, S, D], support_labels [T, S] (int in [0, ways)), query [T, Q, D].

    Primal, per task (x_i the support embeddings, y_i their labels):
        min_{w, xi} 1/2 sum_k ||w_k||^2 + C sum_i xi_i
        s.t. w_{y_i}.x_i - w_k.x_i >= 1 - [k == y_i] - xi_i   for all i, k.
    Dual (alpha [S, ways], Y one-hot, K = X X^T the Gram matrix):
        min_alpha 1/2 tr(alpha^T K alpha) - <alpha, Y>
        s.t. alpha_i <= C y_i (elementwise),  sum_k alpha_ik = 0          for each row i,
    with w_k = sum_i alpha_ik x_i, so logits = scale * (Q X^T) alpha.

    `dual_ridge` = eps adds eps/2 ||alpha||^2 to the dual (K -> K + eps I). That is the same
    SVM on support features augmented with sqrt(eps) * e_i (query features unchanged); it makes
    the dual strictly convex. MetaOptNet's reference code adds 1.0 (with C = 0.1) to keep its
    QP solver stable; 0.0 (the default) is the exact Crammer-Singer SVM.

    Solver (forward, in float64 whatever the input dtype: the problem is only S x ways):
      - FISTA with gradient-based adaptive restart (O'Donoghue & Candes 2015) from alpha = 0,
        step 1/L with L = lambda_max(K + eps I); each row is projected exactly onto
        {a <= C y_i, sum a = 0}, i.e. a = C y_i - b with b on the simplex {b >= 0, sum b = C}
        (sort-based projection, Duchi et al. 2008).
      - Every `check_every` iterations and after the last one the duality gap of each task is
        computed. Once the active set (entries at their bound) has settled between two checks,
        a polish step is tried: with it held fixed, the equality-constrained QP on the free
        entries is solved by conjugate gradient (at most POLISH_CG_STEPS steps); the result,
        projected back if it left the box, is kept where it lowers the gap. Once the active
        set is right this makes the solve exact to rounding (typically 2-4x fewer iterations
        than FISTA alone).
      - A task is converged, and frozen, when gap / P(w) <= `tol`; the loop stops when all are,
        after at most `max_iter` FISTA iterations (the iteration bound). Tasks not converged by
        then trigger a RuntimeWarning giving their worst relative gap; `info` reports every
        task's. The gap is computed in float64, so tol below ~1e-11 may sit under its rounding
        floor on badly scaled problems (e.g. large C); 1e-6 to 1e-9 suits training.

    Gradient (backward): implicit differentiation of the KKT conditions at the returned alpha.
    On the active face (bound entries fixed, free entries summing to zero per row, the subspace
    F) the solution satisfies P_F (K alpha - Y) = 0, so d alpha = -(P_F K P_F)^+ P_F dK alpha.
    The backward solves the adjoint system P_F K P_F u = P_F g (g = dL/dalpha) by conjugate
    gradient and returns dL/dK = -u alpha^T; autograd carries it through K = X X^T and the query
    Gram product to support and query. This assumes the active set is locally stable (strict
    complementarity), which holds except on a measure-zero set of inputs; it is exact only to
    the accuracy of the forward solve (a converged, polished solve is exact to rounding).
    Gradients also flow to `scale` when it is a tensor.
    """
    _check_shapes(support, support_labels, query, ways)
    if not C > 0:
        raise ValueError(f"C must be > 0; got {C}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1; got {max_iter}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0; got {tol}")
    if dual_ridge < 0:
        raise ValueError(f"dual_ridge must be >= 0; got {dual_ridge}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1; got {check_every}")

    targets = F.one_hot(support_labels, ways).to(torch.float64)  # [T, S, ways]
    gram = support @ support.mT  # [T, S, S]
    alpha, gap, rel_gap, iters = _SVMDual.apply(
        gram, targets, float(C), int(max_iter), float(tol), float(dual_ridge), int(check_every)
    )
    converged = rel_gap <= tol
    info = SVMInfo(gap=gap, rel_gap=rel_gap, converged=converged, iterations=iters)
    if not bool(converged.all()):
        bad = ~converged
        warnings.warn(
            f"svm_head: the dual solver did not converge within max_iter={max_iter} for "
            f"{int(bad.sum())}/{bad.numel()} task(s); worst relative duality gap (residual) "
            f"{float(rel_gap[bad].max()):.3g} > tol={tol:g}",
            RuntimeWarning,
            stacklevel=2,
        )
    logits = (query @ support.mT) @ alpha.to(query.dtype)
    return scale * logits, info


class _SVMDual(torch.autograd.Function):
    """K [T, S, S] -> alpha [T, S, ways] (the dual solution), with implicit-KKT backward."""

    @staticmethod
    def forward(ctx, gram, targets, C, max_iter, tol, dual_ridge, check_every):
        k = gram.detach().to(torch.float64)
        n = k.shape[-1]
        k = k + dual_ridge * torch.eye(n, dtype=k.dtype, device=k.device)
        alpha, gap, primal, iters = _solve_dual(k, targets, C, max_iter, tol, check_every)
        ctx.save_for_backward(k, alpha, targets)
        ctx.C = C
        ctx.in_dtype = gram.dtype
        rel_gap = gap / primal.clamp_min(torch.finfo(torch.float64).tiny)
        ctx.mark_non_differentiable(gap, rel_gap, iters)
        return alpha.to(gram.dtype), gap, rel_gap, iters

    @staticmethod
    def backward(ctx, grad_alpha, *_):
        k, alpha, targets = ctx.saved_tensors
        free = _free_mask(alpha, targets, ctx.C)
        g = grad_alpha.to(torch.float64)
        u = _face_cg(k, free, g, torch.zeros_like(g))
        grad_gram = -(u @ alpha.mT)
        return grad_gram.to(ctx.in_dtype), None, None, None, None, None, None


def _proj_rows(v: Tensor, targets: Tensor, C: float) -> Tensor:
    """Exact Euclidean projection of each row of v [.., S, ways] onto {a <= C y, sum a = 0}.

    With b = C y - a the set is the simplex {b >= 0, sum b = C}: project C y - v onto it.
    """
    b = C * targets - v
    srt, _ = b.sort(-1, descending=True)
    css = srt.cumsum(-1) - C
    ks = torch.arange(1, b.shape[-1] + 1, dtype=b.dtype, device=b.device)
    rho = (srt - css / ks > 0).sum(-1, keepdim=True).clamp_min(1)  # size of the support
    theta = css.gather(-1, rho - 1) / rho.to(b.dtype)
    return C * targets - (b - theta).clamp_min(0)


def _free_mask(alpha: Tensor, targets: Tensor, C: float) -> Tensor:
    """Entries strictly inside their bound alpha_ik < C y_ik (the rest are active).

    Each row has at least one free entry: the slacks b = C y - alpha sum to C per row.
    """
    return (C * targets - alpha) > 1e-10 * C


def _face_proj(v: Tensor, free: Tensor) -> Tensor:
    """Orthogonal projection onto F = {supported on `free`, zero sum per row}."""
    cnt = free.sum(-1, keepdim=True).clamp_min(1)
    vf = torch.where(free, v, 0)
    return torch.where(free, vf - vf.sum(-1, keepdim=True) / cnt, 0)


def _face_cg(
    k: Tensor, free: Tensor, rhs: Tensor, x0: Tensor, max_steps: int | None = None
) -> Tensor:
    """Solve P K P x = P rhs for x in F (P the projection onto F) by batched conjugate gradient.

    P K P is positive semidefinite on F; the system is consistent in our uses, so CG from a
    point of F converges in at most dim F steps (in exact arithmetic). K acts on x [S, ways]
    column by column: (K (x) I) vec(x) = K @ x.
    """
    dim = (free.sum(-1) - 1).clamp_min(0).sum(-1)  # dim F per task
    iters = int(dim.max()) + 5 if dim.numel() else 0  # + a few for rounding
    if max_steps is not None:
        iters = min(iters, max_steps)
    x = _face_proj(x0, free)
    r = _face_proj(rhs - k @ x, free)
    p = r
    rr = (r * r).sum((-2, -1))
    stop = rr * 1e-28  # relative residual 1e-14
    for it in range(iters):
        # Tasks already solved take no further steps: past convergence CG only amplifies noise.
        live = rr > stop
        kp = _face_proj(k @ p, free)
        pkp = (p * kp).sum((-2, -1))
        step = torch.where(live & (pkp > 0), rr / pkp.clamp_min(1e-300), 0)
        x = x + step[..., None, None] * p
        r = r - step[..., None, None] * kp
        rr_new = (r * r).sum((-2, -1))
        beta = torch.where(live, rr_new / rr.clamp_min(1e-300), 0)
        p = r + beta[..., None, None] * p
        rr = torch.where(live, rr_new, rr)
        if it % 8 == 7 and not bool((rr > stop).any()):
            break
    return _face_proj(x, free)  # undo rounding drift off the face (row sums exactly 0)


POLISH_CG_STEPS = 100
"""Cap on the conjugate-gradient steps of one polish (the backward runs CG to dim F + 5)."""


def _gap(k: Tensor, alpha: Tensor, targets: Tensor, C: float) -> tuple[Tensor, Tensor]:
    """(duality gap, primal value) [T] at a feasible alpha, with w = X^T alpha.

    P = 1/2 tr(a^T K a) + C sum_i max_k (1 - y_ik + (K a)_ik - (K a)_{i,y_i});
    D = -1/2 tr(a^T K a) + <a, Y>.
    """
    ka = k @ alpha
    quad = (alpha * ka).sum((-2, -1))
    margins = (1 - targets) + ka - (ka * targets).sum(-1, keepdim=True)
    primal = 0.5 * quad + C * margins.amax(-1).sum(-1)  # the k = y_i term keeps each max >= 0
    dual = -0.5 * quad + (alpha * targets).sum((-2, -1))
    return (primal - dual).clamp_min(0), primal


def _polish(k: Tensor, alpha: Tensor, targets: Tensor, C: float, free: Tensor) -> Tensor:
    """Exact minimiser of the dual on alpha's current face, or alpha where that is infeasible.

    Solves P K P d = -P (K alpha - Y) on the face F of the active set (`free` marks the rest);
    alpha + d keeps the active entries at their bound and the row sums at zero. Optimality is
    judged by the caller through the gap, feasibility here through the bounds.
    """
    d = _face_cg(k, free, targets - k @ alpha, torch.zeros_like(alpha), POLISH_CG_STEPS)
    cand = alpha + d
    # The gap certifies optimality only for a feasible point: check bounds and row sums. A
    # candidate that left the box (the face was wrong) is projected back: a cheap active-set
    # move the caller keeps only if it lowers the gap.
    inside = ((C * targets - cand) >= -1e-12 * C).all(-1).all(-1)
    balanced = (cand.sum(-1).abs() <= 1e-12 * C).all(-1)
    feasible = (inside & balanced)[..., None, None]
    return torch.where(feasible, cand, _proj_rows(cand, targets, C))


def _solve_dual(
    k: Tensor, targets: Tensor, C: float, max_iter: int, tol: float, check_every: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batched FISTA + polish on the dual; returns (alpha, gap, primal, iterations)."""
    t_count = k.shape[0]
    targets = targets.to(k.dtype)
    # Step 1/L: L = largest eigenvalue of K (the Hessian is K (x) I). Tiny floor for K = 0.
    lip = torch.linalg.eigvalsh(k)[..., -1].clamp_min(1e-12) * (1 + 1e-6)
    step = (1 / lip)[..., None, None]
    alpha = torch.zeros_like(targets)  # feasible: 0 <= C y and rows sum to 0
    z = alpha
    t = torch.ones(t_count, dtype=k.dtype, device=k.device)
    done = torch.zeros(t_count, dtype=torch.bool, device=k.device)
    iters = torch.zeros(t_count, dtype=torch.long, device=k.device)
    gap, primal = _gap(k, alpha, targets, C)
    tried = torch.zeros_like(targets, dtype=torch.bool)  # the face of the last polish
    last = tried  # the face at the previous check
    since_polish = 0  # checks since the last polish
    for it in range(1, max_iter + 1):
        new = _proj_rows(z - step * (k @ z - targets), targets, C)
        # Restart the momentum where it points against the step taken (O'Donoghue & Candes).
        restart = ((z - new) * (new - alpha)).sum((-2, -1)) > 0
        t_new = torch.where(restart, 1.0, (1 + torch.sqrt(1 + 4 * t * t)) / 2)
        beta = torch.where(restart, 0.0, (t - 1) / t_new)[..., None, None]
        keep = done[..., None, None]  # converged tasks stay frozen (batching = separate calls)
        z = torch.where(keep, alpha, new + beta * (new - alpha))
        alpha = torch.where(keep, alpha, new)
        t = torch.where(done, t, t_new)
        iters = torch.where(done, iters, it)
        if it % check_every and it != max_iter:
            continue
        gap, primal = _gap(k, alpha, targets, C)
        done = done | (gap <= tol * primal)
        free = _free_mask(alpha, targets, C)
        # Polish once the active set of some unfinished task has settled (same face as at
        # the previous check) on a face not tried yet: CG on a face still moving is mostly
        # wasted. Every 5th check polishes anyway, should a face keep flickering.
        moved = (free != last).any(-1).any(-1)
        fresh = (free != tried).any(-1).any(-1)
        last, since_polish = free, since_polish + 1
        if bool(((~moved | (since_polish >= 5)) & fresh & ~done).any()):
            tried, since_polish = free, 0
            polished = _polish(k, alpha, targets, C, free)
            gap_p, primal_p = _gap(k, polished, targets, C)
            better = (gap_p < gap) & ~done
            alpha = torch.where(better[..., None, None], polished, alpha)
            z = torch.where(better[..., None, None], polished, z)
            t = torch.where(better, 1.0, t)
            gap, primal = torch.where(better, gap_p, gap), torch.where(better, primal_p, primal)
            done = done | (gap <= tol * primal)
        if bool(done.all()):
            break
    return alpha, gap, primal, iters
