#!/usr/bin/env bash
# Everything this project can only check on a GPU, in one go, for a lent GPU machine that reaches no registry:
#
#     bash bench/gpu_check.sh [--cpu-rehearsal] [OUT_DIR]
#
# On the machine: its own Python (/opt/torch/.venv/bin/python3, torch 2.11 + CUDA) with the device kit carried
# beside the tree (.cache/gpu_kit, made here by bench/gpu_kit.sh) installed by `pip install --no-index --no-deps
# --target`. Parts, by value, each with its own limit (460 s in all, under the lease's 8 minutes), each writing
# OUT_DIR/<part>.txt and its row of OUT_DIR/table.txt as it finishes, so a run cut short still returns what it
# measured:
#   1. steps     one bf16 channels_last FCMAE step of every size; gather == dense_masked on CUDA in bf16
#   2. huge      huge_fcmae through the launcher on one GPU (DeepSpeed on NCCL, ZeRO-2), with and without
#                activation checkpointing: measured peak memory against the dry-run plan (within 20%)
#   3. backends  bench/encoder_backends.py in bf16 on base/large/huge: images/s, peak memory, MFU (goal >= 40%)
#   4. profile   a profiled run: CUDA kernels in the trace, the memory snapshot, NVML's GPU metrics in MLflow
#   5. compile   the backends compiled (base, huge)
# --cpu-rehearsal runs the same commands on the CPU at tiny sizes (bench/gpu_rehearsal.sh does it in a venv shaped
# like the machine), plus the CPU tests of what the check touches (part compat): what it proves is that the kit,
# the machine's torch and every code path work before a GPU's minutes are spent.
# The table at the end is the whole report; OUT_DIR defaults to $OUT (the device tool's) or bench/gpu_results.
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSAL=0
if [ "${1:-}" = "--cpu-rehearsal" ]; then REHEARSAL=1; shift; fi
OUT_DIR="$(mkdir -p "${1:-${OUT:-bench/gpu_results}}" && cd "${1:-${OUT:-bench/gpu_results}}" && pwd)"
if [ -z "${PY:-}" ]; then
  if [ -x /opt/torch/.venv/bin/python3 ]; then PY=/opt/torch/.venv/bin/python3; else PY=.venv/bin/python; fi
fi
KIT="${KIT:-.cache/gpu_kit}"
WORK="$(mktemp -d)"  # outside OUT_DIR: the installed kit and builds are not results
SITE="$WORK/kit"
# Its own build directory: another torch's builds (and their lock files) must not be picked up or waited on.
export TORCH_EXTENSIONS_DIR="$WORK/torch_extensions"
export MLFLOW_TRACKING_URI="file://$OUT_DIR/mlruns" MLFLOW_ALLOW_FILE_STORE=true  # the kit's client has no sqlite
status=0
: > "$OUT_DIR/table.txt"

if [ -d "$KIT/wheels" ]; then
  if "$PY" -m pip --version > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$KIT"/wheels/*.whl > "$OUT_DIR/kit.txt" 2>&1 \
      || { echo "kit install failed: $(tail -3 "$OUT_DIR/kit.txt")"; exit 1; }
  else  # no pip in the machine's venv: a wheel is a zip of its site-packages tree
    for wheel in "$KIT"/wheels/*.whl; do "$PY" -m zipfile -e "$wheel" "$SITE"; done
  fi
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no kit at $KIT: using $PY's own packages"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
LIMIT_SCALE=1
if [ "$REHEARSAL" = 1 ]; then
  LIMIT_SCALE=4  # two CPU cores compile and run what one GPU does in the limit
  export GPU_CHECK_DEVICE=cpu DS_ACCELERATOR=cpu
  DEV=(--device cpu --sizes atto --batch 2 --image-size 64 --repeats 1)
  DEV_COMPILED=(--device cpu --sizes atto --batch 2 --image-size 64 --repeats 1)
else
  DEV=(--device cuda --sizes base large huge --batch 64 --repeats 10)
  DEV_COMPILED=(--device cuda --sizes base huge --batch 64 --repeats 10)
fi
{
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)"
  date -u +%Y-%m-%dT%H:%M:%SZ
} > "$OUT_DIR/machine.txt" 2>&1

part() {  # part NAME SECONDS COMMAND...: run under a limit, keep the output, add the part's row to the table
  local name=$1 limit=$(($2 * LIMIT_SCALE))
  shift 2
  local start=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT_DIR/$name.txt" 2>&1
  local rc=$?
  local result  # pytest's summary and the memory lines, or the bench's rows as "size variant images/s MFU"
  result=$( { grep -E "GiB, plan|[0-9]+ (passed|failed)|error" "$OUT_DIR/$name.txt" | tail -3
             awk -F'|' '$3 ~ /gather|dense_masked|unmasked_dense/ {gsub(/ /, "", $2); gsub(/ /, "", $3);
               printf "%s %s %s img/s MFU %s\n", $2, $3, $5, $8}' "$OUT_DIR/$name.txt"; } \
           | tr -s ' ' | paste -sd ';' | cut -c1-300)
  [ "$rc" -eq 124 ] && result="cut at ${limit}s; $result"
  printf '%-9s %-4s %4ss  %s\n' "$name" "$([ "$rc" -eq 0 ] && echo ok || echo "rc=$rc")" "$((SECONDS - start))" \
    "$result" >> "$OUT_DIR/table.txt"
  [ "$rc" -eq 0 ] || status=1
}

PYTEST=("$PY" -m pytest -q -s -p no:cacheprovider tests/gpu/test_cuda.py)
echo "gpu check: $PY, kit $KIT, results in $OUT_DIR; parts limited to $((460 * LIMIT_SCALE))s in all"
if [ "$REHEARSAL" = 1 ]; then  # the CPU tests of what gpu_check touches, on the machine's torch (flop formula,
  # v2 transforms, compile, the models)
  part compat 60 "$PY" -m pytest -q -p no:cacheprovider tests/trainer/test_metrics.py tests/data/test_transforms.py \
    tests/models/test_compile.py tests/models/test_convnextv2.py
fi
part steps 90 "${PYTEST[@]}" -k "gather_equals or every_size"
part huge 150 "${PYTEST[@]}" -k "huge"
part backends 80 "$PY" bench/encoder_backends.py "${DEV[@]}" --dtype bf16
part profile 50 "${PYTEST[@]}" -k "profile"
part compile 90 "$PY" bench/encoder_backends.py "${DEV_COMPILED[@]}" --dtype bf16 --compile

echo "part      exit  time  result ($(head -2 "$OUT_DIR/machine.txt" | paste -sd ' '))"
cat "$OUT_DIR/table.txt"
echo "details in $OUT_DIR"
exit $status
