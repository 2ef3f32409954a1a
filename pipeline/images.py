"""Decoded images: one decode per file, kept as compact uint8 arrays."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageSet:
    """Every image of some domains, decoded once to a fixed size, with class and domain labels."""

    images: np.ndarray
    """uint8 [N, C, H, W]. Inverted sets (Omniglot) have strokes at 255 on a 0 background."""
    labels: np.ndarray
    """int32 [N], index into `class_names`."""
    class_names: list[str]
    """'domain/class' for each class index."""
    class_domain: np.ndarray
    """int32 [num_classes], index into `domains`."""
    domains: list[str]
    """Domain names, sorted."""
    data_version: str
    """Content hash of the store rows these images came from."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def classes_of(self, domains: list[str] | tuple[str, ...] | None) -> np.ndarray:
        """Class indices belonging to `domains` (all classes when None)."""
        if domains is None:
            return np.arange(self.num_classes, dtype=np.int32)
        unknown = set(domains) - set(self.domains)
        if unknown:
            raise KeyError(f"unknown domains {sorted(unknown)}; known: {self.domains}")
        wanted = np.array([self.domains.index(d) for d in domains], dtype=np.int32)
        return np.flatnonzero(np.isin(self.class_domain, wanted)).astype(np.int32)


def synthetic_images(
    domains: int = 4, classes: int = 8, per_class: int = 6, size: int = 28, seed: int = 0
) -> ImageSet:
    """Uniform random grey images: `domains` x `classes` classes of `per_class` images each.

    For benchmarks and tests that need the shapes of a dataset but not its content (throughput,
    scheduling, fault handling); nothing can be learned from them.
    """
    rng = np.random.default_rng(seed)
    n = domains * classes * per_class
    return ImageSet(
        images=rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8),
        labels=np.repeat(np.arange(domains * classes, dtype=np.int32), per_class),
        class_names=[f"d{d}/c{c}" for d in range(domains) for c in range(classes)],
        class_domain=np.repeat(np.arange(domains, dtype=np.int32), classes),
        domains=[f"d{d}" for d in range(domains)],
        data_version=f"synthetic-{seed}",
    )


def decode_image(data: bytes, *, image_size: int, channels: int = 1, invert: bool = True) -> np.ndarray:
    """Decode PNG/JPEG bytes to uint8 [channels, image_size, image_size].

    Resizes with Lanczos (what torchvision's Omniglot pipelines and MAML use) and, with
    `invert`, flips intensities so Omniglot's black strokes become 255.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
        arr = np.asarray(img, dtype=np.uint8)
    if channels == 1:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    if invert:
        arr = 255 - arr
    return np.ascontiguousarray(arr)
