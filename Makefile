# Two entry points: `make train` (set up, then the default MoE pretraining run on CPU) and `make test`.
PY := .venv/bin/python
NPROC ?= 4
CONFIG ?= configs/tiny_cpu.yaml
RUN_DIR ?= runs/tiny_cpu

.PHONY: setup train test lint

setup:
	bash scripts/setup_env.sh

train: setup
	OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu .venv/bin/torchrun --standalone --nproc_per_node $(NPROC) \
		-m ep_megatron train $(CONFIG) --run-dir $(RUN_DIR)

test: setup
	.venv/bin/ruff check .
	DS_ACCELERATOR=cpu $(PY) -m pytest -q

lint: setup
	.venv/bin/ruff check .
