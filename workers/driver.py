"""The distributed driver: `train_distributed`, behind `anole train --workers N [--ray-address ADDR]`.

The driver connects to Ray (RAY_ADDRESS / --ray-address, else a local Ray sized for the workers),
puts the dataset into the object store once, reserves the workers' resources in a placement group
(failing with a clear message instead of waiting forever), starts one ParameterServer and N
AdaptationWorkers, then drives the steps:

    sync:  snapshot -> shard the step's meta-batch over the workers -> push each shard's update as
           it lands -> the server applies the complete meta-batch (the Trainer's exact step).
    async: every worker always has a whole meta-batch in flight on the freshest parameters; the
           server applies or drops (stale) each one as it lands.

Failures: a worker that dies mid-call has its shard re-sent to a live worker at once (Ray restarts
the dead one in the background); a parameter server that dies is restarted by Ray from its latest
checkpoint and the driver redoes the steps since. Updates are tagged, so nothing is counted twice.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.checkpoint import Checkpoint, CheckpointDir
from pipeline.config import TrainConfig
from pipeline.errors import CheckpointError, ConfigError
from pipeline.images import ImageSet
from pipeline.tasks import DomainSplit, EpisodeSpecs
from pipeline.train import (
    ProgressFn,
    Stoppable,
    TrainingData,
    TrainResult,
    check_compatible,
    refuse_existing_run,
)

from .pool import WorkerPool
from .protocol import Ack, ServerStatus, Snapshot, WorkerInfo
from .resources import (
    ClusterView,
    RayOptions,
    ResourcePlan,
    TrainingError,
    local_cpus,
    plan_resources,
    reserve_workers,
    server_options,
    worker_options,
)

log = logging.getLogger("anole.workers")

_ERRORS = {"CheckpointError": CheckpointError, "ConfigError": ConfigError}


@dataclass
class DistributedResult(TrainResult):
    """A TrainResult plus what the cluster did: workers, retries, restarts, overhead."""

    workers: int = 0
    mode: str = "sync"
    retries: int = 0
    """Shards re-dispatched because the worker computing them died."""
    worker_failures: int = 0
    ps_restarts: int = 0
    steps_redone: int = 0
    """Steps computed again after parameter-server restarts (those since its last checkpoint)."""
    counters: dict[str, int] = field(default_factory=dict)
    """Server counters: applied, duplicates, dropped_stale, orphaned."""
    resumed_from: str | None = None
    checkpoint_fallbacks: list[str] = field(default_factory=list)
    """Corrupt checkpoints skipped on (re)start, each with the reason."""
    overhead: dict[str, float] = field(default_factory=dict)
    """Mean step seconds, mean slowest-worker compute seconds, and the share outside compute."""
    resources: dict[str, Any] = field(default_factory=dict)
    worker_info: list[dict[str, Any]] = field(default_factory=list)
    final_params: np.ndarray | None = field(default=None, repr=False)
    """The meta-parameters at the end, flat (the checkpoint holds them too)."""

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(
            workers=self.workers,
            mode=self.mode,
            retries=self.retries,
            worker_failures=self.worker_failures,
            ps_restarts=self.ps_restarts,
            steps_redone=self.steps_redone,
            counters=self.counters,
            resumed_from=self.resumed_from,
            checkpoint_fallbacks=self.checkpoint_fallbacks,
            overhead={k: round(v, 4) for k, v in self.overhead.items()},
            resources=self.resources,
            devices=sorted({w["device"] for w in self.worker_info}),
        )
        return out


class _ServerRestarted(Exception):
    """The parameter server came back from a checkpoint at `step`: redo from there."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


BIND_ENV = "ANOLE_RAY_BIND"
"""Where a local Ray listens: `loopback` (default: 127.0.0.1 only) or `all` (Ray's own default,
every interface, for a local Ray that other machines join). A joined cluster is not affected."""

_CLUSTER_MODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def ray_session(address: str | None, num_cpus: int) -> Iterator[bool]:
    """Use the connected Ray, else join `address` / $RAY_ADDRESS, else start a local Ray.

    A local Ray listens on 127.0.0.1 only (see `BIND_ENV`) and keeps Ray's token authentication,
    with the token file readable by its owner only (see `secure_auth_token`).
    Yields whether this call started the connection (and so shuts it down at the end).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        yield False
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    secure_auth_token(create=not address)  # a token made before a join would turn auth on
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        with _bind(local_bind()):
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
    try:
        yield True
    finally:
        ray.shutdown()


def local_bind() -> str:
    """`BIND_ENV`'s value: loopback (the default) or all."""
    value = os.environ.get(BIND_ENV, "").strip().lower() or "loopback"
    if value not in ("loopback", "all"):
        raise ConfigError(
            f"{BIND_ENV}={value!r}: must be loopback (a local Ray listens on 127.0.0.1 only, the "
            "default) or all (every interface, so other machines can join it)"
        )
    return value


@contextmanager
def _bind(bind: str) -> Iterator[None]:
    """Start a local Ray's processes on loopback only, unless `bind` is "all".

    Ray's servers listen on every interface unless the node's address is a loopback one, and on
    Linux it swaps a loopback node address for the machine's own (cluster mode). Cluster mode off,
    its default on macOS and Windows, keeps 127.0.0.1: for the processes ray.init starts (the
    environment) and for this one (ray_constants read it at import).
    """
    if bind == "all":
        yield
        return
    from ray._private import ray_constants

    before_env, before = os.environ.get(_CLUSTER_MODE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_MODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        # Ray's processes keep what they started with; a later join of a real cluster needs it on.
        ray_constants.ENABLE_RAY_CLUSTER = before
        if before_env is None:
            os.environ.pop(_CLUSTER_MODE_ENV, None)
        else:
            os.environ[_CLUSTER_MODE_ENV] = before_env


def secure_auth_token(create: bool = True) -> Path | None:
    """Make Ray's token file owner-only (0600) before Ray reads it; return its path, if a file.

    A local ray.init turns token authentication on and, when no token exists, writes
    ~/.ray/auth_token with the umask's mode (0644: every local user could read it and so reach
    the cluster). Anole creates that file 0600 first (with `create`: a new token, as Ray would
    make it), and tightens an existing one (also $RAY_AUTH_TOKEN_PATH's) that it owns.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").strip().lower() != "token":
        return None  # authentication turned off explicitly: nothing to protect
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None  # the token is in the environment, not in a file
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named or Path.home() / ".ray" / "auth_token").expanduser()
    if not path.exists():
        if named or not create:
            return None  # Ray names a missing named file in its own error
        _create_token(path)
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except OSError as exc:  # e.g. a token owned by another user
        log.warning("could not make %s owner-only (chmod 600 it): %s", path, exc)
    return path


def _create_token(path: Path) -> None:
    """Write a new token to `path`, 0600 from the start, without replacing one written meanwhile."""
    import secrets

    from pipeline.atomic import atomic_write_bytes

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    atomic_write_bytes(tmp, secrets.token_hex(32).encode())  # 256 bits, Ray's own format
    try:
        os.chmod(tmp, 0o600)
        os.link(tmp, path)  # fails if another process created the token first: keep that one
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def shard_specs(specs: EpisodeSpecs, shards: int) -> list[EpisodeSpecs]:
    """`specs` cut into `shards` contiguous pieces of near-equal size (their concat is `specs`)."""
    bounds = np.linspace(0, specs.num_tasks, shards + 1).round().astype(int)
    return [specs[int(a) : int(b)] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


class DistributedTrainer(Stoppable):
    """One distributed run. `run()` trains; while it runs, `server` and `workers` are the actors."""

    def __init__(
        self,
        config: TrainConfig,
        images: ImageSet,
        out_dir: str | Path,
        *,
        workers: int,
        address: str | None = None,
        options: RayOptions | None = None,
        progress: ProgressFn | None = None,
        log_tensorboard: bool = True,
        split: DomainSplit | None = None,
        pool: WorkerPool | None = None,
    ):
        self.config = config
        self.pool = pool
        self.images = images
        self.out_dir = Path(out_dir)
        self.num_workers = int(workers)
        self.address = address
        self.options = options or RayOptions.from_env()
        self.progress = progress
        self.log_tensorboard = log_tensorboard
        self.data = TrainingData.build(images, config, split)
        self.server = None
        self.workers: list[Any] = []
        self.plan: ResourcePlan | None = None
        self.worker_info: list[WorkerInfo] = []
        # Counters of this driver's run.
        self.retries = 0
        self.worker_failures = 0
        self.ps_restarts = 0
        self.steps_redone = 0
        self.fallbacks: list[str] = []
        self._high_step = 0
        self._step_retries = 0
        self._step_stats: list[tuple[float, float]] = []  # (step wall s, slowest compute s)
        self._cpu_stats = [0.0, 0.0]  # worker CPU seconds, worker compute seconds x threads

    # --- public -------------------------------------------------------------------------------
    def run(self, *, resume: bool = False) -> DistributedResult:
        """Train to the configured steps (or time budget); with `resume`, from the latest checkpoint."""
        if self.num_workers < 1:
            raise ConfigError(
                f"--workers {self.num_workers}: need at least 1 (0 trains in this process)"
            )
        checkpoints = CheckpointDir(self.out_dir / "checkpoints")
        if not resume:
            refuse_existing_run(self.out_dir, checkpoints)  # worded as the single-process Trainer's
        if resume:
            self._preflight_resume(checkpoints)
        with ray_session(self.address, local_cpus(self.config, self.num_workers, self.options)):
            try:
                self._start(resume)
                return self._train()
            finally:
                self._stop()

    def _preflight_resume(self, checkpoints: CheckpointDir) -> None:
        """Refuse a resume with another config or data before starting any actor (cheap: JSON only).

        The parameter server verifies checksums and falls back past corrupt payloads itself.
        """
        for step in reversed(checkpoints.steps()):
            path = checkpoints.step_path(step)
            try:
                manifest = json.loads(path.with_suffix(".json").read_text())
            except (OSError, ValueError):
                continue
            check_compatible(Checkpoint(path, manifest, {}), self.config, self.images.data_version)
            return

    def worker_pids(self) -> list[int]:
        """Process ids of the workers (as they are now: a restarted worker has a new one)."""
        import ray

        return ray.get([w.pid.remote() for w in self.workers])

    def server_pid(self) -> int:
        """Process id of the parameter server."""
        import ray

        return ray.get(self.server.pid.remote())

    # --- start and stop -----------------------------------------------------------------------
    def _start(self, resume: bool) -> None:
        import ray
        from ray.exceptions import RayActorError

        from .server import RemoteParameterServer
        from .worker import RemoteAdaptationWorker, make_run_key

        cfg = self.config
        split = self.data.split.to_dict()
        self._key = make_run_key(cfg.to_dict(), split)
        if self.pool is not None:
            self.pool.check(self.images, self.num_workers)
            self.plan = plan = replace(self.pool.plan, workers=self.num_workers)
            self._pg, self._images_ref = None, self.pool.images_ref
        else:
            self.plan = plan = plan_resources(
                cfg, self.num_workers, self.options, ClusterView.current()
            )
            self._pg = reserve_workers(plan)
            # The dataset goes into the object store once; every actor reads that one copy.
            self._images_ref = ray.put(self.images)
        staleness = (
            self.options.staleness if self.options.staleness is not None else self.num_workers
        )
        self.server = RemoteParameterServer.options(
            **server_options(plan, ray.get_runtime_context().get_node_id())
        ).remote(
            cfg.to_dict(),
            [self._images_ref],
            split,
            str(self.out_dir),
            mode=self.options.mode,
            staleness=staleness,
            resume=resume,
            log_tensorboard=self.log_tensorboard,
            run_info={"workers": self.num_workers, **plan.to_dict()},
            threads=plan.threads,
        )
        if self.pool is not None:
            self.workers = self.pool.actors[: self.num_workers]
        else:
            self.workers = [
                RemoteAdaptationWorker.options(**worker_options(plan, self._pg, i)).remote(
                    cfg.to_dict(), [self._images_ref], split, plan.threads
                )
                for i in range(self.num_workers)
            ]
        self._alive = [True] * self.num_workers
        self._probes: dict[int, Any] = {}
        self._probe_due: dict[int, float] = {}
        self._probe_deaths = [0] * self.num_workers
        self._rr = 0
        status = self._open_status(ray.get(self.server.status.remote()))
        self.resumed_from = status.resumed_from
        self.worker_info = [None] * self.num_workers
        infos = []
        for w, actor in enumerate(self.workers):
            if self.pool is not None:
                self._configure(w)
            infos.append(actor.info.remote())
        for w, ref in enumerate(infos):
            try:
                self.worker_info[w] = ray.get(ref)
            except RayActorError:  # e.g. a pooled worker Ray is still restarting
                self._mark_dead(w)
        self._refresh_workers(block=not any(self._alive))
        log.info("workers: %s", [i.to_dict() for i in self.worker_info if i is not None])

    def _open_status(self, status: ServerStatus) -> ServerStatus:
        """Raise the server's open error in this process; report skipped corrupt checkpoints."""
        if status.error:
            raise _ERRORS.get(status.error_kind or "", TrainingError)(status.error)
        for message in status.fallbacks:
            if message not in self.fallbacks:
                self.fallbacks.append(message)
                warnings.warn(f"anole: {message}", RuntimeWarning, stacklevel=3)
        if status.resumed_from:
            log.warning("resumed from %s (step %d)", status.resumed_from, status.step)
        self._status = status
        self._incarnation = status.incarnation
        return status

    def _stop(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        owned = [] if self.pool is not None else self.workers
        for actor in [*owned, self.server]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        if getattr(self, "_pg", None) is not None:
            remove_placement_group(self._pg)
            self._pg = None

    # --- the loop -----------------------------------------------------------------------------
    def _train(self) -> DistributedResult:
        import ray

        cfg = self.config
        status = self._status
        t0 = time.perf_counter()
        self._start_step = status.step
        self._high_step = status.step
        self._tasks_done = 0
        self._train_seconds = 0.0
        self._bookkeeping_seconds = 0.0
        self._budget = cfg.minutes * 60.0
        self._budget_fixed = not self._budget or status.resumed_from is not None
        self._elapsed_before = status.elapsed
        self._t0 = t0
        self._total = status.total_steps
        if self.options.mode == "sync":
            self._run_sync(status.step)
        else:
            self._run_async(status.step)
        # Stopped by a signal: checkpoint where it is, without the final validation's wait.
        summary = self._server_get(self.server.finish.remote(validate=not self.stop_requested))
        _, flat = ray.get(self.server.snapshot.remote())
        counters = summary["counters"]
        return DistributedResult(
            out_dir=self.out_dir,
            step=summary["step"],
            total_steps=summary["total_steps"],
            best_val=summary["best_val"],
            best_checkpoint=Path(summary["best_checkpoint"])
            if summary["best_checkpoint"]
            else None,
            latest_checkpoint=Path(summary["latest_checkpoint"])
            if summary["latest_checkpoint"]
            else None,
            seconds=time.perf_counter() - t0,
            tasks_per_second=self._tasks_done / self._train_seconds if self._train_seconds else 0.0,
            history=summary["history"],
            workers=self.num_workers,
            mode=self.options.mode,
            retries=self.retries,
            worker_failures=self.worker_failures,
            ps_restarts=self.ps_restarts,
            steps_redone=self.steps_redone,
            counters=counters,
            resumed_from=self.resumed_from,
            checkpoint_fallbacks=list(self.fallbacks),
            overhead=self._overhead(),
            resources=self.plan.to_dict() if self.plan else {},
            worker_info=[i.to_dict() for i in self.worker_info if i is not None],
            final_params=np.array(flat),
            interrupted=self.stop_reason,
        )

    def _running(self, step: int) -> bool:
        """Whether to take another step: steps and budget left, and no stop asked for."""
        return step < self._total and not self._over_budget() and not self.stop_requested

    def _over_budget(self) -> bool:
        return (
            bool(self._budget)
            and self._elapsed_before + time.perf_counter() - self._t0 > self._budget
        )

    def _after_step(self, ack: Ack, num_tasks: int, wall: float) -> None:
        """Count an applied step, report progress, fix the step count of a time budget."""
        self._high_step = max(self._high_step, ack.step)
        self._step_retries = 0
        self._tasks_done += num_tasks
        self._train_seconds += wall - ack.bookkeeping_s
        self._bookkeeping_seconds += ack.bookkeeping_s
        if self.progress:
            self.progress(ack.step, self._total, dict(ack.metrics or {}))
        done = ack.step - self._start_step
        elapsed = self._elapsed_before + time.perf_counter() - self._t0
        if not self._budget_fixed and (done >= 20 or elapsed > 0.1 * self._budget):
            # The Trainer's rule: after 20 steps (or a tenth of the budget), size the run.
            per_step = (self._train_seconds + self._bookkeeping_seconds) / max(done, 1)
            remaining = self._budget - elapsed
            total = max(ack.step + 1, ack.step + int(remaining / per_step))
            self._total = self._server_get(self.server.set_total_steps.remote(total))
            self._budget_fixed = True

    # sync ------------------------------------------------------------------------------------
    def _run_sync(self, step: int) -> None:
        while self._running(step):
            try:
                step = self._sync_step(step)
            except _ServerRestarted as restart:
                step = restart.step

    def _sync_step(self, step: int) -> int:
        """One meta-step over the workers; returns the server's step after it."""
        start = time.perf_counter()
        snap, flat_ref = self._snapshot()
        if snap.step != step:  # cannot happen unless the server restarted unnoticed
            raise _ServerRestarted(snap.step)
        specs = self.data.specs_for_step(step)
        shards = self._shards(specs)
        pending: dict[Any, tuple[int, int, Any]] = {}
        for i, shard in enumerate(shards):
            self._submit(
                pending, i, step, snap, flat_ref, shard, self._pick_worker(pending, prefer=i)
            )
        pushes, slowest, retried = [], 0.0, False
        while pending:
            header_ref, (i, w, update_ref) = self._next_done(pending)
            header = self._worker_result(header_ref, w)
            if header is None:  # the worker died: its shard goes to a live worker at once
                retried = True
                self._retry(pending, i, step, snap, flat_ref, shards[i])
                continue
            slowest = max(slowest, header.compute_s)
            self._cpu_stats[0] += header.cpu_s
            self._cpu_stats[1] += header.compute_s * (self.plan.threads if self.plan else 1)
            # Straight from the worker's object store to the server: the driver never holds it.
            pushes.append(self.server.push.remote(header, update_ref))
        acks: list[Ack] = self._server_get(pushes)
        final = acks[-1]
        if not final.applied:
            raise TrainingError(
                f"step {step}: the server answered {[a.status for a in acks]} to a complete meta-batch"
            )
        wall = time.perf_counter() - start
        if not retried and step > self._start_step:  # the first step pays one-off warm-up costs
            self._step_stats.append((wall - final.bookkeeping_s, slowest))
        self._after_step(final, specs.num_tasks, wall)
        return final.step

    def _shards(self, specs: EpisodeSpecs) -> list[EpisodeSpecs]:
        # At most one shard per worker, and never fewer tasks per call than the minimum.
        count = min(self.num_workers, max(1, specs.num_tasks // self.options.min_tasks_per_call))
        return shard_specs(specs, count)

    # async -----------------------------------------------------------------------------------
    def _run_async(self, step: int) -> None:
        dispatch = max(self._status.next_dispatch, step)
        pending: dict[Any, tuple[int, int, Any]] = {}
        snap, flat_ref = None, None
        last_applied = time.perf_counter()
        while self._running(step):
            try:
                if snap is None:
                    snap, flat_ref = self._snapshot()
                    pending.clear()  # work for a previous incarnation is void
                # Keep every live worker busy with a whole meta-batch on the freshest parameters.
                for w in self._idle_workers(pending):
                    specs = self.data.specs_for_step(dispatch)
                    self._submit(pending, dispatch, dispatch, snap, flat_ref, specs, w)
                    dispatch += 1
                header_ref, (d, w, update_ref) = self._next_done(pending)
                header = self._worker_result(header_ref, w)
                if header is None:
                    self._retry(pending, d, d, snap, flat_ref, self.data.specs_for_step(d))
                    continue
                ack: Ack = self._server_get(self.server.push.remote(header, update_ref))
                if ack.applied:
                    step = ack.step
                    # Calls overlap in async mode: throughput counts time between applied updates.
                    now = time.perf_counter()
                    self._after_step(ack, header.num_tasks, now - last_applied)
                    last_applied = now
                    snap, flat_ref = self._snapshot()
            except _ServerRestarted as restart:
                step, snap = restart.step, None
                dispatch = max(dispatch, self._status.next_dispatch)

    # --- workers ------------------------------------------------------------------------------
    def _submit(
        self,
        pending: dict,
        key: int,
        step: int,
        snap: Snapshot,
        flat_ref: Any,
        specs: EpisodeSpecs,
        w: int,
    ) -> None:
        call = self.workers[w].contribute.remote(step, snap, flat_ref, specs, self._key)
        header_ref, update_ref = call
        pending[header_ref] = (key, w, update_ref)

    def _next_done(self, pending: dict) -> tuple[Any, tuple[int, int, Any]]:
        import ray

        ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.options.call_timeout_s)
        if not ready:
            raise TrainingError(
                f"no worker answered within {self.options.call_timeout_s:g}s; the cluster may be "
                "overloaded (raise ANOLE_CALL_TIMEOUT) or a node is unreachable"
            )
        return ready[0], pending.pop(ready[0])

    def _worker_result(self, header_ref: Any, w: int):
        """The header of a finished call, or None when it must be re-sent (the worker died, or
        came back from a restart serving another run)."""
        import ray
        from ray.exceptions import RayActorError

        from .worker import WorkerNotConfigured

        try:
            return ray.get(header_ref)
        except WorkerNotConfigured:
            log.warning("worker %d was restarted for another run; re-configuring it", w)
            self._configure(w)
            return None
        except RayActorError as exc:
            log.warning("worker %d died (%s); re-dispatching its episodes", w, type(exc).__name__)
            self.worker_failures += 1
            self._mark_dead(w)
            return None

    def _mark_dead(self, w: int) -> None:
        """Stop sending work to worker `w` until a liveness probe finds it restarted."""
        self._alive[w] = False
        self._probes[w] = self.workers[w].info.remote()

    def _configure(self, w: int) -> None:
        # Actor calls run in order: the next contribute() sees this configuration.
        self.workers[w].configure.remote(self.config.to_dict(), self.data.split.to_dict())

    def _retry(
        self,
        pending: dict,
        key: int,
        step: int,
        snap: Snapshot,
        flat_ref: Any,
        specs: EpisodeSpecs,
    ) -> None:
        """Send a dead worker's specs to a live worker (the same tag: counted once however often)."""
        self.retries += 1
        self._step_retries += 1
        if self._step_retries > self.options.max_retries_per_step:
            raise TrainingError(
                f"step {step}: gave up after {self._step_retries} re-dispatches; workers keep "
                "dying (see the Ray logs: out of memory? a crashing CUDA kernel?)"
            )
        self._submit(pending, key, step, snap, flat_ref, specs, self._pick_worker(pending))

    def _pick_worker(self, pending: dict, prefer: int | None = None) -> int:
        """A live worker: `prefer` if alive, else the least loaded (waits for a restart if none)."""
        self._refresh_workers(block=not any(self._alive))
        if prefer is not None and prefer < self.num_workers and self._alive[prefer]:
            return prefer
        load = [0] * self.num_workers
        for _, w, _ in pending.values():
            load[w] += 1
        live = [w for w in range(self.num_workers) if self._alive[w]]
        self._rr += 1
        return min(live, key=lambda w: (load[w], (w - self._rr) % self.num_workers))

    def _idle_workers(self, pending: dict) -> list[int]:
        self._refresh_workers(block=not any(self._alive))
        busy = {w for _, w, _ in pending.values()}
        return [w for w in range(self.num_workers) if self._alive[w] and w not in busy]

    def _refresh_workers(self, block: bool) -> None:
        """Mark workers whose liveness probe answered as alive again; with `block`, wait for one.

        A probe sent while Ray restarts the actor fails as "unavailable": it is sent again a
        little later. Three "died" answers in a row mean Ray gave up on that worker.
        """
        import ray
        from ray.exceptions import ActorDiedError, RayActorError

        deadline = time.perf_counter() + self.options.call_timeout_s
        while self._probes or self._probe_due:
            now = time.perf_counter()
            for w, due in list(self._probe_due.items()):
                if now >= due:
                    del self._probe_due[w]
                    self._probes[w] = self.workers[w].info.remote()
            for w, probe in list(self._probes.items()):
                if not ray.wait([probe], timeout=0)[0]:
                    continue
                del self._probes[w]
                try:
                    self.worker_info[w] = ray.get(probe)
                except RayActorError as exc:
                    died = isinstance(exc, ActorDiedError)
                    self._probe_deaths[w] = self._probe_deaths[w] + 1 if died else 0
                    if self._probe_deaths[w] < 3:
                        self._probe_due[w] = time.perf_counter() + 0.25
                    continue
                self._configure(w)  # a restarted worker starts with its creation config
                self._alive[w] = True
                self._probe_deaths[w] = 0
                log.warning("worker %d is back (pid %d)", w, self.worker_info[w].pid)
            if any(self._alive) or not block:
                break
            if time.perf_counter() > deadline:
                raise TrainingError(f"no worker came back within {self.options.call_timeout_s:g}s")
            if self._probes:
                ray.wait(list(self._probes.values()), num_returns=1, timeout=0.25)
            else:
                time.sleep(0.05)
        if not any(self._alive):
            raise TrainingError(
                f"all {self.num_workers} workers died and Ray gave up restarting them "
                f"(max_restarts={self.plan.worker_max_restarts}); see the Ray logs"
            )

    # --- the parameter server -----------------------------------------------------------------
    def _snapshot(self) -> tuple[Snapshot, Any]:
        header_ref, flat_ref = self.server.snapshot.remote()
        return self._server_get(header_ref), flat_ref

    def _server_get(self, refs: Any) -> Any:
        """ray.get on server replies; a crashed or restarted server raises _ServerRestarted."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            out = ray.get(refs, timeout=self.options.call_timeout_s)
        except RayActorError:
            self._recover_server()
        except GetTimeoutError:
            raise TrainingError(
                f"the parameter server did not answer within {self.options.call_timeout_s:g}s"
            ) from None
        for reply in out if isinstance(out, list) else [out]:
            if getattr(reply, "incarnation", self._incarnation) != self._incarnation:
                self._recover_server()
        return out

    def _recover_server(self) -> None:
        """Wait for Ray to restart the server; it resumes from its latest checkpoint."""
        import ray
        from ray.exceptions import RayActorError

        self.ps_restarts += 1
        if self.ps_restarts > self.plan.ps_max_restarts:
            raise TrainingError(
                f"the parameter server died {self.ps_restarts} times (max_restarts="
                f"{self.plan.ps_max_restarts}); resume with `anole train --resume`"
            )
        deadline = time.perf_counter() + self.options.call_timeout_s
        while True:
            try:
                status = ray.get(self.server.status.remote(), timeout=self.options.call_timeout_s)
                if status.incarnation != self._incarnation:
                    break
            except RayActorError:
                pass  # not restarted yet
            if time.perf_counter() > deadline:
                raise TrainingError("the parameter server did not come back after a crash")
            time.sleep(0.2)
        self._open_status(status)
        redone = max(0, self._high_step - status.step)
        self.steps_redone += redone
        self._total = status.total_steps
        log.warning(
            "parameter server restarted from step %d; redoing %d step(s)", status.step, redone
        )
        raise _ServerRestarted(status.step)

    def _overhead(self) -> dict[str, float]:
        """Share of each meta-step spent outside the slowest worker's compute (sync steps)."""
        if not self._step_stats:
            return {}
        walls = np.array([s[0] for s in self._step_stats])
        computes = np.array([s[1] for s in self._step_stats])
        cpu, budget = self._cpu_stats
        return {
            "steps": float(len(walls)),
            "step_s": float(walls.mean()),
            "compute_s": float(computes.mean()),
            "share": float(1.0 - computes.sum() / walls.sum()),
            # Below 1: the workers got less CPU than they reserved (a busy, shared machine).
            "worker_cpu_share": float(cpu / budget) if budget else 0.0,
        }


def train_distributed(
    config: TrainConfig,
    images: ImageSet,
    out_dir: str | Path,
    *,
    workers: int,
    address: str | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
    options: RayOptions | None = None,
    log_tensorboard: bool = True,
    split: DomainSplit | None = None,
    pool: WorkerPool | None = None,
) -> DistributedResult:
    """Meta-train on Ray with `workers` adaptation workers and one parameter server.

    Joins `address` (or $RAY_ADDRESS) when given, otherwise starts a local Ray. `progress(done,
    total, metrics)` is called after every meta-step. With `resume`, continues from the latest good
    checkpoint in `out_dir` (corrupt ones are skipped with a warning). `options` (default: from
    ANOLE_* environment variables) picks sync/async, staleness and per-worker resources. `split`
    fixes the train/val/test domains (default: split from the config, as the Trainer does).
    `pool` runs on the first `workers` workers of a `WorkerPool` instead of starting new ones.
    """
    trainer = DistributedTrainer(
        config,
        images,
        out_dir,
        workers=workers,
        address=address,
        options=options,
        progress=progress,
        log_tensorboard=log_tensorboard,
        split=split,
        pool=pool,
    )
    return trainer.run(resume=resume)


__all__ = [
    "DistributedResult",
    "DistributedTrainer",
    "RayOptions",
    "WorkerPool",
    "shard_specs",
    "train_distributed",
]
