"""Few-shot accuracy with confidence intervals, for any learner or baseline.

A predictor is any callable `predict(episodes) -> query logits [T, ways * queries, ways]`;
`evaluate_episodes` materialises a task pool batch by batch, scores each episode and
reports the mean accuracy with a 95% confidence interval over episodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from pipeline.episodes import Episodes
    from pipeline.images import ImageSet
    from pipeline.tasks import EpisodeSpecs

__all__ = ["Accuracy", "evaluate_episodes", "mean_ci", "t_quantile_975"]

# Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..28 (n = 2..29).
_T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484,
)  # fmt: skip
_Z_975 = 1.96


def t_quantile_975(df: int) -> float:
    """The multiplier of a 95% confidence interval with `df` degrees of freedom.

    Student's t quantile for df <= 28 (n < 30 values) and the normal 1.96 for n >= 30, the
    convention of few-shot papers that report "mean ± 1.96 * std / sqrt(n)" over 600 or
    more episodes. (The t quantile at n = 30 is 2.045, so the multiplier drops there.)
    """
    if df < 1:
        raise ValueError(f"df={df}: a confidence interval needs at least 2 values")
    return _T_975[df - 1] if df <= len(_T_975) else _Z_975


def mean_ci(values: Iterable[float] | np.ndarray) -> tuple[float, float]:
    """(mean, half-width of the 95% confidence interval of the mean).

    half-width = q * std(values, ddof=1) / sqrt(n), where q is Student's t quantile for
    n < 30 and 1.96 for n >= 30 (see `t_quantile_975`). With a single value the half-width
    is nan (the spread is unknown). Raises ValueError for no values or non-finite values.
    """
    array = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64)
    array = array.reshape(-1)
    if array.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not np.all(np.isfinite(array)):
        raise ValueError("mean_ci got nan or infinite values")
    mean = float(array.mean())
    if array.size == 1:
        return mean, math.nan
    std = float(array.std(ddof=1))
    return mean, t_quantile_975(array.size - 1) * std / math.sqrt(array.size)


@dataclass(frozen=True)
class Accuracy:
    """Mean few-shot accuracy over episodes (fractions in [0, 1]) and its 95% CI half-width."""

    mean: float
    ci95: float
    episodes: int
    ways: int
    shots: int
    bn_mode: str | None = None

    def __str__(self) -> str:
        setting = f"{self.episodes} episodes, {self.ways}-way {self.shots}-shot"
        if self.bn_mode is not None:
            setting += f", bn={self.bn_mode}"
        return f"{100 * self.mean:.1f}% ± {100 * self.ci95:.1f}% ({setting})"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if math.isnan(self.ci95):
            data["ci95"] = None  # JSON has no nan
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Accuracy:
        ci95 = data.get("ci95")
        return cls(
            mean=float(data["mean"]),
            ci95=math.nan if ci95 is None else float(ci95),
            episodes=int(data["episodes"]),
            ways=int(data["ways"]),
            shots=int(data["shots"]),
            bn_mode=data.get("bn_mode"),
        )


def episode_accuracies(logits: torch.Tensor, episodes: Episodes) -> np.ndarray:
    """Fraction of query images classified correctly, per episode: float64 [T]."""
    expected = (episodes.num_tasks, episodes.ways * episodes.queries, episodes.ways)
    if tuple(logits.shape) != expected:
        raise ValueError(
            f"predict returned logits of shape {tuple(logits.shape)}; expected "
            f"[T, ways * queries, ways] = {list(expected)}"
        )
    hits = logits.detach().argmax(dim=-1) == episodes.query_y.to(logits.device)
    return hits.double().mean(dim=1).cpu().numpy()


def evaluate_episodes(
    predict: Callable[[Episodes], torch.Tensor],
    images: ImageSet,
    specs: EpisodeSpecs,
    batch_size: int = 100,
    *,
    device: torch.device | str | None = None,
    bn_mode: str | None = None,
) -> Accuracy:
    """Accuracy of `predict` over every episode of `specs`, `batch_size` episodes at a time.

    `predict(episodes)` gets materialised `Episodes` (on `device`) and returns query logits
    [T, ways * queries, ways]; the predicted label is the argmax. Gradients stay enabled
    because learners such as MAML adapt at test time; `predict` owns `torch.no_grad`.
    `bn_mode` is only recorded in the result.
    """
    from pipeline.tasks import materialize

    if specs.queries < 1:
        raise ValueError("evaluation needs at least one query image per class")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if specs.num_tasks == 0:
        raise ValueError("no episodes to evaluate")
    accuracies = []
    for start in range(0, specs.num_tasks, batch_size):
        episodes = materialize(images, specs[start : start + batch_size], device=device)
        accuracies.append(episode_accuracies(predict(episodes), episodes))
    mean, ci95 = mean_ci(np.concatenate(accuracies))
    return Accuracy(mean, ci95, specs.num_tasks, specs.ways, specs.shots, bn_mode)
