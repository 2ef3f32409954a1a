"""Where anole finds data and keeps its store, from the environment."""

from __future__ import annotations

import os
from pathlib import Path

# The repo sits beside ../shared in development and CI.
_REPO_ROOT = Path(__file__).resolve().parent.parent


def data_root() -> Path | None:
    """The raw-data folder: `$ANOLE_DATA`, else `../shared/data` when it exists, else None.

    With None, commands that need Omniglot fall back to torchvision's download.
    """
    env = os.environ.get("ANOLE_DATA")
    if env:
        return Path(env).expanduser()
    for candidate in (Path.cwd().parent / "shared" / "data", _REPO_ROOT.parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def store_root() -> Path:
    """The ingested store: `$ANOLE_HOME`, else `./anole-store`."""
    return Path(os.environ.get("ANOLE_HOME", "anole-store")).expanduser()


def omniglot_background_sources() -> list[Path]:
    """The Omniglot minimal background zips under the data root, for the main job and tests."""
    root = data_root()
    if root is None:
        return []
    return sorted((root / "omniglot").glob("images_background_small*.zip"))


def omniglot_oneshot_runs() -> list[Path]:
    """The Lake et al. one-shot run folders (`runNN/`) under the data root."""
    root = data_root()
    if root is None:
        return []
    return sorted(p for p in (root / "omniglot" / "one-shot-runs").glob("run*") if p.is_dir())
