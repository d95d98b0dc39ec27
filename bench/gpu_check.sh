#!/usr/bin/env bash
# The checks that need a GPU, as one script for the CUDA test machine (../shared/tools/GPU.md):
# the GPU tests (one-rank NCCL, engine on CUDA against transformers) and one dummy:llama3-8b
# throughput run against transformers on the same workload.
#
# Prepare here first:  ../shared/tools/device-wheels.sh pytest pytest-asyncio pluggy iniconfig
# then run it there with `.whl` carried:  bash bench/gpu_check.sh   (writes into $OUT)
set -uo pipefail
out="${OUT:-/tmp/seesaw-gpu}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$HOME/site" .whl/*.whl
export PYTHONPATH="$HOME/site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -30 | tee "$out/gpu-tests.txt"
timeout 300 python3 bench/throughput.py --backend seesaw,hf --model dummy:llama3-8b --device cuda \
  --num-prompts 256 --input-len 512 --output-len 128 --output-json "$out/llama3-8b.json" 2>&1 \
  | grep -v Warning | tail -20 | tee "$out/llama3-8b.txt"
