#!/usr/bin/env bash
# `make demo`: the whole recipe on a laptop CPU, with the embedded SmolLM2-135M-Instruct as teacher and student.
#
# Usage:
#   bash scripts/demo.sh                      # part 1, in_short (what `make demo` runs: ~10 min on 2 cores)
#   PARTS="in_short language_id" bash scripts/demo.sh   # both parts (~23 min with the larger sizes of 2026-11-30)
#   PARTS=language_id bash scripts/demo.sh    # one part: in_short or language_id (or french, not run by default)
#   TRAIN_ROWS=320 EPOCHS=2 bash scripts/demo.sh
#
# Part 1, a behaviour (prompts/in_short.md, a generative task): under a 2,000-token prompt (rules, then 38 example
# question/answer turns) the teacher answers every question in one sentence that starts with "In short:"; a LoRA
# student learns its answers without the prompt; on held-out questions the base model without the prompt, the teacher
# with it and the student without it are scored strictly: the answer must follow the format AND be an answer (not
# cut, an echo of the prompt, a loop, or off its question's topic: distill/checks.py), with chrF against the
# teacher's answers; then each rule of the prompt file, per model (evaluate.py --compare: a table, and a heatmap PNG
# beside the results). The embedded 135M model follows this format from example turns; it cannot write meaningful
# French, so the French task (PARTS=french, prompts/answer_in_french.md) is kept as an example, not as the demo.
# Part 2, the GPU recipe's worked example (language ID, 13 labels under a 2,300-token rule book): the teacher labels
# TRAIN_ROWS train-split rows; a student learns them (and with GOLD_STUDENT=1 a second one the gold labels of the same
# rows); everything is scored on the held-out split. The 135M teacher cannot follow that rule book: this part proves the
# plumbing and that the student copies its teacher, not the task's quality (that is the GPU teacher's job).
#
# The console shows each step's banner, its progress bar and the final tables; everything the step prints (library
# warnings, vLLM and wandb notices included) goes to its log under $DEMO_DIR/logs/, named in the banner. A failing
# step prints its log's last 30 lines and stops the demo with its exit code.
#
# Env (all optional): PARTS ("in_short"; part 2 is opt-in to keep `make demo` within 15 minutes with setup),
# BEHAVIOUR_TRAIN_ROWS (64 of the 330 train-split questions,
# in_short and french), BEHAVIOUR_EPOCHS (2), BEHAVIOUR_MAX_TOKENS (48: answer length cap, teacher and evaluations;
# the french part caps at 40, as measured), ON_POLICY (1: the SFT student goes on with stage 2b, on-policy, on
# ON_POLICY_ROWS training questions, 16; 0 skips it), TRAIN_ROWS (120, language
# ID), EPOCHS (1, language ID), GOLD_STUDENT (0; 1 adds the gold-label student, ~3 min), TEACHER_EVAL_ROWS (120 of
# the 233 held-out rows; the language-ID teacher's evaluation is the slowest one), LATENCY_REQUESTS (4: requests
# timed one at a time per evaluation),
# DEMO_DIR (data/demo), PYTHON (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

PARTS=${PARTS:-in_short}
BEHAVIOUR_TRAIN_ROWS=${BEHAVIOUR_TRAIN_ROWS:-64}
BEHAVIOUR_EPOCHS=${BEHAVIOUR_EPOCHS:-2}
BEHAVIOUR_MAX_TOKENS=${BEHAVIOUR_MAX_TOKENS:-}
ON_POLICY=${ON_POLICY:-1}
ON_POLICY_ROWS=${ON_POLICY_ROWS:-16}
TRAIN_ROWS=${TRAIN_ROWS:-120}
EPOCHS=${EPOCHS:-1}
TEACHER_EVAL_ROWS=${TEACHER_EVAL_ROWS:-120}
GOLD_STUDENT=${GOLD_STUDENT:-0}
LATENCY_REQUESTS=${LATENCY_REQUESTS:-4}
DEMO_DIR=${DEMO_DIR:-data/demo}
PYTHON=${PYTHON:-.venv/bin/python}

MODEL=models/SmolLM2-135M-Instruct
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
    in_short|french) total_steps=$(( total_steps + (ON_POLICY == 1 ? 7 : 5) )) ;;
    language_id) total_steps=$(( total_steps + (GOLD_STUDENT == 1 ? 6 : 4) )) ;;
    *) echo "error: PARTS holds '$part'; the parts are in_short, french and language_id" >&2; exit 2 ;;
  esac
done
mkdir -p "$LOG_DIR" "$LANGUAGE_ID_DIR"
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

# behaviour_part NAME PROMPT_FILE MAX_TOKENS DESCRIPTION: a generative task's teacher, student and three evaluations.
behaviour_part() {
  local name=$1 prompt=(--prompt_file "$2") max_tokens=${BEHAVIOUR_MAX_TOKENS:-$3} description=$4
  local dir=$DEMO_DIR/$name questions=(--input_file example-data/general_questions.jsonl)
  local opd_questions=(--dataset_name example-data/general_questions.jsonl)
  local test=(--test_file example-data/general_questions.jsonl "${prompt[@]}" --max_tokens "$max_tokens"
              --latency_requests "$LATENCY_REQUESTS")
  mkdir -p "$dir"
  # Greedy, as the prompts were measured (SmolLM2 has no generation_config: vLLM's default would be temperature 1),
  # so a redraw would repeat the same answer: no retries. Answers cut at the token cap, echoes of the prompt, loops and
  # off-topic answers are rejected with their reason (the prompt's `stop` ends most answers at their first sentence);
  # the student learns from the rest.
  run_step "$name-teacher" "teacher answers $BEHAVIOUR_TRAIN_ROWS training questions with the prompt ($description)" \
    "$PYTHON" create_data.py --model_name "$MODEL" "${prompt[@]}" "${questions[@]}" --split train \
      --max_samples "$BEHAVIOUR_TRAIN_ROWS" --max_tokens "$max_tokens" --max_in_flight 16 \
      --temperature 0 --max_retries 0 \
      --output_file "$dir/teacher.jsonl" --overwrite
  run_step "$name-train" "student learns the teacher's answers without the prompt (LoRA, $BEHAVIOUR_EPOCHS epochs)" \
    train "$dir/teacher.jsonl" "models/demo-$name" "$BEHAVIOUR_EPOCHS"
  if [ "$ON_POLICY" = 1 ]; then
    # Stage 2b from the SFT adapter: the student samples its own answers to the same training questions, and its
    # base model reading the prompt (adapter off) grades every token; reverse KL (distill/onpolicy.py).
    run_step "$name-on-policy" "the SFT student goes on on-policy: it answers, the prompted teacher grades each token" \
      "$PYTHON" train_opd_trl.py --config recipes/opd_cpu.yaml "${prompt[@]}" "${opd_questions[@]}" \
        --max_train_rows "$ON_POLICY_ROWS" --max_completion_length "$max_tokens" --init_adapter "models/demo-$name" \
        --output_dir "models/demo-$name-opd" --overwrite
  fi
  run_step "$name-eval-teacher" "evaluate the teacher with the prompt on the held-out questions" \
    "$PYTHON" evaluate.py --model_path "$MODEL" --with_prompt "${test[@]}" --output_file "$dir/eval_teacher.json"
  run_step "$name-eval-base" "evaluate the base model without the prompt on the same questions" \
    "$PYTHON" evaluate.py --model_path "$MODEL" "${test[@]}" --teacher_file "$dir/eval_teacher.json" \
      --output_file "$dir/eval_base.json"
  run_step "$name-eval-student" "evaluate the distilled student without the prompt on the same questions" \
    "$PYTHON" evaluate.py --model_path "models/demo-$name" "${test[@]}" --teacher_file "$dir/eval_teacher.json" \
      --output_file "$dir/eval_distilled.json"
  if [ "$ON_POLICY" = 1 ]; then
    run_step "$name-eval-on-policy" "evaluate the on-policy student without the prompt on the same questions" \
      "$PYTHON" evaluate.py --model_path "models/demo-$name-opd" "${test[@]}" \
        --teacher_file "$dir/eval_teacher.json" --output_file "$dir/eval_opd.json"
  fi
}

in_short_part() {
  behaviour_part in_short prompts/in_short.md 48 'rules + 38 example turns: answer in one "In short:" sentence'
}

french_part() {
  behaviour_part french prompts/answer_in_french.md 40 "answer in French, in one short sentence"
}

language_id_part() {
  local engine=(--max-model-len 4096) test=(--latency_requests "$LATENCY_REQUESTS")
  local teacher_rows=() partial_teacher=()
  # The teacher answers only the first TEACHER_EVAL_ROWS held-out rows; the students are scored on all of them, so
  # their agreement with the teacher covers that subset (the report's n says how many): evaluate.py refuses a teacher
  # file that misses scored rows unless told this share is enough.
  if [ -n "$TEACHER_EVAL_ROWS" ]; then teacher_rows=(--max_samples "$TEACHER_EVAL_ROWS") partial_teacher=(--teacher_min_share 0); fi
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
      "${partial_teacher[@]}" "${test[@]}" --output_file "$LANGUAGE_ID_DIR/eval_distilled.json" "${engine[@]}"
  if [ "$GOLD_STUDENT" = 1 ]; then
    run_step language-id-eval-gold "evaluate the gold-label student without the prompt on the held-out rows" \
      "$PYTHON" evaluate.py --model_path models/demo-gold --teacher_file "$LANGUAGE_ID_DIR/eval_teacher.json" \
        "${partial_teacher[@]}" "${test[@]}" --output_file "$LANGUAGE_ID_DIR/eval_gold.json" "${engine[@]}"
  fi
}

for part in $PARTS; do "${part}_part"; done

for part in $PARTS; do
  echo
  if [ "$part" = in_short ] || [ "$part" = french ]; then
    dir=$DEMO_DIR/$part
    if [ "$part" = in_short ]; then echo '== Answer in one "In short:" sentence: held-out questions, none seen in training'
    else echo "== Answer in French: held-out questions, none seen in training"; fi
    on_policy=()
    if [ "$ON_POLICY" = 1 ]; then on_policy=(--on_policy "$dir/eval_opd.json"); fi
    "$PYTHON" -m distill.summary --base "$dir/eval_base.json" --teacher "$dir/eval_teacher.json" \
      --student "$dir/eval_distilled.json" "${on_policy[@]}"
    echo
    echo "== Each rule of the prompt file: pass rate per model (evaluate.py --compare; the heatmap beside the results)"
    opd_results=()
    if [ "$ON_POLICY" = 1 ]; then opd_results=("$dir/eval_opd.json"); fi
    "$PYTHON" evaluate.py --compare "$dir/eval_base.json" "$dir/eval_teacher.json" "$dir/eval_distilled.json" \
      "${opd_results[@]}" --output_file "$dir/rules_compare.png" 2>>"$LOG_DIR/compare.log"
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
  models/demo-in_short/, -in_short-opd/, demo-distilled/, demo-gold/  stage 2 (2b): LoRA adapters, distill_run.json
  $DEMO_DIR/<part>/eval_*.json (+ .png for language ID)          stage 3: results with every answer
  $DEMO_DIR/<part>/rules_compare.png                              the models x rules heatmap (behaviour parts)
  $DEMO_DIR/logs/                                                 each step's full output
  wandb/                                                          offline wandb runs (wandb sync to upload)
Total: $(( $(date +%s) - started )) s
TXT
