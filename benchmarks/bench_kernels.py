"""The kernel-level figures behind the learners' CPU choices, each side by side in one run.

* 3x3 convolution, float32 vs bfloat16 (oneDNN uses AMX for bfloat16 where the CPU has it):
  dense [320, 64, 14, 14] and grouped (32 tasks as groups, [10, 2048, 14, 14]).
* ReLU and 2x2 max-pool of a [360, 64, 28, 28] channels_last tensor with glibc's default
  thresholds vs `pipeline.allocator.keep_large_allocations()` (each in its own process, since
  the setting is per process).
* The fused kernels of `pipeline/kernels` against the stock PyTorch ops they replace, on the
  first block of a 16-task MAML chunk (5 images per task, conv4-64, 28x28, bfloat16):
  pooling + BatchNorm statistics, unpooling + the statistics' gradient, affine + ReLU + cast,
  its backward, and the first convolution fused with its pooling.
* A grouped 3x3 convolution's weight gradient (32 tasks as groups, 5 images, 64 -> 64
  channels, bfloat16) by oneDNN's backward-weights kernel vs `conv3x3_weight_grad` (gather +
  one matrix product per group), at 14x14, 7x7 and 3x3: the models use the latter up to 7x7.
* Weights shared by all tasks (the meta-parameters before an inner step): the grouped
  convolution over 32 copies vs one convolution dilated along the task-interleaved width
  (`pipeline.models.conv3x3`), forward and backward-data, at 14x14, 7x7 and 3x3.

    python benchmarks/bench_kernels.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ms(fn, n: int = 20) -> float:
    """Mean of n calls after two warm-ups, in milliseconds."""
    fn(), fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def convolutions() -> dict[str, float]:
    out = {}
    cl = torch.channels_last
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(320, 64, 14, 14).to(dtype).contiguous(memory_format=cl)
        w = torch.randn(64, 64, 3, 3).to(dtype).contiguous(memory_format=cl)
        xg = torch.randn(10, 32 * 64, 14, 14).to(dtype).contiguous(memory_format=cl)
        wg = torch.randn(32 * 64, 64, 3, 3).to(dtype).contiguous(memory_format=cl)
        name = str(dtype).removeprefix("torch.")
        out[f"conv dense {name}"] = ms(lambda: F.conv2d(x, w, padding=1))  # noqa: B023
        out[f"conv grouped {name}"] = ms(lambda: F.conv2d(xg, wg, padding=1, groups=32))  # noqa: B023
    return out


def memory_bound(keep: bool) -> dict[str, float]:
    if keep:
        from pipeline.allocator import keep_large_allocations

        keep_large_allocations()
    x = torch.randn(360, 64, 28, 28).contiguous(memory_format=torch.channels_last)
    label = "kept heap" if keep else "glibc default"
    return {f"relu {label}": ms(lambda: F.relu(x)), f"max_pool2d {label}": ms(lambda: F.max_pool2d(x, 2))}


def fused_kernels() -> dict[str, float]:
    """Each fused kernel and the PyTorch ops it replaces, same inputs (first block, bfloat16)."""
    from pipeline.allocator import keep_large_allocations
    from pipeline.kernels import cpu_kernels

    keep_large_allocations()
    kernels = cpu_kernels()
    if kernels is None:
        return {}
    cl, bf = torch.channels_last, torch.bfloat16
    n, tasks, c = 5, 16, 64
    h = torch.randn(n, tasks * c, 28, 28).to(bf).contiguous(memory_format=cl)
    y, idx = F.max_pool2d_with_indices(h, 2)
    _, phase, _, _ = kernels.pool_stats_forward(h, True)
    gy = torch.randn_like(y)
    scale, shift = torch.rand(tasks * c) + 0.5, torch.randn(tasks * c)
    out = F.relu(y.float() * scale[:, None, None] + shift[:, None, None]).to(bf)
    x = torch.rand(n, tasks, 28, 28).to(bf).contiguous(memory_format=cl)
    w = torch.randn(tasks * c, 1, 3, 3).to(bf)
    wk = w.float().reshape(tasks, c, 9).transpose(1, 2).contiguous()
    pad = torch.zeros(n, tasks, 30, 30, dtype=bf).contiguous(memory_format=cl)
    pad[:, :, 1:-1, 1:-1] = x

    def torch_affine_backward() -> None:
        g = gy.float() * (out > 0)
        (g * scale[:, None, None]).to(bf), (g * y).sum((0, 2, 3)), g.sum((0, 2, 3))

    return {
        "pool+stats torch": ms(lambda: (F.max_pool2d_with_indices(h, 2),
                                        torch.batch_norm_update_stats(h, None, None, 0.0))),
        "pool+stats fused": ms(lambda: kernels.pool_stats_forward(h, True)),
        "unpool+stats grad torch": ms(lambda: torch.ops.aten.max_pool2d_with_indices_backward(
            gy, h, [2, 2], [2, 2], [0, 0], [1, 1], False, idx
        ) + torch.addcmul(shift[:, None, None], h, scale[:, None, None]).to(bf)),
        "unpool+stats grad fused": ms(lambda: kernels.pool_backward(gy, phase, 28, 28, h, scale,
                                                                    shift)),
        "affine+relu+cast torch": ms(
            lambda: F.relu(y * scale[:, None, None] + shift[:, None, None]).to(bf)
        ),
        "affine+relu+cast fused": ms(lambda: kernels.affine_relu_forward(y, scale, shift, bf)),
        "affine+relu backward torch": ms(torch_affine_backward),
        "affine+relu backward fused": ms(lambda: kernels.affine_relu_backward(gy, out, y, scale)),
        "conv1+pool torch": ms(lambda: F.max_pool2d_with_indices(
            F.conv2d(x, w, padding=1, groups=tasks), 2)),
        "conv1+pool fused (stem)": ms(lambda: kernels.stem_run(pad, wk, tasks, None, bf)),
    }


def weight_gradients() -> dict[str, float]:
    """oneDNN's backward-weights vs the gather + matrix-product kernel, 32-task grouped conv."""
    from pipeline.kernels import cpu_kernels

    kernels = cpu_kernels()
    if kernels is None:
        return {}
    cl, bf, tasks = torch.channels_last, torch.bfloat16, 32
    out = {}
    for side in (14, 7, 3):
        x = torch.randn(5, tasks * 64, side, side).to(bf).contiguous(memory_format=cl)
        gy = torch.randn_like(x)
        w = torch.empty(tasks * 64, 64, 3, 3, dtype=bf).contiguous(memory_format=cl)
        onednn = lambda: torch.ops.aten.convolution_backward(  # noqa: E731
            gy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], tasks, [False, True, False]  # noqa: B023
        )
        out[f"weight grad {side}x{side} oneDNN"] = ms(onednn)
        out[f"weight grad {side}x{side} gather+mm"] = ms(
            lambda: kernels.conv3x3_weight_grad(x, gy, tasks)  # noqa: B023
        )
    return out


def shared_weights() -> dict[str, float]:
    """Shared weights: 32 grouped copies vs one dilated convolution (same memory, same result)."""
    from pipeline.models import _tasks_as_width

    cl, bf, tasks = torch.channels_last, torch.bfloat16, 32
    out = {}
    for side in (14, 7, 3):
        x = torch.randn(5, tasks * 64, side, side).to(bf).contiguous(memory_format=cl)
        w = torch.randn(64, 64, 3, 3).to(bf).contiguous(memory_format=cl)
        copies = w.repeat(tasks, 1, 1, 1).contiguous(memory_format=cl)
        wide = _tasks_as_width(x, tasks)
        grouped = ([1, 1], [1, 1], [1, 1], False, [0, 0], tasks)
        dilated = ([1, 1], [1, tasks], [1, tasks], False, [0, 0], 1)
        data = [True, False, False]
        out[f"shared {side}x{side} grouped fwd"] = ms(
            lambda: F.conv2d(x, copies, padding=1, groups=tasks)  # noqa: B023
        )
        out[f"shared {side}x{side} dilated fwd"] = ms(
            lambda: F.conv2d(wide, w, padding=(1, tasks), dilation=(1, tasks))  # noqa: B023
        )
        out[f"shared {side}x{side} grouped bwd-data"] = ms(
            lambda: torch.ops.aten.convolution_backward(x, x, copies, None, *grouped, data)  # noqa: B023
        )
        out[f"shared {side}x{side} dilated bwd-data"] = ms(
            lambda: torch.ops.aten.convolution_backward(wide, wide, w, None, *dilated, data)  # noqa: B023
        )
    return out


def main() -> None:
    threads = 2
    torch.set_num_threads(threads)
    if len(sys.argv) > 1 and sys.argv[1] == "--memory":
        print(json.dumps(memory_bound(sys.argv[2] == "keep")))
        return
    results = convolutions()
    results.update(fused_kernels())
    results.update(weight_gradients())
    results.update(shared_weights())
    for mode in ("default", "keep"):
        env = {**os.environ, "ANOLE_MALLOC_TUNING": "1"}
        child = subprocess.run([sys.executable, __file__, "--memory", mode], env=env,
                               capture_output=True, text=True, check=True)
        results.update(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"torch {torch.__version__}, {threads} threads, ms per call")
    for name, value in results.items():
        print(f"{name:34} {value:8.2f}")


if __name__ == "__main__":
    main()
