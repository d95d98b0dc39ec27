"""The MLP's activation in Triton for GPUs: silu(gate) * up in one launch, rounding as torch's
`F.silu(gate) * up` does (silu rounded to the input's dtype, then the product rounded)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_COLUMNS = 1024  # columns per program


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * ffn], gate first
    """silu(gate) * up: a new contiguous [num_tokens, ffn] in gate_up's dtype."""
    if gate_up.dim() != 2 or gate_up.dtype not in _DTYPES or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must be [num_tokens, 2 * ffn] in fp16/bf16/fp32 with a contiguous last dim, "
                         f"got {tuple(gate_up.shape)} {gate_up.dtype}")
    num_tokens, width = gate_up.shape
    ffn = width // 2
    out = torch.empty(num_tokens, ffn, dtype=gate_up.dtype, device=gate_up.device)  # [num_tokens, ffn]
    if num_tokens:
        _silu_mul_kernel[(num_tokens, triton.cdiv(ffn, _COLUMNS))](
            gate_up, out, gate_up.stride(0), out.stride(0), ffn, COLUMNS=_COLUMNS)
    return out


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, ffn, COLUMNS: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1) * COLUMNS + tl.arange(0, COLUMNS)
    is_column = columns < ffn
    gate = tl.load(gate_up_ptr + token * stride_in + columns, mask=is_column, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + token * stride_in + ffn + columns, mask=is_column, other=0.0).to(tl.float32)
    activated = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + token * stride_out + columns, (activated * up).to(out_ptr.dtype.element_ty), mask=is_column)
