"""What a batch job asks of the engine before it runs: the lengths of its first lines (prompt
tokens measured by the model's tokenizer, and the most tokens each may generate) and how many
lines it has. The host buffer is sized from it and the layout planned on it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from seesaw.frontend.batch_io import BatchItem, LineError, SamplingDefaults, parse_line

SAMPLE_LINES = 2000  # enough to know a job's lengths; a million-line file is only counted past them


@dataclass(frozen=True)
class JobProfile:
    """The first lines' (prompt tokens, most output tokens), and the whole file's line count."""

    lengths: tuple[tuple[int, int], ...]
    num_lines: int  # non-blank lines in the whole file
    num_read: int  # of them, the lines measured (good or bad)
    skipped: tuple[str, ...] = ()  # why each unreadable line of those was left out

    @property
    def num_requests(self) -> int:
        """The requests the whole file is expected to hold (its unread lines taken to be as good)."""
        if not self.num_read:
            return 0
        return round(len(self.lengths) * self.num_lines / self.num_read)

    def kv_blocks(self, block_size: int) -> int:
        """KV blocks the whole job would hold if every request were in at once at its longest
        (the lines not read taken to be like those read)."""
        if not self.lengths:
            return 0
        sample = sum(-(-(prompt + output) // block_size) for prompt, output in self.lengths)
        return -(-sample * self.num_requests // len(self.lengths))


def item_lengths(item: BatchItem, codec, max_model_len: int) -> tuple[int, int]:
    """(prompt tokens, most output tokens) of a parsed line, its prompt measured by `codec` (a
    TextCodec; a line of token ids needs none); a default max_tokens is lowered to what the
    context leaves, as the engine does."""
    if item.prompt_token_ids is not None:
        prompt = len(item.prompt_token_ids)
    elif item.messages is not None:
        prompt = len(codec.encode_chat(item.messages))
    else:
        prompt = len(codec.encode_prompt(item.prompt or ""))
    output = item.sampling.max_tokens
    if item.sampling.fit_max_tokens:
        output = min(output, max(1, max_model_len - prompt))
    return max(1, prompt), output


def read_job(path: Path, defaults: SamplingDefaults, codec, max_model_len: int,
             max_lines: int = SAMPLE_LINES) -> JobProfile:
    """Measure the first `max_lines` non-blank lines of a batch file and count the rest. A line
    that cannot run (bad JSON, a prompt past the context) is left out and said why, as the batch
    run itself will answer it with an error."""
    lengths, skipped = [], []
    num_lines = num_read = 0
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            num_lines += 1
            if num_read >= max_lines:
                continue
            num_read += 1
            try:
                prompt, output = item_lengths(parse_line(line, number, defaults), codec, max_model_len)
            except LineError as error:
                skipped.append(f"{path}, {error}")
                continue
            except ValueError as error:  # a prompt the tokenizer cannot take (no chat template, no tokenizer)
                skipped.append(f"{path}, line {number}: {error}")
                continue
            if prompt + output > max_model_len:
                skipped.append(f"{path}, line {number}: {prompt} prompt tokens and max_tokens {output} do not fit "
                               f"the model's context of {max_model_len}")
                continue
            lengths.append((prompt, output))
    return JobProfile(tuple(lengths), num_lines, num_read, tuple(skipped))
