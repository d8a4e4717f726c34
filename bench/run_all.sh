#!/usr/bin/env bash
# Runs the benchmarks in turn (make bench). Each prints ratios measured side by side in one run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1
"$PYTHON" bench/teacher_throughput.py "$@" 2>&1 | grep -A4 "^bench" || true
"$PYTHON" bench/prompt_cost.py 2>&1 | grep -A3 "^bench"
"$PYTHON" bench/train_padding.py 2>&1 | grep -A4 "^bench"
"$PYTHON" bench/stream_vs_batch.py 2>&1 | grep -A5 "^bench"
"$PYTHON" bench/ray_replicas.py 2>&1 | grep -A3 "^bench"
"$PYTHON" bench/prompt_cache.py 2>&1 | grep -A3 "^bench"
"$PYTHON" bench/server_prompt_cache.py 2>&1 | grep -A3 "^bench"
