#!/usr/bin/env bash
# Stage 1 on Ray Data: REPLICAS vLLM replicas of TP GPUs each, on this node or on the Ray cluster at RAY_ADDRESS
# (distill/ray_stage.py). One output, resumable by id, every selected input id in it or its rejects exactly once.
# create_data_h100x8.sh stays the simplest way on one node; this one also spans nodes.
#
# Usage:
#   ./create_data_ray.sh [create_data.py flags...]          # this node: a Ray instance starts with the run
#   RAY_ADDRESS=10.0.0.1:6379 REPLICAS=16 TP=4 ./create_data_ray.sh --split train   # a running Ray cluster
#   # CPU, embedded model, two replicas of one core each:
#   MODEL=models/SmolLM2-135M-Instruct REPLICAS=2 ./create_data_ray.sh --constrain_labels --max_samples 50
#
# A cluster: on the head node `ray start --head --port 6379`, on every other node `ray start --address HEAD:6379`
# (Ray 2.60 authenticates nodes with a token: set RAY_AUTH_MODE=token everywhere and share ~/.ray/auth_token),
# then run this on the head with RAY_ADDRESS=HEAD:6379. Under SLURM, scripts/ray_cluster.sbatch does all of it.
#
# Env (all optional): MODEL, TP (4 on GPU machines, else 1), REPLICAS (2), INPUT, OUTPUT, PYTHON (.venv/bin/python),
# REASONING_PARSER (default qwen3 for *Thinking* models), RAY_ADDRESS (unset: Ray on this node).
# Re-running resumes; Ctrl-C or SIGTERM keeps what finished and records the run as interrupted.
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-Qwen/Qwen3-30B-A3B-Thinking-2507}
if command -v nvidia-smi >/dev/null 2>&1; then TP=${TP:-4}; else TP=${TP:-1}; fi
REPLICAS=${REPLICAS:-2}
INPUT=${INPUT:-example-data/language_id.jsonl}
OUTPUT=${OUTPUT:-data/teacher.jsonl}
PYTHON=${PYTHON:-.venv/bin/python}
case "$MODEL" in *Thinking*) REASONING_PARSER=${REASONING_PARSER:-qwen3} ;; *) REASONING_PARSER=${REASONING_PARSER:-} ;; esac

args=(--engine ray --num_replicas "$REPLICAS" --tensor_parallel_size "$TP"
      --input_file "$INPUT" --output_file "$OUTPUT" --model_name "$MODEL")
[ -n "$REASONING_PARSER" ] && args+=(--reasoning-parser "$REASONING_PARSER")
echo "create_data_ray: $REPLICAS replica(s) of $MODEL (TP=$TP) on ${RAY_ADDRESS:-Ray on this node}"
exec "$PYTHON" create_data.py "${args[@]}" "$@"
