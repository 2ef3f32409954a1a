"""The small messages the driver, the workers and the parameter server exchange.

Big payloads never ride in these: the meta-parameters and each meta-update travel as ONE flat
float32 numpy array in Ray's object store, next to the header that describes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Snapshot:
    """The parameter server's parameters at one moment (the flat array travels beside it)."""

    step: int
    """Meta-updates applied so far: the step the next sync meta-batch belongs to."""
    version: int
    """Parameter version; equals `step` (one version per applied meta-update)."""
    incarnation: str
    """Changes whenever the parameter server (re)starts; updates made for another are void."""
    total_steps: int


@dataclass(frozen=True)
class UpdateHeader:
    """A worker's meta-update contribution: its tag, the parameters it used, and its metrics."""

    step: int
    """The step whose episode specs were used (sync: the meta-step; async: the dispatch index)."""
    task_ids: tuple[int, ...]
    """The tasks summed in this update; (step, task_ids) is the update's tag."""
    version: int
    """Version of the parameters the update was computed from."""
    incarnation: str
    """Incarnation of the parameter server that produced those parameters."""
    metric_sums: dict[str, float]
    """The learner's metric sums over these tasks (with "tasks")."""
    compute_s: float
    """Seconds of worker compute: materialising episodes and the learner's inner loops."""
    worker: str = ""
    cpu_s: float = 0.0
    """CPU seconds the worker process used for that compute (all its threads): divided by
    compute_s x threads, how much of its CPUs the worker actually got."""
    """Which worker (node and pid), for logs."""

    @property
    def num_tasks(self) -> int:
        return len(self.task_ids)

    @property
    def tag(self) -> tuple[int, tuple[int, ...]]:
        return (self.step, self.task_ids)


@dataclass(frozen=True)
class Ack:
    """The parameter server's answer to a pushed update."""

    status: str
    """pending (kept, meta-batch incomplete), applied, duplicate, stale or orphaned."""
    step: int
    """The server's step after handling the push."""
    incarnation: str
    metrics: dict[str, float] | None = None
    """Mean metrics of the applied meta-batch (when status is applied)."""
    val_accuracy: float | None = None
    checkpoint: str | None = None
    """Path of a checkpoint written after this step, if one was."""
    server_s: float = 0.0
    """Seconds the server spent on this push (aggregation and the optimiser step)."""
    bookkeeping_s: float = 0.0
    """Seconds of validation and checkpointing inside this push (not step overhead)."""
    elapsed: float = 0.0
    """Training seconds of the whole run so far, across resumes."""

    @property
    def applied(self) -> bool:
        return self.status == "applied"


@dataclass(frozen=True)
class ServerStatus:
    """Where the parameter server stands: step, resume origin, counters."""

    step: int
    total_steps: int
    incarnation: str
    mode: str
    pid: int
    node_id: str
    resumed_from: str | None
    """Checkpoint the server started from (None: fresh parameters)."""
    fallbacks: list[str]
    """Corrupt checkpoints skipped when resuming, each with the reason."""
    error: str | None
    """Why the server could not open its run (a config mismatch, unreadable checkpoints)."""
    error_kind: str | None
    elapsed: float
    next_dispatch: int
    counters: dict[str, int] = field(default_factory=dict)
    """applied, duplicates, dropped_stale, orphaned."""


@dataclass(frozen=True)
class WorkerInfo:
    """Where a worker runs and what it computes on."""

    pid: int
    node_id: str
    device: str
    gpu_ids: list[str]
    num_gpus: float
    threads: int
    images_zero_copy: bool
    """True when the dataset is read straight from Ray's shared-memory object store."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)
