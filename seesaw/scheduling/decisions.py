"""What a scheduling core decides, for the Scheduler actor to turn into messages (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from seesaw.step import StepRow


class Phase(Enum):
    """Which layout a replica's workers are in: prefill's, decode's, or static mode's only one."""

    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"  # static mode: one layout, prefill and decode rows in the same steps


@dataclass(frozen=True)
class ToHost:
    """Copy a request's KV from its device blocks (laid out for `phase`) into its host slot."""

    request_id: str
    phase: Phase
    block_ids: list[int]
    host_block_ids: list[int]


@dataclass(frozen=True)
class ToDevice:
    """Copy a request's KV from its host slot into device blocks laid out for `phase`."""

    request_id: str
    phase: Phase
    host_block_ids: list[int]
    block_ids: list[int]
    # For its first host blocks, shared with other requests: the requests whose saves wrote them.
    shared_holders: tuple[str, ...] = ()


@dataclass(slots=True)
class StepPlan:
    """What to do next: KV moves to start, then a step to run (rows may be empty), and, in
    seesaw mode, a switch to another phase (after this plan's rows, before any later step)."""

    step_id: int
    rows: list[StepRow] = field(default_factory=list)
    moves: list[ToHost | ToDevice] = field(default_factory=list)
    switch_to: Phase | None = None
    released: list[str] = field(default_factory=list)  # requests whose block tables workers may drop

    @property
    def is_empty(self) -> bool:
        return not (self.rows or self.moves or self.switch_to)
