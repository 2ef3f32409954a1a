"""Score trained checkpoints and baselines: held-out alphabets and Lake's one-shot runs."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint, CheckpointDir, load_checkpoint
from .config import TrainConfig
from .episodes import Episodes
from .errors import AnoleError, CheckpointError, ConfigError
from .evaluation import Accuracy
from .oneshot import OneShotRun, RunScores, mhd_classify, pixel_nn_classify, read_run, score_runs
from .tasks import DomainSplit

BASELINES = {"mhd": mhd_classify, "pixels": pixel_nn_classify}


@dataclass
class TrainedModel:
    """A checkpoint ready to predict: its config, learner, meta-parameters and domain split."""

    path: Path
    config: TrainConfig
    params: dict[str, torch.Tensor]
    split: DomainSplit
    data_version: str
    step: int

    @property
    def learner(self):
        """The learner, built for the config's device (`device`: auto, cpu or cuda)."""
        from .train import build_learner

        return build_learner(self.config)

    @property
    def learner_class(self):
        """The registered class of the checkpoint's learner."""
        from .train import learner_class

        return learner_class(self.config)

    @property
    def device(self) -> torch.device:
        from .models import resolve_device

        return resolve_device(self.config.device)

    @property
    def split_name(self) -> str:
        return "test" if self.split.test else "validation"


def load_model(path: str | Path) -> TrainedModel:
    """Load a verified checkpoint: a .pt, or a run (or checkpoints) folder: its best, else the
    newest intact step checkpoint (with a warning when the best is damaged)."""
    ckpt = _load_checkpoint(Path(path))
    manifest = ckpt.manifest
    where = ckpt.path.with_suffix(".json")
    missing = [k for k in ("config", "split") if not isinstance(manifest.get(k), dict)]
    if missing:
        raise CheckpointError(
            f"checkpoint manifest {where} has no {' or '.join(repr(k) for k in missing)}, so "
            "the model cannot be rebuilt; evaluate a checkpoint written by `anole train`"
        )
    meta = ckpt.state.get("meta")
    params = meta.get("params") if isinstance(meta, dict) else None
    if not isinstance(params, dict) or not all(isinstance(v, torch.Tensor) for v in params.values()):
        raise CheckpointError(
            f"checkpoint {ckpt.path} holds no meta-parameters (state['meta']['params']); "
            "evaluate a checkpoint written by `anole train`"
        )
    return TrainedModel(
        path=ckpt.path,
        config=TrainConfig.from_saved(manifest["config"], source=str(where)),
        params=params,
        split=DomainSplit.from_dict(manifest["split"]),
        data_version=manifest.get("data_version", ""),
        step=ckpt.step,
    )


def _load_checkpoint(path: Path) -> Checkpoint:
    if not path.is_dir():
        return load_checkpoint(path)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    ckpts = CheckpointDir(root)
    if not ckpts.holds_checkpoints():
        raise CheckpointError(
            f"{path} holds no checkpoint (no step-*.json or best.json in {root}); point at a run "
            "folder made by `anole train --out DIR`, or at one of its checkpoints/*.pt"
        )
    found = ckpts.best()  # warns why, when the best is damaged
    if found is None:
        found = ckpts.latest()
        if found is None:
            raise CheckpointError(
                f"no checkpoint in {root} verifies (each is corrupt or missing its payload); "
                "restore the folder from a backup or train again"
            )
        if ckpts.best_pointer.exists():
            warnings.warn(f"falling back to the newest intact step checkpoint {found.path}",
                          stacklevel=3)
    return found


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders from `paths`: each a runNN/ folder, or a folder holding runNN/ folders."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise AnoleError(f"--runs {p}: no such folder; point it at runNN/ or its parent")
        if (p / "class_labels.txt").exists():
            runs.append(p)
        else:
            found = sorted(c for c in p.iterdir() if (c / "class_labels.txt").exists())
            if not found:
                raise AnoleError(f"--runs {p}: holds neither class_labels.txt nor runNN/ folders")
            runs.extend(found)
    return runs


def score_baseline(run_dirs: Sequence[Path], name: str) -> RunScores:
    """Error of a non-learned baseline (mhd or pixels) on each run."""
    if name not in BASELINES:
        raise ConfigError(f"--baseline {name!r}: choose one of {', '.join(BASELINES)}")
    image_size = 28 if name == "pixels" else None
    return score_runs((read_run(d, image_size=image_size) for d in run_dirs), BASELINES[name])


def run_episode(run: OneShotRun) -> Episodes:
    """A one-shot run as one episode: each training image is a class, the test items are queries."""
    support = torch.from_numpy(run.train_images).float().div_(255.0)
    query = torch.from_numpy(run.test_images).float().div_(255.0)
    return Episodes(
        support_x=support[None],
        support_y=torch.arange(run.num_train)[None],
        query_x=query[None],
        query_y=torch.from_numpy(np.asarray(run.test_labels, dtype=np.int64))[None],
        ways=run.num_train,
        shots=1,
        queries=1,
    )


def score_oneshot(model: TrainedModel, run_dirs: Sequence[Path], *,
                  bn_mode: str | None = None) -> RunScores:
    """Error of the model on each one-shot run, fine-tuning on the run's 20 training images."""
    from .train import augment_ranges, predict_views

    cfg = model.config
    learner = model.learner
    mode = bn_mode or cfg.bn_mode

    def classify(run: OneShotRun) -> np.ndarray:
        logits = predict_views(learner, model.params, run_episode(run), bn_mode=mode,
                               views=cfg.eval_views, augment=augment_ranges(cfg),
                               device=model.device)
        return logits[0].argmax(-1).numpy()

    runs = (read_run(d, image_size=cfg.image_size) for d in run_dirs)
    return score_runs(runs, classify)


def score_heldout(model: TrainedModel, store, *, ways: int, shots: int, queries: int = 5,
                  episodes: int = 600, seed: int = 0, bn_mode: str | None = None,
                  mode: str | None = None) -> Accuracy:
    """N-way K-shot accuracy with a 95% CI on the domains the model never trained on."""
    from .train import augment_ranges, eval_specs, evaluate_params

    cfg = model.config
    domains = model.split.test or model.split.val
    if not domains:
        raise ConfigError(f"{model.path} was trained with no held-out domains (val_domains=test_domains=0)")
    images = store.load_images(list(domains), image_size=cfg.image_size, channels=cfg.channels,
                               invert=cfg.invert)
    specs = eval_specs(images, domains, ways=ways, shots=shots, queries=queries, episodes=episodes,
                       seed=seed, mode=mode or cfg.val_sampling)
    return evaluate_params(model.learner, model.params, images, specs, bn_mode=bn_mode or cfg.bn_mode,
                           views=cfg.eval_views, augment=augment_ranges(cfg), device=model.device)
