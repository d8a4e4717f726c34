#!/usr/bin/env bash
# `make demo`: the whole recipe on a laptop CPU, with the embedded SmolLM2-135M-Instruct as teacher and student.
#
# Usage:
#   bash scripts/demo.sh                      # both parts (what `make demo` runs)
#   PARTS=french bash scripts/demo.sh         # one part: french or language_id
#   TRAIN_ROWS=320 EPOCHS=2 bash scripts/demo.sh
#
# Part 1, a behaviour (prompts/answer_in_french.md, a generative task): the teacher answers the training questions
# with a French-only prompt; a LoRA student learns its answers without the prompt; on held-out questions the base
# model without the prompt, the teacher with it and the student without it are scored on how many answers are in
# French (lingua) and how close they are to the teacher's (chrF).
# Part 2, the GPU recipe's worked example (language ID, 13 labels under a 2,300-token rule book): the teacher labels
# TRAIN_ROWS train-split rows; a student learns them (and with GOLD_STUDENT=1 a second one the gold labels of the same
# rows); everything is scored on the held-out split. The 135M teacher cannot follow that rule book: this part proves the
# plumbing and that the student copies its teacher, not the task's quality (that is the GPU teacher's job).
#
# The console shows each step's banner, its progress bar and the final tables; everything the step prints (library
# warnings, vLLM and wandb notices included) goes to its log under $DEMO_DIR/logs/, named in the banner. A failing
# step prints its log's last 30 lines and stops the demo with its exit code.
#
# Env (all optional): PARTS ("french language_id"), FRENCH_TRAIN_ROWS (120 of the 330 train-split questions),
# FRENCH_EPOCHS (2), FRENCH_MAX_TOKENS (40: answer length cap, teacher and evaluations), TRAIN_ROWS (120, language
# ID), EPOCHS (1, language ID), GOLD_STUDENT (0; 1 adds the gold-label student, ~3 min), TEACHER_EVAL_ROWS (120 of
# the 233 held-out rows; the language-ID teacher's evaluation is the slowest one), LATENCY_REQUESTS (4: requests
# timed one at a time per evaluation),
# DEMO_DIR (data/demo), PYTHON (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

PARTS=${PARTS:-french language_id}
FRENCH_TRAIN_ROWS=${FRENCH_TRAIN_ROWS:-120}
FRENCH_EPOCHS=${FRENCH_EPOCHS:-2}
FRENCH_MAX_TOKENS=${FRENCH_MAX_TOKENS:-40}
TRAIN_ROWS=${TRAIN_ROWS:-120}
EPOCHS=${EPOCHS:-1}
TEACHER_EVAL_ROWS=${TEACHER_EVAL_ROWS:-120}
GOLD_STUDENT=${GOLD_STUDENT:-0}
LATENCY_REQUESTS=${LATENCY_REQUESTS:-4}
DEMO_DIR=${DEMO_DIR:-data/demo}
PYTHON=${PYTHON:-.venv/bin/python}

MODEL=models/SmolLM2-135M-Instruct
FRENCH=(--prompt_file prompts/answer_in_french.md)
FRENCH_DIR=$DEMO_DIR/french
LANGUAGE_ID_DIR=$DEMO_DIR/language_id
LOG_DIR=$DEMO_DIR/logs
# wandb stays offline (runs land in ./wandb/) unless the user has configured it.
if [ -z "${WANDB_API_KEY:-}" ] && ! grep -qs "api.wandb.ai" ~/.netrc; then export WANDB_MODE=${WANDB_MODE:-offline}; fi
export HF_HUB_OFFLINE=1
# Unbuffered Python keeps each log in the order things happened and lets progress bars through as they move.
export PYTHONUNBUFFERED=1

total_steps=0
for part in $PARTS; do
  case $part in
    french) total_steps=$(( total_steps + 5 )) ;;
    language_id) total_steps=$(( total_steps + (GOLD_STUDENT == 1 ? 6 : 4) )) ;;
    *) echo "error: PARTS holds '$part'; the parts are french and language_id" >&2; exit 2 ;;
  esac
done
mkdir -p "$LOG_DIR" "$FRENCH_DIR" "$LANGUAGE_ID_DIR"
started=$(date +%s)
step_number=0

# What reaches the console from a step: its own progress bars (the stage-1 teacher's, named "teacher", the trainer's,
# which has no name, an evaluation's named "evaluate"), redrawn in place on a terminal and shown once finished
# otherwise. Every byte also goes to the step's log. tqdm draws on stderr, next to the library warnings, so the bars
# are picked by their look rather than by stream.
CONSOLE_FILTER='
import os, re, sys
bar = re.compile(rb"^(teacher|evaluate|student|answers)?:?\s*\d+%\|[^|]*\|[^]]*\]")
live = sys.stdout.isatty()
console = sys.stdout.buffer
with open(sys.argv[1], "ab") as log:
    pending, bar_open = b"", False
    while chunk := os.read(0, 1 << 16):
        log.write(chunk)
        log.flush()
        *pieces, pending = re.split(rb"([\r\n])", pending + chunk)
        for text, end in zip(pieces[0::2], pieces[1::2]):
            found = bar.match(text)
            if not found:
                continue
            # A warning written while the bar is drawn lands on its line: the bar is then still running.
            finished = end == b"\n" and found.end() == len(text)
            if finished or live:
                # On a terminal, clear what a longer earlier draw left to the right of this one.
                console.write(b"\r" + found.group() + (b"\x1b[K" if live else b"") + (b"\n" if finished else b""))
                console.flush()
                bar_open = not finished
    if bar_open:
        console.write(b"\n")
'

# run_step NAME DESCRIPTION COMMAND...: banner, the command with its output filtered to the console and kept in
# full in the step's log; on failure the log's tail and the command's exit code.
run_step() {
  local name=$1 description=$2
  shift 2
  step_number=$(( step_number + 1 ))
  local log
  log=$LOG_DIR/$(printf "%02d" "$step_number")-$name.log
  printf '$ %s\n' "$*" > "$log"
  echo "== [$step_number/$total_steps] $description  (log: $log)"
  local step_started status=0
  step_started=$(date +%s)
  "$@" 2>&1 | "$PYTHON" -c "$CONSOLE_FILTER" "$log" || status=$?
  if (( status != 0 )); then
    echo "error: step $step_number failed (exit $status); the last 30 lines of $log:" >&2
    tail -n 30 "$log" | sed "s/.*\r//" >&2  # a progress bar redrawn with \r: its last state
    exit "$status"
  fi
  echo "   done in $(( $(date +%s) - step_started )) s"
}

train() {  # train DATA OUTPUT_DIR EPOCHS [train_sft_trl.py flags...]
  local data=$1 output_dir=$2 epochs=$3
  shift 3
  RECIPE=recipes/cpu.yaml DATA=$data PYTHON=$PYTHON ./train_trl.sh --num_train_epochs "$epochs" \
    --output_dir "$output_dir" --overwrite "$@"
}

french_part() {
  local questions=(--input_file example-data/general_questions.jsonl)
  local test=(--test_file example-data/general_questions.jsonl "${FRENCH[@]}" --max_tokens "$FRENCH_MAX_TOKENS"
              --latency_requests "$LATENCY_REQUESTS")
  # Greedy, as the prompt was measured (SmolLM2 has no generation_config: vLLM's default would be temperature 1),
  # so a redraw would repeat the same answer: no retries. Answers that still run into the token cap are rejected
  # as cut_at_max_tokens (the prompt's `stop` ends most at their first sentence); the student learns from the rest.
  run_step french-teacher "teacher answers $FRENCH_TRAIN_ROWS training questions with the French prompt" \
    "$PYTHON" create_data.py --model_name "$MODEL" "${FRENCH[@]}" "${questions[@]}" --split train \
      --max_samples "$FRENCH_TRAIN_ROWS" --max_tokens "$FRENCH_MAX_TOKENS" --max_in_flight 16 \
      --temperature 0 --max_retries 0 \
      --output_file "$FRENCH_DIR/teacher.jsonl" --overwrite
  run_step french-train "student learns the teacher's answers without the prompt (LoRA, $FRENCH_EPOCHS epoch)" \
    train "$FRENCH_DIR/teacher.jsonl" models/demo-french "$FRENCH_EPOCHS"
  run_step french-eval-teacher "evaluate the teacher with the prompt on the held-out questions" \
    "$PYTHON" evaluate.py --model_path "$MODEL" --with_prompt "${test[@]}" --output_file "$FRENCH_DIR/eval_teacher.json"
  run_step french-eval-base "evaluate the base model without the prompt on the same questions" \
    "$PYTHON" evaluate.py --model_path "$MODEL" "${test[@]}" --teacher_file "$FRENCH_DIR/eval_teacher.json" \
      --output_file "$FRENCH_DIR/eval_base.json"
  run_step french-eval-student "evaluate the distilled student without the prompt on the same questions" \
    "$PYTHON" evaluate.py --model_path models/demo-french "${test[@]}" --teacher_file "$FRENCH_DIR/eval_teacher.json" \
      --output_file "$FRENCH_DIR/eval_distilled.json"
}

language_id_part() {
  local engine=(--max-model-len 4096) test=(--latency_requests "$LATENCY_REQUESTS")
  local teacher_rows=()
  if [ -n "$TEACHER_EVAL_ROWS" ]; then teacher_rows=(--max_samples "$TEACHER_EVAL_ROWS"); fi
  run_step language-id-teacher "teacher labels $TRAIN_ROWS language-ID training rows under the 2,300-token rule book" \
    "$PYTHON" create_data.py --model_name "$MODEL" --constrain_labels --split train --max_samples "$TRAIN_ROWS" \
      --max_tokens 8 --temperature 0.15 --max_in_flight 16 --output_file "$LANGUAGE_ID_DIR/teacher.jsonl" \
      --overwrite "${engine[@]}"
  run_step language-id-train-distilled "student learns the teacher's labels without the prompt (LoRA, $EPOCHS epoch)" \
    train "$LANGUAGE_ID_DIR/teacher.jsonl" models/demo-distilled "$EPOCHS"
  if [ "$GOLD_STUDENT" = 1 ]; then
    run_step language-id-train-gold "the same student on the gold labels of the same rows (what a perfect teacher gives)" \
      train "$LANGUAGE_ID_DIR/teacher.jsonl" models/demo-gold "$EPOCHS" --answer_field label
  fi
  run_step language-id-eval-teacher "evaluate the teacher with the prompt on the held-out rows" \
    "$PYTHON" evaluate.py --model_path "$MODEL" --with_prompt --constrain_labels --max_tokens 8 "${teacher_rows[@]}" \
      "${test[@]}" --output_file "$LANGUAGE_ID_DIR/eval_teacher.json" "${engine[@]}"
  run_step language-id-eval-distilled "evaluate the distilled student without the prompt on the held-out rows" \
    "$PYTHON" evaluate.py --model_path models/demo-distilled --teacher_file "$LANGUAGE_ID_DIR/eval_teacher.json" \
      "${test[@]}" --output_file "$LANGUAGE_ID_DIR/eval_distilled.json" "${engine[@]}"
  if [ "$GOLD_STUDENT" = 1 ]; then
    run_step language-id-eval-gold "evaluate the gold-label student without the prompt on the held-out rows" \
      "$PYTHON" evaluate.py --model_path models/demo-gold --teacher_file "$LANGUAGE_ID_DIR/eval_teacher.json" \
        "${test[@]}" --output_file "$LANGUAGE_ID_DIR/eval_gold.json" "${engine[@]}"
  fi
}

for part in $PARTS; do "${part}_part"; done

for part in $PARTS; do
  echo
  if [ "$part" = french ]; then
    echo "== Answer in French: held-out questions, none seen in training"
    "$PYTHON" -m distill.summary --base "$FRENCH_DIR/eval_base.json" --teacher "$FRENCH_DIR/eval_teacher.json" \
      --student "$FRENCH_DIR/eval_distilled.json"
  else
    echo "== Language ID: held-out rows, none seen in training"
    gold=()
    if [ "$GOLD_STUDENT" = 1 ]; then gold=(--gold_student "$LANGUAGE_ID_DIR/eval_gold.json"); fi
    "$PYTHON" -m distill.summary --teacher "$LANGUAGE_ID_DIR/eval_teacher.json" \
      --student "$LANGUAGE_ID_DIR/eval_distilled.json" "${gold[@]}"
    echo "The 135M teacher cannot follow a 2,300-token rule book, so the distilled student copies poor labels; good"
    echo "labels are the GPU recipe's teacher's job (GOLD_STUDENT=1 adds a student trained on the gold labels)."
  fi
done
cat <<TXT

Where everything landed:
  $DEMO_DIR/<part>/teacher.jsonl (+ .rejects.jsonl, .run.json)  stage 1: teacher answers, rejects, run record
  models/demo-french/, models/demo-distilled/, models/demo-gold/  stage 2: LoRA adapters, distill_run.json, merged/
  $DEMO_DIR/<part>/eval_*.json (+ .png for language ID)          stage 3: results with every answer
  $DEMO_DIR/logs/                                                 each step's full output
  wandb/                                                          offline wandb runs (wandb sync to upload)
Total: $(( $(date +%s) - started )) s
TXT
