"""The most one step may hold on a worker, and the sizes of the step buffers that follow from it
(pure arithmetic, no torch).

A captured CUDA graph replays reads and writes at the addresses it was captured with, so every
buffer a step's forward pass reads (the upload of its inputs, the device block table) is
allocated once, at the size the largest step needs, and never grows. Decode steps are padded to a
few batch sizes (buckets), so a graph captured for each bucket can replay every decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

SEGMENT_ALIGN = 4  # int32 values: each segment of the upload starts on 16 bytes, as Triton's loads assume
BUCKET_STRIDE = 8  # decode buckets past the first few: every multiple of this, up to the row cap


@dataclass(frozen=True)
class StepBounds:
    """What one step may hold on a worker. A worker derives its own (`for_worker`); the defaults
    are small bounds for steps built by hand (tests, tools).

    `num_blocks` bounds how many requests a worker keeps a block table for: each holds at least
    one of the pool's blocks (released requests' tables are dropped before a step's rows are
    applied), so one table row per block is always enough."""

    max_tokens: int = 4096
    max_rows: int = 256
    num_blocks: int = 4096  # the KV pool's blocks, not counting the padding block
    max_blocks_per_request: int = 256  # the model's length, in blocks

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_rows", "num_blocks", "max_blocks_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"StepBounds.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def for_worker(cls, max_step_tokens: int, max_step_rows: int, num_blocks: int, max_model_len: int,
                   block_size: int) -> StepBounds:
        return cls(max_step_tokens, max_step_rows, num_blocks, min(-(-max_model_len // block_size), num_blocks))

    @property
    def padding_block(self) -> int:
        """The block a padded decode step's padding rows write to and read: the page after the pool's."""
        return self.num_blocks

    @property
    def table_shape(self) -> tuple[int, int]:
        """The device block table: a row per request the worker may hold a table for, then the
        padding rows' row; a column per block of the longest request."""
        return self.num_blocks + 1, self.max_blocks_per_request

    def max_table_writes(self, is_mirrored: bool) -> int:
        """Device table entries one step may set: every block its rows carry, each at most once."""
        return min(self.num_blocks, self.max_rows * self.max_blocks_per_request) if is_mirrored else 0

    def upload_values(self, is_ragged: bool) -> int:
        """int32 values of the largest step's upload: tokens and positions; with a ragged kernel each
        token's k/v place, each row's first token, context and table slot, and the query tiles (at most
        one per token); the sampling rows; the awaited tokens; the table's new entries. A padded decode
        step has at most `max_rows` tokens, so tokens are bounded by the larger of the two caps."""
        tokens, rows = max(self.max_tokens, self.max_rows), self.max_rows
        writes = self.max_table_writes(is_ragged)
        lengths = [tokens, tokens]
        if is_ragged:
            lengths += [tokens, tokens, rows + 1, rows, rows, tokens, tokens, tokens]
        lengths += [rows, rows, rows, writes, writes, writes]
        return sum(padded_length(length) for length in lengths)


def step_bytes_per_block(max_model_len: int, block_size: int) -> int:
    """What a worker's step buffers take on the device for each block of its KV pool, at most: its
    row of the block table (a column per block of the longest request) and, in the upload, the
    three values that set one table entry (int32 each)."""
    return 4 * (-(-max_model_len // block_size) + 3)


def padded_length(length: int) -> int:
    """`length` values rounded up to a whole number of SEGMENT_ALIGN values."""
    return length + (-length % SEGMENT_ALIGN)


def decode_buckets(max_rows: int) -> tuple[int, ...]:
    """The batch sizes decode steps are padded to: 1, 2, 4, then every multiple of BUCKET_STRIDE,
    and `max_rows` itself (so at most BUCKET_STRIDE - 1 padding rows past 4)."""
    small = [size for size in (1, 2, 4) if size < max_rows]
    return (*small, *range(BUCKET_STRIDE, max_rows, BUCKET_STRIDE), max_rows)


def bucket_for(num_rows: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds `num_rows` rows; None when none does (or there are none)."""
    for size in buckets:
        if size >= num_rows:
            return size
    return None
