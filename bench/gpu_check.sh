#!/usr/bin/env bash
# The checks that need a GPU, as one script for a machine with one CUDA device and no internet:
# the GPU tests (one-rank NCCL, the Triton kernels in bf16, the engine on CUDA against transformers,
# two steps in flight, the profiled KV pool), dummy:llama3-8b throughput against transformers with
# the floors, and the cost of a full-shard load and of 1 GiB KV swaps against pinned-memory copies;
# with `all`, also seesaw t1-t1 (every request through the host buffer) against t1. With `calibrate`,
# only the calibration of this GPU (`seesaw-cli calibrate --device cuda`), written to $OUT/profile.json.
#
# The whole script fits one 600 s device call: every stage's limit is cut to what is left of
# GPU_CHECK_BUDGET_S (560 s by default), each figure is printed as it comes, and a summary of every
# stage (its exit status and seconds) is printed at the end, or when the script is stopped.
#
# Wheels the machine lacks go in the git-ignored .whl/ first (../shared/tools/device-wheels.sh:
# pyzmq, orjson, gguf, pytest with pluggy and iniconfig, pytest-asyncio; matplotlib for `all`).
# Then run it there with `.whl` carried: bash bench/gpu_check.sh (it writes into $OUT).
set -uo pipefail
out="${OUT:-/tmp/seesaw-gpu}"
budget_s="${GPU_CHECK_BUDGET_S:-560}"
mode="${1:-}"
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
export PYTHONUNBUFFERED=1

note() { echo "$*" | tee -a "$summary"; }
left_s() { echo $((budget_s - SECONDS)); }
print_summary() { echo "== summary ($SECONDS s of $budget_s)"; cat "$summary"; }
trap print_summary EXIT
trap 'note "stopped by a signal after $SECONDS s"; exit 143' TERM INT

# stage NAME LIMIT_S FILE COMMAND...: run COMMAND within LIMIT_S (cut to the budget left), its output
# shown as it comes and kept in $out/FILE.
stage() {
  local name=$1 limit=$2 file=$3 started=$SECONDS left
  shift 3
  left=$(left_s)
  if ((left < 30)); then
    note "$name: skipped, ${left} s of the budget left"
    return
  fi
  ((limit > left - 15)) && limit=$((left - 15))
  timeout -k 10 "$limit" "$@" 2>&1 | grep --line-buffered -v Warning | tee "$out/$file"
  note "$name: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s (limit $limit s)"
}

wheels=(pyzmq orjson gguf pytest pluggy iniconfig pytest_asyncio)
missing=()
for wheel in "${wheels[@]}"; do
  compgen -G ".whl/${wheel}-*.whl" > /dev/null || missing+=("$wheel")
done
if ((${#missing[@]})); then
  note "missing wheels in .whl/: ${missing[*]} (run ../shared/tools/device-wheels.sh, then carry .whl)"
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$HOME/site" .whl/*.whl
export PYTHONPATH="$HOME/site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
if [ "$mode" = calibrate ]; then # instead of the rest, 5 to 9 minutes: this GPU's fitted profile for plan
  stage calibrate 540 calibrate.txt python3 -c 'import json, sys
from seesaw.calibrate.measure_gpu import calibrate_cuda
profile = calibrate_cuda(log=lambda line: print(line, flush=True))
open(sys.argv[1], "w").write(json.dumps(profile, indent=2))' "$out/profile.json"
  exit 0
fi
stage "GPU tests" 150 gpu-tests.txt python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
stage "llama3-8b 256 x (512 + 128), seesaw and transformers" 240 llama3-8b.txt \
  python3 bench/throughput.py --backend seesaw,hf --model dummy:llama3-8b --device cuda \
  --num-prompts 256 --input-len 512 --output-len 128 --output-json "$out/llama3-8b.json"
stage "full-shard loads and 1 GiB KV swaps" 90 reshard.txt \
  python3 bench/reshard.py --model dummy:llama3-8b --device cuda --layouts "t1;p2,t2" --kv-gb 1 --iters 3
if [ "$mode" = all ]; then # seesaw mode t1-t1 (every request through the host buffer) against t1
  stage "seesaw t1-t1 against t1" 300 seesaw.txt \
    python3 bench/throughput.py --compare t1-t1,t1 --model dummy:llama3-8b --device cuda \
    --host-buffer-gb 24 --num-prompts 256 --input-len 512 --output-len 128 --output-json "$out/seesaw.json"
fi
