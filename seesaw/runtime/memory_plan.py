"""How a worker's device memory is shared out: weights, the KV pool, the largest step's activations,
the sampler's buffers and the communicators' own buffers. Plain arithmetic on byte counts, so the
plan can be checked against any card's figures without the card.

On a GPU the runtime warms its communicator groups (NCCL allocates its buffers, outside torch's
allocator, on a group's first use), measures the largest step (a profiling step) and gives the KV
pool what is left (`kv_pool_bytes`); `DevicePlan` states the same budget ahead of time, part by
part, for the checks a test or a benchmark makes before it allocates anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1 << 30

@dataclass(frozen=True)
class DeviceMemory:
    """A card's memory as CUDA reports it (`torch.cuda.mem_get_info`): free and total bytes."""

    free_bytes: int
    total_bytes: int

    @property
    def in_use_bytes(self) -> int:
        return self.total_bytes - self.free_bytes


def sampler_bytes(num_rows: int, vocab_size: int) -> int:
    """The sampler's peak on a GPU for `num_rows` rows of float32 logits with temperature, top-k and
    top-p: the scaled logits, sorted values, their int64 order, probabilities, cumulative mass,
    masks, the scattered result and the final probabilities, all [rows, vocab] at once at worst
    (the draw itself, one race kernel, writes no noise)."""
    per_entry = 4 + 4 + 8 + 4 + 4 + 1 + 4 + 4  # scaled, sorted, order, probs, cumsum, mask, result, final probs
    return num_rows * vocab_size * per_entry


def step_activation_bytes(hidden_size: int, qkv_size: int, ffn_size: int, vocab_rows: int, num_tokens: int,
                          num_rows: int, itemsize: int) -> int:
    """An upper estimate of one step's activations on a worker: per token the residual stream,
    the normed input and the update (three hidden vectors), q/k/v and the attention output, gate,
    up and their product; per sampled row the float32 logits twice (projected, gathered)."""
    per_token = (3 * hidden_size + qkv_size + qkv_size + 3 * ffn_size) * itemsize
    return num_tokens * per_token + num_rows * vocab_rows * 4 * 2


def kv_pool_bytes(memory: DeviceMemory, memory_fraction: float, step_peak_bytes: int) -> int:
    """What the KV pool may take: `memory_fraction` of the card, less everything in use now
    (weights, the CUDA context, NCCL's buffers, other processes) and the largest step's peak.
    Negative when nothing is left."""
    return int(memory_fraction * memory.total_bytes) - memory.in_use_bytes - step_peak_bytes


@dataclass
class DevicePlan:
    """A worker's device allocations by part, in bytes, and whether they fit a card."""

    parts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, num_bytes: int) -> DevicePlan:
        self.parts[name] = self.parts.get(name, 0) + int(num_bytes)
        return self

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    def shortfall_bytes(self, card_bytes: int, memory_fraction: float = 1.0) -> int:
        """Bytes past `memory_fraction` of the card (0 when the plan fits)."""
        return max(0, self.total_bytes - int(memory_fraction * card_bytes))

    def check(self, card_bytes: int, memory_fraction: float, where: str) -> None:
        """Raise a ValueError naming every part when the plan does not fit."""
        short = self.shortfall_bytes(card_bytes, memory_fraction)
        if short:
            parts = ", ".join(f"{name} {num / GIB:.2f}" for name, num in self.parts.items())
            raise ValueError(f"{where}: {self.total_bytes / GIB:.2f} GiB ({parts} GiB) does not fit "
                             f"{memory_fraction:.0%} of {card_bytes / GIB:.1f} GiB; {short / GIB:.2f} GiB short")

    def describe(self) -> str:
        return ", ".join(f"{name} {num / GIB:.2f} GiB" for name, num in self.parts.items())
