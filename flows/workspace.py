"""A workspace: one folder holding a store, task pools, training runs, reports and champions.

Layout under the root::

    workspace.json          # domain split, pool settings, promotion policy (fixed at creation)
    store/                  # pipeline.store.Store
    pools/<key>/            # versioned episode pools: <split>/<domain>.parquet + pools.json
    runs/<name>/            # one meta-training run (checkpoints/, metrics.jsonl, result.json)
    reports/<name>/         # report.md, report.json and PNG plots of one evaluation
    champions.json          # champion registry: current champion, history, every decision
    champions/<id>/         # a copy of each champion's checkpoint (runs may be pruned)
    inbox/                  # optional: drop a folder or zip here and the retrain flow ingests it
    inbox/rejected/         # sources that failed to ingest, each beside <name>.error.json

Plain Python only (no Prefect, no Ray): the flows call it, tests read it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_json
from pipeline.errors import ConfigError
from pipeline.tasks import DomainSplit

WORKSPACE_FORMAT = 1
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class PoolSettings:
    """How evaluation episodes are sampled: one pool per (split, domain)."""

    ways: int = 20
    """Classes per episode (Lake's 20-way protocol); a smaller domain uses all its classes."""
    shots: int = 1
    queries: int = 3
    """Query images per class (3 x 20 = 60 queries an episode)."""
    episodes: int = 60
    """Episodes per domain (each domain's pool is sampled from that domain alone)."""
    seed: int = 0
    image_size: int = 28
    channels: int = 1
    invert: bool = True

    def key(self) -> str:
        """A stable string naming these settings (part of a pool's cache key)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PoolSettings:
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown pool settings {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class PromotionPolicy:
    """When a candidate replaces the champion."""

    min_improvement: float = 0.0
    """The candidate's validation accuracy must exceed the champion's by more than this."""
    forgetting_margin: float = 0.02
    """Largest allowed drop of mean accuracy on the champion's training domains (absolute)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PromotionPolicy:
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown promotion policy fields {sorted(unknown)}")
        return cls(**{k: float(v) for k, v in data.items()})


@dataclass
class WorkspaceConfig:
    """What stays fixed for the life of a workspace, so every run is comparable."""

    split: DomainSplit
    pools: PoolSettings = field(default_factory=PoolSettings)
    policy: PromotionPolicy = field(default_factory=PromotionPolicy)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": WORKSPACE_FORMAT,
            "split": self.split.to_dict(),
            "pools": asdict(self.pools),
            "policy": asdict(self.policy),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkspaceConfig:
        return cls(
            split=DomainSplit.from_dict(data["split"]),
            pools=PoolSettings.from_dict(data.get("pools")),
            policy=PromotionPolicy.from_dict(data.get("policy")),
        )


class Workspace:
    """Paths and small state files of one workspace root (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    store_dir = property(lambda self: self.root / "store")
    pools_dir = property(lambda self: self.root / "pools")
    runs_dir = property(lambda self: self.root / "runs")
    reports_dir = property(lambda self: self.root / "reports")
    champions_file = property(lambda self: self.root / "champions.json")
    champions_dir = property(lambda self: self.root / "champions")
    inbox_dir = property(lambda self: self.root / "inbox")
    config_file = property(lambda self: self.root / "workspace.json")

    def store(self):
        from pipeline.store import Store

        return Store(self.store_dir)

    def store_id(self) -> str:
        """A short stable id of this workspace's store (names it in event resources)."""
        return hashlib.sha256(str(self.store_dir).encode()).hexdigest()[:16]

    # --- workspace.json -----------------------------------------------------------------------
    def read_config(self) -> WorkspaceConfig | None:
        if not self.config_file.exists():
            return None
        try:
            return WorkspaceConfig.from_dict(json.loads(self.config_file.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{self.config_file} is unreadable ({exc}); fix it or move the workspace aside"
            ) from exc

    def write_config(self, config: WorkspaceConfig) -> None:
        atomic_write_json(self.config_file, config.to_dict())

    @contextmanager
    def locked(self, name: str = "workspace") -> Iterator[None]:
        """An exclusive fcntl lock on `<root>/.<name>.lock` (released if the process dies)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def extend_split(split: DomainSplit, domains: list[str]) -> DomainSplit:
    """`split` with every domain it does not name added to train (new domains are learned from)."""
    known = set(split.all)
    extra = tuple(d for d in sorted(domains) if d not in known)
    return DomainSplit(tuple(sorted(split.train + extra)), split.val, split.test)


def source_fingerprint(source: str | os.PathLike[str]) -> str:
    """sha256 of a zip's bytes, or of (path, size, mtime) of every file under a folder."""
    path = Path(source)
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            st = p.stat()
            h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def list_source_domains(source: str | os.PathLike[str]) -> list[str]:
    """Domain names in a multi-domain source (`<domain>/<class>/<image>`), without reading images.

    A cheap listing for choosing which domains to ingest; ingestion itself validates the layout.
    """
    path = Path(source)
    if path.is_file():
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
        parts = [Path(n).parts for n in names]
    else:
        parts = [p.relative_to(path).parts for p in path.rglob("*") if p.is_file()]
    found = {
        p[-3]
        for p in parts
        if len(p) >= 3
        and Path(p[-1]).suffix.lower() in _IMAGE_SUFFIXES
        and not any(s.startswith((".", "__MACOSX")) for s in p)
    }
    return sorted(found)


REJECTED_DIR = "rejected"
"""An inbox's folder of sources that failed to ingest, each with `<name>.error.json` beside it
(so a folder source cannot be named this)."""


def inbox_sources(inbox: str | os.PathLike[str]) -> list[Path]:
    """Sources waiting in an inbox folder: each .zip and each sub-folder, by name."""
    inbox = Path(inbox)
    if not inbox.is_dir():
        return []
    return sorted(
        p
        for p in inbox.iterdir()
        if not p.name.startswith(".")
        and p.name != REJECTED_DIR
        and (p.is_dir() or p.suffix.lower() == ".zip")
    )


def quarantine_source(source: str | os.PathLike[str], error: BaseException) -> Path:
    """Move an inbox source that failed to ingest to `<inbox>/rejected/`; return its new path.

    The error goes beside it first, as `<name>.error.json`, then the source is renamed (atomic:
    the same filesystem), so a crash between the two leaves it in the inbox to be tried again.
    An earlier rejected source of the same name is kept: this one gets a `-2`, `-3`... suffix.
    """
    source = Path(source)
    folder = source.parent / REJECTED_DIR
    folder.mkdir(exist_ok=True)
    target, n = folder / source.name, 1
    while target.exists() or error_file(target).exists():
        n += 1
        target = folder / f"{source.stem}-{n}{source.suffix}"
    atomic_write_json(
        error_file(target),
        {
            "source": str(source),
            "error": str(error),
            "type": type(error).__name__,
            "rejected_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    os.replace(source, target)
    return target


def error_file(rejected: Path) -> Path:
    """Where the error of a rejected inbox source is written."""
    return rejected.with_name(f"{rejected.name}.error.json")


def stable_hash(obj: Any, length: int = 12) -> str:
    """A short sha256 of `obj` as canonical JSON."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
