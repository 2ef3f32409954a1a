"""Few-shot tasks: domain splits, episode specs (a task pool), sampling and materialisation.

An episode is described by plain index arrays (`EpisodeSpecs`): which rows of an `ImageSet`
make up each way's support and query images, and how many quarter turns to rotate each way.
Specs are cheap to sample, to store as a Parquet task pool shared by many workers, and to
slice into shards; `materialize` turns them into the tensors learners consume.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.errors import ConfigError, SamplingError
from pipeline.images import ImageSet

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from pipeline.episodes import Episodes

__all__ = [
    "DomainSplit",
    "EpisodeSampler",
    "EpisodeSpecs",
    "affine_augment",
    "materialize",
    "split_domains",
]

# Bumped when the Parquet layout of a task pool changes; readers refuse newer formats.
POOL_FORMAT = 1

# task_id = seed * 2**31 + position: unique across seeds and stable per position, and still a
# non-negative int64 for any 32-bit seed (seed = task_id >> 31, position = task_id & (2**31 - 1)).
_TASK_ID_SHIFT = 31
_MAX_SEED = 2**32 - 1


# --------------------------------------------------------------------------- domain splits


@dataclass(frozen=True)
class DomainSplit:
    """Disjoint train / validation / test domains (alphabets for Omniglot)."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        seen: dict[str, str] = {}
        for name in ("train", "val", "test"):
            for domain in getattr(self, name):
                if domain in seen:
                    raise ConfigError(
                        f"domain {domain!r} is in both {seen[domain]!r} and {name!r}; "
                        "a domain split must be disjoint"
                    )
                seen[domain] = name

    @property
    def all(self) -> tuple[str, ...]:
        """Every domain of the split: train, then val, then test."""
        return self.train + self.val + self.test

    def to_dict(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DomainSplit:
        unknown = set(data) - {"train", "val", "test"}
        if unknown:
            raise ConfigError(
                f"unknown domain split fields {sorted(unknown)}; expected train/val/test"
            )
        return cls(
            tuple(data.get("train", ())), tuple(data.get("val", ())), tuple(data.get("test", ()))
        )


def split_domains(
    domains: Iterable[str],
    *,
    val: int | Sequence[str] = 1,
    test: int | Sequence[str] = 1,
    seed: int = 0,
) -> DomainSplit:
    """Split `domains` into disjoint train / val / test sets at the domain level.

    `val` and `test` are each either a count (drawn at random) or an explicit list of domain
    names. Explicit names are taken first; counts are then drawn from the remaining domains
    with a generator seeded by `seed`, and everything left over is train. The result depends
    only on the set of domain names (not their order), the arguments and the seed. Every
    part is sorted. At least one train domain must remain.
    """
    names = list(domains)
    duplicates = sorted({d for d in names if names.count(d) > 1})
    if duplicates:
        raise ConfigError(f"domains listed more than once: {duplicates}")
    pool = sorted(names)

    explicit: dict[str, tuple[str, ...]] = {}
    for part, value in (("test", test), ("val", val)):
        if isinstance(value, str):
            raise ConfigError(f"{part}={value!r}: give a count or a list of domain names")
        if not isinstance(value, int):
            chosen = tuple(value)
            unknown = sorted(set(chosen) - set(pool))
            if unknown:
                raise ConfigError(f"{part} domains {unknown} are not among the domains {pool}")
            explicit[part] = chosen
        elif value < 0:
            raise ConfigError(f"{part}={value}: the number of domains must be >= 0")

    taken = [d for chosen in explicit.values() for d in chosen]
    if len(set(taken)) != len(taken):
        raise ConfigError(
            f"val and test domains overlap: {sorted(set(explicit.get('val', ())) & set(explicit.get('test', ())))}"
        )
    remaining = [d for d in pool if d not in set(taken)]
    wanted = sum(v for v in (val, test) if isinstance(v, int))
    if len(remaining) - wanted < 1:
        raise ConfigError(
            f"cannot split {len(pool)} domains into val={val!r}, test={test!r} and at least one "
            f"train domain: {len(remaining)} domains left for {wanted} random picks; "
            "ingest more domains or lower val/test"
        )

    order = np.random.default_rng(seed).permutation(len(remaining))
    shuffled = [remaining[i] for i in order]
    picked: dict[str, tuple[str, ...]] = dict(explicit)
    for part, value in (("test", test), ("val", val)):
        if isinstance(value, int):
            picked[part], shuffled = tuple(shuffled[:value]), shuffled[value:]
    return DomainSplit(
        train=tuple(sorted(shuffled)),
        val=tuple(sorted(picked["val"])),
        test=tuple(sorted(picked["test"])),
    )


# --------------------------------------------------------------------------- episode specs


@dataclass(frozen=True, eq=False)
class EpisodeSpecs:
    """T episodes as index arrays into one `ImageSet`: the unit of a task pool.

    For task t and way w, `indices[t, w, :shots]` are the support rows and
    `indices[t, w, shots:]` the query rows; the episode label of way w is w.
    """

    indices: np.ndarray
    """int32 [T, ways, shots + queries], rows of the ImageSet."""
    rotations: np.ndarray
    """int8 [T, ways], quarter turns (0..3, counter-clockwise) applied to every image of a way."""
    task_ids: np.ndarray
    """int64 [T], unique and stable: seed * 2**31 + position for sampled specs."""
    shots: int
    queries: int
    data_version: str | None = field(default=None, compare=False)
    """The `ImageSet.data_version` the indices refer to; None when unknown."""

    def __post_init__(self) -> None:
        indices = np.ascontiguousarray(self.indices, dtype=np.int32)
        rotations = np.ascontiguousarray(self.rotations, dtype=np.int8)
        task_ids = np.ascontiguousarray(self.task_ids, dtype=np.int64)
        if indices.ndim != 3:
            raise ValueError(
                f"indices must be [T, ways, shots + queries], got shape {indices.shape}"
            )
        if indices.shape[2] != self.shots + self.queries:
            raise ValueError(
                f"indices hold {indices.shape[2]} images per way but shots + queries = "
                f"{self.shots} + {self.queries}"
            )
        if rotations.shape != indices.shape[:2]:
            raise ValueError(
                f"rotations must be [T, ways] = {indices.shape[:2]}, got {rotations.shape}"
            )
        if task_ids.shape != indices.shape[:1]:
            raise ValueError(f"task_ids must be [T] = {indices.shape[:1]}, got {task_ids.shape}")
        if rotations.size and (rotations.min() < 0 or rotations.max() > 3):
            raise ValueError("rotations must be quarter turns in 0..3")
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "rotations", rotations)
        object.__setattr__(self, "task_ids", task_ids)

    @property
    def ways(self) -> int:
        return int(self.indices.shape[1])

    @property
    def num_tasks(self) -> int:
        return int(self.indices.shape[0])

    def __len__(self) -> int:
        return self.num_tasks

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EpisodeSpecs):
            return NotImplemented
        return (
            self.shots == other.shots
            and self.queries == other.queries
            and np.array_equal(self.indices, other.indices)
            and np.array_equal(self.rotations, other.rotations)
            and np.array_equal(self.task_ids, other.task_ids)
        )

    __hash__ = None  # type: ignore[assignment]  # holds mutable arrays; equal by value

    def __getitem__(self, tasks: int | slice | np.ndarray | Sequence[int]) -> EpisodeSpecs:
        """A subset of the tasks, still an `EpisodeSpecs`: `specs[i::n]` is shard i of n.

        An int selects one task and keeps the task axis (T = 1).
        """
        if isinstance(tasks, int | np.integer):
            index = int(tasks)
            if not -self.num_tasks <= index < self.num_tasks:
                raise IndexError(f"task {index} out of range for {self.num_tasks} tasks")
            index %= self.num_tasks
            tasks = slice(index, index + 1)
        return EpisodeSpecs(
            self.indices[tasks],
            self.rotations[tasks],
            self.task_ids[tasks],
            self.shots,
            self.queries,
            self.data_version,
        )

    @classmethod
    def concat(cls, parts: Sequence[EpisodeSpecs]) -> EpisodeSpecs:
        """The tasks of `parts` in order. All parts must agree on ways, shots and queries."""
        if not parts:
            raise ValueError("concat needs at least one EpisodeSpecs")
        first = parts[0]
        for part in parts[1:]:
            if (part.ways, part.shots, part.queries) != (first.ways, first.shots, first.queries):
                raise ValueError(
                    f"cannot concat {part.ways}-way {part.shots}-shot {part.queries}-query specs "
                    f"with {first.ways}-way {first.shots}-shot {first.queries}-query specs"
                )
        versions = {p.data_version for p in parts}
        return cls(
            np.concatenate([p.indices for p in parts]),
            np.concatenate([p.rotations for p in parts]),
            np.concatenate([p.task_ids for p in parts]),
            first.shots,
            first.queries,
            versions.pop() if len(versions) == 1 else None,
        )

    # -- Parquet task pools ------------------------------------------------------------------

    def to_table(self) -> pa.Table:
        """One row per task: `task_id`, `indices` (fixed-size list, way-major) and `rotations`.

        ways, shots, queries and data_version go in the schema metadata.
        """
        import pyarrow as pa

        T, ways, per_way = self.indices.shape
        indices = pa.FixedSizeListArray.from_arrays(
            pa.array(self.indices.reshape(-1), type=pa.int32()), ways * per_way
        )
        rotations = pa.FixedSizeListArray.from_arrays(
            pa.array(self.rotations.reshape(-1), type=pa.int8()), ways
        )
        metadata = {
            "anole.pool_format": str(POOL_FORMAT),
            "anole.ways": str(ways),
            "anole.shots": str(self.shots),
            "anole.queries": str(self.queries),
        }
        if self.data_version is not None:
            metadata["anole.data_version"] = self.data_version
        return pa.table(
            {
                "task_id": pa.array(self.task_ids, type=pa.int64()),
                "indices": indices,
                "rotations": rotations,
            },
            metadata=metadata,
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> EpisodeSpecs:
        """The inverse of `to_table`."""
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        try:
            version = int(meta["anole.pool_format"])
            ways, shots, queries = (int(meta[f"anole.{k}"]) for k in ("ways", "shots", "queries"))
        except KeyError as exc:
            raise SamplingError(
                f"table is not an anole task pool: schema metadata lacks {exc.args[0]!r}"
            ) from None
        if version > POOL_FORMAT:
            raise SamplingError(
                f"task pool format {version} is newer than this anole reads ({POOL_FORMAT}); upgrade anole"
            )
        T = table.num_rows

        def flat(name: str, dtype: type) -> np.ndarray:
            column = table.column(name).combine_chunks()
            if T == 0:
                return np.zeros(0, dtype=dtype)
            return column.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)

        return cls(
            indices=flat("indices", np.int32).reshape(T, ways, shots + queries),
            rotations=flat("rotations", np.int8).reshape(T, ways),
            task_ids=table.column("task_id").to_numpy().astype(np.int64, copy=False),
            shots=shots,
            queries=queries,
            data_version=meta.get("anole.data_version"),
        )

    def write_pool(self, path: str | Path) -> None:
        """Write the specs as a Parquet task pool, atomically (readers never see a torn file)."""
        import pyarrow.parquet as pq

        with atomic_path(path) as tmp:
            pq.write_table(self.to_table(), tmp)

    @classmethod
    def read_pool(cls, path: str | Path) -> EpisodeSpecs:
        """Read a task pool written by `write_pool`."""
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.is_file():
            raise SamplingError(
                f"task pool {path} does not exist; write it with EpisodeSpecs.write_pool"
            )
        return cls.from_table(pq.read_table(path))


# --------------------------------------------------------------------------- sampling


Mode = Literal["within", "unstructured"]
DomainWeighting = Literal["classes", "uniform"]


class EpisodeSampler:
    """Samples N-way K-shot episode specs from an `ImageSet`, vectorised and reproducibly.

    mode="within": all `ways` classes of an episode come from one domain (Lake et al.'s
    within-alphabet protocol). The domain is drawn with probability proportional to its
    number of eligible classes (`domain_weighting="classes"`, so every class is about as
    likely to appear as in unstructured sampling) or uniformly (`"uniform"`).
    mode="unstructured": the classes are drawn uniformly from every eligible class of
    `domains` (the MAML / Reptile Omniglot protocol).

    rotations=True treats each (class, k * 90 degrees) pair as a class of its own (4x the
    classes, as in Santoro et al. and MAML). An episode never holds the same base class
    twice, even under two rotations: two turns of one character (an "O", an "l") can be
    indistinguishable, which would make the episode unsolvable. So an episode draws `ways`
    distinct base classes and an independent uniform rotation for each.

    Classes with fewer than shots + queries images are excluded with a warning naming them;
    in within mode, so is a domain with fewer eligible classes than `ways`.

    Images of a way are drawn without replacement; support and query images never overlap.
    """

    def __init__(
        self,
        images: ImageSet,
        *,
        ways: int,
        shots: int,
        queries: int,
        domains: Sequence[str] | None = None,
        mode: Mode = "within",
        rotations: bool = False,
        domain_weighting: DomainWeighting = "classes",
    ) -> None:
        if mode not in ("within", "unstructured"):
            raise ConfigError(f"mode={mode!r}: use 'within' or 'unstructured'")
        if domain_weighting not in ("classes", "uniform"):
            raise ConfigError(f"domain_weighting={domain_weighting!r}: use 'classes' or 'uniform'")
        for name, value, least in (("ways", ways, 1), ("shots", shots, 1), ("queries", queries, 0)):
            if not isinstance(value, int | np.integer) or value < least:
                raise ConfigError(f"{name}={value!r}: must be an integer >= {least}")
        self.images = images
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.mode: Mode = mode
        self.rotations = bool(rotations)
        self.domain_weighting: DomainWeighting = domain_weighting
        self.domains = tuple(images.domains if domains is None else domains)
        per_way = self.shots + self.queries

        try:
            classes = images.classes_of(list(self.domains))
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None
        counts = np.bincount(images.labels, minlength=images.num_classes)
        class_counts = counts[classes]
        too_small = classes[class_counts < per_way]
        if too_small.size:
            names = [images.class_names[c] for c in too_small]
            shown = ", ".join(names[:20]) + (
                f" and {len(names) - 20} more" if len(names) > 20 else ""
            )
            warnings.warn(
                f"{len(names)} classes have fewer than shots + queries = {per_way} images and are "
                f"excluded from {ways}-way {shots}-shot sampling: {shown}",
                stacklevel=2,
            )
        eligible = classes[class_counts >= per_way]

        # Candidate class lists: one per domain (within) or a single list (unstructured).
        if mode == "within":
            groups = [
                eligible[images.class_domain[eligible] == d] for d in range(len(images.domains))
            ]
            group_names = list(images.domains)
            small = [(group_names[i], len(g)) for i, g in enumerate(groups) if 0 < len(g) < ways]
            if small:
                shown = ", ".join(f"{name} ({n})" for name, n in small)
                warnings.warn(
                    f"{len(small)} domains have fewer than ways = {ways} eligible classes and are "
                    f"excluded from within-domain sampling: {shown}",
                    stacklevel=2,
                )
            keep = [i for i, g in enumerate(groups) if len(g) >= ways]
            groups = [groups[i] for i in keep]
            self.sampled_domains = tuple(group_names[i] for i in keep)
        else:
            groups = [eligible] if len(eligible) >= ways else []
            self.sampled_domains = tuple(
                sorted({images.domains[d] for d in images.class_domain[eligible]})
            )
        if not groups:
            raise SamplingError(self._infeasible_message(classes, class_counts))

        # Padded tables so sampling is one array operation for all tasks at once.
        sizes = np.array([len(g) for g in groups], dtype=np.int64)
        self._group_classes = np.full((len(groups), sizes.max()), -1, dtype=np.int32)
        for i, g in enumerate(groups):
            self._group_classes[i, : len(g)] = g
        self._group_sizes = sizes
        weights = sizes.astype(np.float64) if domain_weighting == "classes" else np.ones(len(sizes))
        self._group_cdf = np.cumsum(weights / weights.sum())
        self._group_cdf[-1] = 1.0

        # Rows of every class, padded: class_rows[c, :class_sizes[c]] are the rows of class c.
        order = np.argsort(images.labels, kind="stable").astype(np.int32)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._class_sizes = counts.astype(np.int64)
        width = int(counts[eligible].max())
        column = np.arange(width)
        valid = column[None, :] < counts[:, None]
        gather = np.minimum(starts[:, None] + column[None, :], max(len(order) - 1, 0))
        self._class_rows = np.where(valid, order[gather], -1).astype(np.int32)

        # Tasks per random-number chunk: fixed by the configuration (never by num_tasks) so
        # that sample(n, seed) is a prefix of sample(m, seed) for n < m; ~4M keys per chunk.
        widest = max(int(sizes.max()), self.ways * width)
        self._chunk = int(max(1, min(8192, 2**22 // widest)))

    @property
    def num_classes(self) -> int:
        """Eligible base classes (before rotation)."""
        return int(sum(self._group_sizes))

    def _infeasible_message(self, classes: np.ndarray, class_counts: np.ndarray) -> str:
        """Why nothing can be sampled, with the largest ways / shots+queries that would work."""
        per_way = self.shots + self.queries
        if self.mode == "within":
            doms = self.images.class_domain[classes]
            by_group = [class_counts[doms == d] for d in np.unique(doms)]
        else:
            by_group = [class_counts]
        # Largest ways at this shots + queries, and largest shots + queries at these ways.
        max_ways = max((int((c >= per_way).sum()) for c in by_group), default=0)
        max_per_way = max(
            (int(np.sort(c)[::-1][self.ways - 1]) for c in by_group if len(c) >= self.ways),
            default=0,
        )
        where = "any single domain" if self.mode == "within" else "the domains"
        return (
            f"cannot sample {self.ways}-way {self.shots}-shot episodes with {self.queries} queries "
            f"per class from {where} of {list(self.domains)} (mode={self.mode!r}): "
            f"at shots + queries = {per_way} at most {max_ways} ways are feasible; "
            f"at ways = {self.ways} at most shots + queries = {max_per_way} is feasible"
        )

    def sample(self, num_tasks: int, seed: int) -> EpisodeSpecs:
        """`num_tasks` episode specs, a pure function of (this sampler's configuration, seed).

        The same seed gives identical arrays; `sample(n, seed)` is the first n tasks of
        `sample(m, seed)` for m > n, and `task_ids` are seed * 2**31 + position, so a task id
        names the same episode wherever it is sampled. 0 <= seed < 2**32, num_tasks < 2**31.
        """
        seed, num_tasks = int(seed), int(num_tasks)
        if not 0 <= seed <= _MAX_SEED:
            raise ConfigError(f"seed={seed}: must be in 0..{_MAX_SEED}")
        if not 0 <= num_tasks < 2**_TASK_ID_SHIFT:
            raise ConfigError(f"num_tasks={num_tasks}: must be in 0..{2**_TASK_ID_SHIFT - 1}")
        per_way = self.shots + self.queries
        indices = np.empty((num_tasks, self.ways, per_way), dtype=np.int32)
        rotations = np.zeros((num_tasks, self.ways), dtype=np.int8)
        for start in range(0, num_tasks, self._chunk):
            stop = min(start + self._chunk, num_tasks)
            self._sample_chunk(
                seed, start // self._chunk, indices[start:stop], rotations[start:stop]
            )
        task_ids = (np.int64(seed) << _TASK_ID_SHIFT) + np.arange(num_tasks, dtype=np.int64)
        return EpisodeSpecs(
            indices, rotations, task_ids, self.shots, self.queries, self.images.data_version
        )

    def _sample_chunk(
        self, seed: int, chunk: int, indices_out: np.ndarray, rotations_out: np.ndarray
    ) -> None:
        n = indices_out.shape[0]
        # One generator per kind of draw, so each draw is row-major in the task axis and a
        # shorter chunk draws a prefix of the same numbers (the prefix property of `sample`).
        domain_rng, class_rng, image_rng, rotation_rng = (
            np.random.default_rng([seed, chunk, stream]) for stream in range(4)
        )

        group = np.searchsorted(self._group_cdf, domain_rng.random(n), side="right")
        group = np.minimum(group, len(self._group_sizes) - 1)

        # Distinct classes: random keys over the group's (padded) class list, padding last.
        width = self._group_classes.shape[1]
        keys = class_rng.random((n, width))
        keys[np.arange(width)[None, :] >= self._group_sizes[group][:, None]] = 2.0
        slots = _smallest_keys(keys, self.ways)
        classes = self._group_classes[group[:, None], slots]  # [n, ways]

        # Distinct images of each class, the same way; support first, then queries.
        width = self._class_rows.shape[1]
        keys = image_rng.random((n, self.ways, width))
        keys[np.arange(width)[None, None, :] >= self._class_sizes[classes][..., None]] = 2.0
        slots = _smallest_keys(keys, self.shots + self.queries)
        indices_out[...] = self._class_rows[classes[..., None], slots]

        if self.rotations:
            rotations_out[...] = (rotation_rng.random((n, self.ways)) * 4).astype(np.int8)


def _smallest_keys(keys: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k smallest keys along the last axis, in increasing key order.

    With i.i.d. uniform keys this is a uniformly random ordered k-subset without replacement.
    """
    if keys.shape[-1] <= 64 or k * 4 >= keys.shape[-1]:
        return np.argsort(keys, axis=-1)[..., :k]
    # Wide rows: partition first, then order only the k survivors.
    part = np.argpartition(keys, k - 1, axis=-1)[..., :k]
    order = np.argsort(np.take_along_axis(keys, part, axis=-1), axis=-1)
    return np.take_along_axis(part, order, axis=-1)


# --------------------------------------------------------------------------- materialisation


def materialize(
    images: ImageSet,
    specs: EpisodeSpecs,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Episodes:
    """The episodes `specs` describes, as tensors on `device` with pixels scaled to [0, 1].

    Gathers rows of the already decoded `images.images` (no decoding), turns every image of
    way w by `specs.rotations[:, w]` quarter turns counter-clockwise (as `np.rot90` on the H, W
    axes), and splits support and query. support_x is [T, ways * shots, C, H, W] ordered
    class-major (all of way 0's shots, then way 1's, ...); support_y / query_y hold the way
    index 0..ways-1 in the same order. `dtype` defaults to float32.
    """
    import torch

    from pipeline.episodes import Episodes

    dtype = torch.float32 if dtype is None else dtype
    if specs.data_version is not None and specs.data_version != images.data_version:
        raise SamplingError(
            f"episode specs index images of data version {specs.data_version[:12]}, but this "
            f"ImageSet is version {images.data_version[:12]}; resample the task pool"
        )
    T, ways, _ = specs.indices.shape
    shots, queries = specs.shots, specs.queries
    if specs.indices.size and (
        specs.indices.min() < 0 or specs.indices.max() >= len(images.images)
    ):
        raise SamplingError(
            f"episode specs index rows up to {int(specs.indices.max())}, but the ImageSet has "
            f"{len(images.images)} images; the specs were sampled from another ImageSet"
        )
    C, H, W = images.images.shape[1:]
    if H != W and np.any(specs.rotations % 2 == 1):
        raise SamplingError(f"quarter turns need square images, these are {H}x{W}")

    def gather(part: np.ndarray, count: int) -> torch.Tensor:
        # Gather support and query separately, straight into their final class-major layout,
        # so the float conversion is the only full-size pass (np.take beats fancy indexing).
        x = np.take(images.images, part.reshape(-1), axis=0).reshape(T, ways, count, C, H, W)
        for turns in (1, 2, 3):
            # Group by rotation: one vectorised uint8 copy per turn, not one per way.
            mask = specs.rotations == turns
            if mask.any():
                x[mask] = np.rot90(x[mask], turns, axes=(-2, -1))
        pixels = torch.from_numpy(x.reshape(T, ways * count, C, H, W))
        if device is not None:
            pixels = pixels.to(device)  # move uint8 (a quarter of the bytes), convert there
        return pixels.to(dtype).div_(255.0)

    support_x = gather(specs.indices[:, :, :shots], shots)
    query_x = gather(specs.indices[:, :, shots:], queries)
    way_labels = torch.arange(ways, device=support_x.device, dtype=torch.int64)
    support_y = way_labels.repeat_interleave(shots).expand(T, -1).contiguous()
    query_y = way_labels.repeat_interleave(queries).expand(T, -1).contiguous()
    return Episodes(support_x, support_y, query_x, query_y, ways, shots, queries)


# --------------------------------------------------------------------------- augmentation


def affine_augment(
    x: torch.Tensor,
    *,
    max_rotate_deg: float = 0.0,
    max_translate: float = 0.0,
    max_scale: float = 0.0,
    max_shear: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`x` [..., C, H, W] with an independent small random affine transform per image.

    Each image is sheared horizontally by U(-max_shear, max_shear) (x += shear * y: a slant),
    rotated by U(-max_rotate_deg, max_rotate_deg) degrees, scaled by 1 + U(-max_scale,
    max_scale) and shifted by U(-max_translate, max_translate) of its width / height on each
    axis, about its centre, with bilinear sampling. Pixels from outside the image are 0 (the
    background of inverted Omniglot). With all limits 0 it returns `x` itself. Random draws
    come from `generator` (on its own device) so a seeded generator gives the same transforms
    on every run.
    """
    import torch
    import torch.nn.functional as F

    for name, value in (
        ("max_rotate_deg", max_rotate_deg),
        ("max_translate", max_translate),
        ("max_scale", max_scale),
        ("max_shear", max_shear),
    ):
        if value < 0:
            raise ValueError(f"{name}={value}: must be >= 0")
    if max_scale >= 1:
        raise ValueError(f"max_scale={max_scale}: must be < 1 so the scale stays positive")
    if max_rotate_deg == 0 and max_translate == 0 and max_scale == 0 and max_shear == 0:
        return x
    if x.ndim < 3:
        raise ValueError(f"x must be [..., C, H, W], got shape {tuple(x.shape)}")

    lead, (C, H, W) = x.shape[:-3], x.shape[-3:]
    flat = x.reshape(-1, C, H, W)
    B = flat.shape[0]
    draw_device = generator.device if generator is not None else flat.device

    def uniform(limit: float) -> torch.Tensor:
        u = torch.rand(B, generator=generator, device=draw_device, dtype=torch.float32)
        return ((2 * u - 1) * limit).to(flat.device)

    angle = uniform(math.radians(max_rotate_deg))
    scale = 1 + uniform(max_scale)
    shift_x, shift_y = 2 * uniform(max_translate), 2 * uniform(max_translate)  # [-1, 1] coords

    # drawn last, and only when asked for, so shear-free transforms are unchanged by it
    shear = uniform(max_shear) if max_shear else torch.zeros_like(angle)

    # affine_grid maps output to input coordinates, so use the inverse transform:
    # input = Shear(-shear) @ R(-angle) / scale @ (output - shift).
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    a, b = cos + shear * sin, sin - shear * cos  # first row of Shear(-shear) @ R(-angle) / scale
    theta = torch.stack(
        [
            torch.stack([a, b, -(a * shift_x + b * shift_y)], dim=-1),
            torch.stack([-sin, cos, sin * shift_x - cos * shift_y], dim=-1),
        ],
        dim=1,
    )
    compute = flat if flat.is_floating_point() else flat.float()
    grid = F.affine_grid(theta.to(compute.dtype), [B, C, H, W], align_corners=False)
    out = F.grid_sample(compute, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.to(x.dtype).reshape(*lead, C, H, W)
