"""Every Ray resource anole asks for, decided in one place.

`RayOptions` holds the knobs of a distributed run that are not part of the `TrainConfig`
(mode, staleness, per-worker CPUs/GPUs, placement, restarts); `ANOLE_*` environment variables
set them from the command line. `plan_resources` turns them, the config and the cluster's
resources into a `ResourcePlan`; `worker_options` / `server_options` are the only places that
build `.options(...)` for an actor, and `reserve_workers` the only place that reserves bundles.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from pipeline.config import TrainConfig
from pipeline.errors import AnoleError, ConfigError

MODES = ("sync", "async")
STRATEGIES = ("SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK")


class PlacementError(AnoleError):
    """The cluster cannot host the requested workers (missing CPUs/GPUs, nodes, or a timeout)."""


class TrainingError(AnoleError):
    """A distributed run cannot continue (every worker died, the parameter server is gone)."""


# Environment variable -> RayOptions field. `anole train --workers N` reads these.
ENV_VARS: dict[str, str] = {
    "ANOLE_RAY_MODE": "mode",
    "ANOLE_RAY_STALENESS": "staleness",
    "ANOLE_WORKER_CPUS": "worker_cpus",
    "ANOLE_WORKER_GPUS": "worker_gpus",
    "ANOLE_PLACEMENT": "placement",
    "ANOLE_PLACEMENT_TIMEOUT": "placement_timeout_s",
    "ANOLE_WORKER_MAX_RESTARTS": "worker_max_restarts",
    "ANOLE_PS_MAX_RESTARTS": "ps_max_restarts",
    "ANOLE_MIN_TASKS_PER_CALL": "min_tasks_per_call",
    "ANOLE_CALL_TIMEOUT": "call_timeout_s",
}


@dataclass(frozen=True)
class RayOptions:
    """How a distributed run uses Ray. Defaults suit one machine; every field has an env var."""

    mode: str = "sync"
    """sync: wait for the whole meta-batch, average, step (same steps as the Trainer).
    async: apply each worker's meta-batch as it arrives, dropping updates older than `staleness`."""
    staleness: int | None = None
    """async: the most parameter versions an update may lag and still be applied (None: workers)."""
    worker_cpus: float | None = None
    """CPUs per worker, also its torch threads (None: config.num_threads, else a fair share)."""
    worker_gpus: float | None = None
    """GPUs per worker, fractional allowed (None: share the cluster's GPUs, at most 1 each)."""
    placement: str = "SPREAD"
    """Placement-group strategy for the workers' bundles."""
    placement_timeout_s: float = 60.0
    """How long to wait for the cluster to grant the workers' resources before failing."""
    worker_max_restarts: int = 3
    """Times Ray restarts a crashed worker (its in-flight episodes go to the others meanwhile)."""
    ps_max_restarts: int = 3
    """Times Ray restarts a crashed parameter server (it resumes from its latest checkpoint)."""
    ps_cpus: float = 0.0
    """CPUs reserved for the parameter server: it idles while workers compute."""
    min_tasks_per_call: int = 2
    """Fewest tasks in one worker call, so each call carries enough work to amortise its cost."""
    call_timeout_s: float = 600.0
    """How long to wait for any worker answer before declaring the run stuck."""
    max_retries_per_step: int = 50
    """Re-dispatches allowed within one step before giving up."""

    def __post_init__(self) -> None:
        checks = [
            (self.mode in MODES, "mode", "sync or async"),
            (self.staleness is None or self.staleness >= 0, "staleness", ">= 0"),
            (self.worker_cpus is None or self.worker_cpus > 0, "worker_cpus", "> 0"),
            (self.worker_gpus is None or self.worker_gpus >= 0, "worker_gpus", ">= 0"),
            (
                self.worker_gpus is None
                or self.worker_gpus <= 1
                or float(self.worker_gpus).is_integer(),
                "worker_gpus",
                "a fraction <= 1 or a whole number",
            ),
            (self.placement in STRATEGIES, "placement", " / ".join(STRATEGIES)),
            (self.placement_timeout_s > 0, "placement_timeout_s", "> 0"),
            (self.min_tasks_per_call >= 1, "min_tasks_per_call", ">= 1"),
            (self.call_timeout_s > 0, "call_timeout_s", "> 0"),
        ]
        for ok, name, expected in checks:
            if not ok:
                env = (
                    next(k for k, v in ENV_VARS.items() if v == name)
                    if name in ENV_VARS.values()
                    else None
                )
                where = f" (env {env})" if env else ""
                raise ConfigError(
                    f"Ray option '{name}'{where} = {getattr(self, name)!r}: must be {expected}"
                )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> RayOptions:
        """Defaults, then `ANOLE_*` environment variables, then `overrides` (None ones ignored)."""
        env = os.environ if env is None else env
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for var, name in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            kind = types[name]
            try:
                if "float" in kind:
                    values[name] = float(raw)
                elif "int" in kind:
                    values[name] = int(raw)
                else:
                    values[name] = raw.strip() if name != "placement" else raw.strip().upper()
            except ValueError:
                raise ConfigError(
                    f"environment variable {var}={raw!r} is not a valid {kind}"
                ) from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class ClusterView:
    """The resources a cluster has: totals and each alive node's."""

    total: dict[str, float]
    nodes: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def current(cls) -> ClusterView:
        """The connected cluster, as Ray reports it now."""
        import ray

        nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
        return cls(dict(ray.cluster_resources()), nodes)

    def node_max(self, resource: str) -> float:
        return max(
            (n.get(resource, 0.0) for n in self.nodes), default=self.total.get(resource, 0.0)
        )


@dataclass(frozen=True)
class ResourcePlan:
    """What each actor of a run gets. Built by `plan_resources`; read by the option builders."""

    workers: int
    worker_cpus: float
    worker_gpus: float
    threads: int
    """torch threads per worker: its CPUs, at least 1."""
    placement: str
    placement_timeout_s: float
    worker_max_restarts: int
    ps_max_restarts: int
    ps_cpus: float

    @property
    def bundle(self) -> dict[str, float]:
        """One worker's resources, as a placement-group bundle."""
        out = {"CPU": self.worker_cpus}
        if self.worker_gpus:
            out["GPU"] = self.worker_gpus
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "worker_cpus": self.worker_cpus,
            "worker_gpus": self.worker_gpus,
            "threads": self.threads,
            "placement": self.placement,
        }


def plan_resources(
    config: TrainConfig, workers: int, options: RayOptions, cluster: ClusterView
) -> ResourcePlan:
    """Per-worker CPUs/GPUs for `workers` workers on `cluster`.

    CPUs: the option, else `config.num_threads`, else an equal share of the cluster's CPUs
    (capped by the largest node). GPUs: the option, else an equal share of the cluster's GPUs,
    at most one per worker, so two workers share one GPU at 0.5 each; 0 without GPUs.
    """
    if workers < 1:
        raise ConfigError(f"--workers {workers}: need at least 1 worker (0 trains in this process)")
    cpus = options.worker_cpus
    if cpus is None:
        if config.num_threads:
            cpus = float(config.num_threads)
        else:
            share = math.floor(cluster.total.get("CPU", 1.0) / workers)
            cpus = float(max(1, min(share, int(cluster.node_max("CPU")) or 1)))
    gpus = options.worker_gpus
    if gpus is None:
        total_gpus = cluster.total.get("GPU", 0.0)
        gpus = 0.0
        if total_gpus > 0:
            gpus = min(1.0, total_gpus / workers)
            if gpus < 1.0:
                # A fraction that tiles a GPU exactly (1/2, 1/3, ...), so no GPU is left part-used.
                gpus = 1.0 / math.ceil(1.0 / gpus)
    return ResourcePlan(
        workers=workers,
        worker_cpus=float(cpus),
        worker_gpus=float(gpus),
        threads=max(1, int(round(cpus))),
        placement=options.placement,
        placement_timeout_s=options.placement_timeout_s,
        worker_max_restarts=options.worker_max_restarts,
        ps_max_restarts=options.ps_max_restarts,
        ps_cpus=options.ps_cpus,
    )


def local_cpus(config: TrainConfig, workers: int, options: RayOptions) -> int:
    """CPUs to declare when starting a local Ray: this machine's, or enough for the workers."""
    per_worker = options.worker_cpus or config.num_threads or 1
    return max(os.cpu_count() or 1, math.ceil(per_worker * workers))


def shortfall(plan: ResourcePlan, cluster: ClusterView) -> list[str]:
    """Why `plan` cannot fit `cluster`, one line per short resource (empty if it might fit)."""
    problems = []
    for resource, amount in plan.bundle.items():
        need = amount * plan.workers
        have = cluster.total.get(resource, 0.0)
        if have + 1e-9 < need:
            problems.append(
                f"{resource}: {plan.workers} x {amount:g} = {need:g} needed, the cluster has {have:g}"
            )
        elif cluster.node_max(resource) + 1e-9 < amount:
            problems.append(
                f"{resource}: each worker needs {amount:g} on one node, the largest node has "
                f"{cluster.node_max(resource):g}"
            )
    if plan.placement == "STRICT_SPREAD" and len(cluster.nodes) < plan.workers:
        problems.append(
            f"nodes: STRICT_SPREAD needs {plan.workers} nodes, the cluster has {len(cluster.nodes)}"
        )
    return problems


def _placement_message(plan: ResourcePlan, cluster: ClusterView, waited: float) -> str:
    problems = shortfall(plan, cluster) or [
        "the resources exist but other actors or jobs hold them"
    ]
    fixes = []
    if any(p.startswith("GPU") for p in problems):
        fixes.append("add GPU nodes (`ray start --address=HEAD --num-gpus=1`)")
        fixes.append("run the workers on CPUs (ANOLE_WORKER_GPUS=0)")
    if any(p.startswith("CPU") for p in problems):
        fixes.append("give each worker fewer CPUs (ANOLE_WORKER_CPUS or config num_threads)")
    if any(p.startswith("nodes") for p in problems):
        fixes.append("allow several workers per node (ANOLE_PLACEMENT=SPREAD)")
    if not fixes:
        fixes.append("wait for the other jobs (raise ANOLE_PLACEMENT_TIMEOUT)")
    fixes.append("use fewer --workers")
    bundle = ", ".join(f"{k}: {v:g}" for k, v in plan.bundle.items())
    return (
        f"could not place {plan.workers} adaptation worker(s) with {{{bundle}}} each "
        f"({plan.placement}) within {waited:.0f}s: "
        + "; ".join(problems)
        + ". Fix: "
        + ", ".join(fixes[:-1])
        + ("," if len(fixes) > 2 else "")
        + f" or {fixes[-1]}."
    )


def reserve_workers(plan: ResourcePlan):
    """A ready placement group with one bundle per worker, or PlacementError after the timeout.

    Never hangs: a request the cluster cannot grant (e.g. a GPU on a CPU-only cluster) fails with
    a message naming the missing resource and the fix.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    cluster = ClusterView.current()
    pg = placement_group([plan.bundle] * plan.workers, strategy=plan.placement)
    start = time.perf_counter()
    ready, _ = ray.wait([pg.ready()], timeout=plan.placement_timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise PlacementError(_placement_message(plan, cluster, time.perf_counter() - start))
    return pg


def worker_options(plan: ResourcePlan, pg, index: int) -> dict[str, Any]:
    """`.options(...)` for worker `index`: its bundle of the placement group, restartable.

    max_task_retries=0: the driver, not Ray, re-dispatches a dead worker's episodes, so it can
    send them to a live worker at once and count the retries.
    """
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {
        "num_cpus": plan.worker_cpus,
        "num_gpus": plan.worker_gpus,
        "max_restarts": plan.worker_max_restarts,
        "max_task_retries": 0,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=index
        ),
    }


def server_options(plan: ResourcePlan, node_id: str) -> dict[str, Any]:
    """`.options(...)` for the parameter server: pinned to the driver's node, restartable.

    Pinned because it writes checkpoints into the driver's --out directory, and must find them
    again when Ray restarts it.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {
        "num_cpus": plan.ps_cpus,
        "num_gpus": 0,
        "max_restarts": plan.ps_max_restarts,
        "max_task_retries": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    }


__all__ = [
    "ClusterView",
    "PlacementError",
    "RayOptions",
    "ResourcePlan",
    "TrainingError",
    "local_cpus",
    "plan_resources",
    "reserve_workers",
    "server_options",
    "shortfall",
    "worker_options",
]
