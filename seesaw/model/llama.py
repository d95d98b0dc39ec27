"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) built for one shard of a layout.

The layers hold only their shard's weights: query/key/value and gate/up are column-parallel
(this shard's heads and MLP columns), output and down projections are row-parallel, and their
partial sums meet in `reduce`, an all-reduce over the tensor-parallel group (identity at t1).

Every weight is laid out so that a shard's slice of it is a run of whole rows: the row-parallel
output and down projections are held transposed ([inputs, outputs]), so copying a shard in from
a layout-neutral store is a handful of contiguous copies. Tensors come from `allocate`, so a
worker can lay several layouts' shards over one block of memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seesaw.layout import Shard
from seesaw.model.attention import AttentionBatch, paged_attention
from seesaw.model.rope import apply_rotation
from seesaw.model.spec import ModelSpec

Reduce = Callable[[torch.Tensor], torch.Tensor]
Allocate = Callable[..., torch.Tensor]  # allocate(*shape) -> an uninitialised tensor of the model's dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square normalisation computed in float32, as the reference implementation does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(hidden: torch.Tensor, update: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + update, its rms_norm): the residual step and the next norm, which a GPU fuses."""
    hidden = hidden + update
    return hidden, rms_norm(hidden, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [num_tokens, 2 * ffn] (gate first): [num_tokens, ffn]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass(frozen=True)
class LayerKernels:
    """The norms, the rotation and the MLP's activation a forward pass calls: torch here, Triton
    kernels on GPUs (the same results, up to rounding)."""

    norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = rms_norm
    add_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = add_rms_norm
    rotate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = apply_rotation
    silu_mul: Callable[[torch.Tensor], torch.Tensor] = silu_mul


class DecoderLayer:
    """One transformer block's shard: fused qkv and gate/up weights, paged attention."""

    def __init__(self, spec: ModelSpec, shard: Shard, allocate: Allocate, kernels: LayerKernels = LayerKernels()):
        self.kernels = kernels
        self.num_heads = shard.heads.size
        self.num_kv_heads = shard.kv_heads.size
        self.head_dim = spec.head_dim
        self.eps = spec.rms_norm_eps
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_sizes = (q_size, kv_size, kv_size)
        self.input_norm = allocate(spec.hidden_size)
        self.qkv = allocate(q_size + 2 * kv_size, spec.hidden_size)
        self.qkv_bias = allocate(q_size + 2 * kv_size) if spec.qkv_bias else None
        self.o_proj_t = allocate(q_size, spec.hidden_size)  # transposed: [this shard's heads, hidden]
        # A row-parallel bias is added once, after the all-reduce, by tensor-parallel rank 0.
        self.o_bias = allocate(spec.hidden_size) if spec.o_bias and shard.tp_rank == 0 else None
        self.post_attention_norm = allocate(spec.hidden_size)
        self.gate_up = allocate(2 * shard.ffn.size, spec.hidden_size)
        self.down_t = allocate(shard.ffn.size, spec.hidden_size)  # transposed: [this shard's columns, hidden]

    def __call__(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden]: the residual stream
        update: torch.Tensor | None,  # [num_tokens, hidden]: the layer before's MLP output, not yet added
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, kv_heads, block_size, head_dim]
        v_cache: torch.Tensor,
        batch: AttentionBatch,
        reduce: Reduce,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream, this layer's MLP output): the caller adds the output, fused with the next norm."""
        num_tokens = hidden.shape[0]
        if update is None:
            x = self.kernels.norm(hidden, self.input_norm, self.eps)
        else:
            hidden, x = self.kernels.add_norm(hidden, update, self.input_norm, self.eps)
        qkv = F.linear(x, self.qkv, self.qkv_bias)  # [num_tokens, (heads + 2 * kv_heads) * head_dim]
        heads = qkv.view(num_tokens, -1, self.head_dim)  # [num_tokens, heads + 2 * kv_heads, head_dim]
        rotated = self.kernels.rotate(heads[:, : self.num_heads + self.num_kv_heads], cos, sin)  # q and k at once
        q, k = rotated[:, : self.num_heads], rotated[:, self.num_heads :]
        v = heads[:, self.num_heads + self.num_kv_heads :]  # [num_tokens, kv_heads, head_dim]
        attn = paged_attention(q, k, v, k_cache, v_cache, batch)  # [num_tokens, heads, head_dim]
        attended = reduce(F.linear(attn.reshape(num_tokens, -1), self.o_proj_t.t(), self.o_bias))
        hidden, x = self.kernels.add_norm(hidden, attended, self.post_attention_norm, self.eps)
        activated = self.kernels.silu_mul(F.linear(x, self.gate_up))  # [num_tokens, ffn_shard]
        return hidden, reduce(F.linear(activated, self.down_t.t()))


class ShardModel:
    """The layers of one pipeline stage; the first stage embeds, the last projects to logits."""

    def __init__(self, spec: ModelSpec, shard: Shard, allocate: Allocate, kernels: LayerKernels = LayerKernels()):
        self.spec = spec
        self.shard = shard
        self.kernels = kernels
        self.layers = [DecoderLayer(spec, shard, allocate, kernels) for _ in range(shard.layers.size)]
        self.embed = allocate(spec.vocab_size, spec.hidden_size) if shard.is_first_stage else None
        self.norm = allocate(spec.hidden_size) if shard.is_last_stage else None
        self.lm_head = None
        if shard.is_last_stage:
            # Each tensor-parallel rank holds a slice of the vocabulary, padded to equal size.
            shares_embedding = spec.tie_word_embeddings and self.embed is not None and shard.layout.tp == 1
            self.lm_head = self.embed if shares_embedding else allocate(shard.vocab_rows_padded, spec.hidden_size)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.embed)  # [num_tokens, hidden]

    def __call__(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden]
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_pages: torch.Tensor,  # [num_blocks, layers_in_shard, 2, kv_heads, block_size, head_dim]
        batch: AttentionBatch,
        reduce: Reduce,
    ) -> torch.Tensor:
        update = None
        for index, layer in enumerate(self.layers):
            hidden, update = layer(hidden, update, cos, sin, kv_pages[:, index, 0], kv_pages[:, index, 1], batch,
                                   reduce)
        return hidden if update is None else hidden + update

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [rows, vocab rows of this shard] for the sampled rows' final hidden states."""
        x = self.kernels.norm(hidden, self.norm, self.spec.rms_norm_eps)
        return F.linear(x, self.lm_head).float()
