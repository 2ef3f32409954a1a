"""Meta-training throughput: batched learners vs the naive per-task reference loop, same run.

For each learner, times `meta_gradient` (the batched path: all tasks in one call) and
`reference_meta_gradient` (a learn2learn-style loop: per task, clone the parameters, adapt
with autograd.grad, backprop) on the same random episodes and the same model, alternating the
two each iteration so machine load hits both alike. Reports tasks/s (median over iterations)
and the speed-up ratio (median and best over the iterations: on a shared machine load only
ever slows a run down, so "best" estimates the unloaded figure).

    python benchmarks/bench_learners.py                      # defaults: the README's setting
    python benchmarks/bench_learners.py --learners maml --iters 5 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.episodes import Episodes  # noqa: E402
from pipeline.learners import make_learner, registry  # noqa: E402


def random_episodes(
    tasks: int, ways: int, shots: int, queries: int, channels: int, size: int
) -> Episodes:
    """Uniform [0, 1) images with class-ordered labels (throughput does not depend on content)."""
    labels = torch.arange(ways)
    return Episodes(
        torch.rand(tasks, ways * shots, channels, size, size),
        labels.repeat_interleave(shots).expand(tasks, -1).contiguous(),
        torch.rand(tasks, ways * queries, channels, size, size),
        labels.repeat_interleave(queries).expand(tasks, -1).contiguous(),
        ways,
        shots,
        queries,
    )


def learner_settings(name: str, args: argparse.Namespace) -> dict[str, object]:
    """The benchmark's settings of learner `name`'s own config: its config class's defaults
    (Reptile: 5 inner Adam steps; MAML, FOMAML: 1 SGD step), then --inner-steps for every
    learner with inner steps, then the `--set NAME.FIELD=VALUE` given for it."""
    fields = {f.name: f for f in dataclasses.fields(registry.config_class(name))}
    settings: dict[str, object] = {}
    if args.inner_steps is not None and "inner_steps" in fields:
        settings["inner_steps"] = args.inner_steps
    for item in args.set or []:
        key, _, value = item.partition("=")
        learner, _, field = key.partition(".")
        if learner == name:
            settings[field] = value
    return settings


def bench_one(name: str, args: argparse.Namespace, episodes: Episodes) -> dict[str, object]:
    cls = registry.config_class(name)
    config = cls.from_dict(learner_settings(name, args), source="--set", learner=name)
    steps = getattr(config, "inner_steps", None)
    torch.manual_seed(0)
    learner = make_learner(
        name,
        config,  # type: ignore[arg-type]
        ways=args.ways,
        in_channels=args.channels,
        image_size=args.image_size,
        hidden=args.hidden,
        backend=args.backend,
        max_tasks_per_call=args.chunk,
        precision=args.precision,
    )
    params = learner.init_params()

    def naive(params: dict, episodes: Episodes) -> object:
        # bfloat16: the naive loop gets the same mixed precision the usual way, by autocast
        with torch.autocast("cpu", torch.bfloat16, enabled=args.precision == "bfloat16"):
            return learner.reference_meta_gradient(params, episodes)

    runs = {"batched": learner.meta_gradient, "naive": naive}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(args.warmup + args.iters):
        for kind, fn in runs.items():
            start = time.perf_counter()
            fn(params, episodes)
            if i >= args.warmup:
                times[kind].append(time.perf_counter() - start)
    tasks = episodes.num_tasks
    batched, naive = statistics.median(times["batched"]), statistics.median(times["naive"])
    best_b, best_n = min(times["batched"]), min(times["naive"])
    return {
        "learner": name,
        "inner_steps": steps,
        "inner_optimizer": getattr(config, "inner_optimizer", "sgd" if steps else None),
        "backend": args.backend,
        "batched_s_per_iter": batched,
        "naive_s_per_iter": naive,
        "batched_tasks_per_s": tasks / batched,
        "naive_tasks_per_s": tasks / naive,
        "speedup": naive / batched,
        "best_batched_tasks_per_s": tasks / best_b,
        "best_naive_tasks_per_s": tasks / best_n,
        "best_speedup": best_n / best_b,
        "batched_times": times["batched"],
        "naive_times": times["naive"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--learners", default=",".join(registry.names()), help="comma-separated names")
    parser.add_argument("--iters", type=int, default=5, help="timed meta-iterations per path")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=32, help="meta-batch size")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=1, help="query images per class")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument(
        "--inner-steps", type=int, default=None,
        help="inner steps of every learner that has them (default: each learner config's own: "
        "Reptile 5 Adam steps, MAML and FOMAML 1 SGD step)",
    )
    parser.add_argument(
        "--set", action="append", metavar="NAME.FIELD=VALUE",
        help="a field of one learner's config, e.g. reptile.inner_optimizer=sgd (repeatable)",
    )
    parser.add_argument("--backend", choices=("grouped", "vmap"), default="grouped")
    parser.add_argument(
        "--chunk",
        type=lambda s: s if s == "auto" else (None if s == "none" else int(s)),
        default="auto",
        help="max_tasks_per_call: auto (32 here on CPU), none, or a number",
    )
    parser.add_argument(
        "--precision",
        choices=("float32", "bfloat16"),
        default="float32",
        help="bfloat16: mixed-precision convolutions on both paths (batched: the learner's "
        "precision; naive: torch.autocast)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    episodes = random_episodes(
        args.tasks, args.ways, args.shots, args.queries, args.channels, args.image_size
    )
    rows = [bench_one(name, args, episodes) for name in args.learners.split(",")]
    setting = {
        "tasks": args.tasks,
        "ways": args.ways,
        "shots": args.shots,
        "queries": args.queries,
        "image": [args.channels, args.image_size, args.image_size],
        "hidden": args.hidden,
        "threads": args.threads,
        "precision": args.precision,
        "chunk": args.chunk,
        "iters": args.iters,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    if args.json:
        print(json.dumps({"setting": setting, "results": rows}, indent=2))
        return 0
    print(" ".join(f"{k}={v}" for k, v in setting.items()))
    print("tasks/s: median (best) over iterations; speed-up = naive time / batched time")
    print(
        f"{'learner':9} {'steps':>5} {'batched tasks/s':>17} {'naive tasks/s':>17} {'speed-up':>15}"
    )
    for r in rows:
        steps = r["inner_steps"] if r["inner_steps"] is not None else "-"
        print(
            f"{r['learner']:9} {steps:>5} "
            f"{r['batched_tasks_per_s']:8.1f} ({r['best_batched_tasks_per_s']:6.1f}) "
            f"{r['naive_tasks_per_s']:8.1f} ({r['best_naive_tasks_per_s']:6.1f}) "
            f"{r['speedup']:6.2f}x ({r['best_speedup']:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
