"""Atomic file writes: write to a temp file in the same directory, fsync, rename.

A reader sees either the old file or the new one, never a torn write, even if the
process dies halfway.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import DiskFullError


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename inside it survives a power loss."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems don't allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` is an out-of-space error (pyarrow's OSErrors carry no errno, only text)."""
    return isinstance(exc, OSError) and (
        exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc)
    )


def disk_full(path: Path) -> DiskFullError:
    """The one-line error for a write to `path` that ran out of space."""
    return DiskFullError(
        f"no space left on the device while writing {path}; nothing was lost (the previous "
        f"{path.name}, if any, and everything written before it are intact): free some space "
        "and run the command again"
    )


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success fsync it and rename it over `path`.

    The caller writes the temp path by any means (pyarrow, torch.save, ...). On an
    exception the temp file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise (disk_full(path) if is_disk_full(exc) else exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if is_disk_full(exc):
            # The rename never happened, so the previous file (if any) is untouched.
            raise disk_full(path) from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Atomically replace `path` with what `write(fileobj)` writes."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace `path` with `data`."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically replace `path` with `obj` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
