"""A batch job measured before it runs: its first lines' lengths (prompts through the model's
tokenizer), the rest counted, unreadable lines left out with their reason."""

from __future__ import annotations

import orjson

from seesaw.frontend.batch_io import SamplingDefaults
from seesaw.frontend.job_profile import read_job


class _Codec:
    """A tokenizer of one token per word."""

    def encode_prompt(self, text: str) -> list[int]:
        return [0] * len(text.split())

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return [0] * (3 + sum(len(m["content"].split()) for m in messages))


def _write(path, lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else orjson.dumps(line) for line in lines) + b"\n")


def test_the_first_lines_are_measured_and_the_rest_counted(tmp_path):
    job = tmp_path / "job.jsonl"
    _write(job, [{"prompt": "one two three", "max_tokens": 5}, b"{broken", {"prompt": [1] * 10},
                 {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 4}, b"",
                 {"prompt": "too long " * 40, "max_tokens": 10}, {"prompt": "later"}, {"prompt": "later still"}])
    profile = read_job(job, SamplingDefaults(max_tokens=7), _Codec(), max_model_len=64, max_lines=5)
    # A default max_tokens is lowered to what the context leaves, as the engine does.
    assert profile.lengths == ((3, 5), (10, 7), (5, 4))
    assert profile.num_lines == 7 and profile.num_read == 5  # the blank line is no line
    assert len(profile.skipped) == 2 and "line 2" in profile.skipped[0] and "not valid JSON" in profile.skipped[0]
    assert "line 6: 80 prompt tokens and max_tokens 10 do not fit the model's context of 64" in profile.skipped[1]
    assert profile.num_requests == round(3 * 7 / 5)
    # Blocks of 4 tokens: 2 + 5 + 3 for the three read, scaled to the four the whole file should hold.
    assert profile.kv_blocks(4) == -(-10 * 4 // 3)
