#!/usr/bin/env bash
# Everything this project can only check on a GPU, in one go (about 9 minutes on one H100/H200), for a session
# that is lent a GPU machine for a short time. Run from the repository root with the venv set up (`make setup`):
#
#     bash bench/gpu_check.sh [OUT_DIR]
#
# 1. The CUDA tests (tests/gpu): bf16 autocast and channels_last, gather == dense_masked on CUDA, one step of every
#    size, huge through the launcher on one GPU with DeepSpeed on NCCL, with and without activation checkpointing,
#    its measured peak memory against the dry-run plan (within 20%), a profiled run (CUDA kernels in the trace, the
#    memory snapshot, NVML's GPU metrics in MLflow).
# 2. bench/encoder_backends.py on CUDA in bf16: base, large and huge, eager (then base and huge compiled), with
#    images/s, peak memory and MFU. Targets: gather >= 1.5x dense_masked on huge, MFU >= 40%.
# Each part has its own time limit, so a slow part cannot take the others' time; everything is written to OUT_DIR
# (default: $OUT when the device tool sets it, else bench/gpu_results) for bench/RESULTS.md.
set -uo pipefail
OUT_DIR="${1:-${OUT:-bench/gpu_results}}"
mkdir -p "$OUT_DIR"
PY="${PY:-.venv/bin/python}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
status=0

part() {  # part NAME SECONDS COMMAND...: run with a limit, keep its output, remember a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$OUT_DIR/summary.txt"
  local start=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$OUT_DIR/summary.txt"
  [ "$rc" -eq 0 ] || status=1
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)"
  date -u +%Y-%m-%dT%H:%M:%SZ
} 2>&1 | tee "$OUT_DIR/machine.txt"

part cuda_tests 300 "$PY" -m pytest -q -s -p no:cacheprovider tests/gpu
part backends_eager 120 "$PY" bench/encoder_backends.py --device cuda --dtype bf16 --sizes base large huge \
  --batch 64 --repeats 10
part backends_compiled 180 "$PY" bench/encoder_backends.py --device cuda --dtype bf16 --sizes base huge \
  --batch 64 --repeats 10 --compile
echo "results in $OUT_DIR" | tee -a "$OUT_DIR/summary.txt"
exit $status
