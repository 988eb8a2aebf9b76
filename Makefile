# Two commands for a fresh machine: `make demo` and `make test` (ruff, then pytest); and the benchmarks, `make bench`
# (CPU, the cpu preset: about a quarter of an hour on 2 cores, fewer accuracy steps and seeds, its notes
# say what shrank; `make bench BENCH_FLAGS="--preset full"` the recorded sizes, about an hour and a half;
# `make bench BENCH_FLAGS=--quick` in a minute or two) and `make bench-gpu` (CUDA). All create .venv if
# missing and install the project into it first. `make test-lowest`: the floors pyproject.toml states,
# tested (a fresh .venv-lowest with the lowest allowed direct dependencies, and LOWEST_TESTS).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The torch builds our CI machines carry; installed first so that nothing else pulls another build.
TORCH  := torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo_out
BENCH_FLAGS ?=
LOWEST := .venv-lowest
# What the floors are checked by: the model with LoRA and the KV cache (transformers, peft), the shards
# (webdataset), checkpoints and resume (accelerate, safetensors), the optimizers.
LOWEST_TESTS ?= tests/test_import_graph.py tests/test_model.py tests/test_data.py tests/test_checkpoints.py \
	tests/test_optimizers.py

.PHONY: setup demo test test-lowest bench bench-gpu gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/svp demo --out $(DEMO_DIR)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# uv resolves the lowest versions of the direct dependencies itself; without it, pip installs the
# project under constraints that pin each direct dependency to its floor (tools/floor_pins.py).
test-lowest:
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install --quiet $(TORCH)
	if command -v uv >/dev/null; then \
		uv pip install --python $(LOWEST)/bin/python --resolution lowest-direct -e ".[test]" $(TORCH); \
	else \
		$(LOWEST)/bin/python tools/floor_pins.py torch torchvision > $(LOWEST)/floors.txt && \
		$(LOWEST)/bin/pip install --quiet -c $(LOWEST)/floors.txt -e ".[test]"; \
	fi
	$(LOWEST)/bin/python -m pytest -q $(LOWEST_TESTS)

bench: setup
	$(BIN)/python -m bench $(BENCH_FLAGS)

bench-gpu: setup
	$(BIN)/python -m bench --preset gpu $(BENCH_FLAGS)

# Every CUDA path in a few minutes on one GPU (bench/gpu_check.py): bench/results/gpu/check.json.
gpu-check: setup
	$(BIN)/python -m bench.gpu_check

clean:
	rm -rf $(VENV) $(LOWEST) $(DEMO_DIR) .pytest_cache
