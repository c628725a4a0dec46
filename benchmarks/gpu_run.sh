#!/usr/bin/env bash
# The GPU check on a lent machine (its own torch, triton and transformers; no network):
#   bash benchmarks/gpu_run.sh [gpu_check flags]     # table and log under $OUT (or /tmp/gpu-out)
# Tandem is put on PYTHONPATH through a symlinked tandem/ folder (the editable install's
# namespace finder did not resolve there, 2026-11-27); all four packages are linked, the
# check imports only engine/ and kernels/.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT" /tmp/tandem-path/tandem
touch /tmp/tandem-path/tandem/__init__.py
for d in server scheduler engine kernels; do ln -sfn "$PWD/$d" "/tmp/tandem-path/tandem/$d"; done
export PYTHONPATH="/tmp/tandem-path:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
    >"$OUT/smi.txt" 2>&1
python3 -m benchmarks.gpu_check --out "$OUT/gpu_check.md" "$@" >"$OUT/log.txt" 2>&1
rc=$?
cat "$OUT/gpu_check.md"
exit $rc
