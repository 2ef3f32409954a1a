"""Ray benchmarks: parameter-server overhead, and tasks/s of 1, 2 (, 4) workers against the Trainer.

    python benchmarks/bench_ray.py                      # default config, 30 steps, 1 and 2 workers
    python benchmarks/bench_ray.py --workers 1,2,4 --steps 40 --json ray.json
    python benchmarks/bench_ray.py --gpu-smoke          # what benchmarks/gpu_smoke.sh runs

Every run uses the same config, data and seed, in one process, one after another:
* the single-process Trainer with torch on all cores, and with one thread;
* train_distributed (sync) with W workers x C CPUs each (torch threads per worker = its CPUs).

tasks/s counts meta-training tasks per second of step time (validation and checkpoints excluded,
as the Trainer counts them). Parameter-server overhead = the share of each meta-step spent outside
the slowest worker's compute: dispatch, serialisation, object-store transfers, the server's
aggregation and optimiser step, and the driver's round trips (the first step, which pays one-off
warm-up, is left out).

On shared cores the workers may get less CPU than they reserve: "CPU the workers got" is their
CPU seconds over their compute seconds x threads, and "tasks/s at full CPU" re-times each step
with the workers' compute scaled to a whole CPU each (an estimate: the compute is CPU-bound).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import DEFAULT_LEARNER, TrainConfig, config_for  # noqa: E402
from pipeline.images import ImageSet, synthetic_images  # noqa: E402


def default_zip() -> Path | None:
    from pipeline import settings

    zips = settings.omniglot_background_sources()
    return zips[0] if zips else None


def load_images(zip_path: Path | None, store: Path | None, image_size: int) -> ImageSet:
    """Omniglot (a zip ingested into a temporary store, or an existing store), else synthetic."""
    from pipeline.store import Store

    if store is not None:
        return Store(store).load_images(image_size=image_size)
    if zip_path is not None and zip_path.exists():
        root = Path(tempfile.mkdtemp(prefix="anole-bench-store-"))
        Store(root).ingest(zip_path)
        return Store(root).load_images(image_size=image_size)
    print("no Omniglot zip found: using synthetic images", file=sys.stderr)
    return synthetic_images(domains=5, classes=20, per_class=20, size=image_size)


def bench_config(learner: str | None, steps: int, overrides: list[str]) -> TrainConfig:
    """The TrainConfig defaults (meta-batch 32, conv4-64, 5-way 1-shot) for `learner`, timed over
    `steps`; validation kept small (it is not timed). NAME:tuned uses the learner's tuned defaults."""
    if learner and learner.endswith(":tuned"):
        base = config_for(learner.removesuffix(":tuned"), None, overrides, steps=steps)
    else:
        base = TrainConfig.load(
            None, overrides, base={"learner": learner or DEFAULT_LEARNER}, steps=steps
        )
    return base.replace(
        val_every=10**6, checkpoint_every=10**6, val_episodes=min(base.val_episodes, 20)
    )


def run_trainer(cfg: TrainConfig, images: ImageSet, threads: int) -> dict[str, Any]:
    import torch

    from pipeline.train import Trainer

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = Trainer(cfg.replace(num_threads=threads), images, out, log_tensorboard=False).run()
    return {
        "run": f"Trainer, {threads} thread(s)",
        "workers": 0,
        "threads": threads,
        "tasks_per_s": result.tasks_per_second,
        "wall_s": time.perf_counter() - start,
    }


def run_ray(
    cfg: TrainConfig, images: ImageSet, workers: int, cpus: float, gpus: float | None = None
) -> dict[str, Any]:
    from workers.driver import train_distributed
    from workers.resources import RayOptions

    options = RayOptions(worker_cpus=cpus, worker_gpus=gpus)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = train_distributed(
            cfg, images, out, workers=workers, options=options, log_tensorboard=False
        )
    over = result.overhead
    return {
        "run": f"Ray, {workers} worker(s) x {cpus:g} CPU",
        "workers": workers,
        "threads": int(cpus),
        "tasks_per_s": result.tasks_per_second,
        "step_s": over.get("step_s"),
        "compute_s": over.get("compute_s"),
        "overhead_share": over.get("share"),
        "worker_cpu_share": over.get("worker_cpu_share"),
        # Estimate: the same steps if each worker had had its whole CPU (compute is CPU-bound).
        "tasks_per_s_full_cpu": (
            cfg.meta_batch
            / (over["step_s"] - over["compute_s"] + over["compute_s"] * over["worker_cpu_share"])
            if over.get("worker_cpu_share")
            else None
        ),
        "devices": sorted({w["device"] for w in result.worker_info}),
        "wall_s": time.perf_counter() - start,
    }


def table(rows: list[dict[str, Any]], baseline: float, baseline_name: str) -> str:
    def num(value: float | None, fmt: str, suffix: str = "") -> str:
        return "" if value is None else format(value, fmt) + suffix

    lines = [
        f"| run | tasks/s | vs {baseline_name} | step s | slowest worker compute s | PS overhead "
        "| CPU the workers got | tasks/s at full CPU (est.) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        share, cpu = r.get("overhead_share"), r.get("worker_cpu_share")
        lines.append(
            f"| {r['run']} | {r['tasks_per_s']:.1f} | {r['tasks_per_s'] / baseline:.2f}x | "
            f"{num(r.get('step_s'), '.3f')} | {num(r.get('compute_s'), '.3f')} | "
            f"{num(None if share is None else 100 * share, '.1f', '%')} | "
            f"{num(None if cpu is None else 100 * cpu, '.0f', '%')} | "
            f"{num(r.get('tasks_per_s_full_cpu'), '.1f')} |"
        )
    return "\n".join(lines)


def gpu_smoke(args: argparse.Namespace) -> int:
    """On a CUDA machine: 2 workers sharing the GPU (0.5 each), a short sync run, tasks/s."""
    import torch

    if not torch.cuda.is_available():
        print(
            f"FAIL: torch {torch.__version__} sees no CUDA device (driver, CUDA build, "
            "CUDA_VISIBLE_DEVICES?)",
            file=sys.stderr,
        )
        return 2
    print(
        f"cuda ok: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    )
    import ray

    images = load_images(args.zip, args.store, 28)
    cfg = bench_config(args.learner, args.steps, args.set)
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        num_gpus=torch.cuda.device_count(),
        include_dashboard=False,
        logging_level="WARNING",
    )
    try:
        row = run_ray(cfg, images, workers=2, cpus=2, gpus=None)  # GPUs shared: 0.5 each
    finally:
        ray.shutdown()
    print(json.dumps(row, indent=2, default=str))
    if row["devices"] != ["cuda:0"]:
        print(f"FAIL: workers computed on {row['devices']}, expected cuda:0", file=sys.stderr)
        return 1
    print(
        f"OK: {row['tasks_per_s']:.1f} tasks/s on 2 GPU workers ({cfg.learner}, meta_batch "
        f"{cfg.meta_batch}, {args.steps} steps)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--learner",
        default=None,
        help="learner (default: the config default); NAME:tuned for its tuned defaults",
    )
    parser.add_argument("--steps", type=int, default=30, help="meta-steps per run")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--zip", type=Path, default=default_zip(), help="Omniglot zip to ingest")
    parser.add_argument("--store", type=Path, default=None, help="use this store instead of --zip")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--single-thread",
        action="store_true",
        help="only one torch thread per process (skip the all-cores runs: on busy shared cores "
        "they measure the contention more than the code)",
    )
    parser.add_argument("--gpu-smoke", action="store_true", help="the GPU smoke test")
    args = parser.parse_args(argv)
    if args.gpu_smoke:
        return gpu_smoke(args)

    import ray

    cores = os.cpu_count() or 1
    load_start = os.getloadavg()[0]
    cfg = bench_config(args.learner, args.steps, args.set)
    images = load_images(args.zip, args.store, cfg.image_size)
    print(
        f"config: {cfg.learner}, meta_batch {cfg.meta_batch}, hidden {cfg.hidden}, {cfg.ways}-way "
        f"{cfg.shots}-shot, {args.steps} steps; {cores} cores; data {images.data_version[:12]}",
        file=sys.stderr,
    )
    rows = [] if args.single_thread else [run_trainer(cfg, images, cores)]
    if cores > 1 or args.single_thread:
        rows.append(run_trainer(cfg, images, 1))
    counts = [int(w) for w in args.workers.split(",") if w]
    ray.init(
        address="local",
        num_cpus=max(cores, max(counts)),
        include_dashboard=False,
        logging_level="ERROR",
    )
    try:
        for w in counts:
            per_worker = 1.0 if args.single_thread else max(1.0, float(cores // w))
            if w == 1 and per_worker > 1:
                rows.append(run_ray(cfg, images, 1, 1.0))  # the unit the scaling is measured in
            rows.append(run_ray(cfg, images, w, per_worker))
    finally:
        ray.shutdown()
    print(table(rows, rows[0]["tasks_per_s"], rows[0]["run"]))
    # The cores may be shared: say how busy they were, the figures depend on it.
    print(f"load average (1 min) at start {load_start:.1f}, at end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(
            json.dumps({"config": cfg.to_dict(), "cores": cores, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
