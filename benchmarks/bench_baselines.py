"""One-shot baselines on Lake et al.'s 20-way runs: error per run, mean, and time.

Baselines: the modified Hausdorff distance between centred ink points (Lake's
`demo_classification`), the same without centring, and nearest neighbour by L2 distance on
the inverted, Lanczos-resized `--image-size` pixels.

    python benchmarks/bench_baselines.py [--image-size 28] [--json] [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import settings
from pipeline.oneshot import mhd_classify, mhd_costs, pixel_nn_classify, read_run, score_runs

BASELINES = {
    "mhd (centred ink, Lake's demo)": mhd_classify,
    "mhd (uncentred ink)": lambda run: mhd_costs(run, center=False).argmin(axis=1),
    "pixel 1-NN (L2)": pixel_nn_classify,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run folders (default: the shared ones)")
    parser.add_argument("--image-size", type=int, default=28, help="pixel 1-NN resolution")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    paths = args.runs or settings.omniglot_oneshot_runs()
    if not paths:
        sys.exit("no one-shot runs found; pass run folders or set ANOLE_DATA")
    runs = [read_run(path, image_size=args.image_size) for path in paths]
    results: dict[str, Any] = {}
    for name, classify in BASELINES.items():
        start = time.perf_counter()
        scores = score_runs(runs, classify)
        results[name] = {**scores.to_dict(), "seconds": time.perf_counter() - start}
    if args.json:
        print(json.dumps({"image_size": args.image_size, "baselines": results}, indent=2))
        return 0
    names = [run.name for run in runs]
    width = max(len(n) for n in results)
    print(f"{'baseline':<{width}}  " + "  ".join(f"{n:>6}" for n in names) + "    mean   time s")
    for name, r in results.items():
        errors = "  ".join(f"{100 * r['runs'][n]:5.1f}%" for n in names)
        print(f"{name:<{width}}  {errors}  {100 * r['mean_error']:5.1f}%  {r['seconds']:7.2f}")
    print("\nerror = fraction of the 20 test items per run assigned the wrong class")
    return 0


if __name__ == "__main__":
    sys.exit(main())
