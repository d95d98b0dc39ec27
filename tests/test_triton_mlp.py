"""The MLP's activation kernel, run by Triton's CPU interpreter, rounds as torch does."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is first imported: run the kernels on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests; tests/test_gpu.py runs on the GPU")
pytest.importorskip("triton")

from seesaw.model.llama import silu_mul  # noqa: E402
from seesaw.model.triton_mlp import silu_mul_triton  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_matches_torch(dtype):
    # 1,100 columns: one full program of 1,024 and a masked remainder.
    gate_up = (torch.randn(5, 2 * 1100, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    torch.testing.assert_close(silu_mul_triton(gate_up), silu_mul(gate_up), rtol=1e-3 if dtype != torch.float32 else 1e-6,
                               atol=1e-3 if dtype != torch.float32 else 1e-6)


def test_a_strided_or_odd_input_is_refused():
    with pytest.raises(ValueError, match="gate_up must be"):
        silu_mul_triton(torch.randn(4, 7))
    with pytest.raises(ValueError, match="gate_up must be"):
        silu_mul_triton(torch.randn(8, 4).t())
