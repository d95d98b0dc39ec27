"""Workloads for the simulator: requests as (prompt tokens, output tokens) pairs (pure).

Built-in mixes are shaped like two public datasets (see docs/simulator.md for their source):

- `sharegpt`: chat turns, input about as long as output, both long-tailed (log-normal, median
  about 160 tokens each, capped at 2,048 each).
- `arxiv`: summarizing papers, long input and short output, each request capped at 4,096 tokens
  in all (most papers are longer, so most inputs are cut to the cap).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

# Lengths of a line that gives no lengths (a batch line): (entry, "FILE, line N") -> (prompt, output).
Tokenize = Callable[[dict, str], tuple[int, int]]


@dataclass(frozen=True)
class Workload:
    """Requests that all arrive at once (an offline batch)."""

    name: str
    lengths: tuple[tuple[int, int], ...]  # (prompt tokens, output tokens) per request
    left_out: tuple[str, ...] = ()  # why each line of a file that gives no request was left out
    shared_prefix: int = 0  # tokens every prompt starts with (a system prompt), counted in its length

    @property
    def num_requests(self) -> int:
        return len(self.lengths)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(prompt for prompt, _ in self.lengths)

    @property
    def num_output_tokens(self) -> int:
        return sum(output for _, output in self.lengths)

    def describe(self) -> str:
        n = max(1, self.num_requests)
        shared = f", {self.shared_prefix} of them shared by every prompt" if self.shared_prefix else ""
        return (f"{self.name}: {self.num_requests} requests, mean input {self.num_prompt_tokens / n:.0f} "
                f"tokens{shared}, mean output {self.num_output_tokens / n:.0f} tokens")


def within_context(workload: Workload, max_model_len: int) -> tuple[Workload, int]:
    """The requests whose prompt and output fit the model's context, and how many do not (the
    engine refuses those: a prompt with no room left, or a max_tokens that does not fit)."""
    kept = tuple((prompt, output) for prompt, output in workload.lengths if prompt + output <= max_model_len)
    return replace(workload, lengths=kept), workload.num_requests - len(kept)


def with_shared_prefix(workload: Workload, num_tokens: int) -> Workload:
    """The workload with a system prompt of `num_tokens` tokens in front of every prompt."""
    if num_tokens < 0:
        raise ValueError(f"a shared prefix cannot have {num_tokens} tokens")
    if not num_tokens:
        return workload
    lengths = tuple((prompt + num_tokens, output) for prompt, output in workload.lengths)
    return replace(workload, lengths=lengths, shared_prefix=workload.shared_prefix + num_tokens)


def dealt(workload: Workload, num_parts: int) -> list[Workload]:
    """The workload's requests dealt out to `num_parts` parts in turn (request i to part i mod
    num_parts), as `split -n r/NUM_PARTS` deals a file's lines."""
    if num_parts < 1:
        raise ValueError(f"a workload is dealt to at least one part, got {num_parts}")
    return [replace(workload, name=f"{workload.name}, part {part + 1} of {num_parts}",
                    lengths=workload.lengths[part::num_parts], left_out=())
            for part in range(num_parts)]


def fixed(num_requests: int, input_len: int, output_len: int) -> Workload:
    if min(num_requests, input_len, output_len) < 1:
        raise ValueError("a fixed workload needs at least one request, one input and one output token")
    return Workload(f"fixed {input_len}+{output_len}", ((input_len, output_len),) * num_requests)


def _lognormal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(math.log(median), sigma))))


def sharegpt(num_requests: int, seed: int = 0) -> Workload:
    """Chat: input and output drawn independently, each log-normal around 160 tokens."""
    rng = random.Random(seed)
    lengths = tuple((_lognormal(rng, 160, 1.0, 4, 2048), _lognormal(rng, 160, 1.0, 4, 2048))
                    for _ in range(num_requests))
    return Workload(f"sharegpt x{num_requests}", lengths)


def arxiv(num_requests: int, seed: int = 0, max_total: int = 4096) -> Workload:
    """Summarization: papers of about 6,000 tokens (median) cut to fit `max_total` with their
    abstract-length output (about 200 tokens)."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(num_requests):
        output = _lognormal(rng, 200, 0.4, 16, 1024)
        prompt = min(_lognormal(rng, 6000, 0.6, 64, 100_000), max_total - output)
        lengths.append((prompt, output))
    return Workload(f"arxiv x{num_requests}", tuple(lengths))


def from_jsonl(path: Path, tokenize: Tokenize | None = None) -> Workload:
    """Lines of {"input_len": N, "output_len": M} (or prompt_tokens / max_tokens), or batch lines
    measured by `tokenize`. A bad line is left out, its reason (naming the file and line) kept in
    `left_out`, as `seesaw-cli batch` goes on past one; a file with no good line is an error."""
    lengths, left_out = [], []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ValueError(f"workload file {path} does not exist") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            lengths.append(_line_lengths(line, f"{path}, line {number}", tokenize))
        except ValueError as error:
            left_out.append(str(error))
    if not lengths:
        first_error = f" ({len(left_out)} bad lines; the first: {left_out[0]})" if left_out else ""
        raise ValueError(f"{path}: no requests{first_error}")
    return Workload(path.name, tuple(lengths), tuple(left_out))


def _line_lengths(line: str, where: str, tokenize: Tokenize | None) -> tuple[int, int]:
    """(prompt tokens, output tokens) of one line; a ValueError naming `where` if it gives none."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not JSON ({error.msg})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with input_len and output_len")
    prompt = entry.get("input_len", entry.get("prompt_tokens"))
    output = entry.get("output_len", entry.get("max_tokens"))
    if prompt is None and tokenize is not None and not ({"body", "prompt", "messages"}.isdisjoint(entry)):
        prompt, output = tokenize(entry, where)
    for field, value in (("input_len", prompt), ("output_len", output)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: {field} must be a positive integer, got {value!r}")
    return prompt, output


def named(name: str, num_requests: int, seed: int = 0, tokenize: Tokenize | None = None) -> Workload:
    """`sharegpt`, `arxiv`, `fixed:IN:OUT`, or a JSONL file of lengths."""
    if name == "sharegpt":
        return sharegpt(num_requests, seed)
    if name == "arxiv":
        return arxiv(num_requests, seed)
    if name.startswith("fixed:"):
        parts = name.split(":")
        if len(parts) != 3 or not all(part.isdigit() for part in parts[1:]):
            raise ValueError(f"workload {name!r}: write fixed:INPUT:OUTPUT, for example fixed:3000:300")
        return fixed(num_requests, int(parts[1]), int(parts[2]))
    path = Path(name)
    if path.suffix == ".jsonl" or path.exists():
        return from_jsonl(path, tokenize)
    raise ValueError(f"unknown workload {name!r}: arxiv, sharegpt, fixed:IN:OUT, or a JSONL file")
