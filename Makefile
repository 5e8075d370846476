# Two commands set up a fresh machine: `make train` and `make test` (each creates .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DATA ?= data
# DATA as one shell word and one Hydra value: a path with spaces, `=`, `,`, brackets, quotes, `$` or a backquote
# stays whole. Taken as written (`$(value ...)`: make expands no `$` in it) and single-quoted for the shell, which
# then expands nothing either: `DATA='x$y'` names the directory x$y, not x.
# Quoted for Hydra only where it needs it, so that a run's overrides and resume command keep `data.dir=data`.
shell_quote = '$(subst ','\'',$(1))'
DATA_RAW = $(value DATA)
DATA_ARG = $(call shell_quote,$(DATA_RAW))
comma := ,
DATA_NEEDS_QUOTES = $(or $(word 2,$(DATA_RAW)),$(foreach c,$(comma) = [ ] { } ( ) ' " `,$(findstring $(c),$(DATA_RAW))))
DATA_OVERRIDE = $(call shell_quote,data.dir=$(if $(strip $(DATA_NEEDS_QUOTES)),'$(subst ',\',$(DATA_RAW))',$(DATA_RAW)))
ARGS ?=
EXTRAS := dev,export,slurm,postgres,mlflow,wandb

.PHONY: install lock data train test test-fast test-cluster tensorboard bench gpu-check gpu-records speedrun cpu-best ablations report leaderboard docs clean

# An empty PYTHON (an unset shell variable) would make `$(PYTHON) -m venv` a recipe line `-m venv`, whose
# failure make ignores. Checked by the recipes that run it, so that `make clean` still works.
python_named = $(if $(strip $(PYTHON)),,$(error PYTHON is empty (an unset shell variable?): name a Python interpreter, or leave PYTHON out for python3))

# The tested versions of every package, for this Python if there is a lock for it (constraints/py3.X.txt).
PY_VERSION := $(if $(strip $(PYTHON)),$(shell $(PYTHON) -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null))
LOCK := constraints/py$(PY_VERSION).txt
CONSTRAINTS := $(if $(wildcard $(LOCK)),-c $(LOCK))

# uv installs what pip would, from the same lock, in half the time (parallel downloads, bytecode compiled on
# every core). It reads no pip configuration: pip's find-links (e.g. a directory holding a CPU torch wheel) is
# passed on.
UV_VERSION := 0.13.9
# A fresh machine's first install downloads about 1 GB: a slow or briefly failing package index is waited
# for and retried rather than failing `make train` / `make test` (uv's defaults: 30 s, 3 retries).
export UV_HTTP_TIMEOUT ?= 120
export UV_HTTP_RETRIES ?= 5
UV_INSTALL := $(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode \
	$(foreach links,$(PIP_FIND_LINKS),--find-links $(links))

# torch's CPU build comes from PyTorch's own index: PyPI's Linux torch is the CUDA build, with several GB of
# nvidia-* packages. Where pip's find-links (PIP_FIND_LINKS) already holds a torch 2.13.0 wheel (a machine
# without that index keeps one there), it is installed from there. `make install TORCH_INDEX=` installs PyPI's
# (the CUDA build, for a GPU machine); `TORCH_INDEX=URL` another index.
TORCH_INDEX ?= $(if $(wildcard $(addsuffix /torch-2.13.0*.whl,$(PIP_FIND_LINKS))),,https://download.pytorch.org/whl/cpu)

$(STAMP): pyproject.toml $(wildcard $(LOCK))
	$(python_named)$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --retries 5 --timeout 60 uv==$(UV_VERSION)
	# torch first, pinned, from TORCH_INDEX (above).
	$(UV_INSTALL) torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# Extras `export` (onnx, onnxscript, onnxruntime: export.py), `slurm` (the submitit launcher),
	# `postgres` (a study database's driver), `mlflow` and `wandb` (trackers), so that the tests cover them all.
	$(UV_INSTALL) -e ".[$(EXTRAS)]" $(CONSTRAINTS)
	touch $(STAMP)

install: $(STAMP)

# ARGS go to get_data.py only from `make data` itself: from `make train ARGS=...` they are train.py's.
data: $(STAMP)
	$(BIN)/python scripts/get_data.py --data-dir $(DATA_ARG) $(if $(filter data,$(MAKECMDGOALS)),$(ARGS))

train: data
	$(BIN)/python train.py $(DATA_OVERRIDE) $(ARGS)

# The suite runs on two workers per core, at most 4 (pytest-xdist). On an idle machine that changes little
# (the processes the tests start already keep the cores busy); on a machine shared with other work, the
# suite's share of the cores grows with its number of busy processes (docs/performance.md).
# `make test TEST_WORKERS=0` runs the suite in this one process.
TEST_WORKERS ?= $(shell echo $$((2 * $$(nproc))))
# Only the pytest plugin the suite uses (xdist): pytest would otherwise load every installed package's plugin
# (anyio's, Hydra's) and rewrite the asserts of those packages' modules, Hydra's among them, in each worker.
PYTEST_BASE := PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 $(BIN)/python -m pytest -p xdist.plugin -q
PYTEST := $(PYTEST_BASE) -n $(TEST_WORKERS) --maxprocesses 4 --dist worksteal

test: $(STAMP)
	$(PYTEST) -m "not cluster" $(ARGS)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not cluster" $(ARGS)

# The engines past one process: real servers the tests start on this machine (a one-node SLURM cluster and
# PostgreSQL: scripts/cluster/, root, Debian packages; an MLflow tracking server), DDP with two processes,
# the local submitit and joblib launchers' workers. One process: each of these tests fills the cores itself.
test-cluster: $(STAMP)
	$(PYTEST_BASE) -m cluster $(ARGS)

tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir outputs $(ARGS)

bench: data
	$(BIN)/python scripts/benchmark.py --data-dir $(DATA_ARG) $(ARGS)

# On a GPU machine, from a fresh clone: uses the machine's CUDA torch (see scripts/gpu_check.sh).
gpu-check:
	bash scripts/gpu_check.sh $(ARGS)

# The record recipes (speedrun_gpu, speedrun_gpu_95, best) into docs/results/gpu/records/<date>/; run again, it continues.
gpu-records:
	bash scripts/gpu_check.sh --records $(ARGS)

speedrun: data
	$(BIN)/python train.py -m experiment=speedrun_cpu $(DATA_OVERRIDE) $(ARGS)

cpu-best: data
	$(BIN)/python train.py -m experiment=cpu_best $(DATA_OVERRIDE) $(ARGS)

ablations: data
	$(BIN)/python train.py -m experiment=study preset=cpu $(DATA_OVERRIDE) $(ARGS)

# SWEEP, else the sweep directories in ARGS, else outputs/study-cpu (make ablations writes it).
report: $(STAMP)
	$(BIN)/python -m fmnist.results report $(if $(value SWEEP),$(call shell_quote,$(value SWEEP)),$(if $(strip $(ARGS)),,outputs/study-cpu)) $(ARGS)

# The leaderboard in docs/performance.md, from the committed sweeps (add yours: make leaderboard ARGS=outputs/NAME).
LEADERBOARD_SWEEPS := docs/results/cpu_best docs/results/cpu_best_half docs/results/speedrun_cpu docs/results/gpu/speedrun_gpu_95_before_ema docs/results/report docs/results/gpu/records/2026-12-04/speedrun_gpu docs/results/gpu/records/2026-12-04/speedrun_gpu_95
leaderboard: $(STAMP)
	$(BIN)/python -m fmnist.results leaderboard $(LEADERBOARD_SWEEPS) $(ARGS)

# The docs' generated tables, from the committed results (each between `<!-- generated: ... -->` markers).
docs: $(STAMP)
	$(BIN)/python scripts/render_docs.py $(ARGS)

# Rewrite the lock for this Python from a fresh environment (pip freeze, local labels such as +cpu removed).
lock:
	$(python_named)rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv && \
	.lock-venv/bin/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) && \
	.lock-venv/bin/pip install -q ".[$(EXTRAS)]" && \
	{ grep '^#' $(LOCK) 2>/dev/null; .lock-venv/bin/pip freeze | grep -v '^fmnist' | sed 's/+[A-Za-z0-9.]*$$//'; } > $(LOCK).new && \
	mv $(LOCK).new $(LOCK) && rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache
