"""Convert a GGUF file into a Hugging Face folder (dequantized safetensors, config, tokenizer).

Conversion is slow (dequantization and tokenizer conversion), so its result is cached by the
caller and later starts load the folder directly.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file

from seesaw.model.spec import SUPPORTED_TYPES, ModelSpec, RopeSpec

log = logging.getLogger(__name__)

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, model.safetensors and tokenizer files for `gguf_path` into `out_dir`."""
    reader = GGUFReader(str(gguf_path))
    # Vocabulary arrays are large and go to the tokenizer converter; keep only the scalars.
    fields = {
        name: _field_value(field)
        for name, field in reader.fields.items()
        if not name.startswith("tokenizer.ggml.") or name.endswith("_token_id")
    }
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_TYPES:
        raise ValueError(f"{gguf_path}: architecture {arch!r} is not supported ({', '.join(SUPPORTED_TYPES)})")
    tensors = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            raise ValueError(f"{gguf_path}: per-frequency rope factors (rope_freqs) are not supported")
        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        tensors[_hf_name(tensor.name, gguf_path)] = torch.from_numpy(values.copy())
    spec = _spec(fields, arch, tensors)
    if arch in ("llama", "mistral"):
        # llama.cpp interleaves the rotary halves of q and k; undo it.
        for name in list(tensors):
            if name.endswith("q_proj.weight"):
                tensors[name] = _unpermute(tensors[name], spec.num_heads)
            elif name.endswith("k_proj.weight"):
                tensors[name] = _unpermute(tensors[name], spec.num_kv_heads)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(spec.to_hf_config(), indent=2))
    _convert_tokenizer(gguf_path, out_dir)


def _field_value(field):
    try:
        return field.contents()
    except (ValueError, IndexError, TypeError):
        return None


def _hf_name(name: str, gguf_path: Path) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_RE.match(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise ValueError(f"{gguf_path}: tensor {name!r} has no known Hugging Face counterpart")


def _spec(fields: dict, arch: str, tensors: dict) -> ModelSpec:
    def get(key, default=None):
        return fields.get(f"{arch}.{key}", default)

    num_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab_size = tensors["model.embed_tokens.weight"].shape[0]
    rope = RopeSpec(theta=float(get("rope.freq_base", 10000.0)))
    scaling = get("rope.scaling.type")
    if scaling == "linear":
        rope = RopeSpec(theta=rope.theta, kind="linear", factor=float(get("rope.scaling.factor")))
    elif scaling not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    return ModelSpec(
        model_type=arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(get("attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position=int(get("context_length", 4096)),
        tie_word_embeddings="lm_head.weight" not in tensors,
        qkv_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
        rope=rope,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def _unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    rows = weight.shape[0]
    # GGUF row order within a head is (pair, half); Hugging Face's is (half, pair).
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _convert_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))
