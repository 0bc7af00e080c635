#!/usr/bin/env bash
# Creates .venv and installs hf_paged with its dev extras. Idempotent.
# Machines without an NVIDIA GPU get the CPU build of torch (pinned to a wheel that pip can take
# from a local wheel cache or your configured index); machines with one get the normal build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q torch
  else
    $PIP install -q "${HF_PAGED_CPU_TORCH:-torch==2.13.0}"
  fi
fi
$PIP install -q -e ".[${HF_PAGED_EXTRAS:-dev}]"
case "${HF_PAGED_EXTRAS:-dev}" in
  *dev*)
    # TGI's Python client pins huggingface-hub<1.0 (transformers 5 needs >=1): install it without
    # its pins so the server tests can drive the server with it.
    $PIP install -q aiohttp && $PIP install -q --no-deps text-generation ;;
esac
