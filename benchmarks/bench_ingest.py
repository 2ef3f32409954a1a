"""Ingest throughput: a full `Store.ingest` of the Omniglot zips vs decoding them with PIL alone.

Each repeat ingests every source into a fresh temporary store (read, sha256, full decode
check, dedup, Parquet write, registry commit). The baseline reads the same zip entries and
does only `Image.open(...).convert("L")`, i.e. the least any ingest must do. Also timed:
`load_images` at 28x28 with a cold and a warm cache.

    python benchmarks/bench_ingest.py [--repeat 3] [--json] [SOURCE ...]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline import settings
from pipeline.ingest import IMAGE_EXTENSIONS
from pipeline.store import Store


def pil_decode(sources: list[Path]) -> int:
    """Read and decode every image entry of the zips with PIL; return how many."""
    n = 0
    for src in sources:
        with zipfile.ZipFile(src) as zf:
            for info in zf.infolist():
                if info.filename.lower().endswith(IMAGE_EXTENSIONS):
                    with Image.open(io.BytesIO(zf.read(info))) as img:
                        img.convert("L")
                    n += 1
    return n


def timed(fn) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(sources: list[Path], repeat: int) -> dict[str, Any]:
    ingest_s, pil_s, cold_s, warm_s = [], [], [], []
    files = stored = 0
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="anole-bench-") as tmp:
            store = Store(Path(tmp) / "store")
            seconds, reports = timed(lambda store=store: [store.ingest(s) for s in sources])
            ingest_s.append(seconds)
            files = sum(r.files_seen for r in reports)
            stored = sum(i.num_images for i in store.domains())
            seconds, _ = timed(store.load_images)
            cold_s.append(seconds)
            seconds, _ = timed(store.load_images)
            warm_s.append(seconds)
        seconds, n = timed(lambda: pil_decode(sources))
        pil_s.append(seconds)
        assert n == files, (n, files)

    def row(name: str, times: list[float], count: int) -> dict[str, Any]:
        best = min(times)
        return {
            "name": name,
            "count": count,
            "best_s": round(best, 4),
            "median_s": round(statistics.median(times), 4),
            "per_s": round(count / best, 1),
        }

    rows = [
        row("ingest (read+sha256+decode check+parquet+registry)", ingest_s, files),
        row("PIL alone (zip read + open + convert)", pil_s, files),
        row("load_images 28x28, cold cache (decode+resize)", cold_s, stored),
        row("load_images 28x28, warm cache", warm_s, stored),
    ]
    return {
        "sources": [str(s) for s in sources],
        "files": files,
        "images_stored": stored,
        "repeat": repeat,
        "ingest_images_per_s": round(stored / min(ingest_s), 1),
        "ratio_ingest_vs_pil": round(min(pil_s) / min(ingest_s), 3),
        "rows": rows,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sources", nargs="*", type=Path, help="folders or zips (default: Omniglot)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best is kept)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    sources = args.sources or settings.omniglot_background_sources()
    if not sources:
        print("no sources: pass folders/zips or set ANOLE_DATA", file=sys.stderr)
        return 2
    result = run(sources, max(1, args.repeat))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"sources: {', '.join(Path(s).name for s in result['sources'])}")
    print(
        f"{result['files']} files read, {result['images_stored']} unique images stored; "
        f"best of {result['repeat']}\n"
    )
    print(f"{'step':<54} {'count':>6} {'best s':>8} {'median s':>9} {'per s':>9}")
    for r in result["rows"]:
        print(
            f"{r['name']:<54} {r['count']:>6} {r['best_s']:>8.3f} {r['median_s']:>9.3f} "
            f"{r['per_s']:>9.0f}"
        )
    print(
        f"\ningest: {result['ingest_images_per_s']:.0f} unique images/s; "
        f"ingest speed / PIL-only decode speed = {result['ratio_ingest_vs_pil']:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
