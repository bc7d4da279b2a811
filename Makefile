# The two entry points of the README. Both create .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install quickstart test test-slow test-gpu benchmark

$(BIN)/spheregen: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch and torchvision as a matched pair first (a CUDA build that also runs on CPU)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/spheregen

install: $(BIN)/spheregen

# methods trained side by side, one job per core (at most 2), on a machine with >= 2 cores
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); if [ $$n -ge 2 ]; then echo 2; else echo 1; fi)

quickstart: install
	# --threads 1: these small models train faster on one thread than on two (the domain
	# classifier's fit in this run: 85 s at 2 threads, 52-70 s at 1 in four runs, 2026-11-29)
	$(BIN)/spheregen run experiments/quickstart.toml --jobs $(JOBS) --threads 1

test: install
	$(BIN)/pytest

test-slow: install
	$(BIN)/pytest -m slow

test-gpu: install
	$(BIN)/pytest -m gpu

benchmark: install
	$(BIN)/python benchmarks/bench_sphere_encoder.py --compile
	$(BIN)/python benchmarks/bench_sphere_encoder.py --model cifar10-base --no-train --batch 8 --quick --threads 1
	$(BIN)/python benchmarks/bench_flops.py
