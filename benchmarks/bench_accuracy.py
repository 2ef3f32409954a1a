"""Accuracy in a CPU time budget: train a learner on the Omniglot minimal splits, then score it.

Scores: Lake's one-shot runs (20-way 1-shot within an evaluation alphabet), 20-way 1-shot
within-alphabet episodes from background alphabets held out of training, and 5-way 1-shot
accuracy with a 95% CI on those held-out alphabets.

    python benchmarks/bench_accuracy.py --learner protonet --minutes 15 --json
    python benchmarks/bench_accuracy.py --learner reptile --minutes 15 --set inner_steps=5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--learner", default=None)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override key=value (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a temp dir)")
    parser.add_argument("--episodes", type=int, default=600, help="5-way held-out episodes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from pipeline import settings
    from pipeline.config import config_for
    from pipeline.scoring import load_model, score_heldout, score_oneshot
    from pipeline.store import Store
    from pipeline.train import Trainer

    out = args.out or Path(tempfile.mkdtemp(prefix="anole-acc-"))
    store = Store(out / "store")
    for source in settings.omniglot_background_sources():
        store.ingest(source)
    cfg = config_for(args.learner, overrides=args.overrides, minutes=args.minutes)
    images = store.load_images(None, image_size=cfg.image_size, channels=cfg.channels, invert=cfg.invert)
    t0 = time.perf_counter()

    def progress(step: int, total: int, metrics: dict) -> None:
        if step % 100 == 0 and not args.json:
            print(f"  step {step}/{total} {metrics}", file=sys.stderr, flush=True)

    result = Trainer(cfg, images, out / "train", progress=progress).run()
    train_seconds = time.perf_counter() - t0
    model = load_model(out / "train")
    oneshot = score_oneshot(model, settings.omniglot_oneshot_runs())
    held20 = score_heldout(model, store, ways=20, shots=1, queries=1, episodes=200, mode="within")
    held5 = score_heldout(model, store, ways=5, shots=1, queries=5, episodes=args.episodes)
    report = {
        "config": cfg.to_dict(),
        "train": result.to_dict(),
        "train_seconds": round(train_seconds, 1),
        "best_step": model.step,
        "split": model.split.to_dict(),
        "oneshot": oneshot.to_dict(),
        "heldout_20way_1shot_within": held20.to_dict(),
        "heldout_5way_1shot": held5.to_dict(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{cfg.learner}: {result.step} steps in {train_seconds:.0f}s, best at step {model.step}")
        print(f"  one-shot runs: {oneshot}")
        print(f"  held-out 20-way 1-shot within-alphabet error: {100 * (1 - held20.mean):.1f}% ({held20})")
        print(f"  held-out 5-way 1-shot: {held5}")
    return report


if __name__ == "__main__":
    main()
