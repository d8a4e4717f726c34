"""Owns the memory plan of a training run, from configs on the meta device; must not load weights.

A memory plan for training a student, computed from its config on the meta device before any weight loads.

    plan = memory_plan(AutoConfig.from_pretrained(path), peft_config, num_gpus=8, sharded=True)
    print(plan.format())
    if not plan.fits:
        sys.exit(plan.advice())

The model is built with `torch.device("meta")` and wrapped by PEFT itself, so the trainable parameters are exactly the
ones PEFT will create, its own choices included: on a transformers-5 Qwen3-MoE, `all-linear` becomes LoRA on the
attention projections plus the fused expert parameters `gate_up_proj` (at rank 2r, alpha 2*alpha, as it fuses two
projections) and `down_proj`, plus the router `mlp.gate`. `without_router` gives the config that leaves the router out.

Bytes follow from each parameter's dtype as PEFT leaves it: frozen weights in `weight_dtype`; LoRA adapters in fp32
(PEFT's autocast_adapter_dtype, which TRL keeps on outside ZeRO-3); gradients in the trainable dtype; AdamW's two
states in the trainable dtype. Full fine-tuning (peft_config None) trains every weight in `weight_dtype`.
"""

import copy
import re
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

GIB = 2**30

# The MoE router module (Qwen2/Qwen3-MoE, Mixtral in transformers 5): `...mlp.gate`, never the dense `mlp.gate_proj`.
ROUTER_PATTERN = r"(.*\.)?mlp\.gate"

# First match wins; a parameter name (PEFT's lora_A/lora_B included) matching none is "other" (norms).
PART_PATTERNS = (
    ("router", re.compile(ROUTER_PATTERN + r"\..*")),
    ("experts", re.compile(r".*\.experts\..*")),
    ("attention", re.compile(r".*\.self_attn\..*")),
    ("mlp", re.compile(r".*\.mlp\..*")),
    ("embeddings", re.compile(r"(.*\.)?(embed_tokens|lm_head)\..*")),
)
PARTS = tuple(part for part, _ in PART_PATTERNS) + ("other",)
LAYER_PATTERN = re.compile(r".*\.layers\.(\d+)\..*")

# Activations and workspace are not computed, they are allowed for: 10% of the GPU covers the caching allocator's
# fragmentation and activations that grow with the batch; 4 GiB covers the CUDA context, cuBLAS/NCCL workspaces and
# the logits of a batch over a 152k vocabulary. Our rows are short (a query and a one-word answer), so the activations
# themselves are small next to the weights.
WORKSPACE_FRACTION = 0.10
WORKSPACE_GIB = 4.0
# FSDP full shard all-gathers one layer to run it and prefetches the next one.
FSDP_UNSHARDED_LAYERS = 2
GPU_COUNTS_TO_TRY = (1, 2, 4, 8, 16, 32, 64)

# The two students of the GPU recipe, written out from their hub config.json (shapes only; no hub access needed):
# `AutoConfig.for_model(**REFERENCE_CONFIGS[name])` gives a config for memory_plan; load_config falls back to them.
REFERENCE_CONFIGS = {
    "Qwen/Qwen3-4B-Instruct-2507": dict(
        model_type="qwen3", num_hidden_layers=36, hidden_size=2560, intermediate_size=9728, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
        max_position_embeddings=262144, rms_norm_eps=1e-6, hidden_act="silu",
    ),
    "Qwen/Qwen3-30B-A3B-Instruct-2507": dict(
        model_type="qwen3_moe", num_hidden_layers=48, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
        tie_word_embeddings=False, max_position_embeddings=262144, rms_norm_eps=1e-6, hidden_act="silu",
    ),
}


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """(config, where it came from) for a model: a folder's config.json, the hub (or its cache), or for the recipes'
    students without either, the shapes stored in REFERENCE_CONFIGS. So `--plan_only` of every recipe works on a
    machine without the hub, and says which config it planned from."""
    from transformers import AutoConfig

    if name_or_path in REFERENCE_CONFIGS and not Path(name_or_path).exists():
        try:  # the hub's cache only: offline a lookup would fail, online it would only confirm the stored shapes
            config = AutoConfig.from_pretrained(name_or_path, local_files_only=True,
                                                trust_remote_code=trust_remote_code)
            return config, f"{name_or_path} (the hub cache's config.json)"
        except OSError:
            return (AutoConfig.for_model(**REFERENCE_CONFIGS[name_or_path]),
                    f"{name_or_path} (its shapes as stored in distill/plan.py REFERENCE_CONFIGS; no hub needed)")
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    where = f"{Path(name_or_path) / 'config.json'}" if Path(name_or_path).is_dir() else f"{name_or_path} (the hub)"
    return config, where


@dataclass(frozen=True)
class MemoryPlan:
    model_type: str
    num_layers: int
    method: str  # "LoRA r<r>" or "full"
    trainable_parameters: dict  # part -> count
    frozen_parameters: int
    frozen_bytes: int  # whole model, in weight_dtype
    trainable_bytes: int  # whole model, in the dtype PEFT gives the trainable parameters
    largest_layer_bytes: int  # frozen + trainable bytes of the biggest decoder layer
    num_gpus: int
    gpu_gib: float
    sharded: bool
    teacher_bytes: int = 0  # an in-process teacher's frozen weights (on-policy distillation), whole model

    @property
    def total_trainable(self) -> int:
        return sum(self.trainable_parameters.values())

    def with_gpus(self, num_gpus: int, sharded: bool) -> "MemoryPlan":
        """The same model on another GPU count: pure arithmetic, nothing is rebuilt."""
        return replace(self, num_gpus=num_gpus, sharded=sharded)

    def bytes_per_gpu(self) -> dict:
        shards = self.num_gpus if self.sharded else 1
        gather = FSDP_UNSHARDED_LAYERS * self.largest_layer_bytes if self.sharded and self.num_gpus > 1 else 0
        return {
            "weights": self.frozen_bytes // shards,
            "teacher": self.teacher_bytes // shards,
            "adapter": self.trainable_bytes // shards,
            "gradients": self.trainable_bytes // shards,
            "optimizer": 2 * self.trainable_bytes // shards,  # AdamW: exp_avg and exp_avg_sq
            "fsdp_gather": gather,
            "workspace": int((WORKSPACE_FRACTION * self.gpu_gib + WORKSPACE_GIB) * GIB),
        }

    @property
    def total_bytes_per_gpu(self) -> int:
        return sum(self.bytes_per_gpu().values())

    @property
    def fits(self) -> bool:
        return self.total_bytes_per_gpu <= self.gpu_gib * GIB

    def smallest_fsdp_gpu_count(self) -> int | None:
        """The fewest GPUs (of GPU_COUNTS_TO_TRY, this GPU size) on which FSDP full shard fits, or None."""
        return next((count for count in GPU_COUNTS_TO_TRY if self.with_gpus(count, sharded=True).fits), None)

    def to_dict(self) -> dict:
        return {**asdict(self), "total_trainable": self.total_trainable, "bytes_per_gpu": self.bytes_per_gpu(),
                "total_bytes_per_gpu": self.total_bytes_per_gpu, "fits": self.fits,
                "workspace_rule": f"{WORKSPACE_FRACTION:.0%} of the GPU + {WORKSPACE_GIB:g} GiB"}

    def format(self) -> str:
        parts = ", ".join(f"{part} {human(count)}" for part, count in self.trainable_parameters.items() if count)
        share = self.total_trainable / (self.total_trainable + self.frozen_parameters)
        layout = f"{self.num_gpus} x {self.gpu_gib:g} GiB, {'FSDP full shard' if self.sharded else 'no sharding'}"
        per_gpu = " | ".join(f"{name} {size / GIB:.1f}" for name, size in self.bytes_per_gpu().items() if size)
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return (f"memory plan: {self.model_type}, {self.num_layers} layers, {self.method}\n"
                f"  trainable: {parts}; total {human(self.total_trainable)} ({share:.2%}), "
                f"frozen {human(self.frozen_parameters)}\n"
                f"  GiB per GPU ({layout}): {per_gpu} | total {self.total_bytes_per_gpu / GIB:.1f} -> {verdict}")

    def advice(self) -> str:
        smallest = self.smallest_fsdp_gpu_count()
        more_gpus = (f"FSDP over {smallest} or more GPUs of {self.gpu_gib:g} GiB by the same arithmetic"
                     if smallest else f"no count up to {GPU_COUNTS_TO_TRY[-1]} GPUs of {self.gpu_gib:g} GiB fits")
        return (f"the plan needs {self.total_bytes_per_gpu / GIB:.1f} GiB per GPU, more than {self.gpu_gib:g} GiB. "
                f"Fixes:\n"
                f"  - more GPUs with FSDP: NUM_GPUS=8 ./train_trl.sh (recipes/accelerate_fsdp.yaml); {more_gpus}\n"
                f"  - the 4B student: --model_name_or_path Qwen/Qwen3-4B-Instruct-2507\n"
                f"  - fewer LoRA targets: --lora_target_modules q_proj k_proj v_proj o_proj")


def human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def memory_plan(model_config, peft_config, *, weight_dtype: str = "bfloat16", num_gpus: int = 1,
                gpu_gib: float = 80.0, sharded: bool = False) -> MemoryPlan:
    """The plan for `model_config` (a transformers PretrainedConfig) trained with `peft_config` (a LoraConfig, or
    None for full fine-tuning) on `num_gpus` GPUs of `gpu_gib` GiB each, sharded by FSDP or each holding it all."""
    model = adapted_on_meta(model_config, peft_config, weight_dtype)
    trainable = dict.fromkeys(PARTS, 0)
    frozen_parameters = frozen_bytes = trainable_bytes = 0
    layer_bytes = {}
    for name, parameter in model.named_parameters():
        size = parameter.numel() * parameter.element_size()
        if parameter.requires_grad:
            trainable[part_of(name)] += parameter.numel()
            trainable_bytes += size
        else:
            frozen_parameters += parameter.numel()
            frozen_bytes += size
        layer = LAYER_PATTERN.fullmatch(name)
        if layer:
            layer_bytes[layer[1]] = layer_bytes.get(layer[1], 0) + size
    return MemoryPlan(
        model_type=model_config.model_type, num_layers=model_config.num_hidden_layers,
        method=f"LoRA r{peft_config.r}" if peft_config else "full", trainable_parameters=trainable,
        frozen_parameters=frozen_parameters, frozen_bytes=frozen_bytes, trainable_bytes=trainable_bytes,
        largest_layer_bytes=max(layer_bytes.values(), default=0), num_gpus=num_gpus, gpu_gib=gpu_gib, sharded=sharded,
    )


def part_of(name: str) -> str:
    return next((part for part, pattern in PART_PATTERNS if pattern.fullmatch(name)), "other")


def adapted_on_meta(model_config, peft_config, weight_dtype: str):
    """The model on the meta device, wrapped by PEFT as training will wrap it. About a second for the 30B MoE."""
    model = model_on_meta(model_config, weight_dtype)
    return model if peft_config is None else adapted(model, peft_config)


def model_on_meta(model_config, weight_dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, dtype=torch_dtype(model_config, weight_dtype))


def torch_dtype(model_config, weight_dtype: str):
    """`auto` is the checkpoint's own dtype, as from_pretrained reads it."""
    import torch

    name = str(model_config.dtype or "float32").removeprefix("torch.") if weight_dtype == "auto" else weight_dtype
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"weight dtype {weight_dtype!r} is not a torch dtype (bfloat16, float16, float32 or auto)")
    return getattr(torch, name)


def adapted(model, peft_config):
    """get_peft_model on a copy of peft_config (PEFT edits the config it is given)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        # PEFT 0.21 checks rank_pattern keys against targeted modules only, so it calls the fused experts' pattern
        # `.*\.gate_up_proj` unmatched although the targeted parameter gets that rank (tests/test_plan.py checks it).
        warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match")
        # low_cpu_mem_usage creates the LoRA weights on meta too; without it PEFT allocates and initialises each one
        # on the CPU first (29 s instead of 0.9 s for the 30B MoE).
        return get_peft_model(model, copy.deepcopy(peft_config), low_cpu_mem_usage=True)


def without_router(peft_config, model_config):
    """A copy of `peft_config` that leaves the MoE router frozen; the config itself when the model has no router.

    PEFT's exclude_modules cannot do this: on transformers 5 the router is a parameter target (`gate.weight`, added by
    PEFT's v4->v5 conversion of `all-linear`) and exclude_modules only filters modules. So we let PEFT resolve the
    config on the meta model, then drop the targets that name the router. The result lists the targets explicitly
    (attention modules; `gate_up_proj`, `down_proj` parameters; the rank and alpha patterns of the fused experts).
    """
    model = model_on_meta(model_config, "bfloat16")
    routers = [name for name, _ in model.named_modules() if re.fullmatch(ROUTER_PATTERN, name)]
    if not routers:
        return peft_config
    router_parameters = [name for name, _ in model.named_parameters() if name.rpartition(".")[0] in routers]
    resolved = copy.deepcopy(adapted(model, peft_config).peft_config["default"])
    resolved.target_parameters = {target for target in resolved.target_parameters or ()
                                  if not any(names_target(name, target) for name in router_parameters)}
    if not isinstance(resolved.target_modules, str):
        resolved.target_modules = {target for target in resolved.target_modules or ()
                                   if not any(names_target(name, target) for name in routers)}
    return resolved


def names_target(name: str, target: str) -> bool:
    """PEFT's rule for a list entry: the full name, or a suffix of it after a dot."""
    return name == target or name.endswith("." + target)
