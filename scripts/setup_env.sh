#!/usr/bin/env bash
# Creates .venv and installs ep_megatron (editable) with the extras its tests need: dev, deepspeed, megatron,
# tb, hf. Re-running skips finished work.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=.venv/.ep_megatron_installed
want=$(cat setup.py pyproject.toml | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Keep a torch that is already there (e.g. the user's CUDA build); otherwise take the CPU build
# on machines without a GPU, so pip does not pull a multi-GB CUDA wheel.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q torch
  else
    .venv/bin/python -m pip install -q "torch==2.13.0"
  fi
fi
# The extras the test suite needs. A Megatron-Core that is already importable (e.g. a Megatron-LM git
# checkout, which installs under the name megatron-core) is kept: the [megatron] extra would replace it.
extras=dev,deepspeed,tb,hf
if .venv/bin/python -c "import megatron.core" >/dev/null 2>&1; then
  echo "setup_env: keeping the installed Megatron-Core ($(.venv/bin/python -c 'import megatron.core as m; print(m.__file__)'))"
else
  extras=$extras,megatron
fi
.venv/bin/python -m pip install -q -e ".[$extras]"
echo "$want" > "$stamp"
