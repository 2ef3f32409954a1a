"""Shared fixtures. Tests run offline: analytics off, data from ../shared."""

from __future__ import annotations

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pipeline import settings  # noqa: E402


def pytest_sessionstart(session) -> None:
    """Build (or load) the fused CPU kernels once, before any test or Ray worker needs them."""
    from pipeline.kernels import cpu_kernels

    cpu_kernels()


@pytest.fixture(scope="session")
def omniglot_zips() -> list[Path]:
    """The two Omniglot minimal background zips; skips when the shared data is absent."""
    zips = settings.omniglot_background_sources()
    if len(zips) < 2:
        pytest.skip("Omniglot minimal splits not found; set ANOLE_DATA")
    return zips


@pytest.fixture(scope="session")
def oneshot_runs() -> list[Path]:
    """The one-shot run folders; skips when the shared data is absent."""
    runs = settings.omniglot_oneshot_runs()
    if not runs:
        pytest.skip("Omniglot one-shot runs not found; set ANOLE_DATA")
    return runs


@pytest.fixture(scope="session")
def omniglot_store(tmp_path_factory, omniglot_zips):
    """A store holding both minimal splits (8 alphabets), shared read-only by the session."""
    from pipeline.store import Store

    store = Store(tmp_path_factory.mktemp("store"))
    for z in omniglot_zips:
        store.ingest(z)
    return store


@pytest.fixture
def tiny() -> list[str]:
    """Config overrides that make a training run take seconds (tests only)."""
    return list(TINY)


TINY = [
    "hidden=8", "meta_batch=4", "ways=5", "shots=1", "queries=2", "val_episodes=4",
    "val_ways=5", "val_every=3", "checkpoint_every=3", "eval_views=1",
]
"""Overrides that make a training run take seconds (tests only)."""
