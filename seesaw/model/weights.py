"""The model's weights in layout-neutral form, where they come from, and filling a shard from them.

Layout-neutral names (`layers.3.q`, `layers.3.o_proj_t`, `embed`, ...) give every tensor the form
in which any shard's slice is a run of whole rows: q, k, v, gate and up as the checkpoint has
them, the row-parallel output and down projections transposed. Sources (a checkpoint folder,
seeded random values, or the host weight store) hand out row ranges of these tensors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from seesaw.layout import Span
from seesaw.model.llama import ShardModel
from seesaw.model.spec import ModelSpec

Copy = Callable[[torch.Tensor, torch.Tensor], None]  # copy(destination, source)


class WeightSource(Protocol):
    """Row ranges of the model's layout-neutral tensors."""

    def rows(self, name: str, span: Span | None = None) -> torch.Tensor: ...


def neutral_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Full shape of every layout-neutral tensor, layer by layer, in the order a store lays them out."""
    hidden, q_size = spec.hidden_size, spec.num_heads * spec.head_dim
    kv_size, ffn = spec.num_kv_heads * spec.head_dim, spec.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed": (spec.vocab_size, hidden)}
    for layer in range(spec.num_layers):
        prefix = f"layers.{layer}."
        shapes.update({
            prefix + "input_norm": (hidden,),
            prefix + "q": (q_size, hidden),
            prefix + "k": (kv_size, hidden),
            prefix + "v": (kv_size, hidden),
        })
        if spec.qkv_bias:
            shapes.update({prefix + "q_bias": (q_size,), prefix + "k_bias": (kv_size,), prefix + "v_bias": (kv_size,)})
        shapes[prefix + "o_proj_t"] = (q_size, hidden)
        if spec.o_bias:
            shapes[prefix + "o_bias"] = (hidden,)
        shapes.update({
            prefix + "post_attention_norm": (hidden,),
            prefix + "gate": (ffn, hidden),
            prefix + "up": (ffn, hidden),
            prefix + "down_t": (ffn, hidden),
        })
    shapes["norm"] = (hidden,)
    if not spec.tie_word_embeddings:
        shapes["lm_head"] = (spec.vocab_size, hidden)
    return shapes


def checkpoint_name(name: str) -> tuple[str, bool]:
    """The Hugging Face tensor behind a layout-neutral name, and whether it is stored transposed."""
    if not name.startswith("layers."):
        return {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight",
                "lm_head": "lm_head.weight"}[name], False
    _, layer, part = name.split(".")
    prefix = f"model.layers.{layer}."
    table = {
        "input_norm": ("input_layernorm.weight", False),
        "post_attention_norm": ("post_attention_layernorm.weight", False),
        "q": ("self_attn.q_proj.weight", False), "k": ("self_attn.k_proj.weight", False),
        "v": ("self_attn.v_proj.weight", False),
        "q_bias": ("self_attn.q_proj.bias", False), "k_bias": ("self_attn.k_proj.bias", False),
        "v_bias": ("self_attn.v_proj.bias", False),
        "o_proj_t": ("self_attn.o_proj.weight", True), "o_bias": ("self_attn.o_proj.bias", False),
        "gate": ("mlp.gate_proj.weight", False), "up": ("mlp.up_proj.weight", False),
        "down_t": ("mlp.down_proj.weight", True),
    }
    hf_name, is_transposed = table[part]
    return prefix + hf_name, is_transposed


class SafetensorsSource:
    """Tensors of a Hugging Face folder, read lazily and sliced before they are materialised."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._files = {}
        self._location = self._index()

    def _index(self) -> dict[str, Path]:
        index_file = self.folder / "model.safetensors.index.json"
        if index_file.exists():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            return {name: self.folder / file for name, file in weight_map.items()}
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{self.folder}: no *.safetensors files")
        location = {}
        for file in files:
            with safe_open(file, framework="pt") as handle:
                location.update({name: file for name in handle.keys()})
        return location

    def rows(self, name: str, span: Span | None = None) -> torch.Tensor:
        hf_name, is_transposed = checkpoint_name(name)
        if hf_name not in self._location:
            raise ValueError(f"{self.folder}: tensor {hf_name!r} is missing")
        file = self._location[hf_name]
        if file not in self._files:
            self._files[file] = safe_open(file, framework="pt")
        view = self._files[file].get_slice(hf_name)
        part = slice(span.start, span.end) if span else slice(None)
        return view[:, part].t() if is_transposed else view[part]


class RandomSource:
    """Seeded random weights at the model's real shapes; every shard of every layout agrees."""

    def __init__(self, spec: ModelSpec, seed: int, device: torch.device | str = "cpu", std: float = 0.02):
        self.shapes = neutral_shapes(spec)
        self.seed = seed
        self.device = torch.device(device)
        self.std = std

    def rows(self, name: str, span: Span | None = None) -> torch.Tensor:
        shape = self.shapes[name]
        if name.endswith("norm"):
            full = torch.ones(shape, device=self.device)
        else:
            digest = hashlib.blake2b(f"{self.seed}:{name}".encode(), digest_size=8).digest()
            generator = torch.Generator(device=self.device).manual_seed(int.from_bytes(digest, "little") >> 1)
            full = torch.empty(shape, device=self.device).normal_(0.0, self.std, generator=generator)
        return full[span.start : span.end] if span is not None else full


def plain_copy(destination: torch.Tensor, source: torch.Tensor) -> None:
    destination.copy_(source)


def load_shard(model: ShardModel, source: WeightSource, copy: Copy = plain_copy) -> int:
    """Copy this shard's rows of every tensor into the model's tensors; returns the bytes copied.

    Layer by layer, each piece a run of whole rows, so from a store every copy is contiguous."""
    spec, shard = model.spec, model.shard
    head_rows = _scaled(shard.heads, spec.head_dim)
    kv_rows = _scaled(shard.kv_heads, spec.head_dim)
    fill = _Filler(copy)
    with torch.no_grad():
        if model.embed is not None:
            fill(model.embed, [source.rows("embed")], "embed")
        for index, layer in enumerate(model.layers):
            prefix = f"layers.{shard.layers.start + index}."
            fill(layer.input_norm, [source.rows(prefix + "input_norm")], prefix + "input_norm")
            fill(layer.qkv, [source.rows(prefix + "q", head_rows), source.rows(prefix + "k", kv_rows),
                             source.rows(prefix + "v", kv_rows)], prefix + "q/k/v")
            if layer.qkv_bias is not None:
                fill(layer.qkv_bias, [source.rows(prefix + "q_bias", head_rows),
                                      source.rows(prefix + "k_bias", kv_rows),
                                      source.rows(prefix + "v_bias", kv_rows)], prefix + "q/k/v bias")
            fill(layer.o_proj_t, [source.rows(prefix + "o_proj_t", head_rows)], prefix + "o_proj_t")
            if layer.o_bias is not None:
                fill(layer.o_bias, [source.rows(prefix + "o_bias")], prefix + "o_bias")
            fill(layer.post_attention_norm, [source.rows(prefix + "post_attention_norm")],
                 prefix + "post_attention_norm")
            fill(layer.gate_up, [source.rows(prefix + "gate", shard.ffn), source.rows(prefix + "up", shard.ffn)],
                 prefix + "gate/up")
            fill(layer.down_t, [source.rows(prefix + "down_t", shard.ffn)], prefix + "down_t")
        if model.norm is not None:
            fill(model.norm, [source.rows("norm")], "norm")
        if model.lm_head is not None and model.lm_head is not model.embed:
            if not spec.tie_word_embeddings:
                rows = source.rows("lm_head", shard.vocab)
            elif model.embed is not None:
                rows = model.embed[shard.vocab.start : shard.vocab.end]  # loaded just above
            else:
                rows = source.rows("embed", shard.vocab)
            fill(model.lm_head[: rows.shape[0]], [rows], "lm_head")
            model.lm_head[rows.shape[0] :].zero_()  # padding rows give logits that the gather drops
    return fill.num_bytes


class _Filler:
    """Copies pieces into consecutive rows of a tensor, checking shapes and counting bytes."""

    def __init__(self, copy: Copy):
        self.copy = copy
        self.num_bytes = 0

    def __call__(self, target: torch.Tensor, pieces: list[torch.Tensor], what: str) -> None:
        total = sum(piece.shape[0] for piece in pieces)
        if total != target.shape[0] or any(tuple(p.shape[1:]) != tuple(target.shape[1:]) for p in pieces):
            shapes = " + ".join(str(tuple(p.shape)) for p in pieces)
            raise ValueError(f"{what}: shape {shapes} does not match the model's {tuple(target.shape)}")
        start = 0
        for piece in pieces:
            end = start + piece.shape[0]
            self.copy(target[start:end], piece)
            start = end
        self.num_bytes += target.numel() * target.element_size()


def _scaled(span: Span, factor: int) -> Span:
    return Span(span.start * factor, span.end * factor)
