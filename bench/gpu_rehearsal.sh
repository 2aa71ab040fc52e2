#!/usr/bin/env bash
# The GPU check's rehearsal, here, without a GPU: a venv shaped like the lent machine (Python 3.12, torch 2.11.0,
# torchvision 0.26.0 and the machine's other packages, nothing else), the device kit installed the way
# bench/gpu_check.sh installs it, then every part of gpu_check.sh on the CPU at tiny sizes (--cpu-rehearsal).
#
#     bash bench/gpu_rehearsal.sh [OUT_DIR]     # after `make setup`; default OUT_DIR .cache/rehearsal
#
# Needs python3.12 (PATH, or pyenv's) and PyPI; the first run downloads torch 2.11's CUDA build (~2.6 GB: PyPI has
# no CPU build of 2.11; it runs on the CPU) into .cache/rehearsal-venv (git-ignored), later runs reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-.cache/rehearsal}"
VENV=.cache/rehearsal-venv
PY312=""
for candidate in "${PYTHON312:-}" $(command -v python3.12 || true) "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
  # The first that runs (a pyenv shim on PATH fails when 3.12 is not the selected version).
  if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    PY312="$candidate"
    break
  fi
done
[ -n "$PY312" ] || { echo "rehearsal: no working python3.12 (install one, e.g. with pyenv, or set PYTHON312)" >&2; exit 2; }
if [ ! -f "$VENV/.installed" ]; then
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -U pip
  # The machine's set (its documented packages, at this project's tested versions where it pins them).
  "$VENV/bin/python" -m pip install -q torch==2.11.0 torchvision==0.26.0 timm==1.0.31 safetensors==0.8.0 \
    numpy==2.4.6 pillow==13.0.0 pyyaml==6.0.4 fsspec==2026.9.0 psutil==7.2.2 nvidia-ml-py==13.615.71 pytest==9.2.0
  touch "$VENV/.installed"
fi
[ -d .cache/gpu_kit/wheels ] || bash bench/gpu_kit.sh
rm -rf "$OUT_DIR"
PY="$VENV/bin/python" bash bench/gpu_check.sh --cpu-rehearsal "$OUT_DIR"
