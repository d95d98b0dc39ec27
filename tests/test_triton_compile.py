"""Every Triton kernel variant a GPU worker compiles, compiled ahead of time here for the GPUs the
project targets (sm_90 H100/H200, sm_80 A100, sm_89 L4) with Triton's own compiler and ptxas, no
GPU needed: each fits the architecture's shared memory per block and spills no registers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).parents[1]
# Shared memory one block may use (the opt-in maximum), per architecture.
SHARED_LIMIT_BYTES = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024}


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_aot.py"), *map(str, SHARED_LIMIT_BYTES)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, f"Triton could not compile ahead of time here:\n{result.stderr[-3000:]}"
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_every_variant_compiles_for_every_target(compiled):
    kernels = {"_attend_kernel", "_combine_kernel", "_write_kv_kernel", "_rms_norm_kernel", "_rotate_kernel",
               "_silu_mul_kernel", "_race_kernel"}
    for arch in SHARED_LIMIT_BYTES:
        assert {entry["kernel"] for entry in compiled if entry["arch"] == arch} == kernels
    per_arch = [sum(entry["arch"] == arch for entry in compiled) for arch in SHARED_LIMIT_BYTES]
    assert len(set(per_arch)) == 1 and per_arch[0] >= 4 + 4 + 6  # 4 attention, 4 combine widths, the rest


def test_each_fits_shared_memory_and_spills_nothing(compiled):
    for entry in compiled:
        where = f"{entry['kernel']} {entry['variant']} on sm_{entry['arch']}"
        assert entry["shared_bytes"] <= SHARED_LIMIT_BYTES[entry["arch"]], where
        assert entry["local_bytes"] == 0 and entry["stack_bytes"] == 0, f"{where} spills: {entry}"
        assert entry["registers"] <= 255, where
