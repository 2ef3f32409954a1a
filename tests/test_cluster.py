"""Placement on a multi-node Ray cluster with simulated GPUs (ray.cluster_utils.Cluster).

Three nodes on this machine: a CPU-only head (where the driver and the parameter server live) and
two nodes that each declare one GPU. The GPUs are only resources: torch.cuda stays unavailable, so
the workers must be scheduled by the GPU resource and still compute on the CPU.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.images import synthetic_images  # noqa: E402
from workers.driver import train_distributed  # noqa: E402
from workers.resources import (  # noqa: E402
    PlacementError,
    RayOptions,
    ResourcePlan,
    reserve_workers,
)

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

TINY = TrainConfig(
    learner="reptile",
    hidden=8,
    meta_batch=4,
    # one inner SGD step (the flat config's old defaults; ReptileConfig's own are 5 Adam steps)
    learner_config={"inner_steps": 1, "inner_lr": 0.4, "inner_optimizer": "sgd",
                    "eval_inner_steps": 3},
    steps=2,
    val_every=100,
    val_episodes=2,
    val_ways=5,
    checkpoint_every=100,
    num_threads=1,
)


@pytest.fixture(scope="module")
def cluster():
    """Head: 1 CPU, no GPU. Two worker nodes: 2 CPUs and 1 (simulated) GPU each."""
    if ray.is_initialized():
        ray.shutdown()
    c = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    gpu_nodes = [c.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    c.wait_for_nodes()
    c.connect()
    yield c, {n.node_id for n in gpu_nodes}
    ray.shutdown()
    c.shutdown()


def test_half_gpu_workers_land_two_per_gpu_node_and_fall_back_to_cpu(cluster, tmp_path):
    _, gpu_nodes = cluster
    # No GPU option: the planner shares the cluster's 2 GPUs among 4 workers, 0.5 each.
    result = train_distributed(
        TINY,
        synthetic_images(),
        tmp_path,
        workers=4,
        log_tensorboard=False,
        options=RayOptions(worker_cpus=1, min_tasks_per_call=1),
    )
    assert result.step == TINY.steps and result.resources["worker_gpus"] == 0.5
    per_node = Counter(w["node_id"] for w in result.worker_info)
    assert set(per_node) == gpu_nodes and sorted(per_node.values()) == [2, 2]
    for w in result.worker_info:
        assert w["num_gpus"] == 0.5 and w["gpu_ids"]  # scheduled by the GPU resource...
        assert w["device"] == "cpu"  # ...but torch.cuda is unavailable: computed on the CPU


def test_spread_places_bundles_on_different_nodes(cluster):
    plan = ResourcePlan(
        workers=3,
        worker_cpus=1,
        worker_gpus=0,
        threads=1,
        placement="STRICT_SPREAD",
        placement_timeout_s=20,
        worker_max_restarts=0,
        ps_max_restarts=0,
        ps_cpus=0,
    )
    pg = reserve_workers(plan)
    try:
        nodes = ray.util.placement_group_table(pg)["bundles_to_node_id"]
        assert len(set(nodes.values())) == 3
    finally:
        ray.util.remove_placement_group(pg)


def test_a_gpu_request_the_cluster_cannot_meet_fails_fast_with_the_fix(cluster, tmp_path):
    start = time.perf_counter()
    with pytest.raises(PlacementError) as info:
        train_distributed(
            TINY,
            synthetic_images(),
            tmp_path,
            workers=3,
            log_tensorboard=False,
            options=RayOptions(worker_gpus=1, worker_cpus=1, placement_timeout_s=3),
        )
    message = str(info.value)
    assert time.perf_counter() - start < 30
    assert "GPU: 3 x 1 = 3 needed, the cluster has 2" in message
    assert (
        "--num-gpus" in message
        and "ANOLE_WORKER_GPUS=0" in message
        and "use fewer --workers" in message
    )
    # Nothing is left reserved: the next run gets the whole cluster.
    states = [pg["state"] for pg in ray.util.placement_group_table().values()]
    assert "PENDING" not in states and "CREATED" not in states
