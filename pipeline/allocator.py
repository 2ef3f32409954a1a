"""Keep large CPU tensors' memory in the process heap (glibc), so it is reused, not re-faulted.

glibc serves allocations above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh
`mmap`, and returns them to the kernel on free. A batch of task activations is tens of MiB, so
every intermediate tensor of a meta-batch would be a new mapping whose pages fault in one by
one: on the 2-core Xeon, ReLU of a [360, 64, 28, 28] float32 tensor took 17.6 ms that way and
7.9 ms with the memory reused (`benchmarks/bench_kernels.py`). Raising the
mmap and trim thresholds keeps freed blocks in the heap for the next step. The cost: memory
freed by a training process stays with it (its peak is unchanged).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30  # glibc's maximum on 64-bit is HEAP_MAX / 2 (32 MiB in 2.26+ is the
# *dynamic* cap only; an explicit mallopt may go higher)
_done = False


def keep_large_allocations() -> bool:
    """Raise glibc's mmap/trim thresholds once per process; True if they are raised.

    No-op (False) off Linux/glibc, or when ANOLE_MALLOC_TUNING=0.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("ANOLE_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    _done = ok
    return ok
