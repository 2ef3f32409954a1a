"""WorkerPool: AdaptationWorkers that outlive one run, for jobs that train several times.

Starting a worker costs a process and a torch import (seconds on a small machine); a pool pays it
once for a sweep, a retrain after new data, or a test suite. Each run re-configures the workers
(`AdaptationWorker.configure`) and brings its own parameter server. The pool owns the workers'
placement group and the dataset's object-store copy; close it (or use `with`) when done.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.images import ImageSet
from pipeline.train import TrainingData

from .resources import (
    ClusterView,
    RayOptions,
    ResourcePlan,
    plan_resources,
    reserve_workers,
    worker_options,
)


class WorkerPool:
    """`workers` AdaptationWorkers on `images`, placed once; pass to `DistributedTrainer(pool=)`."""

    def __init__(
        self,
        images: ImageSet,
        workers: int,
        *,
        config: TrainConfig,
        options: RayOptions | None = None,
    ):
        import ray

        from .worker import RemoteAdaptationWorker

        if not ray.is_initialized():
            raise ConfigError(
                "WorkerPool needs a connected Ray: call ray.init() (or ray_session) first"
            )
        self.images = images
        self.options = options or RayOptions.from_env()
        self.plan: ResourcePlan = plan_resources(
            config, workers, self.options, ClusterView.current()
        )
        self.pg = reserve_workers(self.plan)
        self.images_ref = ray.put(images)
        split = TrainingData.build(images, config).split.to_dict()
        self.actors: list[Any] = [
            RemoteAdaptationWorker.options(**worker_options(self.plan, self.pg, i)).remote(
                config.to_dict(), [self.images_ref], split, self.plan.threads
            )
            for i in range(workers)
        ]
        ray.get([a.pid.remote() for a in self.actors])  # started (and so ready) before first use

    @property
    def size(self) -> int:
        return len(self.actors)

    def check(self, images: ImageSet, workers: int) -> None:
        """Raise ConfigError unless a run on `images` with `workers` workers fits this pool."""
        if images.data_version != self.images.data_version:
            raise ConfigError(
                f"the worker pool holds data version {self.images.data_version[:12]}, the run "
                f"{images.data_version[:12]}; make a pool for this data"
            )
        if workers > self.size:
            raise ConfigError(f"--workers {workers}: the worker pool has only {self.size}")

    def close(self) -> None:
        """Stop the workers and free their placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
