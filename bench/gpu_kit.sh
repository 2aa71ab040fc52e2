#!/usr/bin/env bash
# The device kit: the wheels bench/gpu_check.sh installs on the lent GPU machine, which reaches no registry.
#
#     bash bench/gpu_kit.sh [KIT_DIR]       # default .cache/gpu_kit (git-ignored); needs `make setup` first
#
# Fetches every wheel named in bench/gpu_kit.txt for CPython 3.12 manylinux x86_64 (no dependencies: the list is the
# closure), builds deepspeed's sdist into a pure-Python wheel with this venv's torch (no prebuilt ops: DeepSpeed
# compiles what it needs on the device), writes KIT_DIR/VERSIONS.txt and checks the kit stays under 40 MiB.
# Carry it with the device tool (`carry: [".cache/gpu_kit"]`); gpu_check.sh installs it with
# `pip install --no-index --no-deps --target`.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT="${1:-.cache/gpu_kit}"
PY="${PY:-.venv/bin/python}"
LIMIT_MIB=40
rm -rf "$KIT" && mkdir -p "$KIT/wheels"
mapfile -t PINS < <(grep -v '^\s*#' bench/gpu_kit.txt | grep -v '^\s*$')
for pin in "${PINS[@]}"; do
  if [ "${pin%%==*}" = deepspeed ]; then
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --wheel-dir "$KIT/wheels" "$pin"
  else
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d "$KIT/wheels" "$pin" 2>&1 | grep -v "is ignored" || true
  fi
done
count=$(ls "$KIT/wheels" | wc -l)
[ "$count" -eq "${#PINS[@]}" ] || { echo "kit: $count wheels for ${#PINS[@]} pins" >&2; ls "$KIT/wheels" >&2; exit 1; }
(cd "$KIT/wheels" && ls) > "$KIT/VERSIONS.txt"
bytes=$(du -sb "$KIT" | cut -f1)
echo "kit: $count wheels, $((bytes / 1048576)) MiB in $KIT (limit $LIMIT_MIB MiB); versions in $KIT/VERSIONS.txt"
[ "$bytes" -lt $((LIMIT_MIB * 1048576)) ] || { echo "kit: over $LIMIT_MIB MiB" >&2; exit 1; }
