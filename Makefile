# Two commands for a fresh machine: `make demo` and `make test` (ruff, then pytest); and the benchmarks, `make bench`
# (CPU, the cpu preset: about a quarter of an hour on 2 cores, fewer accuracy steps and seeds, its notes
# say what shrank; `make bench BENCH_FLAGS="--preset full"` the recorded sizes, about an hour and a half;
# `make bench BENCH_FLAGS=--quick` in a minute or two) and `make bench-gpu` (CUDA). All create .venv if
# missing and install the project into it first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The torch builds our CI machines carry; installed first so that nothing else pulls another build.
TORCH  := torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo_out
BENCH_FLAGS ?=

.PHONY: setup demo test bench bench-gpu gpu-check clean

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

bench: setup
	$(BIN)/python -m bench $(BENCH_FLAGS)

bench-gpu: setup
	$(BIN)/python -m bench --preset gpu $(BENCH_FLAGS)

# Every CUDA path in a few minutes on one GPU (bench/gpu_check.py): bench/results/gpu/check.json.
gpu-check: setup
	$(BIN)/python -m bench.gpu_check

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
