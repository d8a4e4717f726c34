#!/usr/bin/env bash
# Stage 2: LoRA-SFT the student on stage 1's output with a recipe from recipes/.
#
# Usage:
#   ./train_trl.sh [train_sft_trl.py flags...]                       # 1 GPU, recipes/tinker.yaml (Qwen3-4B student)
#   NUM_GPUS=8 ./train_trl.sh                                        # accelerate + FSDP, recipes/tinker_30b_fsdp.yaml
#   RECIPE=recipes/openai_cookbook.yaml ./train_trl.sh --learning_rate 1e-4
#   RECIPE=recipes/cpu.yaml ./train_trl.sh                           # CPU, the embedded SmolLM2 student
#   # two nodes x 8 GPUs: the same command on each node, NODE_RANK 0 and 1 (SLURM: scripts/train_multinode.sbatch)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NUM_GPUS=8 ./train_trl.sh --output_dir /shared/models/run
#
# Env (all optional): RECIPE (default: tinker.yaml on 1 GPU, tinker_30b_fsdp.yaml on several, cpu.yaml without a GPU
# unless --plan_only), DATA (default data/teacher.jsonl), NUM_GPUS (GPUs per node, default 1), ACCELERATE_CONFIG
# (default recipes/accelerate_fsdp.yaml), PYTHON (default .venv/bin/python). Flags after the script name override the
# recipe, e.g. --output_dir, --num_train_epochs, --report_to none. The global batch stays the recipe's at any number of
# processes (--global_batch_size). Check memory first, on any machine, offline too: ./train_trl.sh --plan_only (one
# process plans RECIPE for NNODES x NUM_GPUS GPUs; without RECIPE, the GPU recipe for that count even on a CPU machine).
# Multi-node env: NNODES (default 1), NODE_RANK (this node, 0..NNODES-1, default 0), MASTER_ADDR (the NODE_RANK 0
# node's address as every node reaches it; required when NNODES > 1), MASTER_PORT (default 29500, free on that node).
# NNODES x NUM_GPUS processes train together; only global rank 0 (on NODE_RANK 0) writes the adapter and run record.
set -euo pipefail
cd "$(dirname "$0")"

die() { echo "train_trl: error: $*" >&2; exit 2; }
NUM_GPUS=${NUM_GPUS:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
# Checked before anything starts: a wrong rank or address otherwise shows up as a rendezvous that waits 10 minutes.
# Decimal without leading zeros, since bash arithmetic reads 08 as bad octal.
for name in NUM_GPUS NNODES NODE_RANK MASTER_PORT; do
  [[ ${!name} =~ ^(0|[1-9][0-9]*)$ ]] || die "$name must be a whole number, got '${!name}'"
done
(( NUM_GPUS >= 1 )) || die "NUM_GPUS must be >= 1 (GPUs on this node), got $NUM_GPUS"
(( NNODES >= 1 )) || die "NNODES must be >= 1, got $NNODES"
(( NODE_RANK < NNODES )) || die "NODE_RANK $NODE_RANK is not below NNODES $NNODES (node ranks run 0..$((NNODES - 1)))"
(( MASTER_PORT >= 1 && MASTER_PORT <= 65535 )) || die "MASTER_PORT must be a TCP port (1-65535), got $MASTER_PORT"
# No localhost default: on a real cluster it would make every node wait on itself instead of failing here.
(( NNODES == 1 )) || [[ -n $MASTER_ADDR ]] \
  || die "MASTER_ADDR is required when NNODES > 1: the address of the NODE_RANK 0 node, reachable from every node"
WORLD_SIZE=$(( NNODES * NUM_GPUS ))

plan_only=0
for arg in "$@"; do [[ $arg == --plan_only || $arg == --plan-only ]] && plan_only=1; done
# A plan is for the GPUs a run will have, so without a GPU --plan_only still defaults to a GPU recipe.
if ! command -v nvidia-smi >/dev/null 2>&1 && (( ! plan_only )); then default_recipe=recipes/cpu.yaml
elif (( WORLD_SIZE > 1 )); then default_recipe=recipes/tinker_30b_fsdp.yaml
else default_recipe=recipes/tinker.yaml; fi
RECIPE=${RECIPE:-$default_recipe}
DATA=${DATA:-data/teacher.jsonl}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-recipes/accelerate_fsdp.yaml}
PYTHON=${PYTHON:-.venv/bin/python}

args=(train_sft_trl.py --config "$RECIPE" --dataset_name "$DATA" "$@")
launch=("$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG")
if (( plan_only )); then
  # One process plans for all NNODES x NUM_GPUS GPUs (FSDP when > 1); a --plan_gpus of the user's comes later and wins.
  echo "train_trl: --plan_only: recipe $RECIPE on $WORLD_SIZE GPU(s) (NNODES x NUM_GPUS; a --plan_gpus given wins)"
  exec "$PYTHON" train_sft_trl.py --config "$RECIPE" --dataset_name "$DATA" --plan_gpus "$WORLD_SIZE" "$@"
elif (( NNODES > 1 )); then
  echo "train_trl: recipe $RECIPE, data $DATA, node $NODE_RANK of $NNODES x $NUM_GPUS process(es) = $WORLD_SIZE," \
       "rendezvous $MASTER_ADDR:$MASTER_PORT"
  # accelerate's --num_processes is the total over all machines (it runs num_processes / num_machines per node).
  # The static rendezvous (accelerate's default, pinned here) keeps NODE_RANK as given: node 0 hosts the TCP store
  # at MASTER_ADDR:MASTER_PORT and the others connect to it; a node that never arrives fails the run after 600 s.
  exec "${launch[@]}" --num_machines "$NNODES" --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" \
    --main_process_port "$MASTER_PORT" --rdzv_backend static --num_processes "$WORLD_SIZE" "${args[@]}"
elif (( NUM_GPUS > 1 )); then
  echo "train_trl: recipe $RECIPE, data $DATA, $NUM_GPUS processes"
  exec "${launch[@]}" --num_processes "$NUM_GPUS" "${args[@]}"
else
  echo "train_trl: recipe $RECIPE, data $DATA, 1 process"
  exec "$PYTHON" "${args[@]}"
fi
