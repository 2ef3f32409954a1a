"""Distributed training on a real local Ray: parity with the Trainer, failures, resume.

One local Ray and a pool of 3 workers serve the whole module; failures are real SIGKILLs of actor
processes and of an `anole train` subprocess. Data: the Omniglot small1 zip ingested into tmp.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from faults import (  # noqa: E402
    IN_CREATE,
    Inotify,
    assert_nothing_lost,
    flat_params,
    freeze,
    main_thread_sample,
)

from pipeline.checkpoint import CheckpointDir  # noqa: E402
from pipeline.config import TrainConfig, config_for  # noqa: E402
from pipeline.errors import CheckpointError, ConfigError  # noqa: E402
from workers.driver import DistributedTrainer, shard_specs, train_distributed  # noqa: E402
from workers.pool import WorkerPool  # noqa: E402
from workers.protocol import UpdateHeader  # noqa: E402
from workers.resources import ClusterView, RayOptions, plan_resources, shortfall  # noqa: E402
from workers.server import ParameterServer  # noqa: E402

ray = pytest.importorskip("ray")

ZIP = (
    Path(os.environ.get("ANOLE_DATA", "/work/shared/data"))
    / "omniglot/images_background_small1.zip"
)

# Small and numerically tame (one inner step; hidden=16, where the grouped conv4 agrees across
# task-batch sizes to ~1e-7; float32, since bfloat16 rounds differently per task-batch size):
# shard sums match the batched sum to float rounding.
EXACT = dict(
    precision="float32",
    hidden=16,
    meta_batch=6,
    steps=4,
    val_every=2,
    val_episodes=4,
    val_ways=5,
    checkpoint_every=2,
    seed=1,
    num_threads=1,
)
LEARNER_EXACT = {
    # one inner SGD step: what the flat config's defaults gave every learner before nested
    # learner configs (ReptileConfig's own defaults are supervised-reptile's 5 Adam steps)
    "reptile": {"inner_steps": 1, "inner_lr": 0.4, "inner_optimizer": "sgd", "eval_inner_steps": 3},
    "fomaml": {"inner_steps": 1},
}


def exact(learner: str = "protonet", **changes) -> TrainConfig:
    """The EXACT config for `learner`, with its LEARNER_EXACT settings."""
    return TrainConfig(learner=learner, learner_config=LEARNER_EXACT.get(learner),
                       **{**EXACT, **changes})


# More compute per call (so a kill lands mid-call), compared against a clean distributed run.
FAULT = TrainConfig(
    learner="fomaml",
    precision="float32",
    hidden=16,
    meta_batch=6,
    learner_config={"inner_steps": 3},
    steps=6,
    val_every=3,
    val_episodes=4,
    val_ways=5,
    checkpoint_every=2,
    seed=2,
    num_threads=1,
)
ONE_CPU = RayOptions(worker_cpus=1, min_tasks_per_call=1)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    if not ZIP.exists():
        pytest.skip(f"{ZIP} not found; set ANOLE_DATA")
    from pipeline.store import Store

    root = tmp_path_factory.mktemp("store")
    Store(root).ingest(ZIP)
    return root


@pytest.fixture(scope="module")
def images(store_root):
    from pipeline.store import Store

    return Store(store_root).load_images()


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: Ray startup costs seconds."""
    if ray.is_initialized():
        ray.shutdown()
    # 3 CPUs for the worker pool, 2 for the workers of the `anole train` subprocess.
    ray.init(address="local", num_cpus=5, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(images, local_ray):
    """Three workers shared by the module's runs: a worker process costs seconds to start."""
    with WorkerPool(
        images, 3, config=exact("reptile"), options=ONE_CPU
    ) as p:
        yield p


@pytest.fixture(scope="module")
def trainer_runs(images, tmp_path_factory):
    """Single-process Trainer results, by learner (cached for the module)."""
    from pipeline.train import Trainer

    cache: dict[str, np.ndarray] = {}

    def run(cfg: TrainConfig) -> tuple[np.ndarray, float | None]:
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        if key not in cache:
            out = tmp_path_factory.mktemp("trainer")
            result = Trainer(cfg, images, out, log_tensorboard=False).run()
            cache[key] = (flat_params(result.latest_checkpoint), result.best_val)
        return cache[key]

    return run


# --- no Ray needed ------------------------------------------------------------------------------


def test_options_from_env_and_errors():
    env = {
        "ANOLE_RAY_MODE": "async",
        "ANOLE_RAY_STALENESS": "2",
        "ANOLE_WORKER_GPUS": "0.5",
        "ANOLE_PLACEMENT": "pack",
    }
    opts = RayOptions.from_env(env, worker_cpus=2)
    assert (opts.mode, opts.staleness, opts.worker_gpus, opts.placement, opts.worker_cpus) == (
        "async",
        2,
        0.5,
        "PACK",
        2.0,
    )
    with pytest.raises(ConfigError, match="ANOLE_RAY_MODE"):
        RayOptions.from_env({"ANOLE_RAY_MODE": "hogwild"})
    with pytest.raises(ConfigError, match="ANOLE_WORKER_GPUS"):
        RayOptions.from_env({"ANOLE_WORKER_GPUS": "many"})


def test_plan_shares_cpus_and_gpus():
    cfg = TrainConfig()
    cluster = ClusterView({"CPU": 8.0, "GPU": 1.0}, [{"CPU": 8.0, "GPU": 1.0}])
    plan = plan_resources(cfg, 2, RayOptions(), cluster)
    assert (plan.worker_cpus, plan.worker_gpus, plan.threads) == (4.0, 0.5, 4)
    three = plan_resources(cfg, 3, RayOptions(), cluster)
    assert three.worker_gpus == pytest.approx(1 / 3)
    cpu_only = plan_resources(
        cfg.replace(num_threads=1), 2, RayOptions(), ClusterView({"CPU": 2.0})
    )
    assert (cpu_only.worker_cpus, cpu_only.worker_gpus, cpu_only.bundle) == (1.0, 0.0, {"CPU": 1.0})
    want_gpu = plan_resources(
        cfg, 2, RayOptions(worker_gpus=1), ClusterView({"CPU": 2.0}, [{"CPU": 2.0}])
    )
    assert shortfall(want_gpu, ClusterView({"CPU": 2.0}, [{"CPU": 2.0}])) == [
        "GPU: 2 x 1 = 2 needed, the cluster has 0"
    ]


def test_shards_partition_the_meta_batch(images):
    from pipeline.train import TrainingData

    data = TrainingData.build(images, exact())
    specs = data.specs_for_step(0)
    for n in (1, 2, 3, 4, 6):
        shards = shard_specs(specs, n)
        assert len(shards) == n
        assert np.array_equal(np.concatenate([s.task_ids for s in shards]), specs.task_ids)


def test_fresh_run_refuses_a_directory_with_checkpoints(images, tmp_path):
    CheckpointDir(tmp_path / "checkpoints").save(2, {"x": 1}, {"config": {}})
    with pytest.raises(CheckpointError, match="--resume"):
        train_distributed(exact(), images, tmp_path, workers=1)


def test_server_counts_each_tag_once_and_drops_stale_updates(images, tmp_path):
    """The parameter server's bookkeeping, called in-process (no actor): dedup, staleness, orphans."""
    cfg = exact("reptile", val_episodes=2)
    split = _split(images, cfg)
    ps = ParameterServer(cfg.to_dict(), images, split, str(tmp_path / "sync"), mode="sync")
    ids = ps.data.specs_for_step(0).task_ids.tolist()
    size = sum(p.numel() for p in ps.template.values())
    inc = ps.incarnation

    def header(step, tasks, version=0, incarnation=inc):
        return UpdateHeader(step, tuple(tasks), version, incarnation, {"tasks": len(tasks)}, 0.0)

    ones = np.ones(size, np.float32)
    assert ps.push(header(0, ids[:3]), ones).status == "pending"
    assert ps.push(header(0, ids[:3]), ones).status == "duplicate"  # a retried push
    with pytest.raises(ValueError, match="overlap"):
        ps.push(header(0, ids[2:4]), ones)
    assert ps.push(header(0, ids[3:]), ones).status == "applied"
    assert ps.push(header(0, ids[3:]), ones).status == "duplicate"  # late retry after the step
    assert ps.push(header(1, ids[:3], incarnation="other"), ones).status == "orphaned"
    assert ps.counters == {"applied": 1, "duplicates": 2, "dropped_stale": 0, "orphaned": 1}

    ps = ParameterServer(
        cfg.to_dict(), images, split, str(tmp_path / "async"), mode="async", staleness=1
    )
    inc = ps.incarnation
    statuses = [ps.push(header(d, [d], version=0, incarnation=inc), ones).status for d in range(4)]
    assert statuses == ["applied", "applied", "stale", "stale"]  # lag 0, 1, then 2 > bound
    assert ps.push(header(1, [1], version=0, incarnation=inc), ones).status == "duplicate"
    assert ps.counters["dropped_stale"] == 2 and ps.step == 2


def _split(images, cfg):
    from pipeline.train import TrainingData

    return TrainingData.build(images, cfg).split.to_dict()


# --- on a local Ray -------------------------------------------------------------------------------


@pytest.mark.parametrize("learner", ["reptile", "fomaml"])
def test_sync_training_matches_the_single_process_trainer(
    learner, images, pool, trainer_runs, tmp_path
):
    cfg = exact(learner)
    expected, expected_val = trainer_runs(cfg)
    for workers in (1, 2, 3):
        result = train_distributed(
            cfg,
            images,
            tmp_path / f"w{workers}",
            workers=workers,
            options=ONE_CPU,
            log_tensorboard=False,
            pool=pool,
        )
        # Shards sum the meta-gradient in another order than one call does (float32: ~1e-7
        # relative), and Adam's first steps, lr * g / |g| per component, turn that into up to
        # ~1e-4 on components whose gradient is near zero. A lost or double-counted shard moves
        # every parameter by ~lr = 1e-3 per step: a relative difference of ~5e-3, 10x above this.
        gap = np.linalg.norm(result.final_params - expected) / np.linalg.norm(expected)
        assert gap < 5e-4, f"{learner} on {workers} worker(s): relative difference {gap:.1e}"
        np.testing.assert_array_equal(flat_params(result.latest_checkpoint), result.final_params)
        # validation of a barely trained 16-filter net: near-tied logits, so that gap can flip a
        # few of its 100 answers
        assert result.best_val == pytest.approx(expected_val, abs=0.05)
        assert result.counters == {
            "applied": cfg.steps,
            "duplicates": 0,
            "dropped_stale": 0,
            "orphaned": 0,
        }
        assert [w["device"] for w in result.worker_info] == ["cpu"] * workers
        assert all(w["images_zero_copy"] and w["threads"] == 1 for w in result.worker_info)
        manifest = json.loads(result.latest_checkpoint.with_suffix(".json").read_text())
        assert manifest["data_version"] == images.data_version and manifest["learner"] == learner
        assert manifest["distributed"]["workers"] == workers
    assert CheckpointDir(tmp_path / "w3" / "checkpoints").steps() == [2, 4]


@pytest.fixture(scope="module")
def clean_fault_run(images, pool, tmp_path_factory):
    """The FAULT config on 2 workers without failures: what every failure test must reproduce."""
    out = tmp_path_factory.mktemp("clean")
    return train_distributed(
        FAULT, images, out, workers=2, options=ONE_CPU, log_tensorboard=False, pool=pool
    )


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_killed_worker_mid_step_is_replaced(images, pool, clean_fault_run, tmp_path):
    killed: list[int] = []

    def kill_when_busy(pid: int) -> None:
        # SIGKILL once the worker has burnt 20 ms of CPU on the next step: mid-call, for real.
        start = _cpu_ticks(pid)
        deadline = time.time() + 10
        while time.time() < deadline and _cpu_ticks(pid) - start < 2:
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    trainer: DistributedTrainer

    def progress(done, total, metrics):
        if done == 2 and not killed:
            thread = threading.Thread(target=kill_when_busy, args=(trainer.worker_pids()[0],))
            thread.start()

    trainer = DistributedTrainer(
        FAULT,
        images,
        tmp_path,
        workers=2,
        options=ONE_CPU,
        progress=progress,
        log_tensorboard=False,
        pool=pool,
    )
    result = trainer.run()
    assert killed
    assert result.retries >= 1 and result.worker_failures >= 1
    # No lost and no double-counted update: exactly the clean run's parameters.
    assert_nothing_lost(
        result.counters, FAULT.steps, result.final_params, clean_fault_run.final_params
    )


class ServerKiller:
    """SIGKILLs the parameter server of one run three times, at three real moments, in order:

    * "push": inside a push, while the server validates the step it has just applied. Seen from
      outside: its main thread (where Ray runs actor calls) computing without a break since the
      driver reported the step before a validation step, and that step's record not yet in
      metrics.jsonl. Nothing else the server does between steps computes for 2 ms.
    * "save": inside CheckpointDir.save, while a `.step-*.tmp` file exists (inotify reports its
      creation; the server is reniced so a busy machine slows it, not this watcher).
    * "between": between steps, when the driver reports step 5 (last checkpoint at 4).

    Each kill freezes the server (SIGSTOP) and checks the moment with nothing moving before the
    SIGKILL; a missed moment lets the server go on and waits for its next chance (a later
    validation step, the next checkpoint write). `kills` records (moment, evidence, pid).
    """

    trainer: DistributedTrainer  # set once the trainer, which takes `progress`, exists

    def __init__(self, run: Path):
        self.run = run
        self.kills: list[tuple[str, str, int]] = []
        self.pid = 0
        self._acked: int | None = None  # "push" armed: the step the driver reported last
        self._reniced = 0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._inotify = Inotify()
        self._inotify.watch(run / "checkpoints", IN_CREATE)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    @property
    def moment(self) -> str:
        """The moment to catch next: push, save, between, or done."""
        return ("push", "save", "between", "done")[len(self.kills)]

    def progress(self, done: int, total: int, metrics: dict[str, float]) -> None:
        """The driver's progress callback (its thread, between steps)."""
        self.pid = self.trainer.server_pid()
        if self.moment == "push" and (done + 1) % FAULT.val_every == 0:
            self._acked = done
        elif self.moment == "between" and done == 5:
            self._kill("between", f"after step {done}")

    def close(self) -> None:
        """Stop watching; raise what went wrong in the watching thread, if anything."""
        self._stop.set()
        self._thread.join()
        self._inotify.close()
        if self._error is not None:
            raise self._error

    def _kill(self, moment: str, evidence: str) -> None:
        pid = self.pid
        os.kill(pid, signal.SIGKILL)
        self.kills.append((moment, evidence, pid))

    def _watch(self) -> None:
        try:
            self._watch_until_stopped()
        except BaseException as exc:  # noqa: BLE001 - handed to the test by close()
            self._error = exc
            try:  # never leave a frozen server behind: the run would wait for it
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def _watch_until_stopped(self) -> None:
        while not self._stop.is_set():
            if self.moment == "push" and self._acked is not None:
                self._catch_push()
            elif self.moment == "save":
                self._catch_save()
            else:
                self._inotify.drain()
                time.sleep(0.01)

    def _catch_push(self) -> None:
        acked, pid = self._acked, self.pid
        streak: list[int] = []  # main-thread CPU ns of consecutive "running" samples
        while not self._stop.is_set() and self._acked == acked:
            try:
                state, cpu_ns = main_thread_sample(pid)
            except FileNotFoundError:  # that server died: wait for the next progress report
                time.sleep(0.01)
                return
            streak = streak + [cpu_ns] if state == "R" else []
            if len(streak) >= 3 and streak[-1] - streak[0] >= 2_000_000:
                break
            time.sleep(0.0005)
        else:
            return
        freeze(pid)
        text = (self.run / "metrics.jsonl").read_text()
        # Validating step acked + 1: its record not yet written (nor half-written: frozen mid-append).
        if text.endswith("\n") and max(json.loads(r)["step"] for r in text.splitlines()) <= acked:
            self._kill("push", f"validating step {acked + 1}; metrics.jsonl up to step {acked}")
            self._acked = None
            self._next_server(pid)
        else:  # too late: validation is over; wait for the next validation step
            self._acked = None
            os.kill(pid, signal.SIGCONT)

    def _catch_save(self) -> None:
        if self._reniced != self.pid:
            os.setpriority(os.PRIO_PROCESS, self.pid, 19)
            self._reniced = self.pid
        for _, path in self._inotify.events(timeout=0.05):
            if not (path.name.startswith(".step-") and path.name.endswith(".tmp")):
                continue
            if not path.exists():  # already renamed: no need to stop the server to know
                continue
            freeze(self.pid)
            if path.exists():
                self._kill("save", f"writing {path.name}")
                self._next_server(self.pid)
                return
            os.kill(self.pid, signal.SIGCONT)  # the write was over: wait for the next one

    def _next_server(self, killed: int) -> None:
        """Learn the pid of the server Ray restarts: at once, as its first save comes before any
        progress report. A call to a restarting actor fails only after a while, so a new call
        goes out every 20 ms and the first answer wins. No deadline of its own: the driver
        gives up on a server that does not come back."""
        from ray.exceptions import RayActorError

        self._inotify.drain()  # events of the dead server
        calls: list[Any] = []
        while not self._stop.is_set():
            calls.append(self.trainer.server.pid.remote())
            answered, calls = ray.wait(calls, num_returns=len(calls), timeout=0.02)
            for call in answered:
                try:
                    pid = ray.get(call)
                except RayActorError:  # sent while it was restarting
                    continue
                if pid != killed:
                    self.pid = pid
                    return


def test_killed_parameter_server_mid_push_mid_save_and_between_steps_loses_nothing(
    images, pool, clean_fault_run, tmp_path
):
    """One run, three SIGKILLs of the parameter server (see ServerKiller); Ray restarts it from its
    latest checkpoint each time and the driver redoes the steps since."""
    killer = ServerKiller(tmp_path)
    killer.trainer = DistributedTrainer(
        FAULT,
        images,
        tmp_path,
        workers=2,
        options=ONE_CPU,
        progress=killer.progress,
        log_tensorboard=False,
        pool=pool,
    )
    try:
        result = killer.trainer.run()
    finally:
        killer.close()
    assert [k[0] for k in killer.kills] == ["push", "save", "between"], killer.kills
    assert len({k[2] for k in killer.kills}) == 3  # each kill hit a new server process
    assert (result.ps_restarts, result.step) == (3, FAULT.steps)
    assert result.steps_redone >= 1  # at least step 5, reported before the kill between steps
    assert_nothing_lost(
        result.counters, FAULT.steps, result.final_params, clean_fault_run.final_params
    )
    # Every step's record exactly once: the records a dead server wrote past its last
    # checkpoint are dropped when its successor resumes, and written again when redone.
    records, clean = _metrics(tmp_path), _metrics(clean_fault_run.out_dir)
    assert [r["step"] for r in records] == [r["step"] for r in clean]
    for record, expected in zip(records, clean, strict=True):
        assert record == pytest.approx(expected)
    assert (
        CheckpointDir(tmp_path / "checkpoints").steps()
        == CheckpointDir(clean_fault_run.out_dir / "checkpoints").steps()
    )


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pooled_worker_restarted_between_steps_is_reconfigured(
    images, pool, trainer_runs, tmp_path
):
    # The pool's workers were created for reptile; Ray restarts a killed one with that config.
    cfg = exact("fomaml")
    trainer: DistributedTrainer
    killed: list[int] = []

    def progress(done, total, metrics):
        if done == 1 and not killed:  # between steps: the worker is idle
            killed.append(trainer.worker_pids()[1])
            os.kill(killed[0], signal.SIGKILL)

    trainer = DistributedTrainer(
        cfg,
        images,
        tmp_path,
        workers=2,
        options=ONE_CPU,
        progress=progress,
        log_tensorboard=False,
        pool=pool,
    )
    result = trainer.run()
    assert killed and result.retries >= 1
    # against the single-process run, the bound of test_sync_training_matches_...: shards sum
    # the meta-gradient in another order than one call, and Adam's first steps amplify that
    # on near-zero components (an absolute 2e-6 held only while the rounding happened to
    # allow it); a worker's update computed as reptile's, or lost, moves every parameter by
    # ~lr per step, 10x above this bound
    assert_nothing_lost(
        result.counters, cfg.steps, result.final_params, trainer_runs(cfg)[0], rel=5e-4
    )


def test_corrupt_checkpoint_falls_back_and_says_so(images, pool, clean_fault_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(clean_fault_run.out_dir, run)
    latest = run / "checkpoints" / "step-00000006.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # a truncated copy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_distributed(
            FAULT,
            images,
            run,
            workers=2,
            resume=True,
            options=ONE_CPU,
            log_tensorboard=False,
            pool=pool,
        )
    assert any("corrupt" in str(w.message) and "falling back" in str(w.message) for w in caught)
    assert result.checkpoint_fallbacks and "step-00000006" in result.checkpoint_fallbacks[0]
    assert result.resumed_from.endswith("step-00000004.pt")
    np.testing.assert_allclose(result.final_params, clean_fault_run.final_params, rtol=0, atol=1e-7)
    # Resuming with another config is refused with the reason, in this process.
    with pytest.raises(ConfigError, match=r"\['hidden'\] differ"):
        train_distributed(
            FAULT.replace(hidden=8), images, run, workers=1, resume=True, options=ONE_CPU
        )


def test_async_drops_updates_beyond_the_staleness_bound(images, pool, tmp_path):
    cfg = FAULT.replace(steps=4)
    strict = train_distributed(
        cfg,
        images,
        tmp_path / "strict",
        workers=2,
        log_tensorboard=False,
        options=RayOptions(mode="async", staleness=0, worker_cpus=1),
        pool=pool,
    )
    c = strict.counters
    assert strict.step == 4 and c["applied"] == 4 and c["duplicates"] == 0
    assert c["dropped_stale"] >= 1  # two workers in flight: the slower one is always one behind
    assert strict.to_dict()["mode"] == "async"


@pytest.mark.slow
def test_killed_driver_resumes_with_the_same_config_data_and_rng(
    store_root, images, pool, tmp_path
):
    # Pin the episode shape: the learner's tuned defaults may differ (e.g. a 20-way head).
    sets = {
        **EXACT,
        "ways": 5,
        "queries": 5,
        "checkpoint_every": 3,
        "val_every": 6,
        "learner.inner_steps": 1,
        "learner.eval_inner_steps": 5,
    }
    del sets["steps"]
    overrides = [f"{key}={value}" for key, value in sets.items()]
    # What the CLI builds: reptile's tuned defaults, then the overrides.
    cfg = config_for("reptile", None, overrides, steps=12)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "flows.cli", "train", "--learner", "reptile", "--steps", "12"]
    cmd += ["--workers", "2", "--out", str(out), "--store", str(store_root), "--json"]
    cmd += ["--ray-address", ray.get_runtime_context().gcs_address]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "ANOLE_MIN_TASKS_PER_CALL": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("step-*.json")):
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = CheckpointDir(out / "checkpoints").steps()
    assert steps and steps[-1] < 12, "the driver finished before it could be killed"

    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["step"] == 12 and result["resumed_from"].endswith(f"step-{steps[-1]:08d}.pt")
    manifest = json.loads(Path(result["latest_checkpoint"]).with_suffix(".json").read_text())
    assert manifest["config"] == cfg.to_dict() and manifest["data_version"] == images.data_version
    # Same parameters as the same run never interrupted (same shards: bit for bit).
    clean = train_distributed(
        cfg,
        images,
        tmp_path / "clean",
        workers=2,
        log_tensorboard=False,
        options=ONE_CPU,
        pool=pool,
    )
    np.testing.assert_array_equal(
        flat_params(Path(result["latest_checkpoint"])), clean.final_params
    )
