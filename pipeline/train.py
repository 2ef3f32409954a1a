"""The single-process meta-trainer: sample episodes, take meta-gradients, step, validate, checkpoint.

The per-step pieces (`step_seed`, `MetaOptimizer`, `TrainingData.episodes_for_step`) are shared
with the Ray parameter server, so a distributed run takes exactly the same steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_write_bytes, disk_full, is_disk_full
from .checkpoint import Checkpoint, CheckpointDir
from .config import TrainConfig, migrate_config
from .episodes import Episodes
from .errors import CheckpointError, ConfigError
from .evaluation import Accuracy, evaluate_episodes
from .images import ImageSet
from .kernels import cpu_kernels, kernel_backend
from .learners import Learner, make_learner, registry
from .models import flatten_params, resolve_device, resolve_precision, unflatten_params
from .tasks import (
    DomainSplit,
    EpisodeSampler,
    EpisodeSpecs,
    affine_augment,
    materialize,
    split_domains,
)

Params = dict[str, torch.Tensor]


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 32-bit seed for (run seed, step, stream), independent of any global RNG state."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0])


# --- data -----------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """Decoded images, the domain split and the samplers of one run."""

    images: ImageSet
    split: DomainSplit
    train_sampler: EpisodeSampler
    config: TrainConfig

    @classmethod
    def build(cls, images: ImageSet, config: TrainConfig, split: DomainSplit | None = None) -> TrainingData:
        """Split domains (train/val/test) and make the training sampler."""
        if split is None:
            split = split_domains(
                list(config.domains or images.domains),
                val=config.val_domains,
                test=config.test_domains,
                seed=config.split_seed,
            )
        sampler = EpisodeSampler(
            images,
            ways=config.ways,
            shots=config.shots,
            queries=config.queries,
            domains=split.train,
            mode=config.sampling,
            rotations=config.rotations,
        )
        return cls(images, split, sampler, config)

    def specs_for_step(self, step: int) -> EpisodeSpecs:
        """The meta-batch of episode specs for `step`: a pure function of (seed, step)."""
        return self.train_sampler.sample(self.config.meta_batch, seed=step_seed(self.config.seed, step))

    def episodes(self, specs: EpisodeSpecs, step: int, device: torch.device | str = "cpu") -> Episodes:
        """Materialise specs (any shard of a step's specs) with the step's augmentation."""
        episodes = materialize(self.images, specs, device=device)
        cfg = self.config
        if any(augment_ranges(cfg).values()):
            # Seeded by step and task id so a shard augments its tasks exactly as the whole batch would.
            episodes = _augment(episodes, specs.task_ids, step, cfg)
        return episodes



def eval_specs(images: ImageSet, domains: tuple[str, ...], *, ways: int, shots: int, queries: int,
               episodes: int, seed: int, mode: str) -> EpisodeSpecs:
    """Fixed evaluation episodes on `domains` (no rotations: real characters only)."""
    sampler = EpisodeSampler(
        images, ways=ways, shots=shots, queries=queries, domains=domains, mode=mode, rotations=False
    )
    return sampler.sample(episodes, seed=seed)


def _augment(episodes: Episodes, task_ids: np.ndarray, step: int, cfg: TrainConfig) -> Episodes:
    support, query = [], []
    for i, task_id in enumerate(task_ids.tolist()):
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, 1 + int(task_id) % (2**31)))
        kw = dict(**augment_ranges(cfg), generator=gen)
        support.append(affine_augment(episodes.support_x[i], **kw))
        query.append(affine_augment(episodes.query_x[i], **kw))
    return dataclasses.replace(episodes, support_x=torch.stack(support), query_x=torch.stack(query))


# --- model and meta-optimiser ----------------------------------------------------------------


def learner_class(config: TrainConfig) -> type[Learner]:
    """The registered class of the config's learner."""
    return registry.learner_class(config.learner)


def build_model(config: TrainConfig) -> torch.nn.Module:
    """The learner's network for the config (conv4: an embedding for a learner without a
    head, a `ways`-way head otherwise)."""
    return learner_class(config).build_model(config)


def build_learner(config: TrainConfig, device: torch.device | str | None = None) -> Learner:
    """The learner named by the config, with its own settings (`config.learner_config`), its
    network and its precision (auto resolved for `device`, where its episodes will live;
    default: the config's `device` setting).

    On CPU it also builds (first use on a machine) or loads the fused kernels now, so that the
    build never lands inside a timed step (time budgets calibrate on the first steps). They are
    never loaded for another device."""
    device = resolve_device(config.device) if device is None else torch.device(device)
    if kernel_backend(device) == "cpu_fused":
        cpu_kernels()
    return make_learner(
        config.learner,
        config.learner_config,
        model=build_model(config),
        precision=resolve_precision(config.precision, device),
    )


def initial_params(config: TrainConfig) -> Params:
    """Freshly initialised meta-parameters, a pure function of the seed (the learner's)."""
    return learner_class(config).initial_params(config)


def param_template(config: TrainConfig) -> Params:
    """Names and shapes of the meta-parameters, on the meta device (the learner's)."""
    return learner_class(config).param_template(config)


class MetaOptimizer:
    """Owns the meta-parameters and the outer optimiser; applies summed meta-gradients."""

    def __init__(self, params: Params, config: TrainConfig, total_steps: int):
        self.config = config
        self.total_steps = total_steps
        self.params = {k: v.detach().clone().requires_grad_(False) for k, v in params.items()}
        self.learner_class = learner_class(config)
        opt = self.learner_class.outer_optimizer(config.learner_config, config.meta_optimizer)
        tensors = list(self.params.values())
        self.optimizer = (
            torch.optim.Adam(tensors, lr=config.meta_lr) if opt == "adam"
            else torch.optim.SGD(tensors, lr=config.meta_lr)
        )

    def learning_rate(self, step: int) -> float:
        """The outer step size at `step`: the learner's own (Reptile's linear anneal), or the
        configured schedule."""
        cfg = self.config
        own = self.learner_class.meta_step_size(cfg.learner_config, step, self.total_steps)
        if own is not None:
            return own
        frac = min(step / max(self.total_steps, 1), 1.0)
        if cfg.lr_schedule == "cosine":
            return cfg.meta_lr * 0.5 * (1 + math.cos(math.pi * frac))
        return cfg.meta_lr

    def apply(self, summed: Params, num_tasks: int, step: int) -> None:
        """Step on the mean contribution over `num_tasks` tasks."""
        if num_tasks <= 0:
            raise ValueError("apply() needs at least one task's contribution")
        for name, p in self.params.items():
            p.grad = summed[name].to(p.device, p.dtype) / num_tasks
        lr = self.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def flat(self) -> torch.Tensor:
        return flatten_params(self.params)

    def load_flat(self, flat: torch.Tensor) -> None:
        for name, value in unflatten_params(flat, self.params).items():
            self.params[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {k: v.clone() for k, v in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state["params"].items():
            self.params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.total_steps = int(state["total_steps"])


# --- evaluation during training ---------------------------------------------------------------


def augment_ranges(cfg: TrainConfig) -> dict[str, float]:
    """The config's affine augmentation limits, as `affine_augment` keyword arguments."""
    return dict(max_rotate_deg=cfg.augment_rotate_deg, max_translate=cfg.augment_translate,
                max_scale=cfg.augment_scale, max_shear=cfg.augment_shear)


def predict_views(learner, params: Params, episodes: Episodes, *, bn_mode: str, views: int = 1,
                  augment: dict[str, float] | None = None, seed: int = 0,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Query log-probabilities [T, ways*queries, ways] averaged over `views` views of the episodes.

    View 0 is the episodes as given; views 1.. apply an independent random affine transform
    (limits `augment`) to every support and query image, seeded by (`seed`, view). Each view
    is adapted to and predicted on its own (BatchNorm sees one view's query set at a time),
    so with `views=1` this is `learner.adapt_and_predict` up to a log-softmax.

    `device`: where the learner computes (default: where `episodes` are); the views are drawn
    where the episodes are, and the result comes back there.
    """
    if views > 1 and not any((augment or {}).values()):
        raise ConfigError("eval_views > 1 needs augmentation limits (augment_rotate_deg, "
                          "augment_translate, augment_scale or augment_shear) to draw views from")
    total = None
    for view in range(views):
        ep = episodes
        if view:
            gen = torch.Generator().manual_seed(step_seed(seed, view, 2))
            ep = dataclasses.replace(
                episodes,
                support_x=affine_augment(episodes.support_x, generator=gen, **augment),  # type: ignore[arg-type]
                query_x=affine_augment(episodes.query_x, generator=gen, **augment),  # type: ignore[arg-type]
            )
        home = ep.support_x.device
        if device is not None and torch.device(device) != home:
            params = on_device(params, device)
            ep = ep.to(device)
        logits = learner.adapt_and_predict(params, ep, bn_mode=bn_mode).to(home)
        logp = torch.log_softmax(logits, -1)
        total = logp if total is None else total + logp
    assert total is not None
    return total / views


def on_device(params: Params, device: torch.device | str) -> Params:
    """`params` on `device` (the same tensors where they already are)."""
    return {k: v.to(device) for k, v in params.items()}


def evaluate_params(learner, params: Params, images: ImageSet, specs: EpisodeSpecs, *,
                    bn_mode: str, batch_size: int = 16, views: int = 1,
                    augment: dict[str, float] | None = None,
                    device: torch.device | str | None = None) -> Accuracy:
    """Accuracy of `params` on fixed episodes, fine-tuning per the learner (and averaging
    `views` augmented views of each episode, see `predict_views`)."""

    head = params.get("head.bias")
    if head is not None and specs.ways > head.numel():
        raise ConfigError(
            f"a {head.numel()}-way head cannot score {specs.ways}-way episodes; evaluate with "
            f"--ways {head.numel()} or fewer, or train with ways={specs.ways}"
        )

    if device is not None:
        params = on_device(params, device)  # once, not per batch
    predict = episode_predictor(learner, params, bn_mode=bn_mode, views=views, augment=augment,
                                device=device)
    return evaluate_episodes(predict, images, specs, batch_size=batch_size, bn_mode=bn_mode)


def episode_predictor(learner, params: Params, *, bn_mode: str, views: int = 1,
                      augment: dict[str, float] | None = None,
                      device: torch.device | str | None = None) -> Callable[[Episodes], torch.Tensor]:
    """`predict(episodes)` for `evaluate_episodes`: `predict_views` log-probabilities over the
    episodes' classes, each call (batch of episodes) drawing its own views.

    A head wider than the episode (20-way head, 5-way episode) fine-tunes with the spare
    outputs pushed down by the loss; only the episode's classes can be predicted.
    """
    batch_seeds = iter(range(1 << 62))

    def predict(episodes: Episodes) -> torch.Tensor:
        logits = predict_views(learner, params, episodes, bn_mode=bn_mode, views=views,
                               augment=augment, seed=next(batch_seeds), device=device)
        return logits[..., : episodes.ways]

    return predict


# --- the loop ----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """Where a run ended and what it scored."""

    out_dir: Path
    step: int
    total_steps: int
    best_val: float | None
    best_checkpoint: Path | None
    latest_checkpoint: Path | None
    seconds: float
    tasks_per_second: float
    history: list[dict[str, Any]] = field(default_factory=list)
    interrupted: str | None = None
    """The signal (SIGINT, SIGTERM) that stopped the run early, if one did."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "step": self.step,
            "total_steps": self.total_steps,
            "best_val": self.best_val,
            "best_checkpoint": str(self.best_checkpoint) if self.best_checkpoint else None,
            "latest_checkpoint": str(self.latest_checkpoint) if self.latest_checkpoint else None,
            "seconds": round(self.seconds, 2),
            "tasks_per_second": round(self.tasks_per_second, 2),
            "interrupted": self.interrupted,
        }


ProgressFn = Callable[[int, int, dict[str, float]], None]


class Stoppable:
    """A training loop that can be asked, from a signal handler, to stop after the step in
    flight and checkpoint there (`stop_on_signals`): the Trainer and the Ray driver alike."""

    stop_reason: str | None = None
    """Why to stop after the step in flight (the signal's name), or None."""

    def request_stop(self, reason: str = "stop requested") -> None:
        """Stop after the step in flight and checkpoint there (safe from a signal handler)."""
        self.stop_reason = reason

    @property
    def stop_requested(self) -> bool:
        return self.stop_reason is not None


class Trainer(Stoppable):
    """Runs a meta-training loop in this process, resumable from its checkpoints."""

    def __init__(self, config: TrainConfig, images: ImageSet, out_dir: str | Path, *,
                 split: DomainSplit | None = None, init_params: Params | None = None,
                 progress: ProgressFn | None = None, log_tensorboard: bool = True):
        self.config = config
        self.out_dir = Path(out_dir)
        self.data = TrainingData.build(images, config, split)
        self.device = resolve_device(config.device)
        self.learner = build_learner(config, self.device)
        self.checkpoints = CheckpointDir(self.out_dir / "checkpoints", keep_last=config.keep_last)
        self.progress = progress
        self.log_tensorboard = log_tensorboard
        self.init_params = init_params
        self.val_specs = validation_specs(self.data)
        self._new_best = False  # the last validation beat the best so far: save as best
        self._val_seconds = 0.0  # the last validation's duration, for the budget's step count

    # Checkpoint payload and manifest.
    def _manifest(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return checkpoint_manifest(self.data, step, metrics)

    def _clock(self) -> float:
        """Seconds on the budget's clock: wall time, or this process's CPU time per torch thread."""
        if self.config.budget_clock == "cpu":
            return time.process_time() / torch.get_num_threads()
        return time.perf_counter()

    def run(self, *, resume: bool = False) -> TrainResult:
        """Train to the configured steps or time budget; with `resume`, continue the latest checkpoint.

        A fresh run refuses a folder that holds another run's checkpoints (they would mix)."""
        cfg = self.config
        if not resume:
            refuse_existing_run(self.out_dir, self.checkpoints)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        start = 0
        best_val: float | None = None
        elapsed_before = 0.0
        ckpt = self.checkpoints.latest() if resume else None
        if resume and ckpt is None and self.checkpoints.steps():
            raise CheckpointError(f"no readable checkpoint in {self.checkpoints.root}; cannot resume")
        if ckpt is not None:
            self._check_compatible(ckpt)
            meta = MetaOptimizer(initial_params(cfg), cfg, total_steps=cfg.steps)
            meta.load_state_dict(ckpt.state["meta"])
            if not cfg.minutes:  # an explicit step count may extend (or shorten) a resumed run
                meta.total_steps = cfg.steps
            start = ckpt.step
            best_val = ckpt.state.get("best_val")
            elapsed_before = float(ckpt.state.get("elapsed", 0.0))
            torch.set_rng_state(ckpt.state["torch_rng"])
        else:
            params = self.init_params if self.init_params is not None else initial_params(cfg)
            meta = MetaOptimizer(params, cfg, total_steps=cfg.steps)
            atomic_write_bytes(self.out_dir / "config.json",
                               (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
        history = self._read_history(upto=start)
        writer = self._tensorboard()
        t0 = self._clock()
        train_seconds = 0.0
        tasks_done = 0
        metrics: dict[str, float] = {}
        last_ckpt: Path | None = ckpt.path if ckpt else None
        saved_step = start if ckpt else None
        budget = cfg.minutes * 60.0
        budget_fixed = not budget or ckpt is not None
        step = start
        try:
            if start == 0 and self.val_specs is not None:
                # The untrained score is logged for the learning curve but is no "best": the best
                # checkpoint is always one that was saved.
                self._validate(meta, 0, history, writer, None)
                self._new_best = False
            while step < meta.total_steps:
                # A stop request (Ctrl-C) lets the step in flight finish, then ends here.
                if self.stop_requested:
                    break
                if budget and elapsed_before + self._clock() - t0 > budget:
                    break
                ts = self._clock()
                specs = self.data.specs_for_step(step)
                episodes = self.data.episodes(specs, step, device=self.device)
                # the meta-parameters stay on the CPU (checkpoints, the optimiser); on CPU this
                # is the same tensors, elsewhere one small copy per step each way
                summed, sums = self.learner.meta_gradient(on_device(meta.params, self.device),
                                                          episodes)
                meta.apply(summed, specs.num_tasks, step)
                step += 1
                train_seconds += self._clock() - ts
                tasks_done += specs.num_tasks
                metrics = mean_metrics(sums, specs.num_tasks)
                metrics["meta_lr"] = meta.learning_rate(step - 1)
                elapsed = elapsed_before + self._clock() - t0
                # Fix the schedule's length once the step time is known: after 20 steps, or
                # sooner when a tenth of the budget is gone.
                if not budget_fixed and (step - start == 20 or elapsed > 0.1 * budget):
                    meta.total_steps = self._steps_for_budget(step, elapsed, train_seconds / (step - start))
                    budget_fixed = True
                self._log(writer, history, step, metrics)
                if self.progress:
                    self.progress(step, meta.total_steps, metrics)
                is_val = self.val_specs is not None and step % cfg.val_every == 0
                if is_val:
                    best_val = self._validate(meta, step, history, writer, best_val)
                if step % cfg.checkpoint_every == 0 or is_val:
                    last_ckpt = self._save(meta, step, metrics, best_val,
                                           elapsed_before + self._clock() - t0)
                    saved_step = step
        finally:
            if writer is not None:
                writer.close()
        if self.stop_requested:
            # Interrupted: checkpoint the last finished step as it is; no final validation, the
            # user is waiting (and validation never changes the training path).
            if saved_step != step:
                last_ckpt = self._save(meta, step, metrics, best_val, elapsed_before + self._clock() - t0)
        elif step > start or last_ckpt is None:
            validated = self.val_specs is not None and step % cfg.val_every != 0
            if validated:
                best_val = self._validate(meta, step, history, None, best_val)
            if validated or saved_step != step:  # else the loop has just saved this very state
                last_ckpt = self._save(meta, step, metrics, best_val,
                                       elapsed_before + self._clock() - t0)
        best = self.checkpoints.best()
        return TrainResult(
            out_dir=self.out_dir,
            step=step,
            total_steps=meta.total_steps,
            best_val=best_val,
            best_checkpoint=best.path if best else last_ckpt,
            latest_checkpoint=last_ckpt,
            seconds=self._clock() - t0,
            tasks_per_second=tasks_done / train_seconds if train_seconds else 0.0,
            history=history,
            interrupted=self.stop_reason,
        )

    # --- pieces of the loop ---
    def _steps_for_budget(self, step: int, elapsed: float, sec_per_step: float) -> int:
        """Total steps that fit the time budget, counting validation time per step."""
        cfg = self.config
        val_cost = self._val_seconds / cfg.val_every
        remaining = cfg.minutes * 60.0 - elapsed
        return max(step + 1, step + int(remaining / (sec_per_step + val_cost)))

    def _validate(self, meta: MetaOptimizer, step: int, history: list[dict[str, Any]], writer,
                  best_val: float | None) -> float | None:
        t = self._clock()
        # one view: validation only ranks checkpoints, and test-time views would multiply its cost
        acc = evaluate_params(self.learner, meta.params, self.data.images, self.val_specs,
                              bn_mode=self.config.bn_mode, device=self.device)
        self._val_seconds = self._clock() - t
        record = {"step": step, "val_accuracy": acc.mean, "val_ci95": acc.ci95}
        history.append(record)
        self._append_jsonl(record)
        if writer is not None:
            writer.add_scalar("val/accuracy", acc.mean, step)
        if best_val is None or acc.mean > best_val:
            self._new_best = True
            return acc.mean
        self._new_best = False
        return best_val

    def _save(self, meta: MetaOptimizer, step: int, metrics: dict[str, float],
              best_val: float | None, elapsed: float) -> Path:
        state = checkpoint_state(meta, best_val, elapsed)
        manifest = self._manifest(step, {**metrics, "best_val": best_val})
        manifest["total_steps"] = meta.total_steps
        is_best, self._new_best = self._new_best, False
        return self.checkpoints.save(step, state, manifest, best=is_best)

    def _check_compatible(self, ckpt: Checkpoint) -> None:
        check_compatible(ckpt, self.config, self.data.images.data_version)

    def _tensorboard(self):
        if not self.log_tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional at runtime; metrics.jsonl always exists
            return None
        return SummaryWriter(str(self.out_dir / "tensorboard"))

    def _log(self, writer, history: list[dict[str, Any]], step: int, metrics: dict[str, float]) -> None:
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(f"train/{key}", value, step)
        if step % 10 == 0 or step == 1:
            record = {"step": step, **metrics}
            history.append(record)
            self._append_jsonl(record)

    def _append_jsonl(self, record: dict[str, Any]) -> None:
        append_metrics(self.out_dir, record)

    def _read_history(self, upto: int) -> list[dict[str, Any]]:
        return read_history(self.out_dir, upto)


# --- run bookkeeping shared with the Ray parameter server (workers/server.py) -----------------


def validation_specs(data: TrainingData) -> EpisodeSpecs | None:
    """The fixed validation episodes of a run (None without validation domains)."""
    cfg = data.config
    if not data.split.val:
        return None
    return eval_specs(
        data.images, data.split.val, ways=cfg.val_ways, shots=cfg.val_shots, queries=5,
        episodes=cfg.val_episodes, seed=step_seed(cfg.seed, 0, 7), mode=cfg.val_sampling,
    )


def checkpoint_manifest(data: TrainingData, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a checkpoint: config, learner, data version, split, metrics and step."""
    return {
        "config": data.config.to_dict(),
        "learner": data.config.learner,
        "data_version": data.images.data_version,
        "split": data.split.to_dict(),
        "metrics": metrics,
        "step": step,
    }


def checkpoint_state(meta: MetaOptimizer, best_val: float | None, elapsed: float) -> dict[str, Any]:
    """The payload of a checkpoint: meta-parameters and optimiser state, best score, time, RNG."""
    return {
        "meta": meta.state_dict(),
        "best_val": best_val,
        "elapsed": elapsed,
        "torch_rng": torch.get_rng_state(),
    }


RESUME_IGNORES = frozenset({"steps", "minutes", "budget_clock", "val_every", "checkpoint_every",
                            "keep_last", "num_threads", "device"})
"""Config fields a resumed run may change (budgets, bookkeeping, where it runs)."""


def check_compatible(ckpt: Checkpoint, config: TrainConfig, data_version: str) -> None:
    """Raise ConfigError unless `ckpt` was trained with this config (bar budgets) and data.

    A checkpoint of the flat config layout (before nested learner configs) is migrated first."""
    saved = migrate_config(ckpt.manifest.get("config", {}))
    theirs = saved.get("learner", ckpt.manifest.get("learner"))
    if theirs is not None and theirs != config.learner:
        raise ConfigError(
            f"cannot resume from {ckpt.path}: it was trained with learner {theirs!r}, this run's "
            f"learner is {config.learner!r}; resume with --learner {theirs}, or train into a new "
            "--out directory"
        )
    mine = config.to_dict()
    default = TrainConfig(learner=config.learner).to_dict()  # a field added since: its default
    diff = sorted(k for k in mine if k not in RESUME_IGNORES and k != "learner_config"
                  and saved.get(k, default[k]) != mine[k])
    their_own = saved.get("learner_config") or {}
    diff += sorted(f"learner.{k}" for k, v in mine["learner_config"].items()
                   if their_own.get(k, default["learner_config"][k]) != v)
    if diff:
        raise ConfigError(
            f"cannot resume from {ckpt.path}: config fields {diff} differ from the checkpoint's; "
            "resume with the same config, or train into a new --out directory"
        )
    if ckpt.manifest.get("data_version") != data_version:
        raise ConfigError(
            f"cannot resume from {ckpt.path}: it was trained on data version "
            f"{ckpt.manifest.get('data_version')}, the store now holds {data_version}"
        )


def refuse_existing_run(out_dir: Path, checkpoints: CheckpointDir) -> None:
    """Raise CheckpointError when `checkpoints` holds a run: a fresh run there would mix with it
    (overwrite its steps, cut its metrics, replace a better best). Shared with workers/driver.py."""
    if not checkpoints.holds_checkpoints():
        return
    steps = checkpoints.steps()
    held = f"checkpoints up to step {steps[-1]}" if steps else "a best checkpoint"
    raise CheckpointError(
        f"{out_dir} already holds a run ({held}); pass --resume to continue it, a new --out "
        "directory to start another, or --overwrite to clear it first"
    )


RUN_FILES = ("checkpoints", "metrics.jsonl", "config.json", "tensorboard", "result.json")
"""What a run writes into its folder; `clear_run` removes these and nothing else."""


def clear_run(out_dir: str | Path) -> list[str]:
    """Remove a run's files from `out_dir` (`anole train --overwrite`); returns what was removed.

    Checkpoints go first, so an interrupted clear leaves no run that `--resume` would continue.
    Other files in the folder are not anole's and stay."""
    removed = []
    for name in RUN_FILES:
        path = Path(out_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


@contextmanager
def stop_on_signals(trainer: Stoppable, notify: Callable[[str], None] | None = None) -> Iterator[None]:
    """While inside: the first SIGINT or SIGTERM asks `trainer` to stop after the step in flight
    (it then writes a checkpoint there) and calls `notify(signal name)`; a second raises
    KeyboardInterrupt at once. The previous handlers are restored on exit.

    For the CLI: a library caller (a flow) keeps its own handling unless it opts in. Outside
    the main thread, where Python cannot set handlers, this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if trainer.stop_requested:
            raise KeyboardInterrupt(name)
        trainer.request_stop(name)
        if notify is not None:
            notify(name)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig in previous:
            signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def append_metrics(out_dir: Path, record: dict[str, Any]) -> None:
    """Append one record to the run's metrics.jsonl (a torn append is dropped on resume)."""
    path = Path(out_dir) / "metrics.jsonl"
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise (disk_full(path) if is_disk_full(exc) else exc) from None


def read_history(out_dir: Path, upto: int) -> list[dict[str, Any]]:
    """Metrics logged up to step `upto`, and metrics.jsonl rewritten (atomically) to just those:
    later lines (from a run that crashed) are dropped, and so is a torn last line (a crash
    mid-append), with a warning."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    if upto == 0:  # a fresh start: nothing to keep, whatever the file holds
        atomic_write_bytes(path, b"")
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, TypeError, KeyError):
            if number < len(lines):
                raise CheckpointError(
                    f"{path} line {number} is not a metrics record: {line[:60]!r}; delete that "
                    "line (or the file, losing the run's logged metrics) and resume again"
                ) from None
            warnings.warn(f"{path}: dropped a torn last line (a crash mid-write): {line[:60]!r}",
                          stacklevel=2)
            continue
        if step <= upto:
            records.append(record)
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())
    return records


def mean_metrics(sums: dict[str, float], num_tasks: int) -> dict[str, float]:
    """Per-task means of a learner's metric sums (the "tasks" count itself dropped)."""
    return {k: float(v) / num_tasks for k, v in sums.items() if k != "tasks"}

