"""AdaptationWorker: a Ray actor that turns (meta-parameters, episode specs) into a meta-update.

It holds the learner and the dataset (read zero-copy from Ray's object store) and nothing that
changes between calls, so a crashed worker is replaced by any other: the driver re-sends the
same specs with the same parameters and gets the same contribution.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from typing import Any

import numpy as np
import ray
import torch

from pipeline.config import TrainConfig
from pipeline.images import ImageSet
from pipeline.tasks import DomainSplit, EpisodeSpecs
from pipeline.train import TrainingData, build_learner
from pipeline.train import param_template as learner_param_template

from .protocol import Snapshot, UpdateHeader, WorkerInfo

Params = dict[str, torch.Tensor]


class WorkerNotConfigured(RuntimeError):
    """The worker serves another run (the driver re-configures it and re-sends the call)."""


def make_run_key(config: dict[str, Any], split: dict[str, Any]) -> str:
    """A short key naming (config, split): what a worker must be configured with for a run."""
    text = json.dumps([config, split], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def param_template(config: TrainConfig) -> Params:
    """Names and shapes of the meta-parameters, on the meta device (no memory, no RNG use):
    the learner's own template (`Learner.param_template`)."""
    return {name: p.detach() for name, p in learner_param_template(config).items()}


def flat_to_params(
    flat: np.ndarray | torch.Tensor, template: Params, device: torch.device | str = "cpu"
) -> Params:
    """Split one flat array into named tensors shaped like `template`, on `device`.

    The result never aliases `flat` (object-store arrays are read-only and shared).
    """
    if isinstance(flat, np.ndarray):
        # Copy: object-store arrays are read-only views of shared memory.
        tensor = torch.from_numpy(np.array(flat, dtype=np.float32)).to(device)
    else:
        tensor = flat.to(device=device, dtype=torch.float32, copy=True)
    expected = sum(p.numel() for p in template.values())
    if tensor.dim() != 1 or tensor.numel() != expected:
        raise ValueError(
            f"flat parameters have shape {tuple(tensor.shape)}, expected ({expected},)"
        )
    out: Params = {}
    offset = 0
    for name, p in template.items():
        out[name] = tensor[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
    return out


def params_to_flat(params: Params, template: Params) -> np.ndarray:
    """The tensors of `params`, in the template's order, as one float32 numpy array on the CPU."""
    parts = [params[name].detach().reshape(-1) for name in template]
    return torch.cat(parts).to("cpu", torch.float32).numpy()


def resolve_images(images: ImageSet | list[Any]) -> ImageSet:
    """The ImageSet itself, or the one behind `[object_ref]` read from Ray's object store.

    The driver passes the reference inside a list so Ray does not pin it as a constructor
    argument of a restartable actor; its numpy arrays stay zero-copy, read-only views.
    """
    if isinstance(images, list):
        return ray.get(images[0])
    return images


def pick_device() -> tuple[torch.device, list[str]]:
    """CUDA when Ray gave this actor a GPU and torch can use it, else the CPU.

    With a GPU resource but no usable CUDA (a simulated GPU, a driver mismatch) the worker falls
    back to the CPU with a warning instead of failing: it was still scheduled by the resource.
    """
    gpu_ids = [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    if gpu_ids and torch.cuda.is_available():
        return torch.device("cuda", 0), gpu_ids  # Ray sets CUDA_VISIBLE_DEVICES: ours is cuda:0
    if gpu_ids:
        warnings.warn(
            f"worker pid {os.getpid()} was given GPU(s) {gpu_ids} but torch.cuda is unavailable; "
            "computing on the CPU",
            RuntimeWarning,
            stacklevel=2,
        )
    return torch.device("cpu"), gpu_ids


class AdaptationWorker:
    """Runs the learner's task-batched inner loops on shards of a meta-batch.

    Created through `workers.resources.worker_options` (CPUs, fractional GPUs, restarts). The
    dataset arrives as an object-store reference, resolved once here: its numpy arrays are
    read-only views of Ray's shared memory (zero-copy).
    """

    def __init__(
        self,
        config: dict[str, Any],
        images: ImageSet | list[Any],
        split: dict[str, Any],
        threads: int = 1,
    ):
        torch.set_num_threads(max(1, int(threads)))
        self.threads = max(1, int(threads))
        self.images = resolve_images(images)
        self.device, self.gpu_ids = pick_device()
        self.name = f"{ray.get_runtime_context().get_node_id()[:8]}:{os.getpid()}"
        self.configure(config, split)

    def configure(self, config: dict[str, Any], split: dict[str, Any]) -> str:
        """Serve the run with this config and domain split from now on; returns its run key.

        A `WorkerPool` reuses workers across runs (no new processes, no torch import) this way.
        """
        self.config = TrainConfig.from_dict(config)
        self.data = TrainingData.build(self.images, self.config, DomainSplit.from_dict(split))
        self.learner = build_learner(self.config, self.device)
        self.template = param_template(self.config)
        self.run_key = make_run_key(config, split)
        return self.run_key

    def info(self) -> WorkerInfo:
        """Where this worker runs and what it computes on (also a cheap liveness probe)."""
        assigned = ray.get_runtime_context().get_assigned_resources()
        return WorkerInfo(
            pid=os.getpid(),
            node_id=ray.get_runtime_context().get_node_id(),
            device=str(self.device),
            gpu_ids=self.gpu_ids,
            num_gpus=float(assigned.get("GPU", 0.0)),
            threads=self.threads,
            images_zero_copy=not self.images.images.flags.writeable,
        )

    def pid(self) -> int:
        """This worker's process id (for operators, and for tests that kill it)."""
        return os.getpid()

    @ray.method(num_returns=2)
    def contribute(
        self, step: int, snapshot: Snapshot, flat: np.ndarray, specs: EpisodeSpecs, key: str
    ) -> tuple[UpdateHeader, np.ndarray]:
        """The meta-update of `specs` at the parameters `flat`: summed over its tasks.

        Returns the header (tag, parameter version, metric sums, compute seconds) and the summed
        meta-gradient as one flat float32 array in the parameters' order. Deterministic: the
        same (step, flat, specs) always give the same result, on any worker.
        """
        if key != self.run_key:
            # A pooled worker that Ray restarted with the pool's first config: never guess.
            raise WorkerNotConfigured(f"worker {self.name} serves run {self.run_key}, not {key}")
        params = flat_to_params(flat, self.template, self.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        episodes = self.data.episodes(specs, step, device=self.device)
        summed, sums = self.learner.meta_gradient(params, episodes)
        update = params_to_flat(summed, self.template)
        compute = time.perf_counter() - start
        header = UpdateHeader(
            step=step,
            task_ids=tuple(int(t) for t in specs.task_ids),
            version=snapshot.version,
            incarnation=snapshot.incarnation,
            metric_sums={k: float(v) for k, v in sums.items()},
            compute_s=compute,
            worker=self.name,
            cpu_s=time.process_time() - cpu_start,
        )
        return header, update


RemoteAdaptationWorker = ray.remote(AdaptationWorker)
"""The actor class; create it with `.options(**worker_options(plan, pg, i)).remote(...)`."""
