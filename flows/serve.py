"""Serve the workspace's deployments: nightly and event-triggered retraining, plus on-demand runs.

`anole serve` calls `serve_workspace`, which needs a real Prefect server (the temporary one that
plain flow runs start has no scheduler and no automations): it uses $PREFECT_API_URL, or starts
`prefect server start` on 127.0.0.1 itself and stops it on exit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from pipeline.errors import AnoleError

from .workspace import Workspace

DEFAULT_CRON = "0 3 * * *"
"""Nightly at 03:00 (server time zone unless one is given)."""


def build_deployments(
    root: str | Path,
    *,
    cron: str | None = DEFAULT_CRON,
    timezone: str | None = None,
    debounce_s: float = 60.0,
    minutes: float = 2.0,
    steps: int | None = None,
    workers: int = 0,
    inbox: str | Path | None = None,
    oneshot: bool = True,
) -> list[Any]:
    """Three deployments of one workspace.

    - `retrain-on-new-domains/retrain`: on a cron schedule AND on `anole.domain.arrived` events
      from this workspace's store. The trigger is reactive with threshold 1 and `within=debounce`,
      and the run starts `debounce` seconds after the first event, so a burst of arrivals inside
      that window gives one retrain that sees them all. At most one retrain runs at a time.
    - `anole-pipeline/pipeline` and `ingest/ingest`: run on demand (UI, API or `prefect
      deployment run`).
    """
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from .flows import anole_pipeline, ingest_flow, retrain_on_new_domains
    from .tasks import DOMAIN_ARRIVED

    ws = Workspace(root)
    inbox_dir = str(Path(inbox).expanduser().resolve()) if inbox else str(ws.inbox_dir)
    parameters = {
        "root": str(ws.root),
        "inbox": inbox_dir,
        "minutes": minutes,
        "steps": steps,
        "workers": workers,
        "oneshot": oneshot,
    }
    window = timedelta(seconds=debounce_s)
    trigger = DeploymentEventTrigger(
        name="anole-domain-arrived",
        description="Retrain when new domains arrive in this workspace's store (debounced).",
        expect={DOMAIN_ARRIVED},
        match={"prefect.resource.id": "anole.domain.*"},
        match_related={
            "prefect.resource.role": "store",
            "prefect.resource.id": f"anole.store.{ws.store_id()}",
        },
        posture="Reactive",
        threshold=1,
        within=window,
        schedule_after=window,
    )
    # Module entrypoints: the served flow runs resolve from the installed package, any cwd.
    common = {"tags": ["anole"], "entrypoint_type": EntrypointType.MODULE_PATH}
    retrain = retrain_on_new_domains.to_deployment(
        name="retrain",
        schedules=[Cron(cron, timezone=timezone)] if cron else None,
        triggers=[trigger],
        parameters=parameters,
        concurrency_limit=1,
        description=f"Retrain the champion of {ws.root} on newly arrived domains.",
        **common,
    )
    pipeline = anole_pipeline.to_deployment(
        name="pipeline",
        parameters={"root": str(ws.root), "workers": workers, "oneshot": oneshot},
        description=f"Ingest, train, evaluate and promote in {ws.root}.",
        **common,
    )
    ingest = ingest_flow.to_deployment(
        name="ingest",
        parameters={"root": str(ws.root)},
        description=f"Ingest a folder or zip into {ws.store_dir} (announces new domains).",
        **common,
    )
    return [retrain, pipeline, ingest]


def serve_workspace(root: str | Path, *, limit: int | None = None, **options: Any) -> None:
    """Serve the workspace's deployments until interrupted (see `build_deployments`)."""
    from prefect import serve

    Workspace(root).inbox_dir.mkdir(parents=True, exist_ok=True)
    serve(*build_deployments(root, **options), limit=limit)


# --------------------------------------------------------------------------- a local server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(
    api_url: str, timeout_s: float = 90.0, proc: subprocess.Popen | None = None
) -> None:
    """Poll `<api_url>/health` until the server answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AnoleError(f"the Prefect server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AnoleError(f"the Prefect server at {api_url} did not answer within {timeout_s:.0f} s")


@contextmanager
def local_server(
    home: str | Path, port: int | None = None, log: str | Path | None = None
) -> Iterator[str]:
    """Run `prefect server start` on 127.0.0.1 (database under `home`); yield its API URL."""
    port = port or free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(Path(home).expanduser()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_UI_API_URL": api_url,
    }
    env.pop("PREFECT_API_URL", None)
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = start_server_process(port, env, out)
    try:
        wait_healthy(api_url, proc=proc)
        yield api_url
    finally:
        stop_process(proc)
        if log:
            out.close()


def start_server_process(port: int, env: dict[str, str], out: Any) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:`port` in its own process group (see `stop_process`),
    output to `out` (a binary file or subprocess.DEVNULL); does not wait for it to answer."""
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
           "--port", str(port)]
    return subprocess.Popen(
        cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_process(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM the process (and its group, which it leads), then SIGKILL if it lingers."""
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait(5)
