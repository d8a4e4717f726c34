#!/usr/bin/env bash
# The GPU path on random-init models of the real Qwen3 shapes (scripts/gpu_check.py): memory plans, the 4B student's
# speed with tinker.yaml against the old recipe, FSDP with the 30B-A3B shape, adapter load/merge and vLLM LoRA
# serving. Needs a CUDA machine; no hub, no network, and it installs nothing.
#
# Usage: make gpu-check        or   PYTHON=python3 bash scripts/gpu_check.sh      (a machine without .venv/)
#        WORK_DIR=/tmp/gpu-check STEPS=3 MOE_LAYERS=4 BUDGET_S=720 bash scripts/gpu_check.sh
# Env (all optional): PYTHON (default .venv/bin/python if there, else python3; it needs torch with CUDA,
# transformers, trl, peft, accelerate, datasets, and vllm for the serving step: docs/gpu-check.md, "offline"),
# WORK_DIR (default /tmp/gpu-check, ~16 GB), STEPS (optimizer steps per run, default 3), MOE_LAYERS (default 4),
# BUDGET_S (seconds for the whole check, default 720). Exit 0: every step passed; 1: one failed (or timed out);
# 3: none failed but one was skipped, so not everything was proven; 2: no GPU here.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
command -v nvidia-smi >/dev/null 2>&1 || { echo "gpu_check: no nvidia-smi; this check needs a CUDA machine" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec "$PYTHON" scripts/gpu_check.py --work_dir "${WORK_DIR:-/tmp/gpu-check}" --steps "${STEPS:-3}" \
  --moe_layers "${MOE_LAYERS:-4}" --budget_s "${BUDGET_S:-720}" "$@"
