"""Lengths of `seesaw-cli batch` input lines for the simulator: the prompt tokenized with the
default model's tokenizer (loads transformers; used only when a workload file holds batch lines)."""

from __future__ import annotations

from seesaw.frontend.batch_io import LineError, SamplingDefaults, parse_line


def batch_line_lengths(entry: dict, where: str, state: dict, max_model_len: int) -> tuple[int, int]:
    """(prompt tokens, max_tokens) of one batch line; `state` keeps the tokenizer between calls."""
    import orjson

    if "codec" not in state:
        from seesaw.config import default_cache_dir
        from seesaw.frontend.text import TextCodec
        from seesaw.model.resolve import resolve_model

        state["codec"] = TextCodec(resolve_model("default", default_cache_dir()).tokenizer_folder)
    codec = state["codec"]
    try:
        item = parse_line(orjson.dumps(entry), 0, SamplingDefaults())
    except LineError as error:
        raise ValueError(f"{where}: {error.message}") from None
    if item.prompt_token_ids is not None:
        prompt = len(item.prompt_token_ids)
    elif item.messages is not None:
        prompt = len(codec.encode_chat(item.messages))
    else:
        prompt = len(codec.encode_prompt(item.prompt or ""))
    output = item.sampling.max_tokens
    if item.sampling.fit_max_tokens:  # a default max_tokens is lowered to what the context leaves, as the engine does
        output = min(output, max(1, max_model_len - prompt))
    return max(1, prompt), output
