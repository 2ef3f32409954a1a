"""GPU check of the learner platform's device path (run on a CUDA machine; see gpu_check.sh).

For every registered learner: the meta-gradient and query logits on CUDA (strict fp32, TF32 off)
against the same on the CPU, that the fused CPU extension was never built nor loaded for CUDA
tensors, and the CUDA throughput of a meta-batch of 32 tasks.

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from pipeline.config import config_for
from pipeline.episodes import Episodes
from pipeline.kernels import _build
from pipeline.learners import LEARNERS
from pipeline.train import build_learner, initial_params, on_device


def episodes(tasks: int, ways: int, shots: int, queries: int, size: int, seed: int) -> Episodes:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return Episodes(
        torch.rand(tasks, ways * shots, 1, size, size, generator=g),
        labels.repeat_interleave(shots).expand(tasks, -1).contiguous(),
        torch.rand(tasks, ways * queries, 1, size, size, generator=g),
        labels.repeat_interleave(queries).expand(tasks, -1).contiguous(),
        ways, shots, queries,
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(name: str) -> dict:
    overrides = ["ways=5", "hidden=64", "precision=float32"]
    cuda_cfg = config_for(name, overrides=[*overrides, "device=cuda"])
    cpu_cfg = config_for(name, overrides=[*overrides, "device=cpu"])
    params = initial_params(cuda_cfg)
    ep = episodes(16, 5, 1, 2, cuda_cfg.image_size, seed=0)

    learner = build_learner(cuda_cfg)
    g_cuda, m_cuda = learner.meta_gradient(on_device(params, "cuda"), ep.to("cuda"))
    logits_cuda = learner.adapt_and_predict(on_device(params, "cuda"), ep.to("cuda"),
                                            bn_mode="support")
    torch.cuda.synchronize()
    extension_loaded = _build.cache_info().currsize > 0 or any(
        m.startswith("anole_cpu_") for m in sys.modules)

    # Timing: 32 tasks per meta-gradient, median of 5 after 2 warm-ups.
    big = episodes(32, 5, 1, 2, cuda_cfg.image_size, seed=1).to("cuda")
    p = on_device(params, "cuda")
    times = []
    for i in range(7):
        torch.cuda.synchronize()
        t = time.perf_counter()
        learner.meta_gradient(p, big)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    tasks_per_s = 32 / sorted(times)[len(times) // 2]

    os.environ["ANOLE_KERNELS"] = "0"  # the CPU reference: no build needed on this machine
    ref = build_learner(cpu_cfg)
    g_cpu, _ = ref.meta_gradient(params, ep)
    logits_cpu = ref.adapt_and_predict(params, ep, bn_mode="support")
    os.environ.pop("ANOLE_KERNELS")
    grad_rel = max(rel(g_cuda[k].cpu(), g_cpu[k]) for k in g_cpu)
    return {
        "learner": name,
        "grad_rel_max": grad_rel,
        "logits_rel": rel(logits_cuda.cpu(), logits_cpu),
        "loss_cuda": float(m_cuda["loss"]),
        "cpu_extension_loaded_for_cuda": extension_loaded,
        "cuda_tasks_per_s_32": round(tasks_per_s, 1),
    }


def main() -> None:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    print(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}))
    failed = False
    for name in sorted(LEARNERS):
        try:
            row = check(name)
        except Exception as exc:  # report every learner, then fail
            row = {"learner": name, "error": f"{type(exc).__name__}: {exc}"}
            failed = True
        print(json.dumps(row), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
