"""Episode throughput: sampling specs (EpisodeSampler.sample) and materialising them.

Sampling is timed for both modes, with and without rotations, at 5-way 1-shot and 20-way
5-shot (15 queries each). Materialisation (gather from the decoded uint8 array, quarter
turns, scale to [0, 1], support/query split) is timed at 5-way 1-shot and 20-way 5-shot with
15 queries and rotations on, `--batch` episodes per call, next to its floor: converting the
same number of uint8 pixels to a fresh float32 tensor. The ImageSet is Omniglot-sized:
synthetic by default (8 domains, 242 classes x 20 images = 4,840 images, 1x28x28), or the real
minimal background zips with `--omniglot` (ingested into a temporary store).

    python benchmarks/bench_tasks.py [--repeat 5] [--batch 100] [--omniglot] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import settings
from pipeline.images import ImageSet
from pipeline.tasks import EpisodeSampler, materialize

SETTINGS = [(5, 1, 15), (20, 5, 15)]  # (ways, shots, queries)


def synthetic_omniglot(seed: int = 0) -> ImageSet:
    """4,840 random 28x28 images in 242 classes of 20 over 8 domains (the minimal zips' shape)."""
    per_domain = [24, 22, 24, 47, 40, 26, 42, 17]  # characters per alphabet in the minimal zips
    class_domain = np.repeat(np.arange(8), per_domain).astype(np.int32)
    labels = np.repeat(np.arange(len(class_domain)), 20).astype(np.int32)
    rng = np.random.default_rng(seed)
    return ImageSet(
        images=rng.integers(0, 256, (len(labels), 1, 28, 28), dtype=np.uint8),
        labels=labels,
        class_names=[f"d{d}/c{c:03d}" for c, d in enumerate(class_domain)],
        class_domain=class_domain,
        domains=[f"d{d}" for d in range(8)],
        data_version="synthetic",
    )


def real_omniglot() -> ImageSet:
    from pipeline.store import Store

    sources = settings.omniglot_background_sources()
    if not sources:
        sys.exit("Omniglot zips not found; set ANOLE_DATA or drop --omniglot")
    with tempfile.TemporaryDirectory(prefix="anole-bench-") as tmp:
        store = Store(Path(tmp) / "store")
        for source in sources:
            store.ingest(source)
        return store.load_images(image_size=28)


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, float]:
    """(best, median) seconds of `repeat` calls after one warm-up call."""
    fn()
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return min(seconds), statistics.median(seconds)


def run(
    images: ImageSet, *, repeat: int, batch: int, num_specs: int, device: str
) -> dict[str, Any]:
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 20-way within drops the 17-class alphabet; expected
        # Materialisation first: large sampling calls leave glibc's malloc in a state where
        # later multi-MB allocations are several times slower (see benchmarks/README.md).
        for ways, shots, queries in SETTINGS:
            sampler = EpisodeSampler(
                images, ways=ways, shots=shots, queries=queries, mode="unstructured", rotations=True
            )
            specs = sampler.sample(batch, seed=2)

            def once(specs=specs) -> None:
                episodes = materialize(images, specs, device=device)
                if episodes.query_x.is_cuda:
                    torch.cuda.synchronize()

            best, median = best_of(repeat, once)
            images_per_episode = ways * (shots + queries)
            # The floor: converting the same number of uint8 pixels to a fresh float32 tensor.
            pixels = torch.from_numpy(images.images[specs.indices.reshape(-1)])

            def convert(pixels=pixels) -> None:
                pixels.to(device).to(torch.float32).div_(255.0)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()

            floor_best, floor_median = best_of(repeat, convert)
            rows.append(
                {
                    "step": "materialize",
                    "setting": f"{ways}-way {shots}-shot {queries}q",
                    "mode": "unstructured",
                    "rotations": True,
                    "count": batch,
                    "best_s": best,
                    "median_s": median,
                    "per_s": batch / best,
                    "images_per_s": batch * images_per_episode / best,
                }
            )
            rows.append(
                {
                    "step": "floor",
                    "setting": f"{ways}-way {shots}-shot {queries}q",
                    "mode": "uint8->float",
                    "rotations": False,
                    "count": batch,
                    "best_s": floor_best,
                    "median_s": floor_median,
                    "per_s": batch / floor_best,
                }
            )
        for ways, shots, queries in SETTINGS:
            for mode in ("within", "unstructured"):
                for rotations in (False, True):
                    sampler = EpisodeSampler(
                        images,
                        ways=ways,
                        shots=shots,
                        queries=queries,
                        mode=mode,
                        rotations=rotations,
                    )
                    best, median = best_of(repeat, lambda s=sampler: s.sample(num_specs, seed=1))
                    rows.append(
                        {
                            "step": "sample",
                            "setting": f"{ways}-way {shots}-shot {queries}q",
                            "mode": mode,
                            "rotations": rotations,
                            "count": num_specs,
                            "best_s": best,
                            "median_s": median,
                            "per_s": num_specs / best,
                        }
                    )
    return {
        "images": list(images.images.shape),
        "classes": images.num_classes,
        "domains": len(images.domains),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "repeat": repeat,
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"ImageSet {result['images']} ({result['classes']} classes, {result['domains']} domains); "
        f"device {result['device']}, {result['torch_threads']} torch threads; best of {result['repeat']}",
        "",
        f"{'step':<12}{'setting':<22}{'mode':<14}{'rot':<5}{'count':>8}{'best s':>9}"
        f"{'median s':>10}{'per s':>11}",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['step']:<12}{row['setting']:<22}{row['mode']:<14}{'yes' if row['rotations'] else 'no':<5}"
            f"{row['count']:>8}{row['best_s']:>9.4f}{row['median_s']:>10.4f}{row['per_s']:>11,.0f}"
        )
    lines.append("")
    lines.append(
        "per s: specs/s for sample, episodes/s for materialize; floor: converting the same\n"
        "pixels from uint8 to a fresh float32 tensor, the least materialize must do"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (best is kept)")
    parser.add_argument("--batch", type=int, default=100, help="episodes per materialize call")
    parser.add_argument("--specs", type=int, default=100_000, help="specs per sample call")
    parser.add_argument("--omniglot", action="store_true", help="use the real minimal zips")
    parser.add_argument("--device", default="cpu", help="materialize onto this torch device")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    images = real_omniglot() if args.omniglot else synthetic_omniglot()
    result = run(
        images, repeat=args.repeat, batch=args.batch, num_specs=args.specs, device=args.device
    )
    result["source"] = "omniglot" if args.omniglot else "synthetic"
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
