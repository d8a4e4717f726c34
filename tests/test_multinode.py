"""Stage 2 across nodes (train_trl.sh with NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT), on one CPU machine.

- Two "nodes" are two train_trl.sh launches at once, NODE_RANK 0 and 1, meeting at 127.0.0.1 over gloo: accelerate
  launch -> torchrun's static rendezvous -> one process per node. On CPU accelerate runs DDP, not FSDP (see
  tests/test_distributed.py); what this proves is the multi-machine launch, the recipe's global batch over both
  nodes and that only global rank 0 writes. Each node gets its own --output_dir, as nodes without a shared disk
  would, so a write from node 1 cannot hide in node 0's files.
- The env checks and the commands train_trl.sh and scripts/train_multinode.sbatch build, with PYTHON=echo (and stub
  srun / scontrol): no training starts.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import CLI_ENV, REPO, run_cli
from tests.test_distributed import ACCELERATE_CPU

LAUNCH_TIMEOUT_S = 300  # 20-50 s on 2 busy cores; a stuck rendezvous would wait torch's 600 s before failing


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def end_process_tree(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to a launch and everything under it. torchrun starts each worker in a session of its
    own, so killing the launch's process group would leave the workers running."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    # The launch itself is reaped by proc.wait, not psutil: a child reaped elsewhere reads as exit code 0.
    proc.terminate()
    for member in descendants:
        try:
            member.terminate()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for member in psutil.wait_procs(descendants, timeout=20)[1]:
        member.kill()


def launch_nodes(nnodes: int, flags: list, env: dict, logs_dir, timeout=LAUNCH_TIMEOUT_S) -> list:
    """train_trl.sh once per node rank, all at once, meeting at 127.0.0.1 on a free port. Returns each node's
    CompletedProcess (output in stdout) after all exit 0; a node that fails or outlives the timeout fails the test,
    with every node's log, and ends them all."""
    port = free_port()
    procs, logs = [], []
    try:
        for rank in range(nnodes):
            log = open(logs_dir / f"node{rank}.log", "w+", encoding="utf-8")
            logs.append(log)
            node_env = {**CLI_ENV, **env, "NNODES": str(nnodes), "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}
            procs.append(subprocess.Popen(["bash", "train_trl.sh", *map(str, flags[rank])], cwd=REPO, env=node_env,
                                          stdout=log, stderr=subprocess.STDOUT, text=True))
        deadline, timed_out = time.monotonic() + timeout, False
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                end_process_tree(proc)
    results = []
    for proc, log in zip(procs, logs):
        log.seek(0)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, log.read(), ""))
        log.close()
    if timed_out or any(result.returncode != 0 for result in results):
        ended = f", still running after {timeout} s: ended" if timed_out else ""
        raise AssertionError(f"exit codes {[result.returncode for result in results]}{ended}\n" + "\n".join(
            f"--- node {rank}\n{result.stdout[-4000:]}" for rank, result in enumerate(results)))
    return results


@pytest.mark.slow
def test_two_nodes_train_with_the_recipe_batch_and_node_0_alone_saves_one_adapter(tiny_model, gold_teacher_file,
                                                                                    tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # The recipe sets the global batch (as tinker*.yaml do); each process's share comes from the world size.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((REPO / "recipes" / "cpu.yaml").read_text() + "\nglobal_batch_size: 16\n")
    out = [tmp_path / "node0-disk" / "run", tmp_path / "node1-disk" / "run"]
    common = ["--model_name_or_path", tiny_model, "--max_steps", 2, "--report_to", "none",
              "--per_device_train_batch_size", 4, "--save_strategy", "no"]
    env = {**ACCELERATE_CPU, "NUM_GPUS": "1", "RECIPE": str(recipe), "DATA": str(gold_teacher_file),
           "PYTHON": sys.executable}
    node0, node1 = launch_nodes(2, [[*common, "--output_dir", out[0]], [*common, "--output_dir", out[1]]], env,
                                tmp_path)

    assert "node 0 of 2 x 1 process(es) = 2" in node0.stdout and "node 1 of 2" in node1.stdout
    record = json.loads((out[0] / "distill_run.json").read_text())
    assert record["status"] == "finished"
    batch = record["counts"]["batch"]
    # Both nodes joined (one process each), and 16 rows per step = 4 per micro-batch x 2 accumulation x 2 processes
    assert (batch["world_size"], batch["micro_batch"], batch["gradient_accumulation_steps"]) == (2, 4, 2)
    assert batch["global_batch"] == batch["micro_batch"] * batch["gradient_accumulation_steps"] * 2 == 16
    assert record["args"]["script"]["global_batch_size"] == 16 and "-bs16" in record["args"]["training"]["run_name"]
    assert record["log_history"][-1]["step"] == 2
    assert (node0.stdout + node1.stdout).count("train: done") == 1 and "train: done" in node0.stdout

    # One adapter, on node 0's disk; node 1 wrote no file at all.
    assert len(list(tmp_path.rglob("adapter_config.json"))) == 1
    assert len(list(tmp_path.rglob("distill_run.json"))) == 1
    assert not [path for path in (tmp_path / "node1-disk").rglob("*") if path.is_file()]

    weights = load_file(out[0] / "adapter_model.safetensors")
    lora_b = {name: tensor for name, tensor in weights.items() if "lora_B" in name}
    assert lora_b and all(torch.isfinite(tensor).all() for tensor in weights.values())
    # PEFT initialises B to zero: a non-zero B is what two optimizer steps over both nodes wrote.
    assert max(tensor.abs().max().item() for tensor in lora_b.values()) > 0
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    before = base.model.layers[0].mlp.down_proj.weight.detach().clone()
    merged = PeftModel.from_pretrained(base, out[0]).merge_and_unload()
    assert not torch.allclose(merged.model.layers[0].mlp.down_proj.weight, before), "training moved the adapter"


def dry_run(env: dict, *flags) -> subprocess.CompletedProcess:
    """train_trl.sh with PYTHON=echo: prints the command it would run instead of training."""
    return run_cli("bash", "train_trl.sh", *flags, env={"PYTHON": "echo", **env}, timeout=60, check=False)


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "node0"}, "NODE_RANK 2 is not below NNODES 2"),
    ({"NNODES": "2", "NODE_RANK": "1"}, "MASTER_ADDR is required when NNODES > 1"),
    ({"NNODES": "two"}, "NNODES must be a whole number, got 'two'"),
    ({"NNODES": "2", "NODE_RANK": "-1", "MASTER_ADDR": "node0"}, "NODE_RANK must be a whole number"),
    ({"NNODES": "2", "NODE_RANK": "08", "MASTER_ADDR": "node0"}, "NODE_RANK must be a whole number"),
    ({"NNODES": "0"}, "NNODES must be >= 1"),
    ({"NUM_GPUS": "0"}, "NUM_GPUS must be >= 1"),
    ({"NNODES": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "70000"}, "MASTER_PORT must be a TCP port"),
])
def test_inconsistent_node_env_is_refused_before_anything_starts(env, message):
    # Empty values clear what the shell running the tests may have set (train_trl.sh reads empty as unset)
    result = dry_run({"NNODES": "", "NODE_RANK": "", "MASTER_ADDR": "", "MASTER_PORT": "", "NUM_GPUS": "", **env})
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert result.stdout == "", "nothing was launched"


def launched(stdout: str) -> list[str]:
    """The argv train_trl.sh exec'd (echoed by PYTHON=echo): its last line."""
    return stdout.strip().splitlines()[-1].split()


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_multi_node_command_counts_processes_over_all_nodes_and_passes_flags_through():
    result = dry_run({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "gpu-a", "MASTER_PORT": "29611",
                      "NUM_GPUS": "8", "RECIPE": "recipes/tinker_30b_fsdp.yaml"}, "--learning_rate", "3e-5")
    assert result.returncode == 0, result.stderr
    argv = launched(result.stdout)
    assert argv[:2] == ["-m", "accelerate.commands.launch"]
    # accelerate's --num_processes is the world size: it starts num_processes / num_machines per node
    assert {name: flag(argv, name) for name in ("--num_machines", "--machine_rank", "--main_process_ip",
                                                 "--main_process_port", "--num_processes", "--rdzv_backend")} == {
        "--num_machines": "2", "--machine_rank": "1", "--main_process_ip": "gpu-a", "--main_process_port": "29611",
        "--num_processes": "16", "--rdzv_backend": "static"}
    assert flag(argv, "--config_file") == "recipes/accelerate_fsdp.yaml"
    assert argv[argv.index("train_sft_trl.py"):] == [
        "train_sft_trl.py", "--config", "recipes/tinker_30b_fsdp.yaml", "--dataset_name", "data/teacher.jsonl",
        "--learning_rate", "3e-5"]


def test_one_node_commands_are_unchanged():
    """NNODES=1 (the default) launches exactly as before multi-node support: no machine flags."""
    several = launched(dry_run({"NUM_GPUS": "2", "NNODES": "", "MASTER_ADDR": "somewhere"}).stdout)
    assert several[:6] == ["-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate_fsdp.yaml",
                           "--num_processes", "2"]
    assert not [arg for arg in several if arg in ("--num_machines", "--machine_rank", "--main_process_ip")]
    single = launched(dry_run({"NUM_GPUS": "1", "NNODES": "", "RECIPE": "recipes/cpu.yaml"}).stdout)
    assert single[0] == "train_sft_trl.py"


STUB_SRUN = r"""#!/usr/bin/env bash
# Stub srun: records its options, then runs the command once per node of the (fake) allocation, concurrently, each
# with that node's SLURM_NODEID; fails when any task fails, as srun --kill-on-bad-exit does.
set -euo pipefail
while [[ $1 == -* ]]; do echo "$1" >> "$STUB_LOG"; shift; done
pids=()
for (( node = 0; node < SLURM_JOB_NUM_NODES; node++ )); do
  SLURM_NODEID=$node "$@" > "$STUB_DIR/task$node.out" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
"""


def test_slurm_example_gives_each_node_its_rank_and_node_0_as_master(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(STUB_SRUN)
    # scontrol show hostnames expands a node list; the stub takes a plain comma-separated one
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && tr , "\\n" <<< "$3"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    slurm = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_DIR": str(tmp_path),
             "STUB_LOG": str(tmp_path / "srun.opts"),
             "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NODELIST": "gpu-a,gpu-b", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "32", "PYTHON": "echo",
             "NNODES": "", "NODE_RANK": "", "MASTER_ADDR": "", "MASTER_PORT": "", "NUM_GPUS": ""}
    # sbatch runs a copy of the script elsewhere: run it from a directory that is not the repo
    script = tmp_path / "spool" / "slurm_script"
    script.parent.mkdir()
    script.write_text((REPO / "scripts" / "train_multinode.sbatch").read_text())
    result = subprocess.run(["bash", str(script), "--output_dir", "/shared/run", "--num_train_epochs", "1"],
                            cwd=script.parent, env={**CLI_ENV, **slurm}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 nodes x 8 GPUs, rendezvous gpu-a:24242" in result.stdout
    assert "--cpus-per-task=32" in (tmp_path / "srun.opts").read_text().split()
    for node in (0, 1):
        argv = launched((tmp_path / f"task{node}.out").read_text())
        assert (flag(argv, "--machine_rank"), flag(argv, "--main_process_ip"), flag(argv, "--main_process_port"),
                flag(argv, "--num_processes")) == (str(node), "gpu-a", "24242", "16")
        assert argv[-4:] == ["--output_dir", "/shared/run", "--num_train_epochs", "1"]
