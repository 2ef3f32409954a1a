"""PNG figures of a run: learning curves, per-domain accuracy, one episode's images (matplotlib Agg)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

_SPLIT_COLOURS = {"train": "#4C72B0", "val": "#DD8452", "test": "#55A868"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (empty when there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def learning_curves(
    runs: dict[str, str | Path], out: str | Path, offsets: dict[str, int] | None = None
) -> Path | None:
    """Training loss / accuracy and validation accuracy against step, one colour per run.

    `offsets` shifts a run's steps (a warm-started run continues where its champion stopped).
    """
    series = {label: read_metrics(d) for label, d in runs.items()}
    if not any(series.values()):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, records) in enumerate(series.items()):
        colour = f"C{i}"
        shift = (offsets or {}).get(label, 0)
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_accuracy" in r]
        if train:
            steps = [shift + r["step"] for r in train]
            axes[0].plot(steps, [r["loss"] for r in train], color=colour, label=label)
            if any("accuracy" in r for r in train):
                axes[1].plot(
                    [shift + r["step"] for r in train if "accuracy" in r],
                    [100 * r["accuracy"] for r in train if "accuracy" in r],
                    color=colour,
                    linestyle=":",
                    alpha=0.7,
                    label=f"{label}: training episodes",
                )
        if val:
            steps = np.array([shift + r["step"] for r in val])
            acc = np.array([r["val_accuracy"] for r in val])
            ci = np.array([r.get("val_ci95") or 0.0 for r in val])
            axes[1].plot(steps, 100 * acc, marker="o", color=colour, label=f"{label}: validation")
            axes[1].fill_between(steps, 100 * (acc - ci), 100 * (acc + ci), color=colour, alpha=0.2)
    axes[0].set(title="meta-training loss", xlabel="meta-update", ylabel="query loss")
    axes[1].set(title="accuracy", xlabel="meta-update", ylabel="accuracy (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def domain_accuracy(scores: dict[str, Any], out: str | Path) -> Path:
    """Bars of accuracy per domain (95% CI), candidate beside champion, coloured by split."""
    plt = _pyplot()
    cand = scores["candidate"]["domains"]
    champ = (scores.get("champion") or {}).get("domains", {})
    names = sorted(cand, key=lambda d: (["train", "val", "test"].index(cand[d]["split"]), d))
    x = np.arange(len(names))
    width = 0.4 if champ else 0.7
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.2))
    colours = [_SPLIT_COLOURS.get(cand[d]["split"], "grey") for d in names]
    ax.bar(
        x - (width / 2 if champ else 0),
        [100 * cand[d]["mean"] for d in names],
        width,
        yerr=[100 * (cand[d]["ci95"] or 0) for d in names],
        color=colours,
        capsize=3,
        label="candidate",
    )
    if champ:
        ax.bar(
            x + width / 2,
            [100 * champ[d]["mean"] if d in champ else 0 for d in names],
            width,
            yerr=[100 * ((champ.get(d) or {}).get("ci95") or 0) for d in names],
            color=colours,
            alpha=0.45,
            hatch="//",
            capsize=3,
            label="champion",
        )
    labels = [
        f"{d}\n{cand[d]['split']}{' (new)' if cand[d].get('new') else ''}, {cand[d]['ways']}-way"
        for d in names
    ]
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title="few-shot accuracy per domain (95% CI)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def episode_grid(
    support: np.ndarray, query: np.ndarray, ways: int, out: str | Path, *, title: str = ""
) -> Path:
    """One episode: a row of support images (one per way) over its query images, by way.

    `support` is [ways * shots, C, H, W] and `query` [ways * queries, C, H, W], class-major,
    floats in [0, 1] (as `pipeline.tasks.materialize` returns them).
    """
    plt = _pyplot()
    shots, queries = len(support) // ways, len(query) // ways
    rows = shots + queries
    fig, axes = plt.subplots(
        rows, ways, figsize=(0.75 * ways + 0.5, 0.75 * rows + 0.6), squeeze=False
    )
    for w in range(ways):
        column = [support[w * shots + s] for s in range(shots)]
        column += [query[w * queries + q] for q in range(queries)]
        for r, image in enumerate(column):
            ax = axes[r][w]
            ax.imshow(
                np.transpose(image, (1, 2, 0)).squeeze(-1)
                if image.shape[0] == 1
                else np.transpose(image, (1, 2, 0)),
                cmap="gray_r",
                vmin=0,
                vmax=1,
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == shots - 1:
                for side in ax.spines.values():  # support row framed, queries below
                    side.set_color("#DD8452")
                    side.set_linewidth(2)
        axes[0][w].set_title(str(w), fontsize=7)
    axes[0][0].set_ylabel("support", fontsize=7)
    if queries:
        axes[shots][0].set_ylabel("queries", fontsize=7)
    fig.suptitle(title or f"{ways}-way {shots}-shot episode", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out: str | Path) -> Path:
    from pipeline.atomic import atomic_path

    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)
    return out
