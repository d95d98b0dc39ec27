"""Rotary position embeddings, with the linear and Llama 3 frequency scalings."""

from __future__ import annotations

import math

import torch

from seesaw.model.spec import RopeSpec


def inverse_frequencies(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """Per-pair rotation frequencies, float32: [head_dim // 2]."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        return _llama3_scaled(inv_freq, rope)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, and the band between the two
    # cut-offs interpolates smoothly between both.
    wavelength = 2 * math.pi / inv_freq
    long_cutoff = rope.original_max_position / rope.low_freq_factor
    short_cutoff = rope.original_max_position / rope.high_freq_factor
    scaled = torch.where(wavelength > long_cutoff, inv_freq / rope.factor, inv_freq)
    blend = (rope.original_max_position / wavelength - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - blend) * scaled / rope.factor + blend * scaled
    is_between = (wavelength >= short_cutoff) & (wavelength <= long_cutoff)
    return torch.where(is_between, smoothed, scaled)


def rotation(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for each position: two [num_tokens, head_dim] tensors of `dtype`."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [num_tokens, head_dim // 2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [num_tokens, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [num_tokens, num_heads, head_dim] by per-token cos/sin: [num_tokens, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
