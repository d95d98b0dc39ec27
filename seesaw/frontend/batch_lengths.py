"""Lengths of `seesaw-cli batch` input lines for the simulator: the prompt tokenized with the
planned model's tokenizer when its folder holds one, else the default model's (loads transformers;
used only when a workload file holds batch lines)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from seesaw.frontend.batch_io import LineError, SamplingDefaults, parse_line
from seesaw.frontend.job_profile import item_lengths


def codec_for(model: str, log: Callable[[str], None] = lambda line: None):
    """The tokenizer (a TextCodec) that measures prompts for `model`: its own if it is a folder
    holding one, else the default model's; `log` says which."""
    from seesaw.config import default_cache_dir
    from seesaw.text import TextCodec
    from seesaw.model.resolve import resolve_model

    folder = Path(model).expanduser()
    if folder.is_dir():
        codec = TextCodec(folder)
        if codec.tokenizer is not None:
            log(f"batch lines measured with the tokenizer in {folder}")
            return codec
    log("batch lines measured with the default model's tokenizer (a --model folder holding a tokenizer "
        "would measure them with its own)")
    return TextCodec(resolve_model("default", default_cache_dir()).tokenizer_folder)


def batch_line_lengths(entry: dict, where: str, codec, max_model_len: int) -> tuple[int, int]:
    """(prompt tokens, max_tokens) of one batch line, its prompt measured by `codec` (a TextCodec;
    lines of token ids need none)."""
    import orjson

    try:
        item = parse_line(orjson.dumps(entry), 0, SamplingDefaults())
    except LineError as error:
        raise ValueError(f"{where}: {error.message}") from None
    return item_lengths(item, codec, max_model_len)
