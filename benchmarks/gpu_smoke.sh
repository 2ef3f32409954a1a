#!/usr/bin/env bash
# GPU smoke test of the Ray workers, on one CUDA machine, in well under 5 minutes:
#   1. torch sees a CUDA device;
#   2. a short synchronous distributed run: 2 AdaptationWorkers sharing the GPU (0.5 GPU each),
#      one parameter server, the default config (Omniglot small1 if $ANOLE_DATA has it, else
#      synthetic images);
#   3. checks the workers computed on cuda:0 and prints tasks/s.
# Usage: benchmarks/gpu_smoke.sh [--steps N] [--learner NAME] [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
export RAY_USAGE_STATS_ENABLED=0 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
start=$(date +%s)
# The hard limit keeps the smoke test a smoke test: a hang fails instead of eating the machine.
timeout 280 python benchmarks/bench_ray.py --gpu-smoke --steps 20 "$@"
echo "gpu smoke passed in $(( $(date +%s) - start ))s"
