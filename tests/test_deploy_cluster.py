"""The deploy path on real processes on this machine: a two-node Ray cluster, a Prefect server and a
Prefect process worker, driven by the manifests in deploy/.

Processes (no mocks): `ray start --head` and `ray start --address` (each `--block`, in its own
session and temp dir, token authentication as deploy/ray/anole-env.sh sets it), `anole train` and
`anole ingest`, `prefect server start`, `prefect work-pool create`, `prefect deploy`, `prefect worker
start` and `prefect event emit`. Cleanup kills exactly the sessions this module started; it never
runs `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from faults import assert_nothing_lost, flat_params

from flows.serve import free_port, start_server_process, stop_process, wait_healthy

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT_MANIFEST = REPO / "deploy" / "prefect" / "prefect.yaml"
TINY = {
    "hidden": 8,
    "ways": 5,
    "meta_batch": 4,
    "queries": 2,
    "val_episodes": 4,
    "val_ways": 5,
    "val_every": 5,
    "checkpoint_every": 5,
}
POOLS = {"ways": 5, "episodes": 3}


def _processes() -> list[tuple[int, int, str]]:
    """(pid, session id, command line) of every process we may inspect (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            if state in (b"Z", b"X"):  # dead, not yet reaped by whoever adopted it
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            out.append((pid, os.getsid(pid), cmdline))
        except (OSError, IndexError):
            continue
    return out


def _alive(pid: int) -> bool:
    return any(p == pid for p, _, _ in _processes())


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


class LocalRayCluster:
    """A head and named extra nodes, each a `ray start --block` process leading its own session.

    Every Ray process of a node (GCS, raylet, agents, workers, which take their own process
    groups) keeps the session of its `ray start`, so a node is killed, all of it, by signalling
    the processes of that session.
    """

    def __init__(self, root: Path):
        self.root = root
        token = root / "token"
        from ray._private.authentication.authentication_token_generator import (
            generate_new_authentication_token,
        )

        token.write_text(generate_new_authentication_token())
        self.env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # Token authentication, as on the deployed cluster (deploy/ray/anole-env.sh).
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            # Declare a killed node dead after ~5 s instead of Ray's default ~15-30 s.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "5",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: dict[str, subprocess.Popen] = {}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def _ports(self) -> list[str]:
        # Every listening port of a node: two nodes share this machine (and other Rays may run).
        names = [
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        ]
        return [f"--{name}={free_port()}" for name in names]

    def _start(self, name: str, args: list[str]) -> None:
        temp = self.root / name  # short: Ray's unix sockets live under it
        log = self.root / f"{name}.log"
        cmd = [
            str(BIN / "ray"),
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            "--object-store-memory=150000000",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
            *self._ports(),
            *args,
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.nodes[name] = proc
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"ray start {name} exited:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"ray start {name} hangs:\n{_tail(log)}"
            time.sleep(0.5)

    def start_head(self) -> None:
        self._start(
            "head",
            [
                "--head",
                f"--port={self.port}",
                "--include-dashboard=false",
                f"--dashboard-port={free_port()}",
            ],
        )

    def ensure_node(self, name: str = "second") -> None:
        """Start node `name` (1 CPU and the custom resource `name`) unless it is running."""
        proc = self.nodes.get(name)
        if proc is not None and proc.poll() is None and self.pids(name):
            return
        self._start(name, [f"--address={self.address}", f'--resources={{"{name}": 1}}'])

    def pids(self, name: str) -> list[int]:
        """Processes of node `name`: those in the session its `ray start` leads."""
        sid = self.nodes[name].pid
        return [pid for pid, session, _ in _processes() if session == sid]

    def actors(self, class_name: str) -> dict[str, list[int]]:
        """Node name -> pids of the actor processes of `class_name` on it (by process title)."""
        sids = {proc.pid: name for name, proc in self.nodes.items()}
        found: dict[str, list[int]] = {}
        for pid, session, title in _processes():
            if title.startswith(f"ray::{class_name}") and session in sids:
                found.setdefault(sids[session], []).append(pid)
        return found

    def kill(self, name: str) -> None:
        """SIGKILL every process of node `name`, like a machine that dies."""
        for _ in range(3):  # a raylet may fork a worker while we signal
            pids = self.pids(name)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.3)
        self.nodes[name].wait(10)

    def shutdown(self) -> None:
        for name in reversed(list(self.nodes)):
            if self.nodes[name].poll() is None or self.pids(name):
                self.kill(name)


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="rc_", dir="/tmp"))
    c = LocalRayCluster(root)
    try:
        c.start_head()
        c.ensure_node("second")
        yield c
    finally:
        c.shutdown()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def small1_store(tmp_path_factory, omniglot_zips) -> Path:
    """Omniglot small1 ingested with `anole ingest` into a temporary store."""
    store = tmp_path_factory.mktemp("store")
    zip1 = next(z for z in omniglot_zips if z.name == "images_background_small1.zip")
    subprocess.run(
        [str(BIN / "anole"), "ingest", str(zip1), "--store", str(store), "--json"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return store


def _run(cmd: list[str], env: dict[str, str], timeout: float = 180) -> str:
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_domain_arrived_event_retrains_on_the_ray_cluster_through_a_prefect_worker(
    cluster, omniglot_zips, tmp_path
):
    """deploy/prefect/prefect.yaml on a real server: the event starts the retrain deployment, the
    process worker runs it, and its adaptation workers run on the Ray cluster (RAY_ADDRESS)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        temporary_settings,
    )

    from flows.flows import anole_pipeline
    from flows.workspace import Workspace

    cluster.ensure_node("second")
    zip1 = str(next(z for z in omniglot_zips if z.name == "images_background_small1.zip"))
    root = tmp_path / "ws"
    home = tmp_path / "prefect-home"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **cluster.env,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        # What deploy/prefect/prefect.yaml's templates read when it is deployed.
        "RAY_ADDRESS": cluster.address,
        "ANOLE_WORKSPACE": str(root),
        "ANOLE_REPO": str(REPO),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    procs: list[subprocess.Popen] = []
    prefect = str(BIN / "prefect")
    try:
        with open(server_log, "wb") as log:
            procs.append(start_server_process(port, server_env, log))
        wait_healthy(api, timeout_s=120, proc=procs[0])

        # The first champion, without Korean (in this process, as `anole run` would make it).
        updates = {
            PREFECT_API_URL: api,
            PREFECT_HOME: home,
            PREFECT_RESULTS_LOCAL_STORAGE_PATH: home / "storage",
        }
        with temporary_settings(updates=updates):
            first = anole_pipeline(
                str(root),
                sources=[zip1],
                holdout=["Korean"],
                steps=2,
                overrides=TINY,
                pools=POOLS,
                oneshot=False,
            )
        assert first["champion"] == "champion-001"

        # docs/deploy.md, step by step: the pool, every deployment of the manifest, a worker.
        _run([prefect, "work-pool", "create", "anole", "--type", "process"], env)
        manifest = ["--prefect-file", str(PREFECT_MANIFEST.relative_to(REPO))]
        _run([prefect, "deploy", "--no-prompt", "--all", *manifest], env)
        # The test's retrain: a tiny config on 2 workers, and the manifest's trigger with its 60 s
        # debounce cut to 0 (every other trigger field as deployed).
        spec = yaml.safe_load(PREFECT_MANIFEST.read_text())
        (retrain,) = [d for d in spec["deployments"] if d["name"] == "retrain"]
        (trigger,) = retrain["triggers"]
        trigger_file = tmp_path / "triggers.yaml"
        trigger_file.write_text(
            yaml.safe_dump({"triggers": [{**trigger, "within": 5, "schedule_after": 0}]})
        )
        params = {"steps": 6, "workers": 2, "oneshot": False}
        _run(
            [
                prefect, "deploy", "--no-prompt", *manifest, "--name", "retrain",
                "--params", json.dumps(params), "--trigger", str(trigger_file),
            ],
            env,
        )  # fmt: skip
        with open(worker_log, "wb") as log:
            procs.append(
                subprocess.Popen(
                    [prefect, "worker", "start", "--pool", "anole", "--type", "process"],
                    env=env,
                    cwd=tmp_path,  # the pull step, not the worker's cwd, finds the flows
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

        with temporary_settings(updates=updates), get_client(sync_client=True) as client:
            names = {
                f"{client.read_flow(d.flow_id).name}/{d.name}" for d in client.read_deployments()
            }
            assert names == {
                "retrain-on-new-domains/retrain",
                "anole-pipeline/pipeline",
                "ingest/ingest",
            }
            deployment = client.read_deployment_by_name("retrain-on-new-domains/retrain")
            job_env = deployment.job_variables["env"]
            assert job_env["RAY_ADDRESS"] == cluster.address and job_env["PREFECT_API_URL"] == api
            assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
            assert deployment.parameters["root"] == str(root)
            assert deployment.parameters["workers"] == 2
            automations = client.read_automations_by_name("anole-domain-arrived")
            assert len(automations) == 1
            time.sleep(3)  # let the server's trigger service load the automation

            # A new alphabet lands in the store (`anole ingest` emits nothing) and a producer
            # announces it the way the ingest flow does.
            store = Workspace(root).store_dir
            _run([str(BIN / "anole"), "ingest", zip1, "--domain", "Korean", "--store", str(store)], env)  # fmt: skip
            related = [
                {
                    "prefect.resource.id": f"anole.store.{Workspace(root).store_id()}",
                    "prefect.resource.role": "store",
                }
            ]
            _run(
                [
                    prefect, "event", "emit", "anole.domain.arrived",
                    "--resource-id", "anole.domain.Korean",
                    "--related", json.dumps(related),
                    "--payload", json.dumps({"domain": "Korean", "store": str(store)}),
                ],
                env,
            )  # fmt: skip

            only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            seen_on: set[str] = set()
            runs: list = []
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                for node in cluster.actors("AdaptationWorker"):
                    seen_on.add(node)
                runs = [
                    r
                    for r in client.read_flow_runs(deployment_filter=only_this)
                    if not r.auto_scheduled
                ]
                if runs and all(r.state and r.state.is_final() for r in runs):
                    break
                assert procs[1].poll() is None, _tail(worker_log)
                time.sleep(0.5)
        assert len(runs) == 1, [(r.name, r.state_name) for r in runs] or _tail(worker_log)
        assert runs[0].state.is_completed(), _tail(worker_log, 80)
        # The flow run's driver joined this cluster: its workers ran on both nodes.
        assert seen_on == {"head", "second"}, seen_on

        registry = json.loads((root / "champions.json").read_text())
        decision = registry["decisions"][-1]
        assert decision["new_domains"] == ["Korean"] and decision["champion"] == "champion-001"
        run_dir = Path(decision["candidate"]).parents[1]
        result = json.loads((run_dir / "result.json").read_text())
        assert result["workers"] == 2 and result["resources"]["workers"] == 2
        assert result["init_checkpoint"].endswith("champion-001/model.pt")  # a warm start
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def test_training_finishes_when_a_node_dies_mid_run(cluster, small1_store, tmp_path):
    """`anole train --ray-address --workers 2`: one worker per node; SIGKILL the second node
    (every process of it) mid-run; the run re-sends that worker's shards and finishes, with no
    update lost or applied twice: the parameters of the same run on a Ray that loses nothing."""
    cluster.ensure_node("second")
    out = tmp_path / "run"
    steps = 60
    sets = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    cmd = [
        str(BIN / "anole"), "train", "--ray-address", cluster.address, "--workers", "2",
        "--steps", str(steps), "--store", str(small1_store), "--out", str(out), "--json", *sets,
    ]  # fmt: skip
    err_log = tmp_path / "train.err"
    with open(err_log, "wb") as err:
        proc = subprocess.Popen(cmd, env=cluster.env, stdout=subprocess.PIPE, stderr=err)
    try:
        # Wait for a worker on each node and a few checkpointed steps.
        deadline = time.monotonic() + 180
        while True:
            placed = cluster.actors("AdaptationWorker")
            ckpts = sorted((out / "checkpoints").glob("step-*.pt"))
            if set(placed) == {"head", "second"} and len(ckpts) >= 2:
                break
            assert proc.poll() is None, _tail(err_log)
            assert time.monotonic() < deadline, (placed, ckpts, _tail(err_log))
            time.sleep(0.2)
        killed_at = int(ckpts[-1].stem.split("-")[1])
        second_worker = placed["second"]
        cluster.kill("second")
        assert not cluster.pids("second")
        assert not any(_alive(pid) for pid in second_worker)
        stdout, _ = proc.communicate(timeout=240)
        (tmp_path / "train.out").write_bytes(stdout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, _tail(err_log)
    # Ray forwards its own messages to the driver's stdout too (e.g. "(raylet) The node with node
    # id ... has been marked dead"): the JSON document is the block from the line "{" on.
    lines = stdout.decode().splitlines()
    result = json.loads("\n".join(lines[lines.index("{") :]))
    assert killed_at < steps, "the node was killed after the run ended"
    assert result["step"] == steps and result["total_steps"] == steps
    assert result["worker_failures"] + result["retries"] >= 1, result
    assert result["latest_checkpoint"].endswith(f"step-{steps:08d}.pt")

    # The same run without a failure, in this process on a local Ray of the cluster's 2 CPUs: the
    # same config, data, shards (2 of 2 tasks) and threads per worker (1), so the same sums.
    import ray

    from pipeline.config import config_for
    from pipeline.store import Store
    from workers.driver import train_distributed

    cfg = config_for(None, None, sets[1::2], steps=steps)
    manifest = json.loads(Path(result["latest_checkpoint"]).with_suffix(".json").read_text())
    assert manifest["config"] == cfg.to_dict()
    images = Store(small1_store).load_images(
        image_size=cfg.image_size, channels=cfg.channels, invert=cfg.invert
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        clean = train_distributed(cfg, images, tmp_path / "clean", workers=2, log_tensorboard=False)
    finally:
        ray.shutdown()
    assert clean.resources["threads"] == result["resources"]["threads"]
    # The dead node's shards were computed again on the other node from the same parameters:
    # the same numbers, so bit for bit (atol 1e-7) the clean run's parameters.
    final = flat_params(Path(result["latest_checkpoint"]))
    assert_nothing_lost(result["counters"], steps, final, clean.final_params)
