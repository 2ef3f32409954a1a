"""Checkpoints: an atomic payload plus a JSON manifest that carries its checksum.

Layout of a checkpoint directory:

    step-00000400.pt    torch.save payload (params, optimiser state, RNG state, ...)
    step-00000400.json  manifest: config, step, metrics, learner, data version, sha256 of the .pt
    best-00000400-<sha>.pt / .json  the best checkpoint by validation score, a pair as above
    best.json           names the best pair: {"checkpoint": "best-00000400-<sha>.pt", "step": 400}

Every pair is written payload first, manifest second (each atomically), so a manifest only
exists for a payload that was completely written. The best pair is written under a name of its
own, and `best.json` is switched to it last, so a crash at any point leaves `best.json` naming a
whole pair (the old one or the new one); the superseded pair is removed after the switch. Older
runs kept the best as one `best.pt`/`best.json` pair, which still loads. A payload whose sha256
no longer matches its manifest (bit rot, a truncated copy) is detected on load, and `latest()`
falls back to the previous good checkpoint.

Payloads load with `torch.load(weights_only=True)`, which admits only tensors and plain data, so
a crafted file cannot run code (the sha256 is no defence: a forger rewrites the manifest too).
A payload holding other objects is refused with a message naming `anole convert-checkpoint`,
which re-saves a checkpoint the user trusts in that safe form.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes, atomic_write_json
from .errors import CheckpointError

_STEP_RE = re.compile(r"^step-(\d{8})\.json$")
_BEST_RE = re.compile(r"^best-\d{8}-[0-9a-f]{12}\.(pt|json)$")
BEST_POINTER = "best.json"
CONVERT_COMMAND = "anole convert-checkpoint"
"""The command that re-saves a trusted old checkpoint in the safe (weights-only) form."""


class UnsafeCheckpointError(CheckpointError):
    """A payload holds objects beyond tensors and plain data: loading it could run code.

    Never skipped as "corrupt" by `latest()`: falling back past it would hide a planted file."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: its manifest and payload."""

    path: Path
    """The payload file (.pt); its manifest is the same path with .json."""
    manifest: dict[str, Any]
    """config, step, metrics, learner, data_version, sha256, ..."""
    state: dict[str, Any]
    """What the trainer saved: params, optimiser state, RNG state."""

    @property
    def step(self) -> int:
        try:
            return int(self.manifest["step"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"checkpoint manifest {self.path.with_suffix('.json')} has no valid 'step'; "
                "it was not written by anole: point at a checkpoint from `anole train`"
            ) from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _serialize(state: dict[str, Any]) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _write_pair(path: Path, payload: bytes, manifest: dict[str, Any]) -> Path:
    """Write `payload` to `path` (.pt), then its manifest (.json), each atomically.

    When either write fails (a full disk), what was there before is put back: nothing, or the
    pair this one was replacing."""
    backup = _link_aside(path) if path.with_suffix(".json").exists() else None
    try:
        atomic_write_bytes(path, payload)
        atomic_write_json(
            path.with_suffix(".json"),
            {**manifest, "sha256": _sha256(payload), "bytes": len(payload), "file": path.name},
        )
    except BaseException:
        if backup is not None:
            os.replace(backup, path)  # the old payload again, matching the old manifest
        else:  # a payload without its manifest is never loaded; don't leave it behind either
            path.unlink(missing_ok=True)
        raise
    if backup is not None:
        backup.unlink(missing_ok=True)
    return path


def _link_aside(path: Path) -> Path | None:
    """A second name for the payload at `path` (a hard link: no copy), or None when impossible."""
    backup = path.with_name(f".{path.name}.old")
    try:
        backup.unlink(missing_ok=True)
        os.link(path, backup)
    except OSError:  # no payload, or no hard links here: a failed rewrite then loses the old pair
        return None
    return backup


def save_checkpoint(path: str | Path, state: dict[str, Any], manifest: dict[str, Any]) -> Path:
    """Write `state` to `path` (.pt) and its manifest beside it (.json), both atomically.

    Returns the payload path. The manifest gains `sha256`, `bytes` and `file`.
    """
    return _write_pair(Path(path), _serialize(state), manifest)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint manifest {path} is missing; pass a .pt written by anole (with its "
            ".json beside it) or a run folder"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint manifest {path} is corrupt: {exc}") from None


def _is_pointer(manifest: Any) -> bool:
    return isinstance(manifest, dict) and "checkpoint" in manifest and "sha256" not in manifest


def _locate(path: Path) -> tuple[Path, dict[str, Any]]:
    """The payload path and manifest of the checkpoint `path` names (following `best.json`)."""
    manifest_path = path.with_suffix(".json")
    if not manifest_path.exists() and not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass a run folder (`anole train --out DIR`) or "
            "one of its checkpoints/*.pt"
        )
    manifest = _read_json(manifest_path)
    if _is_pointer(manifest):
        name = manifest["checkpoint"]
        if not isinstance(name, str) or not _BEST_RE.match(name) or not name.endswith(".pt"):
            raise CheckpointError(
                f"{manifest_path} is corrupt: it names {name!r}, not a best-*.pt of this folder; "
                "point at a step-*.pt instead"
            )
        manifest_path = manifest_path.with_name(name).with_suffix(".json")
        manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint manifest {manifest_path} is corrupt: not a JSON object")
    return manifest_path.with_suffix(".pt"), manifest


def _is_pickle(payload: bytes) -> bool:
    """Whether `payload` is a torch archive or a pickle stream (parsed, never executed)."""
    buf = io.BytesIO(payload)
    if zipfile.is_zipfile(buf):
        try:
            with zipfile.ZipFile(buf) as archive:
                return any(n.endswith("data.pkl") for n in archive.namelist())
        except zipfile.BadZipFile:
            return False
    if not payload.startswith(b"\x80"):  # every pickle of protocol 2+ opens with PROTO
        return False
    try:
        for _ in pickletools.genops(payload):
            pass
    except Exception:  # any parse failure: not a pickle
        return False
    return True


def _decode(payload: bytes, payload_path: Path) -> dict[str, Any]:
    """Unpickle a verified payload: tensors and plain data only, so nothing in it can run."""
    import torch

    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad input; each means "not loadable"
        if _is_pickle(payload):
            raise UnsafeCheckpointError(
                f"checkpoint {payload_path} holds objects other than tensors and plain data, so "
                "loading it could run code; if you trust its origin (an older anole wrote it), "
                f"convert it once with `{CONVERT_COMMAND} {payload_path}`, else delete it"
            ) from None
        raise CheckpointError(
            f"checkpoint {payload_path} is not a torch checkpoint ({type(exc).__name__}) although "
            "its manifest's sha256 matches it; it was not written by anole: delete it and its "
            ".json, or restore them from a backup"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {payload_path} holds a {type(state).__name__}, not anole's training "
            "state; point at a checkpoint written by `anole train`"
        )
    return state


def _verified_payload(payload_path: Path, manifest: dict[str, Any]) -> bytes:
    try:
        payload = payload_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint payload {payload_path} is missing") from None
    if _sha256(payload) != manifest.get("sha256"):
        raise CheckpointError(
            f"checkpoint {payload_path} is corrupt: its sha256 does not match "
            f"{payload_path.with_suffix('.json').name} ({len(payload)} bytes, expected "
            f"{manifest.get('bytes')})"
        )
    return payload


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and verify a checkpoint by its payload or manifest path (or a folder: its latest).

    `best.pt`/`best.json` name the best checkpoint of their folder. Raises CheckpointError
    naming the file when the manifest is missing or unreadable, the payload is missing,
    truncated or altered (checksum mismatch) or not a checkpoint, and UnsafeCheckpointError
    when the payload holds more than tensors and plain data.
    """
    path = Path(path)
    if path.is_dir():
        found = CheckpointDir(path).latest()
        if found is None:
            raise CheckpointError(f"{path} holds no checkpoint (no step-*.json manifest)")
        return found
    payload_path, manifest = _locate(path)
    state = _decode(_verified_payload(payload_path, manifest), payload_path)
    return Checkpoint(payload_path, manifest, state)


# --- converting old checkpoints ----------------------------------------------------------------


def _plain(obj: Any, where: str, path: Path) -> Any:
    """`obj` with numpy values as tensors / Python numbers; anything else unsafe is an error."""
    import numpy as np
    import torch

    if isinstance(obj, np.generic):  # first: np.float64 and np.str_ subclass float and str
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        return {k: _plain(v, f"{where}[{k!r}]", path) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v, f"{where}[{i}]", path) for i, v in enumerate(obj))
    if isinstance(obj, (set, frozenset)):
        return sorted(_plain(v, where, path) for v in obj)
    raise CheckpointError(
        f"cannot convert {path}: {where} is a {type(obj).__module__}.{type(obj).__qualname__}, "
        "which an anole checkpoint never holds; it was not written by anole"
    )


def convert_checkpoint(path: str | Path) -> list[Path]:
    """Re-save trusted checkpoints in the safe form; returns the payloads that were converted.

    `path` is a payload, a manifest, a checkpoints folder or a run folder (every checkpoint in
    it). Each payload's sha256 is checked first; then a payload that `weights_only` refuses is
    unpickled in full (THIS RUNS ANY CODE IN IT: only for files you trust), its numpy values
    become tensors and numbers, and it is written back with a fresh manifest. Payloads that
    already load safely are left alone.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        manifests = sorted(
            p for p in root.glob("*.json")
            if _STEP_RE.match(p.name) or _BEST_RE.match(p.name)
            or (p.name == BEST_POINTER and not _is_pointer(_read_json(p)))  # an older run's best
        )
        if not manifests:
            raise CheckpointError(f"{path} holds no checkpoint to convert (no step-*.json or best-*.json)")
    else:
        manifests = [_locate(path)[0].with_suffix(".json")]
    converted = []
    for manifest_path in manifests:
        payload_path, manifest = _locate(manifest_path)
        payload = _verified_payload(payload_path, manifest)
        try:
            _decode(payload, payload_path)
            continue  # already safe
        except UnsafeCheckpointError:
            pass
        try:
            state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
        except Exception as exc:  # as in _decode: any failure means "not loadable"
            raise CheckpointError(f"cannot convert {payload_path}: {type(exc).__name__}: {exc}") from None
        safe = _serialize(_plain(state, "state", payload_path))
        _decode(safe, payload_path)  # proves the result loads with weights_only
        kept = {k: v for k, v in manifest.items() if k not in ("sha256", "bytes", "file")}
        _write_pair(payload_path, safe, kept)
        converted.append(payload_path)
    return converted


# --- a run's checkpoints -----------------------------------------------------------------------


class CheckpointDir:
    """The checkpoints of one run: numbered steps, the last `keep_last` kept, plus the best."""

    def __init__(self, root: str | Path, keep_last: int = 3):
        self.root = Path(root)
        self.keep_last = keep_last

    def step_path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}.pt"

    @property
    def best_pointer(self) -> Path:
        """`best.json`: names the best pair (or, from older runs, is the manifest of `best.pt`)."""
        return self.root / BEST_POINTER

    def steps(self) -> list[int]:
        """Steps that have a manifest, oldest first."""
        if not self.root.is_dir():
            return []
        found = (_STEP_RE.match(p.name) for p in self.root.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def holds_checkpoints(self) -> bool:
        """Whether a run has saved anything here (a step or a best checkpoint)."""
        return bool(self.steps()) or self.best_pointer.exists()

    def save(self, step: int, state: dict[str, Any], manifest: dict[str, Any], *,
             best: bool = False) -> Path:
        """Save step `step` (and as best when `best`), then prune old steps.

        Nothing is pruned until every new file is whole: a failed write (a full disk) leaves
        the earlier checkpoints as they were."""
        self.root.mkdir(parents=True, exist_ok=True)
        payload = _serialize(state)
        path = _write_pair(self.step_path(step), payload, {**manifest, "step": step})
        if best:
            # Named by step and content: never overwrites the pair best.json still names.
            name = f"best-{step:08d}-{_sha256(payload)[:12]}.pt"
            _write_pair(self.root / name, payload, {**manifest, "step": step, "best": True})
            atomic_write_json(self.best_pointer, {"checkpoint": name, "step": step})
        self._prune()
        return path

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; corrupt ones are reported and skipped (unsafe
        ones raise UnsafeCheckpointError)."""
        for step in reversed(self.steps()):
            try:
                return load_checkpoint(self.step_path(step))
            except UnsafeCheckpointError:
                raise
            except CheckpointError as exc:
                warnings.warn(f"{exc}; falling back to the previous checkpoint", stacklevel=2)
        return None

    def best(self) -> Checkpoint | None:
        """The best checkpoint by validation score, when one verifies (unsafe ones raise)."""
        if not self.best_pointer.exists():
            return None
        try:
            return load_checkpoint(self.best_pointer)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            warnings.warn(str(exc), stacklevel=2)
            return None

    def _best_name(self) -> str | None:
        """The payload name best.json points to; None when it is not a readable pointer."""
        try:
            pointer = json.loads(self.best_pointer.read_text())
        except (OSError, ValueError):
            return None
        return pointer["checkpoint"] if _is_pointer(pointer) else None

    def _prune(self) -> None:
        for step in self.steps()[: -self.keep_last]:
            # Manifest first: a payload without a manifest is ignored, never half-trusted.
            self.step_path(step).with_suffix(".json").unlink(missing_ok=True)
            self.step_path(step).unlink(missing_ok=True)
        # Left by a process killed mid-rewrite (.pt.old) or mid-write (atomic temp files): this
        # run's one writer has no write in flight while it prunes.
        for leftover in [*self.root.glob(".*.pt.old"), *self.root.glob(".*.tmp")]:
            leftover.unlink(missing_ok=True)
        best = self._best_name()
        if best is None:  # no pointer (or an unreadable one): remove nothing it might need
            return
        keep = {best, Path(best).with_suffix(".json").name}
        stale = [p for p in self.root.iterdir() if _BEST_RE.match(p.name) and p.name not in keep]
        # An older run's best.pt is superseded once best.json is a pointer.
        for p in sorted(stale, key=lambda p: p.suffix != ".json") + [self.root / "best.pt"]:
            p.unlink(missing_ok=True)
