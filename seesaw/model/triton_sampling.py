"""Sampling's random draw in Triton for GPUs: every row of a step in one launch.

Each row draws from its probabilities by an exponential race, argmax(p / E) with E ~ Exp(1) per
token, where E comes from a counter-based generator (Philox) keyed by the row's own key and counted
by the token's index: a row's draw depends on its key alone, never on the rows beside it, and no
noise tensor is written (the race keeps only each row's best token).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COLUMNS = 1024  # vocabulary entries per loop iteration


def exponential_race_triton(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` ([rows, vocab] float32, rows summing to 1), raced with noise
    keyed by `keys` ([rows] int64): the same key and probabilities give the same token. [rows] int64."""
    if probs.dim() != 2 or probs.dtype != torch.float32 or probs.stride(1) != 1:
        raise ValueError(f"probs must be [rows, vocab] float32 with a contiguous last dim, got "
                         f"{tuple(probs.shape)} {probs.dtype}")
    if keys.shape != probs.shape[:1] or keys.dtype != torch.int64:
        raise ValueError(f"keys must be [rows] int64 for {probs.shape[0]} rows, got {tuple(keys.shape)} {keys.dtype}")
    rows, vocab = probs.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=probs.device)  # [rows]
    if rows:
        _race_kernel[(rows,)](probs, keys, tokens, probs.stride(0), vocab, COLUMNS=_COLUMNS)
    return tokens


@triton.jit
def _race_kernel(probs_ptr, keys_ptr, tokens_ptr, stride_row, vocab, COLUMNS: tl.constexpr):
    """One row: the token with the largest p / E over the vocabulary, E = -log(u) for u uniform in
    (0, 1) from 24 random bits (never 0 or 1, so E is finite and positive)."""
    row = tl.program_id(0).to(tl.int64)
    key = tl.load(keys_ptr + row)
    best = tl.full((), -1.0, tl.float32)
    best_token = tl.full((), 0, tl.int64)
    for first in range(0, vocab, COLUMNS):
        columns = first + tl.arange(0, COLUMNS)
        is_token = columns < vocab
        p = tl.load(probs_ptr + row * stride_row + columns, mask=is_token, other=0.0)
        bits = tl.randint(key, columns)  # [COLUMNS] uint32, counted by the token's index
        uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        ratio = tl.where(is_token, p / -tl.log(uniform), -1.0)
        chunk_best = tl.max(ratio, 0)
        chunk_token = (first + tl.argmax(ratio, 0)).to(tl.int64)
        is_better = chunk_best > best  # ties keep the earlier token, as torch's argmax does
        best_token = tl.where(is_better, chunk_token, best_token)
        best = tl.where(is_better, chunk_best, best)
    tl.store(tokens_ptr + row, best_token)
