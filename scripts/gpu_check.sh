#!/usr/bin/env bash
# The GPU check (docs/gpu.md): on a machine with a CUDA GPU and no network, install what the project
# needs from wheels/ (brought along with the working tree) and run the tests marked `gpu` within 8 minutes.
#
#   bash scripts/gpu_check.sh        # PYTHON (default python3): the interpreter whose torch has CUDA
#                                    # EP_WHEELS (default wheels): the folder of wheels (docs/gpu.md)
#
# The machine's torch is used as it is; nothing replaces it. Missing distributions (scripts/
# gpu_requirements.txt, and scripts/gpu_optional.txt for DeepSpeed) are installed with --no-deps from
# the wheels folder into .gpu_site/ (pip when the interpreter has it, else the wheels are unpacked), so
# the system Python is not modified. The project itself is installed there too, to check that it
# installs; the tests import the working tree. Output: gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${EP_WHEELS:-wheels}
SITE=$PWD/.gpu_site
LIMIT=${EP_GPU_CHECK_SECONDS:-470}
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset DS_ACCELERATOR

"$PYTHON" - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU")
print(f"gpu_check: Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{torch.cuda.get_device_name(0)}, compute capability {torch.cuda.get_device_capability(0)}")
PY

missing() {  # the distributions of requirements file $1 that are not installed
    "$PYTHON" - "$1" <<'PY'
import importlib.metadata as metadata
import re
import sys

for line in open(sys.argv[1]):
    requirement = line.split("#")[0].strip()
    if requirement:
        try:
            metadata.version(re.split(r"[<>=!~;\[ ]", requirement)[0])
        except metadata.PackageNotFoundError:
            print(requirement)
PY
}

has_pip() { "$PYTHON" -m pip --version >/dev/null 2>&1; }

install() {  # install requirement $1 (no dependencies) from the wheels folder into $SITE
    local name=${1%%[<>=!~;]*}
    local pattern=${name//-/_}
    if has_pip; then
        "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" --no-deps --target "$SITE" "$1"
        return
    fi
    local wheel
    wheel=$(ls "$WHEELS" | grep -i "^${pattern}-[0-9].*\.whl$" | sort -V | tail -1 || true)
    [ -n "$wheel" ] || { echo "gpu_check: no wheel for $1 in $WHEELS"; return 1; }
    "$PYTHON" -m zipfile -e "$WHEELS/$wheel" "$SITE"
}

mkdir -p "$SITE"
for requirement in $(missing scripts/gpu_requirements.txt); do
    install "$requirement" || { echo "gpu_check: $requirement is missing: put its wheel in $WHEELS (docs/gpu.md)"; exit 1; }
done
for requirement in $(missing scripts/gpu_optional.txt | grep -v '^deepspeed'); do
    install "$requirement" || echo "gpu_check: optional $requirement not installed"
done
if [ -n "$(missing scripts/gpu_optional.txt | grep '^deepspeed' || true)" ]; then
    if ls "$WHEELS"/deepspeed-*.whl >/dev/null 2>&1; then
        install "deepspeed" || echo "gpu_check: DeepSpeed not installed; its test will be skipped"
    elif ls "$WHEELS"/deepspeed-*.tar.gz >/dev/null 2>&1 && has_pip; then
        # PyPI has only an sdist: build a pure-Python wheel (no CUDA ops) against this machine's torch
        DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-index --no-deps --no-build-isolation \
            -w "$SITE/_built" "$(ls "$WHEELS"/deepspeed-*.tar.gz | sort -V | tail -1)" \
            && "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "$SITE"/_built/deepspeed-*.whl \
            || echo "gpu_check: building DeepSpeed from its sdist failed; its test will be skipped"
    else
        echo "gpu_check: no DeepSpeed wheel or sdist in $WHEELS; its test will be skipped"
    fi
fi
if has_pip; then  # the project installs (offline: built with the setuptools installed above)
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-build-isolation --target "$SITE/_project" . \
        && echo "gpu_check: the project installs (into $SITE/_project)"
fi

set +e
timeout "$LIMIT" "$PYTHON" -m pytest -m gpu tests/test_gpu.py -v -rs -p no:cacheprovider 2>&1 | tee gpu_check.log
status=${PIPESTATUS[0]}
[ "$status" = 124 ] && echo "gpu_check: stopped after $LIMIT s" | tee -a gpu_check.log
exit "$status"
