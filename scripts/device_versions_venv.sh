#!/usr/bin/env bash
# A venv with the lent GPU machine's versions, to check the tree against them on CPU before a device run.
#   usage: scripts/device_versions_venv.sh VENV [full]
# The device image (the device tool's KINDS.md) has Python 3.12, torch 2.11.0, transformers 5.17.0,
# triton 3.6.0 and numpy 2.5.2, and no xgrammar, gguf, FastAPI or Gradio. The plain venv mirrors that
# (what benchmarks/gpu_check.sh needs), so a missing lazy import shows up in its DRY_RUN:
#   DRY_RUN=1 PYTHON=VENV/bin/python bash benchmarks/gpu_check.sh DIR
#   env -u TRITON_INTERPRET PYTHONPATH=. VENV/bin/python benchmarks/compile_check.py --arch 90
# `full` adds the rest of the dev extras at the same pins, for the whole suite:
#   PYTHONPATH=. VENV/bin/python -m pytest -q tests/
# numpy is 2.3.x here, not the device's 2.5.2: Triton 3.6's interpreter (the CPU stand-in for the GPU)
# fails on numpy >= 2.4 ("only 0-dimensional arrays can be converted to Python scalars", a kernel's
# range() over loaded bounds). On the device the kernels are compiled, not interpreted.
# torch 2.11.0 comes as the CUDA build (several GB); it runs on the CPU.
set -euo pipefail
VENV="${1:?usage: scripts/device_versions_venv.sh VENV [full]}"
PY312="${PYTHON312:-python3.12}"
[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
PINS="$(mktemp)"
trap 'rm -f "$PINS"' EXIT
printf '%s\n' torch==2.11.0 transformers==5.17.0 triton==3.6.0 numpy==2.3.5 accelerate==1.15.0 \
    safetensors==0.8.0 tokenizers==0.23.2 huggingface_hub==1.33.0 > "$PINS"
# What the image holds of the packages gpu_check.sh and the tests it runs import.
$PIP install -q -c "$PINS" torch transformers triton numpy accelerate safetensors tokenizers huggingface_hub \
    peft pytest pytest-timeout pytest-xdist hypothesis prometheus-client psutil ninja httpx
if [ "${2:-}" = full ]; then
    $PIP install -q -c "$PINS" gguf tqdm xgrammar "fastapi>=0.110" "uvicorn>=0.29" "pydantic>=2" "gradio>=6" \
        "schemathesis>=4.0" "jsonschema>=4" "ray[serve]>=2.40" "openai>=1.40" "selenium>=4.20" aiohttp
    $PIP install -q --no-deps text-generation
fi
"$VENV/bin/python" -c "import torch, transformers, triton, numpy; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
