#!/usr/bin/env bash
# The GPU path on random-init models of the real Qwen3 shapes: memory plans, the 4B student's speed against the old
# recipe, FSDP with the 30B-A3B shape, adapter load/merge and vLLM LoRA serving. Needs a CUDA machine; no hub.
#
# Usage: make gpu-check            or   WORK_DIR=/tmp/gpu-check STEPS=5 MOE_LAYERS=4 bash scripts/gpu_check.sh
# Env (all optional): WORK_DIR (default /tmp/gpu-check), STEPS (default 5), MOE_LAYERS (default 4),
# PYTHON (default .venv/bin/python). Exits non-zero when a step fails; the summary lists every step.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
command -v nvidia-smi >/dev/null 2>&1 || { echo "gpu_check: no nvidia-smi; this check needs a CUDA machine" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec "$PYTHON" scripts/gpu_check.py --work_dir "${WORK_DIR:-/tmp/gpu-check}" --steps "${STEPS:-5}" \
  --moe_layers "${MOE_LAYERS:-4}" "$@"
