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

quickstart: install
	$(BIN)/spheregen run experiments/quickstart.toml

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
