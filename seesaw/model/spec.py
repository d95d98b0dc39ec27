"""The architecture of a Llama-family model, read from a Hugging Face `config.json` dict."""

from __future__ import annotations

from dataclasses import dataclass, field

from seesaw.layout import ModelShape

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters; `kind` is `default`, `linear` or `llama3`."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelSpec:
    """Everything the model code needs to build the layers of one architecture."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool = False
    rope: RopeSpec = field(default_factory=RopeSpec)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def shape(self) -> ModelShape:
        return ModelShape(self.num_layers, self.num_heads, self.num_kv_heads, self.intermediate_size, self.vocab_size)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes per token for the whole model at 4 bytes per element (scale for dtype)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * 4

    @classmethod
    def from_hf_config(cls, config: dict, where: str = "config.json") -> ModelSpec:
        """Build from a Hugging Face config dict; ValueError names the field and `where`."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_TYPES:
            raise ValueError(
                f"{where}: model_type {model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_TYPES)}"
            )
        if config.get("mlp_bias"):
            raise ValueError(f"{where}: mlp_bias is not supported")
        activation = config.get("hidden_act", "silu")
        if activation != "silu":
            raise ValueError(f"{where}: hidden_act {activation!r} is not supported (only silu)")
        sliding_window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        max_position = _required(config, "max_position_embeddings", where)
        if sliding_window is not None and sliding_window < max_position:
            # Full attention equals sliding-window attention while the context fits the window.
            max_position = int(sliding_window)
        num_heads = _required(config, "num_attention_heads", where)
        hidden_size = _required(config, "hidden_size", where)
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=_required(config, "vocab_size", where),
            hidden_size=hidden_size,
            intermediate_size=_required(config, "intermediate_size", where),
            num_layers=_required(config, "num_hidden_layers", where),
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or hidden_size // num_heads,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position=int(max_position),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", model_type != "qwen2")),
            # Qwen2 always has q/k/v biases; Llama's attention_bias adds them to o_proj as well.
            qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias")),
            o_bias=model_type != "qwen2" and bool(config.get("attention_bias")),
            rope=_rope_spec(config, where),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_hf_config(self) -> dict:
        """The Hugging Face config dict for this architecture (used when converting GGUF)."""
        rope: dict = {"rope_type": self.rope.kind, "rope_theta": self.rope.theta}
        if self.rope.kind == "linear":
            rope["factor"] = self.rope.factor
        elif self.rope.kind == "llama3":
            rope.update(
                factor=self.rope.factor,
                low_freq_factor=self.rope.low_freq_factor,
                high_freq_factor=self.rope.high_freq_factor,
                original_max_position_embeddings=self.rope.original_max_position,
            )
        eos = list(self.eos_token_ids)
        return {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.o_bias or (self.qkv_bias and self.model_type != "qwen2"),
            "rope_theta": self.rope.theta,
            "rope_scaling": None if self.rope.kind == "default" else rope,
            "rope_parameters": rope,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
            "torch_dtype": "float32",
        }


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _required(config: dict, key: str, where: str):
    if key not in config or config[key] is None:
        raise ValueError(f"{where}: missing required field {key!r}")
    return config[key]


def _rope_spec(config: dict, where: str) -> RopeSpec:
    # Transformers 5 writes `rope_parameters` (with rope_theta inside); older versions write
    # `rope_theta` and `rope_scaling` at the top level.
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return RopeSpec(theta=theta)
    if kind == "linear":
        return RopeSpec(theta=theta, kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeSpec(
            theta=theta,
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position=int(params.get("original_max_position_embeddings", 8192)),
        )
    raise ValueError(f"{where}: rope type {kind!r} is not supported (default, linear, llama3)")
