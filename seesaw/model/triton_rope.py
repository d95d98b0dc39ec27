"""Rotary position embedding as one Triton launch for GPUs: every head of every token rotated by
its token's angles, in fp32, rounded once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def apply_rotation_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [num_tokens, num_heads, head_dim] by per-token cos/sin [num_tokens, head_dim] (as
    seesaw.model.rope builds them: the two halves hold the same angles); a new tensor like x."""
    _check(x, cos, sin)
    num_tokens, num_heads, head_dim = x.shape
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=x.dtype, device=x.device)  # [tokens, heads, hd]
    if num_tokens:
        _rotate_kernel[(num_tokens,)](
            x, out, cos, sin, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), num_heads,
            HALF=head_dim // 2, BLOCK_HEADS=triton.next_power_of_2(num_heads),
        )
    return out


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 3 or x.dtype not in _DTYPES or x.stride(-1) != 1:
        raise ValueError(f"x must be [num_tokens, num_heads, head_dim] of fp32/fp16/bf16 with a contiguous "
                         f"last dimension, got {tuple(x.shape)} {x.dtype}")
    head_dim = x.shape[-1]
    if head_dim % 2 or head_dim & (head_dim - 1):
        raise ValueError(f"x's head_dim must be an even power of two, got {head_dim}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (x.shape[0], head_dim) or table.stride(-1) != 1 or table.device != x.device:
            raise ValueError(f"{name} must be [{x.shape[0]}, {head_dim}] on {x.device} with a contiguous last "
                             f"dimension, got {tuple(table.shape)} on {table.device}")


@triton.jit
def _rotate_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, token_stride, head_stride, cos_stride, sin_stride,
                   num_heads, HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, HALF)
    mask = heads[:, None] < num_heads
    source = x_ptr + token * token_stride + heads[:, None] * head_stride + dims[None, :]  # [heads, half]
    first = tl.load(source, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(source + HALF, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + token * cos_stride + dims).to(tl.float32)[None, :]  # [1, half]
    sin = tl.load(sin_ptr + token * sin_stride + dims).to(tl.float32)[None, :]
    target = out_ptr + token * num_heads * 2 * HALF + heads[:, None] * 2 * HALF + dims[None, :]
    tl.store(target, (first * cos - second * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(target + HALF, (second * cos + first * sin).to(out_ptr.dtype.element_ty), mask=mask)
