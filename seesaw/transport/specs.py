"""What the data plane's shared pieces are, as the head hands them to the workers: the collective
groups, the host KV buffer and the host weight store (pure: the wire carries these, the data
plane builds on them)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Backend(StrEnum):
    """The collective library workers move bulk data with."""

    GLOO = "gloo"
    NCCL = "nccl"


@dataclass(frozen=True)
class GroupSpec:
    """One communicator group: its key (its rank set, "ranks:0,1"), its global ranks in order, and an NCCL id."""

    key: str
    ranks: list[int]
    nccl_id: list[int] | None = None


@dataclass(frozen=True)
class CollectiveSpec:
    """How one replica's workers meet for bulk transfers: gloo through its first rank's TCP store,
    or NCCL ids. A gloo world is one replica: world rank = global rank - first_rank."""

    backend: Backend
    world_size: int  # the replica's workers
    groups: list[GroupSpec]
    init_address: str | None = None  # gloo only
    first_rank: int = 0


@dataclass(frozen=True)
class HostBufferSpec:
    """Where a node's host KV buffer lives and how its blocks are shaped. Host block numbers are
    the engine's, over all nodes: this buffer holds blocks first_block .. first_block + num_blocks."""

    name: str
    num_blocks: int
    block_shape: list[int]  # [layers, 2, kv_heads, block_size, head_dim]
    dtype: str
    first_block: int = 0


@dataclass(frozen=True)
class WeightStoreSpec:
    """Where the node's host weight store lives (its layout follows from the model's config)."""

    name: str
    dtype: str
    num_bytes: int
