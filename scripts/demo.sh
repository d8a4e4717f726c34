#!/usr/bin/env bash
# `make demo`: the whole recipe on a laptop CPU with the embedded SmolLM2-135M-Instruct as teacher and student.
#   1. teacher + long prompt labels TRAIN_ROWS rows of the train split (answers constrained to the label set)
#   2. two LoRA students without the prompt: one on the teacher's labels, one on the gold labels of the same rows
#   3. evaluation on the held-out split: teacher with prompt, both students, lingua; then the side-by-side table
# The 135M teacher reads the long prompt poorly: the demo proves the plumbing and the measurements, not quality.
# Env: TRAIN_ROWS (default 320), EPOCHS (default 1), DEMO_DIR (default data/demo), PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
MODEL=models/SmolLM2-135M-Instruct
DEMO_DIR=${DEMO_DIR:-data/demo}
TRAIN_ROWS=${TRAIN_ROWS:-320}
EPOCHS=${EPOCHS:-1}
# wandb stays offline (runs land in ./wandb/) unless the user has configured it.
if [ -z "${WANDB_API_KEY:-}" ] && ! grep -qs "api.wandb.ai" ~/.netrc; then export WANDB_MODE=${WANDB_MODE:-offline}; fi
export HF_HUB_OFFLINE=1
engine=(--max-model-len 4096)
started=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - started )) s] $*"; }

step "1/6 teacher: $MODEL with prompts/language_identification.md labels $TRAIN_ROWS train-split rows"
"$PYTHON" create_data.py --model_name "$MODEL" --constrain_labels --split train --max_samples "$TRAIN_ROWS" \
  --max_tokens 8 --temperature 0.15 --max_in_flight 16 --output_file "$DEMO_DIR/teacher.jsonl" --overwrite "${engine[@]}"

step "2/6 student on the teacher's labels (LoRA r32, recipes/cpu.yaml, $EPOCHS epoch)"
RECIPE=recipes/cpu.yaml DATA="$DEMO_DIR/teacher.jsonl" PYTHON="$PYTHON" ./train_trl.sh \
  --num_train_epochs "$EPOCHS" --output_dir models/demo-distilled --overwrite

step "3/6 the same student on the gold labels of the same rows (what a perfect teacher would give)"
RECIPE=recipes/cpu.yaml DATA="$DEMO_DIR/teacher.jsonl" PYTHON="$PYTHON" ./train_trl.sh \
  --num_train_epochs "$EPOCHS" --output_dir models/demo-gold --answer_field label --overwrite

step "4/6 evaluate the teacher with its prompt on the held-out split"
"$PYTHON" evaluate.py --model_path "$MODEL" --with_prompt --constrain_labels --max_tokens 8 \
  --output_file "$DEMO_DIR/eval_teacher.json" "${engine[@]}"

step "5/6 evaluate the distilled student (no prompt) on the held-out split"
"$PYTHON" evaluate.py --model_path models/demo-distilled --teacher_file "$DEMO_DIR/eval_teacher.json" \
  --output_file "$DEMO_DIR/eval_distilled.json" "${engine[@]}"

step "6/6 evaluate the gold-label student on the held-out split"
"$PYTHON" evaluate.py --model_path models/demo-gold --teacher_file "$DEMO_DIR/eval_teacher.json" \
  --output_file "$DEMO_DIR/eval_gold.json" "${engine[@]}"

step "results (held-out split; nothing here was trained on)"
"$PYTHON" -m distill.summary --teacher "$DEMO_DIR/eval_teacher.json" --student "$DEMO_DIR/eval_distilled.json" \
  --gold_student "$DEMO_DIR/eval_gold.json"
cat <<TXT

The teacher is SmolLM2-135M: it cannot follow a 2,300-token prompt, so its labels are poor and the distilled
student faithfully copies them. The gold-label row shows what the same student learns from good labels; the GPU
recipe (Qwen3-30B-A3B-Thinking teacher, see README) is what produces good labels.

Where everything landed:
  $DEMO_DIR/teacher.jsonl (+ .rejects.jsonl, .run.json)   stage 1: teacher labels, rejects, run record
  models/demo-distilled/, models/demo-gold/               stage 2: LoRA adapters, distill_run.json, merged/ (CPU serving)
  $DEMO_DIR/eval_*.json, $DEMO_DIR/eval_*.png               stage 3: results (per-example predictions) and confusion heatmaps
  wandb/                                                  offline wandb runs (wandb sync to upload)
Total: $(( $(date +%s) - started )) s
TXT
