"""Parallel layouts and the shard each worker owns under one: pure arithmetic, no torch."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

_LAYOUT_RE = re.compile(r"^(?:d(\d+))?(?:t(\d+))?(?:p(\d+))?$")


class Span(NamedTuple):
    """A half-open range [start, end)."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Layout:
    """A parallel layout: `dp` replicas, each `pp` pipeline stages of `tp` tensor-parallel ranks."""

    dp: int = 1
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"layout {name} must be a positive integer, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> Layout:
        """Parse the paper's notation: `t1`, `t4`, `p2`, `t2p2`, `d2t4`."""
        match = _LAYOUT_RE.match(text.strip().lower())
        if not text.strip() or match is None:
            raise ValueError(
                f"layout {text!r} is not of the form d<N>t<N>p<N> (each part optional, "
                "in that order), for example t1, t2, p2, t2p2, d2t4"
            )
        dp, tp, pp = (int(group) if group else 1 for group in match.groups())
        return cls(dp=dp, tp=tp, pp=pp)

    def __str__(self) -> str:
        parts = [f"{letter}{n}" for letter, n in (("d", self.dp), ("t", self.tp), ("p", self.pp)) if n > 1]
        return "".join(parts) or "t1"

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(dp_rank, pp_rank, tp_rank) of a global rank: dp outermost, tp innermost."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside layout {self} of {self.world_size} workers")
        return rank // (self.pp * self.tp), (rank // self.tp) % self.pp, rank % self.tp

    def replica_ranks(self, dp_rank: int) -> range:
        """The global ranks of one data-parallel replica (dp is the outermost axis)."""
        size = self.pp * self.tp
        return range(dp_rank * size, (dp_rank + 1) * size)

    def rank_of(self, dp_rank: int, pp_rank: int, tp_rank: int) -> int:
        return (dp_rank * self.pp + pp_rank) * self.tp + tp_rank

    def tp_group(self, rank: int) -> list[int]:
        """Global ranks sharing this rank's tensor-parallel group."""
        dp_rank, pp_rank, _ = self.coordinates(rank)
        return [self.rank_of(dp_rank, pp_rank, t) for t in range(self.tp)]

    def pp_group(self, rank: int) -> list[int]:
        """Global ranks of this rank's pipeline, first stage first."""
        dp_rank, _, tp_rank = self.coordinates(rank)
        return [self.rank_of(dp_rank, p, tp_rank) for p in range(self.pp)]

    def dp_group(self, rank: int) -> list[int]:
        _, pp_rank, tp_rank = self.coordinates(rank)
        return [self.rank_of(d, pp_rank, tp_rank) for d in range(self.dp)]

    def group(self, kind: str, rank: int) -> list[int]:
        """The global ranks of this rank's "tp", "pp" or "dp" group."""
        return {"tp": self.tp_group, "pp": self.pp_group, "dp": self.dp_group}[kind](rank)

    def group_key(self, kind: str, rank: int) -> str | None:
        """The name of this rank's "tp", "pp" or "dp" group: its rank set, so that groups of
        different layouts with the same members share one communicator; None for a group of one."""
        return group_key(self.group(kind, rank))


@dataclass(frozen=True)
class ModelShape:
    """The model dimensions that sharding depends on."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int = 0


@dataclass(frozen=True)
class Shard:
    """One worker's slice of the model under a layout."""

    rank: int
    layout: Layout
    layers: Span
    kv_heads: Span
    heads: Span
    ffn: Span
    vocab: Span  # rows of the LM head: the last stage splits the vocabulary
    vocab_total: int = 0

    @property
    def vocab_rows_padded(self) -> int:
        return padded_vocab_rows(self.vocab_total, self.layout.tp)

    @property
    def dp_rank(self) -> int:
        return self.layout.coordinates(self.rank)[0]

    @property
    def pp_rank(self) -> int:
        return self.layout.coordinates(self.rank)[1]

    @property
    def tp_rank(self) -> int:
        return self.layout.coordinates(self.rank)[2]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1


def padded_vocab_rows(vocab_size: int, tp: int) -> int:
    """LM-head rows every tensor-parallel rank holds, so logits gather in equal parts."""
    return -(-vocab_size // tp)


def split_evenly(total: int, parts: int) -> list[Span]:
    """Split range(total) into `parts` contiguous spans whose sizes differ by at most one."""
    base, extra = divmod(total, parts)
    spans, start = [], 0
    for index in range(parts):
        size = base + (1 if index < extra else 0)
        spans.append(Span(start, start + size))
        start += size
    return spans


def validate(layout: Layout, shape: ModelShape) -> None:
    """Raise ValueError saying exactly why `layout` cannot run this model."""
    if layout.tp > shape.num_kv_heads:
        raise ValueError(
            f"{layout} needs at least {layout.tp} KV heads; this model has {shape.num_kv_heads}"
        )
    if layout.pp > shape.num_layers:
        raise ValueError(f"{layout} needs at least {layout.pp} layers; this model has {shape.num_layers}")
    if shape.num_heads % shape.num_kv_heads:
        raise ValueError(
            f"the model's {shape.num_heads} query heads do not divide into "
            f"{shape.num_kv_heads} KV-head groups"
        )
    if layout.tp > shape.intermediate_size:
        raise ValueError(f"{layout} splits an MLP of only {shape.intermediate_size} columns")


def shard_for(layout: Layout, shape: ModelShape, rank: int) -> Shard:
    """The shard of `rank`: balanced layer range, whole KV-head groups, an even MLP slice."""
    validate(layout, shape)
    _, pp_rank, tp_rank = layout.coordinates(rank)
    group = shape.num_heads // shape.num_kv_heads
    kv_heads = split_evenly(shape.num_kv_heads, layout.tp)[tp_rank]
    return Shard(
        rank=rank,
        layout=layout,
        layers=split_evenly(shape.num_layers, layout.pp)[pp_rank],
        kv_heads=kv_heads,
        heads=Span(kv_heads.start * group, kv_heads.end * group),
        ffn=split_evenly(shape.intermediate_size, layout.tp)[tp_rank],
        vocab=split_evenly(shape.vocab_size, layout.tp)[tp_rank],
        vocab_total=shape.vocab_size,
    )


def group_key(ranks: list[int]) -> str | None:
    """The name of a group of ranks (`ranks:0,1`); None for a group of one, which needs no communicator."""
    return f"ranks:{','.join(map(str, ranks))}" if len(ranks) > 1 else None


def groups_of(layouts: list[Layout], replica: int) -> list[tuple[str, list[int]]]:
    """Every tensor- and pipeline-parallel group of one data-parallel replica under these layouts
    that has more than one rank, as (key, global ranks), each rank set once, in a fixed order that
    every rank shares (group creation is collective). Replicas never communicate with each other,
    so each forms its own groups (and can form them again after a restart)."""
    groups: dict[str, list[int]] = {}
    for layout in layouts:
        for kind in ("tp", "pp"):
            for rank in layout.replica_ranks(replica):
                members = layout.group(kind, rank)
                key = group_key(members)
                if key is not None:
                    groups.setdefault(key, members)
    return list(groups.items())
