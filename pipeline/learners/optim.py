"""Inner-loop optimizers as one functional type (torchopt style), batched over tasks.

    opt = Adam(lr=1e-3)                      # or SGD(lr=0.1)
    state = opt.init(params)                 # params: {name: Tensor}, any leading task dims
    params, state = opt.update(grads, state, params)

`update` never modifies `params` (they may be views of the meta-parameters) and returns new
tensors; the state's own tensors may be updated in place (they belong to the state). Every
operation is elementwise, so parameters [T, ...] with per-task gradients step every task at
once, each with its own moments: one state per task, fresh from `init`, as supervised-reptile
resets its inner Adam for every task. The formulas are torch.optim.SGD's and Adam's (no weight
decay, no momentum, no amsgrad); tests check them against torch.optim in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

Params = dict[str, Tensor]


class InnerOptimizer(Protocol):
    def init(self, params: Mapping[str, Tensor]) -> Any:
        """A fresh state for `params`."""
        ...

    def update(
        self, grads: Mapping[str, Tensor], state: Any, params: Mapping[str, Tensor]
    ) -> tuple[Params, Any]:
        """One step: (new parameters, new state)."""
        ...


@dataclass(frozen=True)
class SGD:
    """theta <- theta - lr * g (one op per tensor: one pass over the per-task weights)."""

    lr: float

    def init(self, params: Mapping[str, Tensor]) -> None:
        return None

    def update(
        self, grads: Mapping[str, Tensor], state: None, params: Mapping[str, Tensor]
    ) -> tuple[Params, None]:
        return {k: torch.add(params[k], grads[k], alpha=-self.lr) for k in params}, state


@dataclass
class AdamState:
    step: int
    m: Params
    v: Params


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba): bias-corrected moments; eps added to sqrt of the corrected v."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def init(self, params: Mapping[str, Tensor]) -> AdamState:
        return AdamState(0, {}, {})  # moments start at zero; made at the first step

    def update(
        self, grads: Mapping[str, Tensor], state: AdamState, params: Mapping[str, Tensor]
    ) -> tuple[Params, AdamState]:
        beta1, beta2 = self.betas
        i = state.step + 1
        m, v = state.m, state.v
        out: Params = {}
        with torch.no_grad():  # in place where the tensors are the state's: fewer passes
            for k, g in grads.items():
                if k not in m:
                    m[k], v[k] = (1 - beta1) * g, (1 - beta2) * g * g
                else:
                    m[k].mul_(beta1).add_(g, alpha=1 - beta1)
                    v[k].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = v[k].sqrt().div_(math.sqrt(1 - beta2**i)).add_(self.eps)
                out[k] = params[k].addcdiv(m[k], denom, value=-self.lr / (1 - beta1**i))
        return out, AdamState(i, m, v)


def inner_optimizer(kind: str, lr: float, **adam: Any) -> SGD | Adam:
    """"sgd" or "adam" (Adam's `betas`, `eps` from `adam`)."""
    if kind == "sgd":
        return SGD(lr)
    if kind == "adam":
        return Adam(lr, **adam)
    raise ValueError(f"inner optimizer must be sgd or adam, got {kind!r}")


__all__ = ["SGD", "Adam", "AdamState", "InnerOptimizer", "inner_optimizer"]
