# anole's environment on every node of deploy/ray/cluster.yaml (sourced from ~/.bashrc, which
# Ray's login shells read: it reaches `ray start`, the raylets, every driver and every actor).
export PATH="$HOME/anole-venv/bin:$PATH"
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false RAY_USAGE_STATS_ENABLED=0
# Ray token authentication; the token is ~/.ray/auth_token (file_mounts).
export RAY_AUTH_MODE=token
# The repository (Prefect's pull step runs flows from it), the workspace, the store, raw data.
export ANOLE_REPO="$HOME/anole"
export ANOLE_WORKSPACE=/mnt/anole/workspace
export ANOLE_HOME=/mnt/anole/workspace/store
export ANOLE_DATA=/mnt/anole/data
# Adaptation workers: two per A10G (0.5 GPU, 2 of the g5.xlarge's 4 vCPUs each). The placement
# timeout covers the autoscaler starting GPU nodes (a g5 boots and runs setup in ~5-8 min).
export ANOLE_WORKER_GPUS=0.5
export ANOLE_WORKER_CPUS=2
export ANOLE_PLACEMENT_TIMEOUT=900
