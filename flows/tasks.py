"""Prefect tasks of the anole pipeline: coarse steps that call `pipeline/` and `workers/`.

Tasks pass paths, versions and small dicts between each other, never tensors: every task loads
what it needs from the workspace (decoded images come from the store's .npz cache). Caches are
keyed on content hashes and settings strings, so a rerun on unchanged data does no work.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.filesystems import LocalFileSystem
from prefect.serializers import JSONSerializer

from pipeline.atomic import atomic_write_bytes, atomic_write_json
from pipeline.errors import AnoleError, ConfigError, IngestError, StoreError

from . import plots
from .champions import Champions, decide
from .workspace import PoolSettings, PromotionPolicy, Workspace, source_fingerprint, stable_hash

DOMAIN_ARRIVED = "anole.domain.arrived"
"""The event `ingest_domain` emits for every new domain or new domain version."""

ProgressFn = Callable[[int, int, dict[str, float]], None]
_progress_listener: ProgressFn | None = None


def set_progress_listener(fn: ProgressFn | None) -> None:
    """Also report meta-training progress to `fn(done, total, metrics)` (the CLI's progress bar).

    A module-level hook rather than a task parameter: callables do not belong in a task's inputs.
    """
    global _progress_listener
    _progress_listener = fn


def _retry_on_io(task, task_run, state) -> bool:
    """Retry only transient I/O failures; bad input (AnoleError) fails at once."""
    try:
        state.result()
    except AnoleError:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


# --------------------------------------------------------------------------- cached results

RESULT_SERIALIZER = "json"
"""How every task and flow persists its result: they are small JSON reports (paths, versions,
dicts), never pickles, which would run whatever code a planted cache file holds."""

_JSON_SERIALIZER = JSONSerializer().model_dump()


def cached_result_problem(data: bytes) -> str | None:
    """Why a persisted result record must not be read, or None if it is plain JSON.

    Prefect decodes a record with the serializer that the record itself names, whatever the
    task's own is: a planted record naming pickle, or JSON with another `jsonlib` or decoder, or
    a `__class__` for Prefect's decoder to import and build, would run code. Only Prefect's stock
    JSON serializer over plain JSON values passes.
    """
    try:
        record = json.loads(data)
    except ValueError:  # also a UnicodeDecodeError: a pickle, say
        return "it is not JSON"
    if not isinstance(record, dict) or set(record) != {"metadata", "result"}:
        return "it is not a Prefect result record"
    meta = record["metadata"]
    serializer = meta.get("serializer") if isinstance(meta, dict) else None
    if serializer != _JSON_SERIALIZER:
        return f"its serializer is {json.dumps(serializer)[:120]}, not plain JSON"
    if not isinstance(record["result"], str):
        return "its result is not JSON text"
    try:
        json.loads(record["result"], object_hook=_plain)
    except ValueError as exc:
        return f"its result is not plain JSON ({exc})"
    return None


def _plain(obj: dict[str, Any]) -> dict[str, Any]:
    if "__class__" in obj or "__exc_type__" in obj:  # Prefect's decoder would build these types
        raise ValueError("it names a Python type to build")
    return obj


def _vetted(context, key: str) -> str:
    """`key`, once no unsafe record sits under it; a task's cache-key function returns this.

    The cache key is computed before Prefect looks the record up, so an unsafe one is moved to
    `rejected/` beside the results, with a warning, and the task recomputes its result.
    """
    storage = context.result_store.result_storage
    if not isinstance(storage, LocalFileSystem):
        # Prefect then runs the task uncached (it logs this error), never reading the record.
        raise AnoleError(
            f"anole vets cached task results on local disk only, not in {type(storage).__name__}; "
            "unset PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK to keep the cache"
        )
    path = Path(storage.basepath or ".").expanduser() / key
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return key
    problem = cached_result_problem(data)
    if problem is not None:
        rejected = path.parent / "rejected" / path.name
        rejected.parent.mkdir(exist_ok=True)
        os.replace(path, rejected)
        get_run_logger().warning(
            f"ignored the cached result {path}: {problem}; moved it to {rejected} and "
            "computing the result again"
        )
    return key


# --------------------------------------------------------------------------- ingest


def _ingest_cache_key(context, p: dict[str, Any]) -> str:
    return _vetted(context, ingest_cache_key(p))


def ingest_cache_key(p: dict[str, Any]) -> str:
    """The name of an ingest's cached result, from the task's parameters `p`."""
    # The source's content, the store and the selection: the same bytes are never ingested twice.
    ws = Workspace(p["root"])
    key = {
        "store": str(ws.store_dir),
        "source": source_fingerprint(p["source"]),
        "domain": p.get("domain"),
        "skip_invalid": p.get("skip_invalid", False),
    }
    return f"anole-ingest-{stable_hash(key, 40)}"


def _ingest_run_name() -> str:
    from prefect.runtime import task_run

    p = task_run.parameters
    return f"ingest-{p.get('domain') or Path(p['source']).name}"


@task(
    name="ingest-domain",
    task_run_name=_ingest_run_name,
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=_retry_on_io,
    cache_key_fn=_ingest_cache_key,
    persist_result=True,
    result_serializer=RESULT_SERIALIZER,
)
def ingest_domain(
    source: str, root: str, domain: str | None = None, skip_invalid: bool = False
) -> dict[str, Any]:
    """Validate and ingest a folder or zip (or one domain of it); announce each new version."""
    from pipeline.ingest import check_domain_name

    logger = get_run_logger()
    path = Path(source).expanduser()
    if not path.exists():
        raise IngestError(f"source {path} does not exist; give a folder or a .zip")
    if path.is_file() and path.suffix.lower() != ".zip":
        raise IngestError(f"source {path} is a file but not a .zip; give a folder or a .zip")
    if domain is not None:
        check_domain_name(domain)
    ws = Workspace(root)
    report = ws.store().ingest(path, domain, skip_invalid=skip_invalid)
    for warning in report.warning_lines():  # bounded: the first few and a count
        logger.warning(warning)
    emitted = []
    for d in report.domains:
        logger.info(
            f"{d.name}: {d.outcome} (version {d.version}, {d.num_classes} classes, "
            f"{d.num_images} images)"
        )
        if d.outcome != "unchanged":
            emit_domain_arrived(
                ws,
                d.name,
                d.version,
                d.content_hash,
                report.source,
                d.outcome,
                d.num_classes,
                d.num_images,
            )
            emitted.append(d.name)
    return {**report.to_dict(), "store": str(ws.store_dir), "announced": emitted}


def emit_domain_arrived(
    ws: Workspace,
    name: str,
    version: int,
    content_hash: str,
    source: str,
    outcome: str = "new",
    num_classes: int = 0,
    num_images: int = 0,
):
    """Emit `anole.domain.arrived` with the domain as the resource and the store as related."""
    return emit_event(
        event=DOMAIN_ARRIVED,
        resource={
            "prefect.resource.id": f"anole.domain.{name}",
            "prefect.resource.name": name,
            "anole.domain.version": str(version),
            "anole.domain.content-hash": content_hash,
        },
        related=[
            {
                "prefect.resource.id": f"anole.store.{ws.store_id()}",
                "prefect.resource.role": "store",
                "prefect.resource.name": str(ws.store_dir),
            }
        ],
        payload={
            "domain": name,
            "version": version,
            "content_hash": content_hash,
            "outcome": outcome,
            "source": source,
            "store": str(ws.store_dir),
            "workspace": str(ws.root),
            "num_classes": num_classes,
            "num_images": num_images,
        },
    )


# --------------------------------------------------------------------------- task pools


def _pools_cache_key(context, p: dict[str, Any]) -> str:
    # Strings only: the data version (a content hash), the split and the sampler settings.
    key = {
        "pools": str(Workspace(p["root"]).pools_dir),
        "data_version": p["data_version"],
        "split": p["split"],
        "settings": PoolSettings.from_dict(p.get("settings")).key(),
    }
    return _vetted(context, f"anole-pools-{stable_hash(key, 40)}")


@task(
    name="build-task-pools",
    cache_key_fn=_pools_cache_key,
    persist_result=True,
    result_serializer=RESULT_SERIALIZER,
    retries=1,
    retry_condition_fn=_retry_on_io,
)
def build_task_pools(
    root: str,
    data_version: str,
    split: dict[str, list[str]],
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Sample the evaluation episode pools of every (split, domain) for one data version."""
    from pipeline.tasks import DomainSplit, EpisodeSampler

    logger = get_run_logger()
    ws = Workspace(root)
    cfg = PoolSettings.from_dict(settings)
    parts = DomainSplit.from_dict(split)
    folder = ws.pools_dir / f"{data_version[:16]}-{stable_hash([parts.to_dict(), cfg.key()])}"
    manifest_path = folder / "pools.json"
    if manifest_path.exists():  # built by an earlier run whose Prefect cache is gone
        logger.info(f"task pools already built in {folder}")
        return json.loads(manifest_path.read_text())
    store = ws.store()
    if store.data_version() != data_version:
        raise StoreError(
            f"the store changed while the flow ran (data version {store.data_version()[:12]}, "
            f"expected {data_version[:12]}); run the flow again"
        )
    hashes = {d.name: d.content_hash for d in store.domains()}
    pools: dict[str, dict[str, Any]] = {}
    built = 0
    for part in ("train", "val", "test"):
        pools[part] = {}
        for domain in getattr(parts, part):
            # Episodes index the domain's own images, so a domain's pool (and every score on
            # it) stays valid when other domains arrive: it is named by the domain's content.
            path = (
                ws.pools_dir
                / "domains"
                / (f"{domain}-{hashes[domain][:16]}-{stable_hash(cfg.key())}.parquet")
            )
            meta = path.with_suffix(".json")
            if not (path.exists() and meta.exists()):
                images = store.load_images(
                    [domain], image_size=cfg.image_size, channels=cfg.channels, invert=cfg.invert
                )
                counts = np.bincount(images.labels, minlength=images.num_classes)
                eligible = int((counts >= cfg.shots + cfg.queries).sum())
                ways = min(cfg.ways, eligible)
                if ways < 2:
                    logger.warning(f"{domain}: {eligible} usable classes, too few for episodes")
                    continue
                sampler = EpisodeSampler(
                    images,
                    ways=ways,
                    shots=cfg.shots,
                    queries=cfg.queries,
                    mode="within",
                    rotations=False,
                )
                sampler.sample(cfg.episodes, seed=cfg.seed).write_pool(path)
                atomic_write_json(meta, {"ways": ways, "episodes": cfg.episodes})
                built += 1
            entry = json.loads(meta.read_text())
            pools[part][domain] = {"path": str(path), **entry}
    manifest = {
        "dir": str(folder),
        "data_version": data_version,
        "settings": asdict(cfg),
        "split": parts.to_dict(),
        "pools": pools,
    }
    atomic_write_json(manifest_path, manifest)
    n = sum(len(v) for v in pools.values())
    logger.info(
        f"task pools for {n} domains ({built} newly sampled, {cfg.episodes} episodes each); "
        f"manifest {manifest_path}"
    )
    return manifest


# --------------------------------------------------------------------------- meta-training


def run_name_for(
    config: dict[str, Any], split: dict[str, Any], data_version: str, init_sha: str | None
) -> str:
    """A training run's folder name: the same config, data and start point name the same run."""
    key = {"config": config, "split": split, "data_version": data_version, "init": init_sha}
    return f"{'warm' if init_sha else 'base'}-{data_version[:8]}-{stable_hash(key)}"


def checkpoint_sha(path: str | Path) -> str:
    """The payload sha256 recorded in a checkpoint's manifest."""
    return json.loads(Path(path).with_suffix(".json").read_text())["sha256"]


@task(name="meta-train", cache_policy=NO_CACHE, result_serializer=RESULT_SERIALIZER)
def meta_train(
    root: str,
    config: dict[str, Any],
    split: dict[str, list[str]],
    data_version: str,
    workers: int = 0,
    init_checkpoint: str | None = None,
    ray_address: str | None = None,
    log_tensorboard: bool = True,
) -> str:
    """Meta-train (on Ray when workers > 0), resuming a crashed run; return the checkpoint path."""
    from pipeline.checkpoint import CheckpointDir
    from pipeline.config import TrainConfig
    from pipeline.scoring import load_model
    from pipeline.tasks import DomainSplit

    logger = get_run_logger()
    ws = Workspace(root)
    cfg = TrainConfig.from_saved(config)
    parts = DomainSplit.from_dict(split)
    init_sha = checkpoint_sha(init_checkpoint) if init_checkpoint else None
    name = run_name_for(cfg.to_dict(), parts.to_dict(), data_version, init_sha)
    run_dir = ws.runs_dir / name
    done = CheckpointDir(run_dir / "checkpoints").steps()
    finished = _finished(run_dir, done)
    if finished is not None:  # the same run completed before: nothing to train
        logger.info(f"{name} already trained to step {done[-1]}: {finished}")
        return finished
    resume = bool(done)
    images = ws.store().load_images(
        None, image_size=cfg.image_size, channels=cfg.channels, invert=cfg.invert
    )
    if images.data_version != data_version:
        raise StoreError(
            f"the store changed while the flow ran (data version {images.data_version[:12]}, "
            f"expected {data_version[:12]}); run the flow again"
        )
    if resume:
        logger.info(f"resuming {name} from its checkpoint at step {done[-1]}")
    else:
        how = f"warm-started from {init_checkpoint}" if init_checkpoint else "from scratch"
        logger.info(f"meta-training {cfg.learner} {how} into {run_dir}")
    progress = _TrainingProgress(name, logger)
    if workers > 0:
        result = _train_on_ray(
            cfg,
            images,
            parts,
            run_dir,
            workers=workers,
            address=ray_address,
            resume=resume,
            init_checkpoint=init_checkpoint,
            progress=progress,
            log_tensorboard=log_tensorboard,
        )
    else:
        from pipeline.train import Trainer

        init = None
        if init_checkpoint and not resume:
            init = load_model(init_checkpoint).params
        trainer = Trainer(
            cfg,
            images,
            run_dir,
            split=parts,
            init_params=init,
            progress=progress,
            log_tensorboard=log_tensorboard,
        )
        result = trainer.run(resume=resume)
    progress.finish()
    summary = {
        **result.to_dict(),
        "run": name,
        "workers": workers,
        "resumed_from_step": done[-1] if done else None,
        "init_checkpoint": init_checkpoint,
        "data_version": data_version,
        "split": parts.to_dict(),
    }
    atomic_write_json(run_dir / "result.json", summary)
    checkpoint = result.best_checkpoint or result.latest_checkpoint
    best = "n/a" if result.best_val is None else f"{100 * result.best_val:.1f}%"
    logger.info(
        f"trained to step {result.step}/{result.total_steps} in {result.seconds:.0f} s "
        f"({result.tasks_per_second:.1f} tasks/s); best validation {best}; {checkpoint}"
    )
    return str(checkpoint)


def _finished(run_dir: Path, steps: list[int]) -> str | None:
    """The checkpoint of a run that completed (result.json is written last), else None."""
    result = run_dir / "result.json"
    if not steps or not result.exists():
        return None
    summary = json.loads(result.read_text())
    checkpoint = summary.get("best_checkpoint") or summary.get("latest_checkpoint")
    if summary.get("step") != steps[-1] or not checkpoint or not Path(checkpoint).exists():
        return None
    return str(checkpoint)


class _TrainingProgress:
    """Progress callback: a Prefect progress artifact (throttled) plus the CLI's listener."""

    def __init__(self, name: str, logger, every_s: float = 2.0):
        self.logger = logger
        self.every_s = every_s
        self.last = 0.0
        self.logged_tenth = -1
        self.total = 0
        self.artifact = create_progress_artifact(
            0.0, key="anole-meta-train", description=f"meta-training run {name}"
        )

    def __call__(self, done: int, total: int, metrics: dict[str, float]) -> None:
        self.total = total
        now = time.monotonic()
        if now - self.last >= self.every_s or done >= total:
            self.last = now
            update_progress_artifact(self.artifact, 100.0 * min(done / max(total, 1), 1.0))
        tenth = int(10 * done / max(total, 1))
        if tenth > self.logged_tenth:
            self.logged_tenth = tenth
            shown = ", ".join(
                f"{k} {v:.3g}" for k, v in metrics.items() if k in ("loss", "accuracy")
            )
            self.logger.info(f"step {done}/{total} {shown}")
        if _progress_listener is not None:
            _progress_listener(done, total, metrics)

    def finish(self) -> None:
        update_progress_artifact(self.artifact, 100.0)


def _train_on_ray(
    cfg,
    images,
    split,
    run_dir: Path,
    *,
    workers: int,
    address: str | None,
    resume: bool,
    init_checkpoint: str | None,
    progress,
    log_tensorboard: bool,
):
    """The Ray parameter-server trainer on this run's explicit split (warm start via a step-0
    checkpoint, which the server resumes from like any other)."""
    from pipeline.train import TrainingData
    from workers.driver import DistributedTrainer

    trainer = DistributedTrainer(
        cfg,
        images,
        run_dir,
        workers=workers,
        address=address,
        progress=progress,
        log_tensorboard=log_tensorboard,
    )
    # The driver splits domains from the config; this run's split is explicit (the workspace's).
    trainer.data = TrainingData.build(images, cfg, split)
    if init_checkpoint and not resume:
        _seed_checkpoint(
            trainer.data, run_dir, init_checkpoint, _pace_of(run_dir.parent.parent, init_checkpoint)
        )
        resume = True
    return trainer.run(resume=resume)


def _seed_checkpoint(data, run_dir: Path, init_checkpoint: str, pace: float | None) -> None:
    """Step 0 of a warm start: the champion's parameters under a fresh optimiser and schedule."""
    from pipeline.checkpoint import CheckpointDir
    from pipeline.scoring import load_model
    from pipeline.train import MetaOptimizer, checkpoint_manifest, checkpoint_state

    cfg = data.config
    total = cfg.steps
    if cfg.minutes and pace:
        # The server sizes no budget on resume: size it from the pace of the champion's run.
        total = max(1, int(cfg.minutes * 60 / pace))
    meta = MetaOptimizer(load_model(init_checkpoint).params, cfg, total_steps=total)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    manifest = {
        **checkpoint_manifest(data, 0, {}),
        "total_steps": total,
        "warm_start": init_checkpoint,
    }
    CheckpointDir(run_dir / "checkpoints", keep_last=cfg.keep_last).save(
        0, checkpoint_state(meta, None, 0.0), manifest
    )


def _pace_of(root: Path, init_checkpoint: str) -> float | None:
    """Seconds per step of the run that produced `init_checkpoint` (a champion copy), if known."""
    for record in Champions(Workspace(root)).read()["history"]:
        if record["checkpoint"] == str(init_checkpoint):
            result = Path(record["run_dir"]) / "result.json"
            if result.exists():
                r = json.loads(result.read_text())
                if r.get("step") and r.get("seconds"):
                    return float(r["seconds"]) / int(r["step"])
    return None


# --------------------------------------------------------------------------- evaluation


EVAL_THREADS = 1
"""torch threads while scoring. Measured on the shared 2-core VM: 20-way episodes score 7-9x
slower with 2 threads than with 1 when other processes load the cores (threads spin-wait)."""


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _acc_dict(mean: float, ci95: float, **extra: Any) -> dict[str, Any]:
    return {"mean": float(mean), "ci95": None if math.isnan(ci95) else float(ci95), **extra}


def score_model(
    model, ws: Workspace, pools: dict[str, Any], *, oneshot: bool = True
) -> dict[str, Any]:
    """Accuracy (95% CI) of one model per domain and per split on the pools' fixed episodes.

    Scores are cached per (checkpoint, pool file) under `<root>/scores/`: a champion is scored
    only on pools it has not seen, e.g. the new domains' when it is compared with a retrain.
    """
    cfg = model.config
    store = ws.store()
    learner = model.learner
    cache = ws.root / "scores" / checkpoint_sha(model.path)[:24]
    with _torch_threads(EVAL_THREADS):
        return _score_model(model, cfg, store, learner, cache, pools, oneshot)


def _score_model(model, cfg, store, learner, cache: Path, pools, oneshot: bool) -> dict[str, Any]:
    from pipeline.evaluation import evaluate_episodes, mean_ci
    from pipeline.tasks import EpisodeSpecs

    head = model.params.get("head.bias")
    width = None if head is None else head.numel()  # a classifier head's ways (MAML, Reptile)

    from pipeline.train import augment_ranges, episode_predictor

    predict = episode_predictor(learner, model.params, bn_mode=cfg.bn_mode, device=model.device,
                                views=cfg.eval_views,
                                augment=augment_ranges(cfg))

    def cached(name: str, compute) -> dict[str, Any]:
        path = cache / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        value = compute()
        atomic_write_json(path, value)
        return value

    domains: dict[str, Any] = {}
    splits: dict[str, Any] = {}
    for part, entries in pools["pools"].items():
        means, cis = [], []
        for domain, entry in entries.items():
            if width is not None and entry["ways"] > width:
                raise ConfigError(
                    f"{model.path} has a {width}-way head and cannot score the {entry['ways']}-way "
                    f"episodes of {domain}; use a workspace whose pools have ways <= {width}"
                )

            def compute(domain=domain, entry=entry) -> dict[str, Any]:
                images = store.load_images(
                    [domain], image_size=cfg.image_size, channels=cfg.channels, invert=cfg.invert
                )
                specs = EpisodeSpecs.read_pool(entry["path"])
                acc = evaluate_episodes(predict, images, specs, batch_size=20, bn_mode=cfg.bn_mode)
                return _acc_dict(
                    acc.mean, acc.ci95, ways=acc.ways, shots=acc.shots, episodes=acc.episodes
                )

            acc = cached(Path(entry["path"]).stem, compute)
            domains[domain] = {**acc, "split": part}
            means.append(acc["mean"])
            cis.append(acc["ci95"] or 0.0)
        if means:
            # Mean of independent per-domain estimates: its CI adds the domains' in quadrature.
            splits[part] = _acc_dict(
                float(np.mean(means)),
                float(math.sqrt(sum(c * c for c in cis)) / len(cis)),
                domains=len(means),
            )
    result: dict[str, Any] = {
        "checkpoint": str(model.path),
        "step": model.step,
        "learner": cfg.learner,
        "domains": domains,
        "splits": splits,
    }
    if oneshot and cfg.channels == 1 and (width is None or width >= 20):  # the runs are 20-way
        from pipeline import settings
        from pipeline.scoring import score_oneshot

        runs = settings.omniglot_oneshot_runs()
        if runs:

            def compute_oneshot() -> dict[str, Any]:
                scores = score_oneshot(model, runs)
                mean, ci = mean_ci([1.0 - e for e in scores.errors])
                errors = dict(zip(scores.names, scores.errors, strict=True))
                return _acc_dict(mean, ci, runs=len(scores.errors), errors=errors)

            result["oneshot"] = cached(
                f"oneshot-{stable_hash([str(r) for r in runs])}", compute_oneshot
            )
    return result


@task(name="evaluate", cache_policy=NO_CACHE, result_serializer=RESULT_SERIALIZER)
def evaluate(
    root: str,
    checkpoint: str,
    pools: dict[str, Any],
    champion_checkpoint: str | None = None,
    champion_run_dir: str | None = None,
    new_domains: list[str] | None = None,
    oneshot: bool = True,
) -> dict[str, Any]:
    """Score the candidate and the champion on the same episodes; tables, plots and a report."""
    from pipeline.scoring import load_model
    from pipeline.tasks import EpisodeSpecs, materialize

    logger = get_run_logger()
    ws = Workspace(root)
    new = set(new_domains or [])
    candidate = load_model(checkpoint)
    scores: dict[str, Any] = {
        "data_version": pools["data_version"],
        "pools": pools["dir"],
        "new_domains": sorted(new),
        "candidate": score_model(candidate, ws, pools, oneshot=oneshot),
        "champion": None,
        "champion_checkpoint": champion_checkpoint,
    }
    for name in new & set(scores["candidate"]["domains"]):
        scores["candidate"]["domains"][name]["new"] = True
    if champion_checkpoint:
        scores["champion"] = score_model(
            load_model(champion_checkpoint), ws, pools, oneshot=oneshot
        )
    store = ws.store()
    if store.data_version() != pools["data_version"]:
        raise StoreError("the store changed during evaluation; run the flow again")
    scores["store_domains"] = {d.name: d.content_hash for d in store.domains()}

    run_dir = Path(checkpoint).parent.parent
    out = ws.reports_dir / run_dir.name
    curves = {"candidate": run_dir}
    offsets = {}
    if champion_run_dir:
        curves = {"champion": champion_run_dir, **curves}
        if champion_checkpoint and _warm_started_from(run_dir, champion_checkpoint):
            offsets["candidate"] = int(scores["champion"]["step"])  # it continues the champion
    figures = {
        "learning_curves": plots.learning_curves(curves, out / "learning_curves.png", offsets),
        "domain_accuracy": plots.domain_accuracy(scores, out / "domain_accuracy.png"),
    }
    first = next(
        ((p, d) for p in ("val", "test", "train") for d in pools["pools"].get(p, {})), None
    )
    if first is not None:
        part, domain = first
        cfg = candidate.config
        images = store.load_images(
            [domain], image_size=cfg.image_size, channels=cfg.channels, invert=cfg.invert
        )
        specs = EpisodeSpecs.read_pool(pools["pools"][part][domain]["path"])[:1]
        ep = materialize(images, specs)
        figures["episode"] = plots.episode_grid(
            ep.support_x[0].numpy(),
            ep.query_x[0].numpy(),
            ep.ways,
            out / "episode.png",
            title=f"{domain} ({part}): {ep.ways}-way {ep.shots}-shot episode, support over queries",
        )
    scores["figures"] = {k: str(v) for k, v in figures.items() if v is not None}

    domain_rows, split_rows = _tables(scores)
    create_table_artifact(
        domain_rows,
        key="anole-domain-accuracy",
        description=f"Accuracy per domain of {run_dir.name}",
    )
    create_table_artifact(
        split_rows, key="anole-split-accuracy", description=f"Accuracy per split of {run_dir.name}"
    )
    markdown = evaluation_markdown(scores, run_dir.name, domain_rows, split_rows)
    create_markdown_artifact(
        markdown, key="anole-evaluation-report", description=f"Evaluation of {run_dir.name}"
    )
    atomic_write_bytes(out / "report.md", markdown.encode())
    atomic_write_json(out / "scores.json", scores)
    cand = scores["candidate"]["splits"]
    logger.info(
        "candidate: "
        + ", ".join(f"{p} {100 * a['mean']:.1f}%" for p, a in cand.items())
        + f"; report {out / 'report.md'}"
    )
    return {"report": str(out / "report.md"), "report_dir": str(out), "scores": scores}


def _warm_started_from(run_dir: Path, checkpoint: str) -> bool:
    """Whether the run at `run_dir` started from `checkpoint`'s parameters."""
    config = run_dir / "result.json"
    if not config.exists():
        return False
    init = json.loads(config.read_text()).get("init_checkpoint")
    return bool(init) and checkpoint_sha(init) == checkpoint_sha(checkpoint)


def _pct(acc: dict[str, Any] | None) -> str:
    if not acc:
        return "–"
    ci = acc.get("ci95")
    return (
        f"{100 * acc['mean']:.1f}% ± {100 * ci:.1f}"
        if ci is not None
        else f"{100 * acc['mean']:.1f}%"
    )


def _delta(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    return "–" if not a or not b else f"{100 * (a['mean'] - b['mean']):+.1f} pp"


def _tables(scores: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    cand, champ = scores["candidate"], scores.get("champion") or {}
    order = {"train": 0, "val": 1, "test": 2}
    domain_rows = []
    for name, acc in sorted(cand["domains"].items(), key=lambda kv: (order[kv[1]["split"]], kv[0])):
        other = champ.get("domains", {}).get(name)
        domain_rows.append(
            {
                "domain": name + (" (new)" if acc.get("new") else ""),
                "split": acc["split"],
                "episodes": f"{acc['ways']}-way {acc['shots']}-shot x{acc['episodes']}",
                "candidate": _pct(acc),
                "champion": _pct(other),
                "delta": _delta(acc, other),
            }
        )
    split_rows = []
    for part in ("train", "val", "test"):
        if part in cand["splits"]:
            acc, other = cand["splits"][part], champ.get("splits", {}).get(part)
            split_rows.append(
                {
                    "split": part,
                    "domains": acc["domains"],
                    "candidate": _pct(acc),
                    "champion": _pct(other),
                    "delta": _delta(acc, other),
                }
            )
    if "oneshot" in cand:
        acc, other = cand["oneshot"], champ.get("oneshot")
        split_rows.append(
            {
                "split": f"one-shot runs (x{acc['runs']}, 20-way)",
                "domains": "-",
                "candidate": _pct(acc),
                "champion": _pct(other),
                "delta": _delta(acc, other),
            }
        )
    return domain_rows, split_rows


def _md_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)\n"
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def evaluation_markdown(scores: dict[str, Any], name: str, domain_rows, split_rows) -> str:
    cand = scores["candidate"]
    lines = [
        f"# anole evaluation: `{name}`",
        "",
        f"- candidate: `{cand['checkpoint']}` ({cand['learner']}, step {cand['step']})",
        f"- champion: `{scores['champion_checkpoint']}`"
        if scores.get("champion")
        else "- champion: none yet",
        f"- data version `{scores['data_version'][:12]}`; episode pools `{scores['pools']}`",
    ]
    if scores.get("new_domains"):
        lines.append(f"- new domains: {', '.join(scores['new_domains'])}")
    lines += [
        "",
        "## Accuracy by split (95% CI)",
        "",
        _md_table(split_rows),
        "## Accuracy by domain (95% CI)",
        "",
        _md_table(domain_rows),
        "## Figures",
        "",
    ]
    lines += [f"- {k.replace('_', ' ')}: `{v}`" for k, v in scores.get("figures", {}).items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- promotion


@task(name="promote", cache_policy=NO_CACHE, result_serializer=RESULT_SERIALIZER)
def promote(
    root: str,
    candidate_checkpoint: str,
    scores: dict[str, Any],
    policy: dict[str, float] | None = None,
    report: str | None = None,
) -> dict[str, Any]:
    """Make the candidate champion if it beats it on validation without forgetting old domains."""
    from pipeline.scoring import load_model

    logger = get_run_logger()
    ws = Workspace(root)
    champions = Champions(ws)
    current = champions.current()
    if policy is None:
        wcfg = ws.read_config()
        rule = wcfg.policy if wcfg else PromotionPolicy()
    else:
        rule = PromotionPolicy.from_dict(policy)
    if current and checkpoint_sha(current["checkpoint"]) == checkpoint_sha(candidate_checkpoint):
        message = f"{candidate_checkpoint} is already champion {current['id']}"
        logger.info(message)
        return {
            "promoted": False,
            "already_champion": True,
            "champion": current["id"],
            "champion_checkpoint": current["checkpoint"],
            "reasons": [message],
        }
    evaluated_against = scores.get("champion_checkpoint")
    if (current["checkpoint"] if current else None) != evaluated_against:
        raise AnoleError(
            f"the champion changed since the candidate was evaluated (evaluated against "
            f"{evaluated_against}, champion now {current and current['checkpoint']}); "
            "evaluate again"
        )
    old = list(current["split"]["train"]) if current else []
    decision = decide(scores["candidate"], scores.get("champion"), old, rule)
    entry = None
    if decision.promoted:
        model = load_model(candidate_checkpoint)
        cand = scores["candidate"]
        entry = {
            "run_dir": str(Path(candidate_checkpoint).parent.parent),
            "data_version": scores["data_version"],
            "domains": scores["store_domains"],
            "split": model.split.to_dict(),
            "learner": model.config.learner,
            "config": model.config.to_dict(),
            "step": model.step,
            "scores": {
                "splits": cand["splits"],
                "oneshot": cand.get("oneshot"),
                "domains": cand["domains"],
            },
            "reason": "; ".join(decision.reasons),
            "report": report,
        }
    record = champions.record(
        {
            **decision.to_dict(),
            "champion": current["id"] if current else None,
            "data_version": scores["data_version"],
            "new_domains": scores.get("new_domains", []),
            "policy": asdict(rule),
        },
        candidate_checkpoint=candidate_checkpoint,
        entry=entry,
    )
    champion = record or current
    verdict = (
        f"promoted to {record['id']}"
        if record
        else f"not promoted; {current['id'] if current else 'no one'} stays champion"
    )
    logger.info(f"candidate {verdict}: " + "; ".join(decision.reasons))
    markdown = (
        "\n".join(
            [
                f"# Promotion: {verdict}",
                "",
                *[f"- {r}" for r in decision.reasons],
                "",
                f"- champion checkpoint: `{champion['checkpoint'] if champion else None}`",
                f"- registry: `{champions.path}`",
            ]
        )
        + "\n"
    )
    create_markdown_artifact(markdown, key="anole-promotion", description=verdict)
    if report and Path(report).exists():
        text = Path(report).read_text()
        atomic_write_bytes(
            report, (text + "\n" + markdown.replace("# Promotion", "## Promotion")).encode()
        )
    return {
        "promoted": decision.promoted,
        "champion": champion["id"] if champion else None,
        "champion_checkpoint": champion["checkpoint"] if champion else None,
        "reasons": decision.reasons,
        "validation": decision.validation,
        "forgetting": decision.forgetting,
    }
