"""The main job on embedded defaults: ingest Omniglot, meta-train, evaluate, write a report."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import settings
from pipeline.atomic import atomic_write_bytes, atomic_write_json
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


def run_main_job(out: Path, *, minutes: float, learner: str | None = None,
                 progress: Callable[[int, int, dict[str, float]], None] | None = None,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Ingest, train for `minutes`, score on held-out alphabets and the one-shot runs; write a report.

    Re-running with the same `out` reuses the store (ingestion is idempotent) and resumes training.
    """
    from pipeline.config import config_for
    from pipeline.scoring import load_model, score_baseline, score_heldout, score_oneshot
    from pipeline.store import Store
    from pipeline.train import Trainer

    say = log or (lambda _msg: None)
    out = Path(out)
    t0 = time.perf_counter()
    store = Store(out / "store")
    for source in omniglot_sources(out / "downloads"):
        report = store.ingest(source)
        say(f"ingested {source.name}: " + ", ".join(f"{d.name} {d.outcome}" for d in report.domains))

    cfg = config_for(learner, minutes=minutes)
    images = store.load_images(None, image_size=cfg.image_size, channels=cfg.channels, invert=cfg.invert)
    run_dir = out / "train"
    resume = (run_dir / "checkpoints").is_dir()
    say(f"meta-training {cfg.learner} for {minutes:g} min on {len(images.domains)} alphabets"
        f"{' (resuming)' if resume else ''}")
    result = Trainer(cfg, images, run_dir, progress=progress).run(resume=resume)

    model = load_model(run_dir)
    summary: dict[str, Any] = {
        "learner": cfg.learner,
        "train": result.to_dict(),
        "split": model.split.to_dict(),
        "checkpoint": str(model.path),
        "data_version": images.data_version,
    }
    for ways in (5, 20):
        acc = score_heldout(model, store, ways=ways, shots=1, episodes=600 if ways == 5 else 200,
                            mode="within")
        summary[f"heldout_{ways}way_1shot"] = acc.to_dict()
        say(f"held-out {'/'.join(model.split.test)}: {acc}")
    runs = settings.omniglot_oneshot_runs()
    if runs:
        scores = score_oneshot(model, runs)
        summary["oneshot"] = scores.to_dict()
        summary["oneshot_baseline_mhd"] = score_baseline(runs, "mhd").to_dict()
        say(f"one-shot runs: {scores}")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "report.json", summary)
    atomic_write_bytes(out / "report.md", _markdown(summary).encode())
    say(f"report: {out / 'report.md'}\nchampion checkpoint: {model.path}")
    return summary


def _markdown(summary: dict[str, Any]) -> str:
    lines = [f"# anole run: {summary['learner']}", ""]
    tr = summary["train"]
    lines.append(f"- trained {tr['step']} meta-updates in {tr['seconds']:.0f} s "
                 f"({tr['tasks_per_second']:.1f} tasks/s); checkpoint `{summary['checkpoint']}`")
    lines.append(f"- split: {json.dumps(summary['split'])}")
    for key in ("heldout_5way_1shot", "heldout_20way_1shot"):
        a = summary[key]
        lines.append(f"- {key}: {100 * a['mean']:.1f}% ± {100 * a['ci95']:.1f}% "
                     f"({a['episodes']} episodes, BN {a.get('bn_mode')})")
    if "oneshot" in summary:
        runs = summary["oneshot"]["runs"]
        lines.append(f"- one-shot runs error: {100 * summary['oneshot']['mean_error']:.1f}% "
                     f"({', '.join(f'{k} {100 * v:.1f}%' for k, v in runs.items())}); "
                     f"modified Hausdorff baseline {100 * summary['oneshot_baseline_mhd']['mean_error']:.1f}%")
    return "\n".join(lines) + "\n"
