#!/usr/bin/env bash
# bench/gpu_check.sh's set-up rehearsed on a machine without a GPU: the wheels it requires are
# downloaded for this machine's Python (as ../shared/tools/device-wheels.sh does for the GPU's),
# then installed as the GPU machine installs them (--no-index --no-deps --target) beside a stand-in
# for that machine's own packages (this virtual environment's copies of them), and with
# nothing else the GPU run's modules import and pytest collects tests/test_gpu.py.
# Usage, from the project root: bash bench/gpu_check_rehearsal.sh (needs the package index once).
set -euo pipefail
python="${PYTHON:-.venv/bin/python}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mapfile -t wheels < <(sed -n 's/^wheels=(\(.*\))$/\1/p' bench/gpu_check.sh | tr ' ' '\n')
echo "carried: ${wheels[*]}"
"$python" -m pip download -q --no-deps --only-binary=:all: -d "$work/whl" "${wheels[@]//_/-}"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" "$work"/whl/*.whl
# The GPU machine's own packages: this environment's share of them, and nothing else.
machine="$work/machine"
"$python" bench/gpu_machine.py "$machine"
base=$("$python" -c 'import sys; print(sys.base_prefix)')/bin/python3
export PYTHONPATH="$work/site:$PWD:$machine"
"$base" -S -c 'import importlib, sys
sys.path[:0] = ["tests", "bench"]
for name in ["seesaw.worker", "seesaw.engine", "seesaw.calibrate.measure_gpu", "throughput", "reshard", "pytest_asyncio"]:
    importlib.import_module(name)
print("imports: ok")'
"$base" -S -m pytest --collect-only -q -p no:cacheprovider tests/test_gpu.py | tail -3
