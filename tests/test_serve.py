"""`anole serve` on a real Prefect server: a burst of `anole.domain.arrived` events starts ONE run
of the served retrain deployment, which retrains the champion on the new domains.

Processes: `prefect server start` and `anole serve` as subprocesses; the test process builds the
first champion and ingests the new domains (emitting the events) against that server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.serve import free_port, start_server_process, stop_process, wait_healthy

pytestmark = pytest.mark.slow

TINY = {
    "ways": 5,
    "hidden": 8,
    "meta_batch": 2,
    "val_episodes": 5,
    "val_every": 2,
    "checkpoint_every": 1,
    "num_threads": 1,
}
POOLS = {"ways": 5, "episodes": 3}


def _log_tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def test_domain_arrival_starts_the_served_retrain_once(omniglot_zips, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.events.worker import EventsWorker
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        temporary_settings,
    )

    from flows.flows import anole_pipeline, ingest_flow

    zip1 = str(omniglot_zips[0])
    root = tmp_path / "ws"
    home = tmp_path / "prefect-home"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base_env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    base_env.pop("PREFECT_API_URL", None)
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    procs: list[subprocess.Popen] = []
    try:
        with open(server_log, "wb") as log:
            procs.append(start_server_process(port, base_env, log))
        wait_healthy(api, timeout_s=120, proc=procs[0])
        updates = {
            PREFECT_API_URL: api,
            PREFECT_HOME: home,
            PREFECT_RESULTS_LOCAL_STORAGE_PATH: home / "storage",
        }
        with temporary_settings(updates=updates):
            # The first champion, trained without Korean and Latin.
            first = anole_pipeline(
                str(root),
                sources=[zip1],
                holdout=["Korean", "Latin"],
                steps=2,
                overrides=TINY,
                pools=POOLS,
                oneshot=False,
            )
            assert first["champion"] == "champion-001"

            with open(serve_log, "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "flows.cli",
                            "serve",
                            "--root",
                            str(root),
                            "--api-url",
                            api,
                            "--debounce",
                            "4",
                            "--steps",
                            "2",
                            "--no-oneshot",
                        ],
                        env={**base_env, "PREFECT_RUNNER_POLL_FREQUENCY": "2"},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            with get_client(sync_client=True) as client:
                # `serve` creates the deployment, then its trigger as an automation: wait for both
                deployment, automations = None, []
                deadline = time.monotonic() + 90
                while not automations and time.monotonic() < deadline:
                    assert procs[1].poll() is None, _log_tail(serve_log)
                    try:
                        deployment = client.read_deployment_by_name(
                            "retrain-on-new-domains/retrain"
                        )
                        automations = client.read_automations_by_name("anole-domain-arrived")
                    except Exception:
                        pass
                    if not automations:
                        time.sleep(1)
                assert deployment is not None, _log_tail(serve_log)
                assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
                assert automations, _log_tail(serve_log)
                assert automations[0].trigger.within.total_seconds() == 4
                time.sleep(3)  # let the server's trigger service load the new automation

                # A burst: two alphabets arrive back to back, two events.
                for name in ("Korean", "Latin"):
                    report = ingest_flow(zip1, str(root), domain=name)
                    assert report["announced"] == [name]
                EventsWorker.drain_all(timeout=30)

                only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))

                def triggered() -> list:
                    # The cron schedule's future runs are auto-scheduled; event runs are not.
                    runs = client.read_flow_runs(deployment_filter=only_this)
                    return [r for r in runs if not r.auto_scheduled]

                runs: list = []
                deadline = time.monotonic() + 150
                while time.monotonic() < deadline:
                    runs = triggered()
                    if runs and all(r.state and r.state.is_final() for r in runs):
                        break
                    assert procs[1].poll() is None, _log_tail(serve_log)
                    time.sleep(1)
                assert runs, "no run of the retrain deployment\n" + _log_tail(serve_log)
                time.sleep(6)  # past the debounce window: a second run would show up now
                runs = triggered()
        assert len(runs) == 1, [(r.name, r.state_name) for r in runs]
        assert runs[0].state.is_completed(), _log_tail(serve_log)

        registry = json.loads((root / "champions.json").read_text())
        decision = registry["decisions"][-1]
        assert decision["new_domains"] == ["Korean", "Latin"]
        assert decision["champion"] == "champion-001"
    finally:
        for proc in reversed(procs):
            stop_process(proc)
