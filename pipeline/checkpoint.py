"""Checkpoints: an atomic payload plus a JSON manifest that carries its checksum.

Layout of a checkpoint directory:

    step-00000400.pt    torch.save payload (params, optimiser state, RNG state, ...)
    step-00000400.json  manifest: config, step, metrics, learner, data version, sha256 of the .pt
    best.pt / best.json the best checkpoint by validation score

The manifest is written after its payload, so a manifest only exists for a payload that was
completely written. A payload whose sha256 no longer matches its manifest (bit rot, a truncated
copy) is detected on load, and `latest()` falls back to the previous good checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes, atomic_write_json
from .errors import CheckpointError

_STEP_RE = re.compile(r"^step-(\d{8})\.json$")


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: its manifest and payload."""

    path: Path
    """The payload file (.pt)."""
    manifest: dict[str, Any]
    """config, step, metrics, learner, data_version, sha256, ..."""
    state: dict[str, Any]
    """What the trainer saved: params, optimiser state, RNG state."""

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any], manifest: dict[str, Any]) -> Path:
    """Write `state` to `path` (.pt) and its manifest beside it (.json), both atomically.

    Returns the payload path. The manifest gains `sha256`, `bytes` and `file`.
    """
    import torch

    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    atomic_write_bytes(path, payload)
    atomic_write_json(
        path.with_suffix(".json"),
        {**manifest, "sha256": _sha256(payload), "bytes": len(payload), "file": path.name},
    )
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and verify a checkpoint by its payload or manifest path.

    Raises CheckpointError naming the file when the manifest is missing or unreadable, or the
    payload is missing, truncated or altered (checksum mismatch).
    """
    import torch

    path = Path(path)
    if path.is_dir():
        found = CheckpointDir(path).latest()
        if found is None:
            raise CheckpointError(f"{path} holds no checkpoint (no step-*.json manifest)")
        return found
    payload_path = path.with_suffix(".pt")
    manifest_path = path.with_suffix(".json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint manifest {manifest_path} is missing; pass a .pt written by anole"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is corrupt: {exc}") from None
    try:
        payload = payload_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint payload {payload_path} is missing") from None
    if _sha256(payload) != manifest.get("sha256"):
        raise CheckpointError(
            f"checkpoint {payload_path} is corrupt: its sha256 does not match {manifest_path.name} "
            f"({len(payload)} bytes, expected {manifest.get('bytes')})"
        )
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    return Checkpoint(payload_path, manifest, state)


class CheckpointDir:
    """The checkpoints of one run: numbered steps, the last `keep_last` kept, plus the best."""

    def __init__(self, root: str | Path, keep_last: int = 3):
        self.root = Path(root)
        self.keep_last = keep_last

    def step_path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}.pt"

    @property
    def best_path(self) -> Path:
        return self.root / "best.pt"

    def steps(self) -> list[int]:
        """Steps that have a manifest, oldest first."""
        if not self.root.is_dir():
            return []
        found = (_STEP_RE.match(p.name) for p in self.root.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save(self, step: int, state: dict[str, Any], manifest: dict[str, Any], *,
             best: bool = False) -> Path:
        """Save step `step` (and as best when `best`), then prune old steps."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = save_checkpoint(self.step_path(step), state, {**manifest, "step": step})
        if best:
            save_checkpoint(self.best_path, state, {**manifest, "step": step, "best": True})
        self._prune()
        return path

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
        for step in reversed(self.steps()):
            try:
                return load_checkpoint(self.step_path(step))
            except CheckpointError as exc:
                warnings.warn(f"{exc}; falling back to the previous checkpoint", stacklevel=2)
        return None

    def best(self) -> Checkpoint | None:
        """The best checkpoint by validation score, when one verifies."""
        if not self.best_path.with_suffix(".json").exists():
            return None
        try:
            return load_checkpoint(self.best_path)
        except CheckpointError as exc:
            warnings.warn(str(exc), stacklevel=2)
            return None

    def _prune(self) -> None:
        for step in self.steps()[: -self.keep_last]:
            # Manifest first: a payload without a manifest is ignored, never half-trusted.
            self.step_path(step).with_suffix(".json").unlink(missing_ok=True)
            self.step_path(step).unlink(missing_ok=True)
