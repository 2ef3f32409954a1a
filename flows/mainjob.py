"""The main job on embedded defaults: the whole Prefect pipeline on Omniglot, then a new alphabet.

`run_main_job` runs the `anole-main-job` flow (flows/flows.py) against Prefect's temporary
server (or $PREFECT_API_URL when set) and a local Ray: ingest the minimal background splits with
two alphabets held out, build task pools, meta-train, evaluate, promote; then the held-out
alphabets arrive, and the champion is retrained on them, evaluated on old and new domains, and
promoted only if it is better without forgetting.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import settings
from pipeline.atomic import atomic_write_json
from pipeline.config import OneOf, Range, check_values, learner_names
from pipeline.errors import AnoleError


def omniglot_sources(download_root: Path) -> list[Path]:
    """The Omniglot background data: the local minimal zips, else torchvision's download."""
    local = settings.omniglot_background_sources()
    if local:
        return local
    try:
        from torchvision.datasets import Omniglot

        Omniglot(str(download_root), background=True, download=True)
    except Exception as exc:  # no network, or the mirror moved
        raise AnoleError(
            "no Omniglot data: set ANOLE_DATA to a folder holding omniglot/images_background_small*.zip "
            f"(torchvision's download failed: {exc})"
        ) from exc
    return [download_root / "omniglot-py" / "images_background"]


def check_args(out: Path, *, minutes: float, learner: str | None, workers: int | None) -> None:
    """Refuse bad arguments of the main job before any work (no workspace, no Prefect server,
    no ingestion), each named with the value given."""
    check_values([
        ("--minutes", minutes, Range(gt=0)),
        ("--learner", learner, OneOf(learner_names())),
        ("--workers", workers, Range(ge=0)),
    ])
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise AnoleError(f"--out {out} is a file: give a folder for the workspace")


def default_workers() -> int:
    """Ray adaptation workers for the main job: one per core."""
    return max(1, os.cpu_count() or 1)


@contextmanager
def _local_ray(workers: int) -> Iterator[None]:
    """One Ray for both trainings of the job (started once, not per training run)."""
    if workers <= 0:
        yield
        return
    from workers.driver import ray_session

    with ray_session(None, max(workers, os.cpu_count() or 1)):
        yield


def run_main_job(
    out: Path,
    *,
    minutes: float,
    learner: str | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    log: Callable[[str], None] | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline in workspace `out`; `minutes` of training, 75% first, 25% retrain.

    Re-running with the same `out` reuses everything already done: cached ingestion and task
    pools, finished training runs (a crashed one resumes from its checkpoint), the champion.
    """
    check_args(out, minutes=minutes, learner=learner, workers=workers)

    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from .flows import main_job
    from .tasks import set_progress_listener

    say = log or (lambda _msg: None)
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    workers = default_workers() if workers is None else workers
    sources = omniglot_sources(out / "downloads")
    t0 = time.perf_counter()
    set_progress_listener(progress)
    # Task results (the ingestion and task-pool caches) live with the workspace they describe,
    # as JSON; a record there that is not plain JSON is never read (flows/tasks.py, _vetted).
    updates = {PREFECT_RESULTS_LOCAL_STORAGE_PATH: out / ".prefect-results"}
    try:
        with temporary_settings(updates=updates), _local_ray(workers):
            summary = main_job(
                str(out),
                [str(s) for s in sources],
                learner=learner,
                minutes=minutes,
                workers=workers,
            )
    finally:
        set_progress_listener(None)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "summary.json", summary)
    for line in _where(summary):
        say(line)
    return summary


def _where(summary: dict[str, Any]) -> list[str]:
    first, second = summary["pipeline"], summary["retrain"]
    lines = []
    for label, part in (("first training", first), ("retrain", second)):
        acc = part.get("accuracy", {}).get("candidate", {})
        shown = ", ".join(
            f"{k} {100 * v['mean']:.1f}%" for k, v in acc.items() if v and v.get("mean") is not None
        )
        lines.append(f"{label}: {part.get('status')} ({shown})")
        if part.get("report"):
            lines.append(f"  report: {part['report']}")
            lines.append(f"  plots: {', '.join(part.get('figures', {}).values())}")
        for reason in part.get("reasons", []):
            lines.append(f"  - {reason}")
    lines.append(f"champion: {summary['champion']} -> {summary['champion_checkpoint']}")
    lines.append(f"champion registry: {summary['champions_registry']}")
    lines.append(f"finished in {summary['seconds']:.0f} s")
    return lines
