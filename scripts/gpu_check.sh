#!/usr/bin/env bash
# `make gpu-check`: install what is missing, then run scripts/gpu_check.py (arguments pass through).
#
# A GPU machine usually has a CUDA build of torch already: it is kept, and only the project's other
# dependencies are installed. WHEELS=DIR installs the wheels in DIR instead, offline, for a machine
# without a package index (scripts/gpu_wheels.sh makes them elsewhere), and nothing else; without a
# CUDA torch, `pip install -e .` brings torch too (PyPI's Linux wheels of torch are CUDA builds).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
. scripts/require_python.sh
require_python gpu-check
NEEDED="import hydra, omegaconf, lightning, torchmetrics, pandas, matplotlib, tensorboard, scipy, joblib
import hydra_plugins.hydra_joblib_launcher"

# Wheels in .whl/ (scripts/gpu_wheels.sh) but no WHEELS=: a machine given them has no package index, so they
# are used rather than pip's retries against one, which would spend minutes of the window and fail. WHEELS= opts out.
if [ -z "${WHEELS+set}" ] && compgen -G ".whl/*.whl" >/dev/null && ! "$PYTHON" -c "$NEEDED" 2>/dev/null; then
    echo "gpu-check: $PYTHON lacks some of the packages gpu-check needs; installing the wheels in .whl/ (WHEELS= to skip)"
    WHEELS=.whl
fi

if [ -n "${WHEELS:-}" ]; then
    if ! compgen -G "$WHEELS/*.whl" >/dev/null; then  # else pip's "*.whl is not a valid wheel filename", exit 1
        echo "gpu-check: WHEELS=$WHEELS holds no .whl files; expected the folder scripts/gpu_wheels.sh writes" \
             "(.whl/ in the checkout), or WHEELS= to install from a package index" >&2
        exit 2
    fi
    # Offline: the wheels go into a folder of their own, first on the path, without their dependencies;
    # the image's own packages (its CUDA torch among them) stay as they are, whoever owns its environment.
    site="${TMPDIR:-/tmp}/fmnist-wheels"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PYTHON" -c "$NEEDED"; then
        echo "gpu-check: after installing $WHEELS, a package gpu-check needs is still missing (above): add its wheel" \
             "(or, where a package index is reachable, WHEELS= to install from it instead)" >&2
        exit 2
    fi
elif "$PYTHON" -c "import torch; $NEEDED" 2>/dev/null; then
    :  # everything is there (a dry run or smoke test in the project's own environment, or a prepared GPU image)
elif ! command -v nvidia-smi >/dev/null; then
    # Not a GPU machine: installing would bring PyPI's CUDA torch (gigabytes) into $PYTHON. Use the project's own.
    echo "gpu-check: $PYTHON lacks the project's packages and this machine has no NVIDIA GPU; nothing was installed." \
         "For a dry run or smoke test here: make install, then PYTHON=.venv/bin/python make gpu-check ARGS=--dry-run" >&2
    exit 2
elif ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu-check: no CUDA build of torch with a visible GPU in $PYTHON; installing the project (pip install -e .)"
    "$PYTHON" -m pip install -q -e .
elif ! "$PYTHON" -c "$NEEDED" 2>/dev/null; then
    # The project's dependencies except torch, read from pyproject.toml (one list, kept there).
    listed=$("$PYTHON" scripts/deps_without_torch.py)  # an assignment, so that set -e stops on its failure
    mapfile -t deps <<< "$listed"
    "$PYTHON" -m pip install -q "${deps[@]}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu_check.py "$@"
