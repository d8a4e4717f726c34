"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): shards a LoRA-wrapped tiny Qwen3 with
FSDP2, gathers its adapter with distill.checkpoint.save_gathered and writes it from rank 0, next to the adapter
tensors as they were before sharding (reference.safetensors), so the test can compare the two; then the sharded
model scores two probes into fingerprint.json (distill.fingerprint.record: every rank forwards, rank 0 writes).

    torchrun --nproc_per_node 2 tests/fsdp_save_worker.py <tiny model dir> <output dir>
"""

import sys

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill import fingerprint
from distill.checkpoint import save_gathered


def main(model_dir: str, output_dir: str):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # every rank builds the same adapter, as after a synchronised training step
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # LoRA B starts at zero: make the adapter non-trivial
    reference = {name: parameter.detach().clone() for name, parameter in model.named_parameters()
                 if parameter.requires_grad}
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = [name for name, parameter in model.named_parameters()
               if parameter.requires_grad and parameter.to_local().shape != reference[name].shape]
    assert sharded, "FSDP left every adapter tensor whole: the test would not exercise the gather"
    count = save_gathered(model, output_dir, is_main_process=rank == 0)
    probes = fingerprint.probes(AutoTokenizer.from_pretrained(model_dir), [("a", "Bonjour tout le monde", "fr"),
                                                                          ("b", "Hello there, how are you?", "en")])
    fingerprint.record(model, probes, output_dir, "cpu", is_main_process=rank == 0, peft_model=model)
    if rank == 0:
        save_file(reference, f"{output_dir}/reference.safetensors")
        print(f"saved {count} adapter tensors, {len(sharded)} of them sharded across {dist.get_world_size()} ranks")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
