"""A batch of materialised episodes: the tensors every learner consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Episodes:
    """T episodes of `ways`-way `shots`-shot classification with `queries` query images per class.

    Labels are 0..ways-1 within each episode, ordered by class (support and query alike).
    """

    support_x: torch.Tensor
    """float32 [T, ways*shots, C, H, W], pixel values in [0, 1]."""
    support_y: torch.Tensor
    """int64 [T, ways*shots]."""
    query_x: torch.Tensor
    """float32 [T, ways*queries, C, H, W]."""
    query_y: torch.Tensor
    """int64 [T, ways*queries]."""
    ways: int
    shots: int
    queries: int

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str) -> Episodes:
        """The same episodes on `device`."""
        return Episodes(
            self.support_x.to(device),
            self.support_y.to(device),
            self.query_x.to(device),
            self.query_y.to(device),
            self.ways,
            self.shots,
            self.queries,
        )

    def __getitem__(self, tasks: slice | torch.Tensor) -> Episodes:
        """A subset of the tasks (for sharding a meta-batch or per-task reference loops)."""
        return Episodes(
            self.support_x[tasks],
            self.support_y[tasks],
            self.query_x[tasks],
            self.query_y[tasks],
            self.ways,
            self.shots,
            self.queries,
        )
