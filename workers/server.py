"""ParameterServer: a Ray actor that owns the meta-parameters, the meta-optimiser and the run's files.

It holds the meta-parameters as one flat array with a version (= steps applied), the
`pipeline.train.MetaOptimizer`, the config, and the run directory: metrics.jsonl, validation,
and checkpoints through `pipeline.checkpoint.CheckpointDir`, in the same format the single-process
Trainer writes (either can resume the other's run).

* sync mode: keeps contributions until the step's whole meta-batch is in, then sums them in task
  order and steps once: exactly the Trainer's step.
* async mode: applies each meta-batch as it arrives, unless its parameters are more than
  `staleness` versions old; then it is dropped and counted.

Every update is tagged (step, task ids); a tag seen before is acknowledged as a duplicate and never
counted again. Ray restarts a crashed server (max_restarts); the new incarnation resumes from the
latest good checkpoint, and the driver redoes the steps since.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from pipeline.checkpoint import CheckpointDir
from pipeline.config import TrainConfig
from pipeline.errors import AnoleError, CheckpointError
from pipeline.images import ImageSet
from pipeline.tasks import DomainSplit
from pipeline.train import (
    MetaOptimizer,
    TrainingData,
    append_metrics,
    build_learner,
    check_compatible,
    checkpoint_manifest,
    checkpoint_state,
    evaluate_params,
    initial_params,
    mean_metrics,
    read_history,
    validation_specs,
)

from .protocol import Ack, ServerStatus, Snapshot, UpdateHeader
from .worker import flat_to_params, param_template, resolve_images


def _was_restarted() -> bool:
    """True inside an actor that Ray re-created after a crash."""
    if not ray.is_initialized():
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Ray warns about its own use of a deprecated property
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not inside an actor
        return False


class ParameterServer:
    """Owns the meta-parameters of one run; applies tagged updates exactly once."""

    def __init__(
        self,
        config: dict[str, Any],
        images: ImageSet | list[Any],
        split: dict[str, Any],
        out_dir: str,
        *,
        mode: str = "sync",
        staleness: int = 1,
        resume: bool = False,
        run_info: dict[str, Any] | None = None,
        log_tensorboard: bool = False,
        threads: int = 1,
    ):
        torch.set_num_threads(max(1, int(threads)))
        self.incarnation = uuid.uuid4().hex[:12]
        self.config = TrainConfig.from_dict(config)
        self.mode = mode
        self.staleness = int(staleness)
        self.run_info = dict(run_info or {})
        self.out_dir = Path(out_dir)
        self.data = TrainingData.build(
            resolve_images(images), self.config, DomainSplit.from_dict(split)
        )
        self.learner = build_learner(self.config, "cpu")  # validation runs beside the CPU params
        self.template = param_template(self.config)
        self.checkpoints = CheckpointDir(
            self.out_dir / "checkpoints", keep_last=self.config.keep_last
        )
        self.val_specs = validation_specs(self.data)
        self.counters = {"applied": 0, "duplicates": 0, "dropped_stale": 0, "orphaned": 0}
        self.fallbacks: list[str] = []
        self.resumed_from: str | None = None
        self.error: str | None = None
        self.error_kind: str | None = None
        self.writer = None
        self.log_tensorboard = log_tensorboard
        self._pending: dict[tuple[int, ...], tuple[UpdateHeader, np.ndarray]] = {}
        self._expected: tuple[int, dict[int, int]] | None = None
        self._seen_dispatch: set[int] = set()
        self.next_dispatch = 0
        self.metrics: dict[str, float] = {}
        self._new_best = False
        try:
            self._open(resume=resume or _was_restarted())
        except AnoleError as exc:
            # Reported through status(): the driver raises it as a clean error, not a crash loop.
            self.error, self.error_kind = str(exc), type(exc).__name__

    # --- opening the run ---------------------------------------------------------------------
    def _open(self, *, resume: bool) -> None:
        cfg = self.config
        self.t_open = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt = None
        if resume:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ckpt = self.checkpoints.latest()
            self.fallbacks = [str(w.message) for w in caught]
            if ckpt is None and self.checkpoints.steps():
                raise CheckpointError(
                    f"no readable checkpoint in {self.checkpoints.root}; cannot resume "
                    f"({'; '.join(self.fallbacks)})"
                )
        self.meta = MetaOptimizer(initial_params(cfg), cfg, total_steps=cfg.steps)
        self.best_val: float | None = None
        self.elapsed_before = 0.0
        self.step = 0
        if ckpt is not None:
            check_compatible(ckpt, cfg, self.data.images.data_version)
            self.meta.load_state_dict(ckpt.state["meta"])
            if not cfg.minutes:  # as the Trainer: an explicit step count may extend a resumed run
                self.meta.total_steps = cfg.steps
            self.step = ckpt.step
            self.best_val = ckpt.state.get("best_val")
            self.elapsed_before = float(ckpt.state.get("elapsed", 0.0))
            torch.set_rng_state(ckpt.state["torch_rng"])
            ps_state = ckpt.state.get("ps", {})
            self.counters.update(ps_state.get("counters", {}))
            self._seen_dispatch = set(ps_state.get("seen_dispatch", []))
            self.next_dispatch = int(ps_state.get("next_dispatch", self.step))
            self.resumed_from = str(ckpt.path)
        else:
            (self.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.start = self.step
        self.last_ckpt: str | None = str(ckpt.path) if ckpt else None
        self.history = read_history(self.out_dir, upto=self.start)
        if self.log_tensorboard:
            self.writer = _tensorboard(self.out_dir)
        if self.start == 0 and self.val_specs is not None:
            self._validate(0)

    # --- queries -----------------------------------------------------------------------------
    def status(self) -> ServerStatus:
        """Step, incarnation, resume origin, skipped corrupt checkpoints, counters, open error."""
        return ServerStatus(
            step=self.step if self.error is None else 0,
            total_steps=self.meta.total_steps if self.error is None else self.config.steps,
            incarnation=self.incarnation,
            mode=self.mode,
            pid=os.getpid(),
            node_id=ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
            resumed_from=self.resumed_from,
            fallbacks=list(self.fallbacks),
            error=self.error,
            error_kind=self.error_kind,
            elapsed=self.elapsed() if self.error is None else 0.0,
            next_dispatch=self.next_dispatch,
            counters=dict(self.counters),
        )

    def pid(self) -> int:
        """This server's process id (for operators, and for tests that kill it)."""
        return os.getpid()

    def elapsed(self) -> float:
        """Training seconds of the run so far, across resumes."""
        return self.elapsed_before + time.perf_counter() - self.t_open

    @ray.method(num_returns=2)
    def snapshot(self) -> tuple[Snapshot, np.ndarray]:
        """The current parameters: a small header and ONE flat float32 array.

        Called once per step; Ray stores the array once in the object store and every worker
        reads that one copy.
        """
        self._check_open()
        header = Snapshot(self.step, self.step, self.incarnation, self.meta.total_steps)
        return header, self.meta.flat().numpy()

    def set_total_steps(self, total: int) -> int:
        """Change the run length (a time budget measured by the driver); returns it."""
        self._check_open()
        self.meta.total_steps = max(int(total), self.step + 1)
        return self.meta.total_steps

    # --- updates -----------------------------------------------------------------------------
    def push(self, header: UpdateHeader, update: np.ndarray) -> Ack:
        """Take one tagged contribution (`update` is its summed flat meta-gradient).

        sync: kept until the step's meta-batch is complete, then applied (status "applied";
        "pending" before). async: applied at once unless stale. A tag seen before answers
        "duplicate" and changes nothing; an update computed for another incarnation of this
        server answers "orphaned".
        """
        self._check_open()
        start = time.perf_counter()
        if header.incarnation != self.incarnation:
            self.counters["orphaned"] += 1
            return self._ack("orphaned", start)
        self.next_dispatch = max(self.next_dispatch, header.step + 1)
        if self.mode == "sync":
            return self._push_sync(header, update, start)
        return self._push_async(header, update, start)

    def _push_sync(self, header: UpdateHeader, update: np.ndarray, start: float) -> Ack:
        if header.step < self.step or header.task_ids in self._pending:
            self.counters["duplicates"] += 1
            return self._ack("duplicate", start)
        if header.step > self.step:
            raise ValueError(
                f"update for step {header.step} arrived while the server is at step {self.step}"
            )
        positions = self._positions()
        received = {t for ids in self._pending for t in ids}
        unknown = [t for t in header.task_ids if t not in positions or t in received]
        if unknown:
            raise ValueError(
                f"update for step {header.step} has tasks {unknown[:5]} that are not in the step's "
                "meta-batch or overlap another update: shards must partition the meta-batch"
            )
        # Copy out of the (read-only, shared) object store; sum in float64 once complete.
        self._pending[header.task_ids] = (header, np.array(update, dtype=np.float64))
        if len(received) + header.num_tasks < len(positions):
            return self._ack("pending", start)
        # Sum in task order, so the result never depends on which worker answered first.
        parts = sorted(self._pending.values(), key=lambda hu: positions[hu[0].task_ids[0]])
        total = np.zeros_like(parts[0][1])
        sums: dict[str, float] = {}
        for part_header, part in parts:
            total += part
            for key, value in part_header.metric_sums.items():
                sums[key] = sums.get(key, 0.0) + value
        self._pending.clear()
        self._expected = None
        return self._apply(total, len(positions), sums, start)

    def _push_async(self, header: UpdateHeader, update: np.ndarray, start: float) -> Ack:
        if header.step in self._seen_dispatch:
            self.counters["duplicates"] += 1
            return self._ack("duplicate", start)
        self._seen_dispatch.add(header.step)
        if self.step - header.version > self.staleness:
            self.counters["dropped_stale"] += 1
            return self._ack("stale", start)
        return self._apply(
            np.asarray(update, dtype=np.float64), header.num_tasks, dict(header.metric_sums), start
        )

    def _positions(self) -> dict[int, int]:
        """Task id -> position in the current step's meta-batch (the specs are a pure function)."""
        if self._expected is None or self._expected[0] != self.step:
            ids = self.data.specs_for_step(self.step).task_ids
            self._expected = (self.step, {int(t): i for i, t in enumerate(ids)})
        return self._expected[1]

    def _apply(
        self, total: np.ndarray, num_tasks: int, sums: dict[str, float], start: float
    ) -> Ack:
        """One meta-update on the mean of `total` over `num_tasks`, then log, validate, checkpoint."""
        summed = flat_to_params(total.astype(np.float32), self.template)
        step = self.step
        self.meta.apply(summed, num_tasks, step)
        self.step = step + 1
        self.counters["applied"] += 1
        self.metrics = mean_metrics(sums, num_tasks)
        self.metrics["meta_lr"] = self.meta.learning_rate(step)
        self._log(self.step, self.metrics)
        server_s = time.perf_counter() - start
        # Validation and checkpoints at the Trainer's cadence.
        cfg = self.config
        val = ckpt = None
        is_val = self.val_specs is not None and self.step % cfg.val_every == 0
        if is_val:
            val = self._validate(self.step)
        if self.step % cfg.checkpoint_every == 0 or is_val:
            ckpt = self._save()
        return Ack(
            "applied",
            self.step,
            self.incarnation,
            metrics=dict(self.metrics),
            val_accuracy=val,
            checkpoint=ckpt,
            server_s=server_s,
            bookkeeping_s=time.perf_counter() - start - server_s,
            elapsed=self.elapsed(),
        )

    def _ack(self, status: str, start: float) -> Ack:
        return Ack(
            status,
            self.step,
            self.incarnation,
            server_s=time.perf_counter() - start,
            elapsed=self.elapsed(),
        )

    # --- bookkeeping (the Trainer's, step for step) -------------------------------------------
    def finish(self, validate: bool = True) -> dict[str, Any]:
        """End the run as the Trainer does: final validation (unless not `validate`: a run
        stopped by a signal) and checkpoint; where things are."""
        self._check_open()
        if self.step > self.start or self.last_ckpt is None:
            if validate and self.val_specs is not None and self.step % self.config.val_every != 0:
                self._validate(self.step, log=False)
            self._save()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        best = self.checkpoints.best()
        return {
            "step": self.step,
            "total_steps": self.meta.total_steps,
            "best_val": self.best_val,
            "best_checkpoint": str(best.path) if best else self.last_ckpt,
            "latest_checkpoint": self.last_ckpt,
            "history": self.history,
            "elapsed": self.elapsed(),
            "counters": dict(self.counters),
        }

    def _validate(self, step: int, log: bool = True) -> float:
        acc = evaluate_params(
            self.learner, self.meta.params, self.data.images, self.val_specs,
            bn_mode=self.config.bn_mode,  # one view, as the Trainer's validation
        )
        record = {"step": step, "val_accuracy": acc.mean, "val_ci95": acc.ci95}
        self.history.append(record)
        append_metrics(self.out_dir, record)
        if self.writer is not None and log:
            self.writer.add_scalar("val/accuracy", acc.mean, step)
        self._new_best = self.best_val is None or acc.mean > self.best_val
        if self._new_best:
            self.best_val = acc.mean
        return acc.mean

    def _save(self) -> str:
        state = checkpoint_state(self.meta, self.best_val, self.elapsed())
        state["ps"] = {
            "counters": dict(self.counters),
            "seen_dispatch": sorted(self._seen_dispatch),
            "next_dispatch": self.next_dispatch,
            "mode": self.mode,
        }
        manifest = checkpoint_manifest(
            self.data, self.step, {**self.metrics, "best_val": self.best_val}
        )
        manifest["total_steps"] = self.meta.total_steps
        manifest["distributed"] = {**self.run_info, "mode": self.mode, "staleness": self.staleness}
        best, self._new_best = self._new_best, False
        self.last_ckpt = str(self.checkpoints.save(self.step, state, manifest, best=best))
        return self.last_ckpt

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, step)
        if step % 10 == 0 or step == 1:
            record = {"step": step, **metrics}
            self.history.append(record)
            append_metrics(self.out_dir, record)

    def _check_open(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"parameter server could not open the run: {self.error}")


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional at runtime; metrics.jsonl always exists
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


RemoteParameterServer = ray.remote(ParameterServer)
"""The actor class; create it with `.options(**server_options(plan, node_id)).remote(...)`."""
