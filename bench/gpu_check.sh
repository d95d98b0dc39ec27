#!/usr/bin/env bash
# The checks that need a GPU, as one script for a machine with one CUDA device and no internet:
# the GPU tests (one-rank NCCL, the Triton kernels in bf16, the engine on CUDA against transformers,
# two steps in flight, the profiled KV pool), dummy:llama3-8b throughput against transformers with
# the floors, and the cost of a full-shard load and of 1 GiB KV swaps against pinned-memory copies;
# with `all`, also seesaw t1-t1 (every request through the host buffer) against t1. With `calibrate`,
# only the calibration of this GPU (`seesaw-cli calibrate --device cuda`), written to $OUT/profile.json.
#
# Wheels the machine lacks go in the git-ignored .whl/ first (pyzmq, orjson, gguf, pytest and
# its plugins, matplotlib).
# Then run it there with `.whl` carried: bash bench/gpu_check.sh (it writes into $OUT).
set -uo pipefail
out="${OUT:-/tmp/seesaw-gpu}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$HOME/site" .whl/*.whl
export PYTHONPATH="$HOME/site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
if [ "${1:-}" = calibrate ]; then  # instead of the rest, 5 to 9 minutes: this GPU's fitted profile for plan
  timeout 560 python3 -c 'import json, sys
from seesaw.sim.measure_gpu import calibrate_cuda
profile = calibrate_cuda(log=lambda line: print(line, flush=True))
open(sys.argv[1], "w").write(json.dumps(profile, indent=2))' "$out/profile.json" 2>&1 | tail -20 | tee "$out/calibrate.txt"
  exit 0
fi
# About 8 minutes in all, within one device call: the tests, the throughput run, then copies.
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -30 | tee "$out/gpu-tests.txt"
timeout 240 python3 bench/throughput.py --backend seesaw,hf --model dummy:llama3-8b --device cuda \
  --num-prompts 256 --input-len 512 --output-len 128 --output-json "$out/llama3-8b.json" 2>&1 \
  | grep -v Warning | tail -20 | tee "$out/llama3-8b.txt"
timeout 90 python3 bench/reshard.py --model dummy:llama3-8b --device cuda --layouts "t1;p2,t2" --kv-gb 1 2>&1 \
  | tail -20 | tee "$out/reshard.txt"
if [ "${1:-}" = all ]; then  # seesaw mode t1-t1 (every request through the host buffer) against t1
  timeout 300 python3 bench/throughput.py --compare t1-t1,t1 --model dummy:llama3-8b --device cuda \
    --host-buffer-gb 24 --num-prompts 256 --input-len 512 --output-len 128 --output-json "$out/seesaw.json" 2>&1 \
    | grep -v Warning | tail -20 | tee "$out/seesaw.txt"
fi
