"""The memory plan against hand counts: a tiny Qwen3-MoE (the shape of tests/test_moe.py) with LoRA r4, and the two
reference students of the GPU recipe. Everything is built on the meta device; nothing trains."""

import json
import re

import pytest

from distill.plan import GIB, REFERENCE_CONFIGS, ROUTER_PATTERN, adapted_on_meta, memory_plan, without_router

RANK, ALPHA = 4, 8
HIDDEN, HEAD_DIM, HEADS, KV_HEADS, EXPERTS, EXPERT_INTERMEDIATE, LAYERS, VOCAB = 64, 32, 2, 1, 4, 32, 2, 1000


def tiny_moe_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, moe_intermediate_size=EXPERT_INTERMEDIATE,
        num_experts=EXPERTS, num_experts_per_tok=2, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=1024, tie_word_embeddings=True,
    )


def lora(rank=RANK, alpha=ALPHA):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0)


def reference(name):
    from transformers import AutoConfig

    return AutoConfig.for_model(**REFERENCE_CONFIGS[name])


# Hand count for the tiny MoE, per layer. A LoRA on an in->out linear has r*(in+out) weights; on a fused expert
# parameter, PEFT gives each expert its own A and B, and the fused gate_up_proj (gate and up side by side) rank 2r.
QUERY_OUT, KEY_VALUE_OUT = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
ATTENTION_LORA = RANK * ((HIDDEN + QUERY_OUT) + 2 * (HIDDEN + KEY_VALUE_OUT) + (QUERY_OUT + HIDDEN))
EXPERTS_LORA = (EXPERTS * 2 * RANK * (HIDDEN + 2 * EXPERT_INTERMEDIATE)  # gate_up_proj: 64 -> 2 x 32
                + EXPERTS * RANK * (EXPERT_INTERMEDIATE + HIDDEN))  # down_proj: 32 -> 64
ROUTER_LORA = RANK * (HIDDEN + EXPERTS)  # the router is a 64 -> 4 linear map
LAYER_BASE = (HIDDEN * QUERY_OUT + 2 * HIDDEN * KEY_VALUE_OUT + QUERY_OUT * HIDDEN  # q, k, v, o
              + 2 * HEAD_DIM + 2 * HIDDEN  # q_norm, k_norm, the two layer norms
              + EXPERTS * 2 * EXPERT_INTERMEDIATE * HIDDEN + EXPERTS * HIDDEN * EXPERT_INTERMEDIATE  # experts
              + EXPERTS * HIDDEN)  # router
BASE = VOCAB * HIDDEN + LAYERS * LAYER_BASE + HIDDEN  # tied embeddings counted once, final norm


def test_trainable_and_frozen_counts_match_the_hand_count():
    plan = memory_plan(tiny_moe_config(), lora())
    assert plan.trainable_parameters == {
        "router": LAYERS * ROUTER_LORA, "experts": LAYERS * EXPERTS_LORA, "attention": LAYERS * ATTENTION_LORA,
        "mlp": 0, "embeddings": 0, "other": 0}
    assert plan.total_trainable == LAYERS * (ATTENTION_LORA + EXPERTS_LORA + ROUTER_LORA) == 15392
    assert plan.frozen_parameters == BASE == 138688


def test_fused_gate_up_proj_gets_twice_the_rank():
    # PEFT 0.21 warns that its rank_pattern `.*\.gate_up_proj` matched nothing; the parameter gets the rank anyway.
    model = adapted_on_meta(tiny_moe_config(), lora(), "bfloat16")
    ranks = {module.parameter_name: module.r["default"] for name, module in model.named_modules()
             if name.endswith("layers.0.mlp.experts") or name.endswith("layers.0.mlp.experts.base_layer")}
    assert ranks == {"gate_up_proj": 2 * RANK, "down_proj": RANK}


def test_bytes_per_gpu_follow_the_dtypes():
    plan = memory_plan(tiny_moe_config(), lora(), gpu_gib=80.0)
    adapter = plan.total_trainable * 4  # PEFT keeps LoRA weights in fp32 under a bf16 base
    assert plan.bytes_per_gpu() == {"weights": BASE * 2, "adapter": adapter, "gradients": adapter,
                                    "optimizer": 2 * adapter, "fsdp_gather": 0, "workspace": int(12.0 * GIB),
                                    "teacher": 0}  # no in-process teacher (on-policy distillation) in this plan
    assert plan.fits


def test_fsdp_divides_by_the_gpu_count_and_gathers_two_layers():
    single = memory_plan(tiny_moe_config(), lora()).bytes_per_gpu()
    sharded = memory_plan(tiny_moe_config(), lora(), num_gpus=4, sharded=True).bytes_per_gpu()
    for part in ("weights", "adapter", "gradients", "optimizer"):
        assert sharded[part] == single[part] // 4
    layer_bytes = LAYER_BASE * 2 + (ATTENTION_LORA + EXPERTS_LORA + ROUTER_LORA) * 4
    assert sharded["fsdp_gather"] == 2 * layer_bytes
    replicated = memory_plan(tiny_moe_config(), lora(), num_gpus=4, sharded=False).bytes_per_gpu()
    assert replicated == single


def test_full_fine_tuning_trains_every_weight_in_the_weight_dtype():
    plan = memory_plan(tiny_moe_config(), None, weight_dtype="bfloat16")
    assert plan.total_trainable == BASE and plan.frozen_parameters == 0
    assert plan.bytes_per_gpu()["adapter"] == BASE * 2 and plan.bytes_per_gpu()["optimizer"] == BASE * 4


def test_router_pattern_names_the_router_only():
    assert re.fullmatch(ROUTER_PATTERN, "model.layers.0.mlp.gate")
    for name in ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp"):
        assert not re.fullmatch(ROUTER_PATTERN, name)


def test_exclude_modules_cannot_freeze_the_fused_router():
    # Why without_router exists: PEFT 0.21 adds the router as a parameter target, which exclude_modules does not
    # filter. If this starts failing, LoraConfig(exclude_modules=ROUTER_PATTERN) may be enough.
    config = lora()
    config.exclude_modules = ROUTER_PATTERN
    assert memory_plan(tiny_moe_config(), config).trainable_parameters["router"] == LAYERS * ROUTER_LORA


def test_without_router_freezes_the_router_and_keeps_experts_and_attention():
    config = lora()
    frozen_router = without_router(config, tiny_moe_config())
    assert config.target_modules == "all-linear" and frozen_router is not config  # the caller's config is untouched
    plan = memory_plan(tiny_moe_config(), frozen_router)
    assert plan.trainable_parameters["router"] == 0
    assert plan.trainable_parameters["experts"] == LAYERS * EXPERTS_LORA
    assert plan.trainable_parameters["attention"] == LAYERS * ATTENTION_LORA
    assert plan.frozen_parameters == BASE


def test_without_router_trains_experts_on_a_real_model():
    import torch
    from peft import get_peft_model
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = tiny_moe_config()
    model = get_peft_model(Qwen3MoeForCausalLM(config), without_router(lora(), config))
    model(input_ids=torch.randint(0, VOCAB, (2, 8)), labels=torch.randint(0, VOCAB, (2, 8))).loss.backward()
    gradients = {name: parameter.grad for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert not any(re.fullmatch(ROUTER_PATTERN + r"\..*", name.removeprefix("base_model.model.")) for name in gradients)
    expert_b = [grad for name, grad in gradients.items() if "mlp.experts" in name and "lora_B" in name]
    assert len(expert_b) == 2 * LAYERS and all(grad.abs().sum() > 0 for grad in expert_b)


def test_without_router_leaves_a_dense_model_alone():
    config = lora()
    assert without_router(config, reference("Qwen/Qwen3-4B-Instruct-2507")) is config


def test_a_plan_that_cannot_fit_says_so_and_names_the_fixes():
    plan = memory_plan(tiny_moe_config(), lora(), gpu_gib=4.0)  # the workspace allowance alone is 4.4 GiB
    assert not plan.fits and "DOES NOT FIT" in plan.format()
    advice = plan.advice()
    for fix in ("NUM_GPUS=8 ./train_trl.sh", "recipes/accelerate_fsdp.yaml", "Qwen/Qwen3-4B-Instruct-2507",
                "--lora_target_modules q_proj k_proj v_proj o_proj", "no count up to 64 GPUs"):
        assert fix in advice


def test_plan_is_json_for_the_run_record():
    record = json.loads(json.dumps(memory_plan(tiny_moe_config(), lora()).to_dict()))
    assert record["total_trainable"] == 15392 and record["fits"] is True
    assert record["bytes_per_gpu"]["weights"] == BASE * 2


def test_the_30b_moe_needs_fsdp_and_the_4b_fits_one_gpu():
    moe = memory_plan(reference("Qwen/Qwen3-30B-A3B-Instruct-2507"), lora(32, 16))
    attention = 32 * ((2048 + 4096) + 2 * (2048 + 512) + (4096 + 2048))
    experts = 128 * 64 * (2048 + 2 * 768) + 128 * 32 * (768 + 2048)
    router = 32 * (2048 + 128)
    assert moe.total_trainable == 48 * (attention + experts + router) == 1_993_015_296
    assert moe.frozen_parameters == 30_532_122_624  # the published 30.5B
    assert not moe.fits and not moe.with_gpus(8, sharded=False).fits
    assert moe.with_gpus(8, sharded=True).fits
    assert moe.smallest_fsdp_gpu_count() == 2 and "FSDP over 2 or more GPUs" in moe.advice()

    dense = memory_plan(reference("Qwen/Qwen3-4B-Instruct-2507"), lora(32, 16))
    assert dense.total_trainable == 36 * 32 * ((2560 + 4096) + 2 * (2560 + 1024) + (4096 + 2560) + 3 * (2560 + 9728))
    assert dense.frozen_parameters == 4_022_468_096 and dense.fits


def test_weight_dtype_auto_reads_the_config_and_a_typo_is_refused():
    config = tiny_moe_config()
    config.dtype = "float32"
    assert memory_plan(config, lora(), weight_dtype="auto").bytes_per_gpu()["weights"] == BASE * 4
    with pytest.raises(ValueError, match="'bf16' is not a torch dtype"):
        memory_plan(config, lora(), weight_dtype="bf16")


# ---- --plan_only offline: the recipes' students from their stored shapes ---------------------------------------


def test_load_config_uses_the_stored_shapes_without_the_hub(tmp_path):
    from distill.plan import load_config

    config, source = load_config("Qwen/Qwen3-30B-A3B-Instruct-2507")
    assert (config.model_type, config.num_hidden_layers, config.num_experts) == ("qwen3_moe", 48, 128)
    assert "REFERENCE_CONFIGS" in source or "hub cache" in source  # the cache, where a run has filled it
    reference("Qwen/Qwen3-4B-Instruct-2507").save_pretrained(tmp_path / "local")
    config, source = load_config(str(tmp_path / "local"))
    assert config.hidden_size == 2560 and source == str(tmp_path / "local" / "config.json")


def test_train_trl_plans_the_named_recipe_offline_on_a_cpu_machine():
    from tests.conftest import run_cli

    result = run_cli("bash", "train_trl.sh", "--plan_only", "--plan_gpus", 8,
                     env={"RECIPE": "recipes/tinker_30b_fsdp.yaml", "HF_HUB_OFFLINE": "1"}, timeout=300)
    out = result.stdout
    assert "train_trl: --plan_only: recipe recipes/tinker_30b_fsdp.yaml" in out
    assert "memory plan for Qwen/Qwen3-30B-A3B-Instruct-2507 (recipes/tinker_30b_fsdp.yaml); config:" in out
    assert "8 x 80 GiB, FSDP full shard" in out and "total 25.4 -> fits" in out


@pytest.mark.skipif(__import__("shutil").which("nvidia-smi") is not None, reason="the CPU defaults of train_trl.sh")
def test_train_trl_plan_only_defaults_to_the_gpu_recipe_without_a_gpu():
    from tests.conftest import run_cli

    def launched(*flags, **env):  # PYTHON=echo: the command train_trl.sh would run
        result = run_cli("bash", "train_trl.sh", *flags, env={"PYTHON": "echo", "RECIPE": "", **env}, timeout=60)
        return result.stdout.strip().splitlines()[-1]

    assert launched("--plan_only") == ("train_sft_trl.py --config recipes/tinker.yaml --dataset_name "
                                       "data/teacher.jsonl --plan_gpus 1 --plan_only")
    # several GPUs: still one process, planning FSDP over all of them; a --plan_gpus given comes last and wins
    assert launched("--plan_only", "--plan_gpus", "16", NUM_GPUS="8").startswith(
        "train_sft_trl.py --config recipes/tinker_30b_fsdp.yaml --dataset_name data/teacher.jsonl --plan_gpus 8 "
        "--plan_only --plan_gpus 16")
    assert "--config recipes/cpu.yaml" in launched("--max_steps", "1")  # training on CPU: the CPU recipe
