#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package index, made on a machine that can.
#
#   bash scripts/gpu_wheels.sh [DIR]      # DIR (its wheels replaced) defaults to .whl/ in the checkout (git-ignored)
#   # then, on the GPU machine, with the wheels in .whl/ of its checkout:
#   WHEELS=.whl make gpu-check            # or make gpu-records
#
# A CUDA image with PyTorch usually has Lightning, torchmetrics, pandas, matplotlib, tensorboard and
# scipy, and lacks Hydra: this fetches the pure-Python packages that `make gpu-check` needs beyond those
# (Hydra, OmegaConf, ANTLR's runtime, the joblib launcher, and joblib with its cloudpickle, which every
# multirun imports and an image without scikit-learn lacks), at the versions of this Python's lock
# (constraints/), so they suit any Python 3. ANTLR's runtime 4.9.3 (OmegaConf 2.3 pins it) is published
# as source only: its wheel is built here.
set -euo pipefail
PYTHON=${PYTHON:-python3}
DIR=$(realpath -m "${1:-$(dirname "$0")/../.whl}")  # a relative DIR is where the command was run from
cd "$(dirname "$0")/.."
. scripts/require_python.sh
require_python gpu_wheels
PACKAGES=(hydra-core omegaconf antlr4-python3-runtime hydra-joblib-launcher joblib cloudpickle)

# This Python's lock, else any: the packages are pure Python, so any lock's versions suit the GPU machine.
LOCK=$("$PYTHON" -c 'import sys; print(f"constraints/py{sys.version_info[0]}.{sys.version_info[1]}.txt")')
[ -f "$LOCK" ] || LOCK=$(ls constraints/py3.*.txt | head -n 1)
pins=()
for package in "${PACKAGES[@]}"; do
    pin=$(grep -i "^${package}==" "$LOCK") || { echo "gpu_wheels: $package is not in $LOCK" >&2; exit 2; }
    pins+=("$pin")
done

mkdir -p "$DIR"
rm -f "$DIR"/*.whl  # gpu_check.sh installs every wheel in DIR: one version of each
# --no-deps: everything else they need (PyYAML, packaging) is already on such an image.
"$PYTHON" -m pip wheel -q --no-deps --wheel-dir "$DIR" "${pins[@]}"
ls -1 "$DIR"/*.whl
