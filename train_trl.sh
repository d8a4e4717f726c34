#!/usr/bin/env bash
# Stage 2: LoRA-SFT the student on stage 1's output with a recipe from recipes/.
#
# Usage:
#   ./train_trl.sh [train_sft_trl.py flags...]                       # 1 GPU, recipes/tinker.yaml (Qwen3-4B student)
#   NUM_GPUS=8 ./train_trl.sh                                        # accelerate + FSDP, recipes/tinker_30b_fsdp.yaml
#   RECIPE=recipes/openai_cookbook.yaml ./train_trl.sh --learning_rate 1e-4
#   RECIPE=recipes/cpu.yaml ./train_trl.sh                           # CPU, the embedded SmolLM2 student
#
# Env (all optional): RECIPE (default: tinker.yaml on 1 GPU, tinker_30b_fsdp.yaml on several, cpu.yaml without a GPU),
# DATA (default data/teacher.jsonl), NUM_GPUS (default 1), ACCELERATE_CONFIG (default recipes/accelerate_fsdp.yaml),
# PYTHON (default .venv/bin/python). Flags after the script name override the recipe, e.g. --output_dir,
# --num_train_epochs, --report_to none. The global batch stays the recipe's at any NUM_GPUS (--global_batch_size).
# Check memory first: ./train_trl.sh --plan_only   (prints the plan for NUM_GPUS GPUs and exits)
set -euo pipefail
cd "$(dirname "$0")"

NUM_GPUS=${NUM_GPUS:-1}
if ! command -v nvidia-smi >/dev/null 2>&1; then default_recipe=recipes/cpu.yaml
elif (( NUM_GPUS > 1 )); then default_recipe=recipes/tinker_30b_fsdp.yaml
else default_recipe=recipes/tinker.yaml; fi
RECIPE=${RECIPE:-$default_recipe}
DATA=${DATA:-data/teacher.jsonl}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-recipes/accelerate_fsdp.yaml}
PYTHON=${PYTHON:-.venv/bin/python}

args=(train_sft_trl.py --config "$RECIPE" --dataset_name "$DATA" "$@")
echo "train_trl: recipe $RECIPE, data $DATA, $NUM_GPUS process(es)"
if (( NUM_GPUS > 1 )); then
  exec "$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_GPUS" "${args[@]}"
else
  exec "$PYTHON" "${args[@]}"
fi
