"""Fill a shard model's parameters from a safetensors folder or from seeded random values."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from seesaw.layout import Span
from seesaw.model.llama import ShardModel
from seesaw.model.spec import ModelSpec


class WeightSource(Protocol):
    """Reads one Hugging Face-named tensor, optionally sliced to a row and a column span."""

    def get(self, name: str, rows: Span | None = None, cols: Span | None = None) -> torch.Tensor: ...


def logical_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every tensor of the model, by Hugging Face name."""
    hidden, q_size = spec.hidden_size, spec.num_heads * spec.head_dim
    kv_size, ffn = spec.num_kv_heads * spec.head_dim, spec.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (spec.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, hidden)
    for layer in range(spec.num_layers):
        prefix = f"model.layers.{layer}."
        shapes.update({
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (q_size, hidden),
            prefix + "self_attn.k_proj.weight": (kv_size, hidden),
            prefix + "self_attn.v_proj.weight": (kv_size, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, q_size),
            prefix + "mlp.gate_proj.weight": (ffn, hidden),
            prefix + "mlp.up_proj.weight": (ffn, hidden),
            prefix + "mlp.down_proj.weight": (hidden, ffn),
        })
        if spec.qkv_bias:
            for proj, size in (("q", q_size), ("k", kv_size), ("v", kv_size)):
                shapes[prefix + f"self_attn.{proj}_proj.bias"] = (size,)
        if spec.o_bias:
            shapes[prefix + "self_attn.o_proj.bias"] = (hidden,)
    return shapes


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

    def get(self, name: str, rows: Span | None = None, cols: Span | None = None) -> torch.Tensor:
        if name not in self._location:
            raise ValueError(f"{self.folder}: tensor {name!r} is missing")
        file = self._location[name]
        if file not in self._files:
            self._files[file] = safe_open(file, framework="pt")
        view = self._files[file].get_slice(name)
        row_slice = slice(rows.start, rows.end) if rows else slice(None)
        if cols is not None:
            return view[row_slice, cols.start : cols.end]
        return view[row_slice]


class RandomSource:
    """Seeded random weights at the model's real shapes; every shard of a layout agrees."""

    def __init__(self, spec: ModelSpec, seed: int, device: torch.device, std: float = 0.02):
        self.shapes = logical_shapes(spec)
        self.seed = seed
        self.device = device
        self.std = std

    def get(self, name: str, rows: Span | None = None, cols: Span | None = None) -> torch.Tensor:
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            full = torch.ones(shape, device=self.device)
        else:
            digest = hashlib.blake2b(f"{self.seed}:{name}".encode(), digest_size=8).digest()
            generator = torch.Generator(device=self.device).manual_seed(int.from_bytes(digest, "little") >> 1)
            full = torch.empty(shape, device=self.device).normal_(0.0, self.std, generator=generator)
        if rows is not None:
            full = full[rows.start : rows.end]
        if cols is not None:
            full = full[:, cols.start : cols.end]
        return full


def load_shard(model: ShardModel, source: WeightSource) -> None:
    """Copy this shard's slices of every tensor into the model's parameters."""
    spec, shard = model.spec, model.shard
    head_rows = _scaled(shard.heads, spec.head_dim)
    kv_rows = _scaled(shard.kv_heads, spec.head_dim)
    with torch.no_grad():
        for index, layer in enumerate(model.layers):
            prefix = f"model.layers.{shard.layers.start + index}."
            attn, mlp = prefix + "self_attn.", prefix + "mlp."
            _copy(layer.input_norm, source.get(prefix + "input_layernorm.weight"), prefix + "input_layernorm")
            _copy(layer.post_attention_norm, source.get(prefix + "post_attention_layernorm.weight"), prefix + "post_attention_layernorm")
            _copy(layer.qkv, _qkv(source, attn, "weight", head_rows, kv_rows), attn + "qkv")
            if layer.qkv_bias is not None:
                _copy(layer.qkv_bias, _qkv(source, attn, "bias", head_rows, kv_rows), attn + "qkv bias")
            _copy(layer.o_proj, source.get(attn + "o_proj.weight", cols=head_rows), attn + "o_proj")
            if layer.o_bias is not None:
                _copy(layer.o_bias, source.get(attn + "o_proj.bias"), attn + "o_proj.bias")
            gate = source.get(mlp + "gate_proj.weight", rows=shard.ffn)
            _copy(layer.gate_up, torch.cat([gate, source.get(mlp + "up_proj.weight", rows=shard.ffn)]), mlp + "gate/up")
            _copy(layer.down, source.get(mlp + "down_proj.weight", cols=shard.ffn), mlp + "down_proj")
        if model.embed is not None:
            _copy(model.embed, source.get("model.embed_tokens.weight"), "model.embed_tokens")
        if model.norm is not None:
            _copy(model.norm, source.get("model.norm.weight"), "model.norm")
        if model.lm_head is not None and model.lm_head is not model.embed:
            name = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
            if spec.tie_word_embeddings and model.embed is not None:
                rows = model.embed[shard.vocab.start : shard.vocab.end]  # loaded just above
            else:
                rows = source.get(name, rows=shard.vocab)
            _copy(model.lm_head[: rows.shape[0]], rows, name)
            model.lm_head[rows.shape[0] :].zero_()  # padding rows give logits that the gather drops


def _scaled(span: Span, factor: int) -> Span:
    return Span(span.start * factor, span.end * factor)


def _qkv(source: WeightSource, attn: str, kind: str, head_rows: Span, kv_rows: Span) -> torch.Tensor:
    return torch.cat([
        source.get(attn + f"q_proj.{kind}", rows=head_rows),
        source.get(attn + f"k_proj.{kind}", rows=kv_rows),
        source.get(attn + f"v_proj.{kind}", rows=kv_rows),
    ])


def _copy(parameter: torch.nn.Parameter, value: torch.Tensor, what: str) -> None:
    if tuple(parameter.shape) != tuple(value.shape):
        raise ValueError(f"{what}: shape {tuple(value.shape)} does not match the model's {tuple(parameter.shape)}")
    parameter.copy_(value.to(device=parameter.device, dtype=parameter.dtype))
