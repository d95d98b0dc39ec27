"""The default model (SmolLM2-135M-Instruct from its GGUF file) against transformers' own GGUF loader."""

from __future__ import annotations

import pytest
import torch

from helpers import engine_config, generate
from seesaw.text import TextCodec
from seesaw.model.resolve import default_gguf_path
from seesaw.sampling import SamplingParams

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [{"role": "user", "content": "List three prime numbers."}],
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def reference(default_model):
    """Greedy continuations from transformers, which dequantizes the GGUF itself."""
    from transformers import AutoModelForCausalLM

    gguf = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    codec = TextCodec(default_model.tokenizer_folder)
    prompts = [codec.encode_chat(chat) for chat in CHATS]
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                 do_sample=False, pad_token_id=2)  # stops after <|im_end|>
            outputs.append(out[0, len(prompt):].tolist())
    return prompts, outputs


def test_default_model_chat_greedy_matches_transformers(default_model, reference):
    prompts, expected = reference
    config = engine_config("default", scheduler={"max_num_batched_tokens": 64})
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    results = generate(config, [{"sampling": sampling, "messages": chat} for chat in CHATS])
    assert [r.prompt_tokens for r in results] == [len(p) for p in prompts]
    assert [r.token_ids for r in results] == expected


def test_default_model_stops_at_end_of_turn(default_model):
    config = engine_config("default")
    (result,) = generate(config, [{"sampling": SamplingParams(max_tokens=64, temperature=0.0), "messages": CHATS[0]}])
    assert result.finish_reason == "stop"
    assert result.token_ids[-1] == 2 and "Paris" in result.text and "<|im_end|>" not in result.text
