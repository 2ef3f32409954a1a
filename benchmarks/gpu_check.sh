#!/usr/bin/env bash
# The GPU checks, run as one short script on a CUDA machine (the device tool), from the repo root.
set -uo pipefail
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
PYTHONPATH=. python3 benchmarks/gpu_check.py 2>&1 | tee "${OUT:-/tmp}/gpu_check.jsonl"
