"""Optional fused CPU kernels (C++, compiled on first use), with a pure-PyTorch fallback.

`cpu_kernels()` returns the compiled module of `cpu.cpp` (2x2 max-pooling fused with BatchNorm
statistics, the affine map + ReLU, the first convolution fused with its pooling, and their
derivatives; see there and `fused.py`), or None where it cannot be had:

* `ANOLE_KERNELS=0` in the environment (the kill switch; tests use it to compare paths),
* no C++ compiler or build failure (one warning, then the fallback for the process).

It is built once per machine by `torch.utils.cpp_extension` (about a minute, cached under
`$TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`), named after the source hash and
the CPU's vector capability so that caches shared between machines never mix builds.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).with_name("cpu.cpp")


def enabled() -> bool:
    """Whether the environment allows the compiled kernels (ANOLE_KERNELS unset or not 0)."""
    return os.environ.get("ANOLE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def _build() -> ModuleType | None:
    import torch
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability().lower()
    flags = ["-O3", "-fopenmp"]
    if capability in ("avx2", "avx512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    if capability == "avx512":  # what PyTorch's own AVX512 kernels require of a CPU
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    # The source's path too: ninja rebuilds when a build's source path changes, so two checkouts
    # sharing one build folder would rebuild each other's extension on every first use.
    key = SOURCE.read_bytes() + " ".join(flags).encode() + str(SOURCE.resolve()).encode()
    digest = hashlib.sha256(key).hexdigest()[:12]
    name = f"anole_cpu_{capability}_{digest}"
    try:
        built = Path(cpp_extension._get_build_directory(name, verbose=False), f"{name}.so")
    except Exception:  # a private helper: only decides whether to say something
        built = None
    if built is not None and not built.exists():
        print("anole: building the fused CPU kernels (once per machine, about a minute)...",
              file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a broken toolchain: run without
        warnings.warn(
            f"anole: fused CPU kernels unavailable ({type(exc).__name__}: {exc}); using "
            "PyTorch ops (slower). Set ANOLE_KERNELS=0 to skip the build.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def cpu_kernels() -> ModuleType | None:
    """The compiled pooling kernels, or None (disabled or unavailable).

    For CPU tensors only: callers check the device first (`kernel_backend`, `for_tensor`), so
    the extension is never loaded, nor called, for a CUDA (or meta) tensor."""
    return _build() if enabled() else None


def kernel_backend(device: object) -> str:
    """The backend of the memory-bound steps for tensors on `device` (a torch.device, a string
    such as "cpu" or "cuda:0", or a tensor): "cpu_fused" (the compiled kernels, where allowed)
    for CPU only, "torch" (PyTorch ops) for every other device. Decides from the device alone:
    never loads the extension."""
    import torch

    if isinstance(device, torch.Tensor):
        device = device.device
    if torch.device(device).type != "cpu" or not enabled():
        return "torch"
    return "cpu_fused"


def for_tensor(x: object) -> ModuleType | None:
    """The compiled kernels for tensor `x`, or None: None for any non-CPU tensor (checked
    before anything is loaded), else `cpu_kernels()`."""
    return cpu_kernels() if kernel_backend(x) == "cpu_fused" else None


__all__ = ["enabled", "cpu_kernels", "for_tensor", "kernel_backend"]
