#!/usr/bin/env bash
# Stage 1 on one 8-GPU node: NUM_GPUS/TP teacher instances (default 8/4 = 2), each on its own GPU slice and
# shard of the input (a query goes to shard hash(id) mod instances, so shards stay put when the input, --split or
# --max_samples change), then one merged output in which every selected input id appears exactly once.
#
# Usage:
#   ./create_data_h100x8.sh [create_data.py flags...]
#   MODEL=Qwen/Qwen3-30B-A3B-Thinking-2507 TP=4 NUM_GPUS=8 INPUT=my.jsonl OUTPUT=data/teacher.jsonl ./create_data_h100x8.sh
#   # CPU, embedded model, two instances (what `make demo` and the tests run):
#   MODEL=models/SmolLM2-135M-Instruct TP=1 NUM_GPUS=2 ./create_data_h100x8.sh --constrain_labels --max_samples 50
#
# Env (all optional): MODEL, TP, NUM_GPUS, INPUT, OUTPUT, SHARD_DIR (default <OUTPUT without .jsonl>.shards),
# PYTHON (default .venv/bin/python), REASONING_PARSER (default qwen3 for *Thinking* models, else none).
# Re-running resumes each shard where it stopped. If any instance fails, the others are stopped and the script
# exits non-zero; per-instance logs are in SHARD_DIR. Ctrl-C or SIGTERM: every instance stops admitting queries,
# keeps what finished and records itself as interrupted; run again to resume.
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-Qwen/Qwen3-30B-A3B-Thinking-2507}
TP=${TP:-4}
NUM_GPUS=${NUM_GPUS:-8}
INPUT=${INPUT:-example-data/language_id.jsonl}
OUTPUT=${OUTPUT:-data/teacher.jsonl}
SHARD_DIR=${SHARD_DIR:-${OUTPUT%.jsonl}.shards}
PYTHON=${PYTHON:-.venv/bin/python}
case "$MODEL" in *Thinking*) REASONING_PARSER=${REASONING_PARSER:-qwen3} ;; *) REASONING_PARSER=${REASONING_PARSER:-} ;; esac

(( NUM_GPUS % TP == 0 )) || { echo "error: NUM_GPUS ($NUM_GPUS) must be a multiple of TP ($TP)" >&2; exit 2; }
INSTANCES=$(( NUM_GPUS / TP ))
common=(--input_file "$INPUT" --model_name "$MODEL" --tensor_parallel_size "$TP")
[ -n "$REASONING_PARSER" ] && common+=(--reasoning-parser "$REASONING_PARSER")
mkdir -p "$SHARD_DIR"
echo "create_data_h100x8: $INSTANCES instance(s) of $MODEL (TP=$TP) over $INPUT; shards and logs in $SHARD_DIR"

pids=()
stop_all() { kill "${pids[@]}" 2>/dev/null || true; }
# SIGTERM lets each instance write what finished and record "interrupted"; wait for that before leaving
trap 'stop_all; wait || true; exit 130' INT TERM
for (( i = 0; i < INSTANCES; i++ )); do
  gpus=$(seq -s, $(( i * TP )) $(( i * TP + TP - 1 )))
  log="$SHARD_DIR/shard-$i.log"
  CUDA_VISIBLE_DEVICES=$gpus "$PYTHON" create_data.py "${common[@]}" \
    --output_file "$SHARD_DIR/shard-$i-of-$INSTANCES.jsonl" --shard_index "$i" --num_shards "$INSTANCES" "$@" \
    > "$log" 2>&1 &
  pids+=($!)
  echo "  instance $i: GPUs $gpus, pid ${pids[-1]}, log $log"
done

# Progress: the last line of each instance's log, until all have finished.
status=0
remaining=${#pids[@]}
while (( remaining > 0 )); do
  if wait -n; then
    remaining=$(( remaining - 1 ))
  else
    status=$?
    echo "error: a teacher instance failed (exit $status); stopping the others. Logs:" >&2
    stop_all
    for log in "$SHARD_DIR"/shard-*.log; do echo "--- $log" >&2; tail -n 5 "$log" >&2; done
    wait || true
    exit "$status"
  fi
done
for log in "$SHARD_DIR"/shard-*.log; do tail -n 1 "$log"; done

"$PYTHON" create_data.py "${common[@]}" --output_file "$OUTPUT" "$@" \
  --merge_shards "$SHARD_DIR/shard-*-of-$INSTANCES.jsonl"
