# The two commands of the README:
#   make demo   set up .venv and run the local pipeline on real data
#   make test   set up .venv and run lint, types and the whole test suite
# Set-up is idempotent: a second run only checks a stamp file.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
MINKOWSKI := $(VENV)/.minkowski
PIP     := $(BIN)/python -m pip --disable-pip-version-check -q
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

FMNIST_DIR := /usr/share/datasets/fashion-mnist
DEMO_DATA  := runs/data/fashion-mnist-64
DET_DATA   := runs/data/fmnist-det
DEMO_SETS  := $(DEMO_DATA)/train/manifest.json $(DEMO_DATA)/test/manifest.json \
              $(DEMO_DATA)/knn-train/manifest.json $(DEMO_DATA)/knn-test/manifest.json \
              $(DET_DATA)/train/manifest.json $(DET_DATA)/val/manifest.json

.PHONY: setup system-deps demo demo-continue test lint typecheck pytest bench minkowski gpu-kit gpu-rehearsal clean

setup: $(STAMP) system-deps

# Real data for the demo and the tests: Debian's Fashion-MNIST package (needs root; skipped tests say so).
system-deps:
	@if [ ! -d $(FMNIST_DIR) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo ">> installing dataset-fashion-mnist"; apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "!! Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist"; fi; \
	fi

$(STAMP): pyproject.toml constraints.txt
	@echo ">> creating $(VENV) with the pinned stack (constraints.txt)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -U pip setuptools wheel
	# torch first and pinned: deepspeed's sdist would otherwise pull another torch.
	$(PIP) install -c constraints.txt torch torchvision
	$(PIP) install -c constraints.txt --no-build-isolation deepspeed
	$(PIP) install -c constraints.txt -e '.[dev]'
	$(BIN)/python -c "import torch, torchvision, timm, deepspeed; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'deepspeed', deepspeed.__version__)"
	touch $@

# MinkowskiEngine 0.5.4 built CPU-only into the venv (~6 min once, then a stamp): the `minkowski` encoder backend's
# equality tests run in `make test`, not only on machines where someone built it by hand.
$(MINKOWSKI): $(STAMP) .ci/install_minkowski.sh
	bash .ci/install_minkowski.sh
	touch $@

# Real data for the demo: Fashion-MNIST at 64 px (train 60k, test 10k) and a detection set of Fashion-MNIST
# items on 128-px canvases (COCO format, then shards).
$(DEMO_DATA)/%/manifest.json: | setup
	$(BIN)/python -m data.write_shards --source fashion-mnist --split $* --image-size 64 \
	    --samples-per-shard 5000 --output $(DEMO_DATA)/$* --overwrite --quiet

# The pretraining probes' sets: the first 500 training images (the kNN bank) and 500 test images (the queries).
$(DEMO_DATA)/knn-%/manifest.json: | setup
	$(BIN)/python -m data.write_shards --source fashion-mnist --split $* --image-size 64 --limit 500 \
	    --samples-per-shard 500 --output $(DEMO_DATA)/knn-$* --overwrite --quiet

$(DET_DATA)/%/manifest.json: | setup
	$(BIN)/python -m data.fmnist_detection --split $* --images $(if $(filter train,$*),2000,200) \
	    --output $(DET_DATA)/coco-$*
	$(BIN)/python -m data.write_shards --source coco --input $(DET_DATA)/coco-$*/annotations.json \
	    --samples-per-shard 500 --output $(DET_DATA)/$* --overwrite --quiet

# The pipeline on real data: FCMAE pretraining -> fine-tuning -> Mask R-CNN transfer, each stage reading the
# previous one's export; one MLflow store for the three runs; a summary table at the end.
demo: setup $(DEMO_SETS)
	MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/runs/mlflow.db $(BIN)/python cluster/launch.py --local \
	    --config demo_fcmae --chain demo_finetune --chain demo_maskrcnn --payoff demo_linprobe

# The quick start's continuation (after `make demo`): the demo's FCMAE export continued on another set, the
# detection demo's canvases, with the kNN probe at its start and its end; the same MLflow store.
demo-continue: setup $(DEMO_SETS)
	MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/runs/mlflow.db $(BIN)/python cluster/launch.py --local \
	    --config demo_fcmae_continue

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: setup
	$(BIN)/mypy

# Two pytest-xdist workers: the end-to-end tests leave a core idle about half the time (waiting on their runs,
# SLURM, signals); the real SLURM's tests share one worker (xdist_group). TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
pytest: setup $(MINKOWSKI)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python bench/encoder_backends.py

minkowski: $(MINKOWSKI)

# The device kit for a lent GPU machine (.cache/gpu_kit, ~15 MiB), and its rehearsal here on the CPU in a venv shaped
# like that machine (Python 3.12, torch 2.11.0; ~2.6 GB downloaded once): bench/gpu_check.sh --cpu-rehearsal.
gpu-kit: $(STAMP)
	bash bench/gpu_kit.sh

gpu-rehearsal: gpu-kit
	bash bench/gpu_rehearsal.sh

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
