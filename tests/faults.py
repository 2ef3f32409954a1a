"""Helpers for the fault tests (tests/test_workers.py, tests/test_deploy_cluster.py).

* `Inotify`: Linux file events through libc, so a test reacts to a file appearing the moment the
  kernel reports it instead of polling for it.
* `freeze`: SIGSTOP a process and wait until it is stopped, so a test can check, with nothing
  moving, that it caught the process at the moment it wanted before it SIGKILLs it.
* `assert_nothing_lost`: what every fault test checks of a finished run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

IN_MODIFY = 0x002
IN_CREATE = 0x100
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)


class Inotify:
    """Kernel file events for a few directories (Linux only; the tests run on Linux)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._dirs: dict[int, Path] = {}

    def watch(self, directory: Path, mask: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), mask)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory} failed")
        self._dirs[wd] = directory

    def events(self, timeout: float) -> Iterator[tuple[int, Path]]:
        """(mask, path) of the events that arrive within `timeout` seconds (as they arrive)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.fd], [], [], left)[0]:
                return
            data = os.read(self.fd, 65536)
            offset = 0
            while offset < len(data):
                wd, mask, _, size = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size : offset + _EVENT.size + size].rstrip(b"\0")
                offset += _EVENT.size + size
                yield mask, self._dirs[wd] / os.fsdecode(name)

    def drain(self) -> None:
        """Drop the events read so far."""
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


def main_thread_sample(pid: int) -> tuple[str, int]:
    """(scheduler state, CPU nanoseconds so far) of the main thread of `pid`, where Ray runs an
    actor's calls. State "R": running or ready to run; CPU time exact, not in clock ticks."""
    task = Path(f"/proc/{pid}/task/{pid}")
    state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    return state, int((task / "schedstat").read_text().split()[0])


def freeze(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP `pid` and return once the kernel reports it stopped: nothing in it moves any more."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        assert time.monotonic() < deadline, f"process {pid} did not stop (state {state})"
        time.sleep(0.0005)


def flat_params(checkpoint: Path) -> np.ndarray:
    """The meta-parameters a checkpoint holds, as one flat array."""
    from pipeline.checkpoint import load_checkpoint

    params = load_checkpoint(checkpoint).state["meta"]["params"]
    return np.concatenate([v.reshape(-1).numpy() for v in params.values()])


def assert_nothing_lost(
    counters: dict[str, Any],
    steps: int,
    final: np.ndarray,
    clean: np.ndarray,
    *,
    rel: float | None = None,
) -> None:
    """No update lost or applied twice, and the parameters of a run without failures.

    `counters` are the parameter server's: every step applied exactly once in the history that
    survived (a restarted server resumes the counters of its checkpoint), no tagged update counted
    twice, none dropped as stale. ("orphaned" counts updates addressed to a server that has since
    restarted: refused, so not applied, and any number of them is fine.)

    `final` against `clean`: bit for bit (atol 1e-7) when both ran the same shards, as the same
    shards give the same sums however often and wherever they are recomputed; else within `rel`,
    the relative bound of tests/test_workers.py's parity test (shards sum the meta-gradient in
    another order than one call; a lost or doubled shard is 10x above it).
    """
    assert counters["applied"] == steps, counters
    assert counters["duplicates"] == 0 and counters["dropped_stale"] == 0, counters
    if rel is None:
        np.testing.assert_allclose(final, clean, rtol=0, atol=1e-7)
    else:
        gap = float(np.linalg.norm(final - clean) / np.linalg.norm(clean))
        assert gap < rel, f"final parameters differ from the clean run's by {gap:.1e} (relative)"
