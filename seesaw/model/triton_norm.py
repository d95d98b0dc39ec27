"""RMS normalisation in Triton for GPUs, one program per token row: alone, or fused with the residual
add before it, rounding exactly as `seesaw.model.llama.rms_norm` and torch's `hidden + update` do."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HIDDEN = 8192  # a whole row sits in one block of registers


def rms_norm_triton(
    x: torch.Tensor,  # [num_tokens, hidden], last dim contiguous
    weight: torch.Tensor,  # [hidden] in x's dtype
    eps: float,
) -> torch.Tensor:
    """`weight * (x * rsqrt(mean(x^2) + eps))`, normalised in fp32 and rounded to x's dtype before the
    weight multiplies it, as `llama.rms_norm` does. Returns a new contiguous [num_tokens, hidden]."""
    _check_rows("x", x)
    _check_weight(weight, x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, x, weight, out, out, eps, has_update=False)
    return out


def add_rms_norm_triton(
    hidden: torch.Tensor,  # [num_tokens, hidden], last dim contiguous
    update: torch.Tensor,  # [num_tokens, hidden] in hidden's dtype, last dim contiguous
    weight: torch.Tensor,  # [hidden] in hidden's dtype
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + update, rms_norm of that sum): the sum rounded to hidden's dtype once, as torch's add
    rounds it, then normalised as `rms_norm_triton` does. Both are new tensors; the inputs are untouched."""
    _check_rows("hidden", hidden)
    _check_rows("update", update)
    if update.shape != hidden.shape or update.dtype != hidden.dtype or update.device != hidden.device:
        raise ValueError(f"update must match hidden's shape {tuple(hidden.shape)}, dtype {hidden.dtype} and device "
                         f"{hidden.device}, got {tuple(update.shape)} {update.dtype} on {update.device}")
    _check_weight(weight, hidden)
    total = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    out = torch.empty_like(total)
    _launch(hidden, update, weight, total, out, eps, has_update=True)
    return total, out


def _launch(x, update, weight, total, out, eps: float, has_update: bool) -> None:
    num_tokens, size = x.shape
    if num_tokens == 0:
        return
    _rms_norm_kernel[(num_tokens,)](
        x, update, weight, total, out,
        x.stride(0), update.stride(0), total.stride(0), out.stride(0),
        size, float(eps),
        BLOCK=triton.next_power_of_2(size), HAS_UPDATE=has_update,
    )


def _check_rows(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2 or x.dtype not in _DTYPES:
        raise ValueError(f"{name} must be [num_tokens, hidden] in fp16/bf16/fp32, got {tuple(x.shape)} {x.dtype}")
    if not 0 < x.shape[1] <= _MAX_HIDDEN:
        raise ValueError(f"{name}'s hidden size must be 1 to {_MAX_HIDDEN}, got {x.shape[1]}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name}'s last dim must be contiguous, got strides {x.stride()}")


def _check_weight(weight: torch.Tensor, x: torch.Tensor) -> None:
    if weight.shape != x.shape[1:] or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must be [{x.shape[1]}] in {x.dtype} on {x.device}, "
                         f"got {tuple(weight.shape)} {weight.dtype} on {weight.device}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")


@triton.jit
def _rms_norm_kernel(
    x_ptr, update_ptr, weight_ptr, total_ptr, out_ptr,
    stride_x, stride_update, stride_total, stride_out,
    size, eps,
    BLOCK: tl.constexpr, HAS_UPDATE: tl.constexpr,
):
    """One token row: optionally add the update (rounded to the row's dtype), then normalise it."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    is_col = cols < size
    x = tl.load(x_ptr + row * stride_x + cols, mask=is_col, other=0.0)  # [BLOCK] in x's dtype
    if HAS_UPDATE:
        update = tl.load(update_ptr + row * stride_update + cols, mask=is_col, other=0.0)
        x = (x.to(tl.float32) + update.to(tl.float32)).to(x_ptr.dtype.element_ty)  # one rounding, as torch's add
        tl.store(total_ptr + row * stride_total + cols, x, mask=is_col)
    x32 = x.to(tl.float32)
    scale = tl.rsqrt(tl.sum(x32 * x32, 0) / size + eps)
    normed = (x32 * scale).to(x_ptr.dtype.element_ty)  # rounded before the weight, as the reference does
    weight = tl.load(weight_ptr + cols, mask=is_col, other=0.0)  # [BLOCK]
    out = weight.to(tl.float32) * normed.to(tl.float32)  # exact in fp32 for fp16/bf16 operands
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=is_col)
