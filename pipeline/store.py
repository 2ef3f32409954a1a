"""The ingested image store: versioned Parquet partitions per domain, committed by a registry.

Layout under the store root::

    registry.json                                   # the commit point, written atomically, last
    data/domain=<name>/version=<n>/part-<hash16>.parquet
    cache/images-<data_version>-<size>-<channels>-<inv|raw>.npz
    .lock                                           # fcntl lock held while ingesting

Readers trust only `registry.json`: a Parquet file it does not name (left by a crashed
ingest) is invisible, and the next ingest deletes it.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import settings
from pipeline.atomic import atomic_path, atomic_write, atomic_write_json, is_disk_full
from pipeline.errors import DiskFullError, StoreError
from pipeline.images import ImageSet, decode_image
from pipeline.ingest import (
    SCHEMA,
    DomainOutcome,
    IngestReport,
    Progress,
    ScannedDomain,
    ScannedSource,
    content_hash,
    scan_source,
)

REGISTRY_FORMAT = 1
_METADATA_COLUMNS = [f.name for f in SCHEMA if f.name != "image"]
"""The columns that get dictionaries and min/max statistics. Images are unique blobs: both
would only keep copies of the largest ones in memory (measured: 2x a 60 MB image per file)."""
_STALE_TEMP_SECONDS = 3600.0
"""Cache temp files older than this belong to a dead writer and may be removed."""


@dataclass(frozen=True)
class DomainInfo:
    """One version of one domain, as the registry records it."""

    name: str
    version: int
    content_hash: str
    """sha256 over the sorted (class, image sha256) pairs."""
    num_classes: int
    num_images: int
    ingested_at: str
    """UTC, ISO 8601."""
    source: str
    """The folder or zip it was ingested from."""
    layout: str
    """"omniglot" or "generic"."""
    path: str
    """The Parquet file, relative to the store root."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> DomainInfo:
        return cls(
            name=name,
            version=int(d["version"]),
            content_hash=str(d["content_hash"]),
            num_classes=int(d["num_classes"]),
            num_images=int(d["num_images"]),
            ingested_at=str(d["ingested_at"]),
            source=str(d["source"]),
            layout=str(d["layout"]),
            path=str(d["path"]),
        )


def data_version_of(infos: list[DomainInfo]) -> str:
    """sha256 over the (name, content hash) of each domain, in name order."""
    h = hashlib.sha256()
    for info in sorted(infos, key=lambda i: i.name):
        h.update(f"{info.name}\x00{info.content_hash}\n".encode())
    return h.hexdigest()


class Store:
    """A versioned, crash-safe store of ingested images (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root if root is not None else settings.store_root()).expanduser()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    @property
    def registry_path(self) -> Path:
        return self.root / "registry.json"

    # ------------------------------------------------------------------ ingest

    def ingest(
        self,
        source: str | os.PathLike[str],
        domain: str | None = None,
        *,
        skip_invalid: bool = False,
        min_images: int = 1,
        progress: Progress | None = None,
        max_total_bytes: int | None = None,
    ) -> IngestReport:
        """Ingest a folder or .zip; each changed domain becomes a new version.

        Promises: every file is read and decode-checked before anything is written; the
        registry is written last and atomically, so an exception or a crash at any point
        leaves the store as it was (stray files are ignored and removed by the next ingest),
        and a full disk is a `DiskFullError` saying so. Ingesting content the store already
        has changes nothing. `domain` selects one domain of a multi-domain source, or names a
        single-domain source. Memory stays bounded: images are streamed from the source into
        the Parquet files, never all held at once; `max_total_bytes` caps the source (see
        `pipeline.ingest.scan_source` for it and for the checks and warnings).
        """
        start = time.perf_counter()
        # Reading and checking the source needs no lock: it touches nothing in the store.
        scanned = scan_source(
            source,
            domain,
            skip_invalid=skip_invalid,
            min_images=min_images,
            progress=progress,
            max_total_bytes=max_total_bytes,
        )
        try:
            outcomes = self._commit(scanned)
        except OSError as exc:  # creating the store folder or its lock file
            if not is_disk_full(exc):
                raise
            raise self._disk_full(scanned, Path(exc.filename or self.root)) from None
        return IngestReport(
            source=scanned.source,
            layout=scanned.layout,
            domains=tuple(outcomes),
            warnings=tuple(scanned.warnings),
            files_seen=scanned.files_seen,
            seconds=time.perf_counter() - start,
            more_warnings=scanned.more_warnings,
        )

    def _commit(self, scanned: ScannedSource) -> list[DomainOutcome]:
        """Under the lock: version each changed domain, write its Parquet file, then the
        registry (the commit point); on any failure before that rename, remove what was
        written, so the store is exactly as before."""
        with self._locked():
            registry = self._read_registry()
            new_registry = copy.deepcopy(registry)
            outcomes: list[DomainOutcome] = []
            to_write: list[tuple[ScannedDomain, dict[str, Any]]] = []
            now = datetime.now(UTC).isoformat(timespec="seconds")
            for d in scanned.domains:
                entry = new_registry["domains"].get(d.name)
                current = _current_entry(entry) if entry else None
                if current is not None and current["content_hash"] == d.content_hash:
                    outcomes.append(_outcome(d, "unchanged", current["version"]))
                    continue
                previous = [v["version"] for v in entry["versions"]] if entry else []
                version = max(previous, default=0) + 1
                record = {
                    "version": version,
                    "content_hash": d.content_hash,
                    "num_classes": d.num_classes,
                    "num_images": d.num_images,
                    "ingested_at": now,
                    "source": scanned.source,
                    "layout": scanned.layout,
                    "path": (
                        f"data/domain={d.name}/version={version}/part-{d.content_hash[:16]}.parquet"
                    ),
                }
                to_write.append((d, record))
                entry = new_registry["domains"].setdefault(d.name, {"versions": []})
                entry["versions"].append(record)
                entry["current"] = version
                outcomes.append(_outcome(d, "new" if version == 1 else "new version", version))

            if to_write:
                self._remove_orphans(registry)
                written: list[Path] = []
                target = self.registry_path
                try:
                    for d, record in to_write:
                        target = self.root / record["path"]
                        written.append(target)
                        self._write_part(target, scanned.tables(d))
                    target = self.registry_path
                    self._write_registry(new_registry)  # the commit point
                except BaseException as exc:
                    # Nothing names these files yet; take them back so the store is as before.
                    if self._committed(new_registry):
                        raise  # failed after the rename: the new registry stands
                    for path in written:
                        path.unlink(missing_ok=True)
                        _remove_empty_parents(path.parent, stop=self.root)
                    if isinstance(exc, DiskFullError) or is_disk_full(exc):
                        raise self._disk_full(scanned, target) from None
                    raise
        return outcomes

    def _disk_full(self, scanned: ScannedSource, target: Path) -> DiskFullError:
        """The one line for an ingest that ran out of space: what, where, and that the store
        (whose registry was never replaced) is as it was."""
        return DiskFullError(
            f"no space left on the device while writing {target} (ingesting {scanned.source} "
            f"into store {self.root}); nothing was lost: the store is as it was before this "
            "ingest. Free some space and run the ingest again."
        )

    def _committed(self, registry: dict[str, Any]) -> bool:
        """Whether the registry on disk is `registry` (so its files must stay)."""
        try:
            return json.loads(self.registry_path.read_text()) == registry
        except (OSError, ValueError):
            return False

    def _write_part(self, path: Path, tables: Iterable[pa.Table]) -> None:
        """Write one domain version's Parquet file from `tables` (one row group each, so only
        one batch of images is in memory): temp file, fsync, rename."""
        with (
            atomic_path(path) as tmp,
            pq.ParquetWriter(
                tmp,
                SCHEMA,
                compression="zstd",
                use_dictionary=_METADATA_COLUMNS,
                write_statistics=_METADATA_COLUMNS,
            ) as out,
        ):
            for table in tables:
                out.write_table(table)

    def _write_registry(self, registry: dict[str, Any]) -> None:
        atomic_write_json(self.registry_path, registry)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the store's exclusive fcntl lock (the kernel drops it if the process dies)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _remove_orphans(self, registry: dict[str, Any]) -> None:
        """Delete files under data/ the registry does not name, and leftover temp files."""
        keep = {
            (self.root / v["path"]).resolve()
            for entry in registry["domains"].values()
            for v in entry["versions"]
        }
        data = self.root / "data"
        if data.is_dir():
            for dirpath, dirnames, filenames in os.walk(data, topdown=False):
                for name in filenames:
                    path = Path(dirpath) / name
                    if path.resolve() not in keep:
                        path.unlink(missing_ok=True)
                for name in dirnames:
                    try:
                        (Path(dirpath) / name).rmdir()  # only succeeds when empty
                    except OSError:
                        pass
        for tmp in self.root.glob(".registry.json.*.tmp"):
            tmp.unlink(missing_ok=True)
        # A cache writer in another process may be mid-write (it takes no lock): only old ones.
        cutoff = time.time() - _STALE_TEMP_SECONDS
        for tmp in (self.root / "cache").glob(".*.tmp"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except OSError:
                pass

    # ------------------------------------------------------------------ registry

    def _read_registry(self) -> dict[str, Any]:
        path = self.registry_path
        if not path.exists():
            return {"format": REGISTRY_FORMAT, "domains": {}}
        try:
            registry = json.loads(path.read_text())
            if not isinstance(registry.get("domains"), dict):
                raise ValueError("no 'domains' mapping")
        except (ValueError, OSError) as e:
            raise StoreError(
                f"store registry {path} is unreadable ({e}); restore it from a backup or move "
                "the store aside and ingest again."
            ) from e
        if registry.get("format", REGISTRY_FORMAT) > REGISTRY_FORMAT:
            raise StoreError(
                f"store registry {path} has format {registry['format']}, newer than this anole "
                f"understands ({REGISTRY_FORMAT}); upgrade anole."
            )
        return registry

    def domains(self) -> list[DomainInfo]:
        """The current version of every domain, sorted by name."""
        registry = self._read_registry()
        return [
            DomainInfo.from_dict(name, _current_entry(entry))
            for name, entry in sorted(registry["domains"].items())
        ]

    def history(self, name: str) -> list[DomainInfo]:
        """Every version of domain `name`, oldest first; StoreError for an unknown domain."""
        registry = self._read_registry()
        if name not in registry["domains"]:
            raise StoreError(self._unknown_message([name], registry))
        versions = sorted(registry["domains"][name]["versions"], key=lambda v: v["version"])
        return [DomainInfo.from_dict(name, v) for v in versions]

    def _select(self, domains: list[str] | tuple[str, ...] | str | None) -> list[DomainInfo]:
        """Current versions of `domains` (all when None), sorted by name."""
        current = {info.name: info for info in self.domains()}
        if domains is None:
            return list(current.values())
        names = [domains] if isinstance(domains, str) else list(domains)
        missing = [n for n in names if n not in current]
        if missing:
            raise StoreError(self._unknown_message(missing, self._read_registry()))
        return [current[n] for n in sorted(set(names))]

    def _unknown_message(self, names: list[str], registry: dict[str, Any]) -> str:
        known = ", ".join(sorted(registry["domains"])) or "none yet"
        return (
            f"unknown domain(s) {', '.join(map(repr, names))} in store {self.root}; "
            f"known: {known}. Ingest it first (`anole ingest <folder|zip>`)."
        )

    def data_version(self, domains: list[str] | tuple[str, ...] | str | None = None) -> str:
        """sha256 over the current content hashes (and names) of the chosen domains."""
        return data_version_of(self._select(domains))

    # ------------------------------------------------------------------ reading

    def read_table(self, domains: list[str] | tuple[str, ...] | str | None = None) -> pa.Table:
        """All rows of the current versions of `domains` (all when None), domains in name order.

        Each file is checked against the registry's content hash, so a swapped or damaged
        file is an error rather than silently different data.
        """
        infos = self._select(domains)
        if not infos:
            return SCHEMA.empty_table()
        return pa.concat_tables([self._read_part(info) for info in infos])

    def _read_part(self, info: DomainInfo) -> pa.Table:
        path = self.root / info.path
        try:
            table = pq.read_table(path, schema=SCHEMA)
        except (OSError, pa.ArrowInvalid) as e:
            raise StoreError(
                f"cannot read {path} (domain {info.name!r} version {info.version}): {e}. "
                f"Re-ingest its source ({info.source}) into a fresh store."
            ) from e
        pairs = zip(
            table.column("class").to_pylist(), table.column("sha256").to_pylist(), strict=True
        )
        if content_hash(list(pairs)) != info.content_hash:
            raise StoreError(
                f"{path} does not match the registry's content hash for domain {info.name!r} "
                f"version {info.version}; the file was changed outside anole. Re-ingest "
                f"{info.source} into a fresh store."
            )
        return table

    def read_version(self, name: str, version: int) -> pa.Table:
        """The rows of one version of domain `name`, current or not (see `history`)."""
        for info in self.history(name):
            if info.version == version:
                return self._read_part(info)
        raise StoreError(
            f"domain {name!r} has no version {version} in store {self.root}; "
            f"it has {[i.version for i in self.history(name)]}."
        )

    def load_images(
        self,
        domains: list[str] | tuple[str, ...] | str | None = None,
        *,
        image_size: int = 28,
        channels: int = 1,
        invert: bool = True,
    ) -> ImageSet:
        """Every image of the current `domains`, decoded once to uint8 [N, C, size, size].

        Domains are sorted by name, classes by "domain/class", images within a class by their
        source path. Decoded arrays are cached under cache/ keyed by data version and decode
        settings, so a second call with the same arguments decodes nothing.
        """
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        infos = self._select(domains)
        if not infos:
            raise StoreError(
                f"store {self.root} has no domains yet; ingest a source first "
                "(`anole ingest <folder|zip>`)."
            )
        version = data_version_of(infos)
        cache = self.cache_path(version, image_size, channels, invert)
        cached = _read_cache(cache, version)
        if cached is not None:
            return cached
        table = pa.concat_tables([self._read_part(info) for info in infos])
        images = _decode_table(
            table, version, image_size=image_size, channels=channels, invert=invert
        )
        self._write_cache(cache, images)
        return images

    def cache_path(self, data_version: str, image_size: int, channels: int, invert: bool) -> Path:
        """Where `load_images` keeps decoded arrays for these settings."""
        inv = "inv" if invert else "raw"
        return self.root / "cache" / f"images-{data_version}-{image_size}-{channels}-{inv}.npz"

    def _write_cache(self, path: Path, images: ImageSet) -> None:
        try:
            atomic_write(
                path,
                lambda f: np.savez(
                    f,
                    images=images.images,
                    labels=images.labels,
                    class_names=np.array(images.class_names, dtype=str),
                    class_domain=images.class_domain,
                    domains=np.array(images.domains, dtype=str),
                ),
            )
        except (OSError, DiskFullError):
            pass  # a read-only or full store still loads; it just decodes again next time


def _remove_empty_parents(folder: Path, *, stop: Path) -> None:
    """Remove `folder` and its parents up to (not including) `stop` while they are empty."""
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _current_entry(entry: dict[str, Any]) -> dict[str, Any]:
    for v in entry["versions"]:
        if v["version"] == entry["current"]:
            return v
    raise StoreError(f"registry names current version {entry['current']} but does not list it")


def _outcome(d: ScannedDomain, outcome: str, version: int) -> DomainOutcome:
    return DomainOutcome(
        name=d.name,
        outcome=outcome,
        version=version,
        num_classes=d.num_classes,
        num_images=d.num_images,
        duplicates=d.duplicates,
        skipped=d.skipped,
        content_hash=d.content_hash,
    )


def _decode_table(
    table: pa.Table, data_version: str, *, image_size: int, channels: int, invert: bool
) -> ImageSet:
    """Order rows by ("domain/class", source_path) and decode each image once."""
    doms = table.column("domain").to_pylist()
    classes = table.column("class").to_pylist()
    paths = table.column("source_path").to_pylist()
    keys = [f"{d}/{c}" for d, c in zip(doms, classes, strict=True)]
    domain_of = dict(zip(keys, doms, strict=True))
    class_names = sorted(domain_of)
    domain_names = sorted(set(doms))
    class_index = {k: i for i, k in enumerate(class_names)}
    domain_index = {d: i for i, d in enumerate(domain_names)}
    order = sorted(range(len(keys)), key=lambda i: (class_index[keys[i]], paths[i]))
    blobs = table.column("image").to_pylist()
    # One thread: 105x105 PNGs decode in ~0.1 ms each, and a pool measured slower here.
    out = np.empty((len(order), channels, image_size, image_size), dtype=np.uint8)
    for j, i in enumerate(order):
        out[j] = decode_image(blobs[i], image_size=image_size, channels=channels, invert=invert)
    return ImageSet(
        images=out,
        labels=np.array([class_index[keys[i]] for i in order], dtype=np.int32),
        class_names=class_names,
        class_domain=np.array([domain_index[domain_of[k]] for k in class_names], dtype=np.int32),
        domains=domain_names,
        data_version=data_version,
    )


def _read_cache(path: Path, data_version: str) -> ImageSet | None:
    """The cached ImageSet at `path`, or None when absent or unreadable (then decode again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            images = ImageSet(
                images=z["images"],
                labels=z["labels"],
                class_names=[str(c) for c in z["class_names"]],
                class_domain=z["class_domain"],
                domains=[str(d) for d in z["domains"]],
                data_version=data_version,
            )
    except (OSError, ValueError, KeyError):
        return None
    if images.images.ndim != 4 or len(images.labels) != len(images.images):
        return None
    return images
