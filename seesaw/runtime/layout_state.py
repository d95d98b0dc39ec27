"""What a worker holds for one layout: its shard, the model laid over the weight arena, its view
of the KV arena, its communicators and its vocabulary slice; and one forward pass of its stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from seesaw.layout import Layout, Shard, padded_vocab_rows, split_evenly
from seesaw.model.llama import ShardModel
from seesaw.model.rope import rotation
from seesaw.model.spec import ModelSpec
from seesaw.model.logits import token_logprobs
from seesaw.runtime.step_inputs import PromptScoring, StepInputs
from seesaw.transport.collective import Communicator


SCORE_CHUNK = 256  # prompt places whose logits are made at once (their vocabulary-wide rows are large)


class StageOutput(NamedTuple):
    """The last stage's result: float32 logits [sampled rows, vocab], and for scored prompt places
    (chosen [n], top values [n, top], top ids [n, top]) of the model's log-probabilities, or None."""

    logits: torch.Tensor
    prompt_scores: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class StageContext:
    """What every layout's forward pass shares: the model's shape, device and dtype."""

    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    inv_freq: torch.Tensor


class LayoutState:
    """One layout's part of a worker: `forward` runs this worker's stage of a step."""

    def __init__(self, shard: Shard, model: ShardModel, kv_pages: torch.Tensor,
                 communicators: dict[str, Communicator], context: StageContext):
        self.shard = shard
        self.layout: Layout = shard.layout
        self.model = model
        self.kv_pages = kv_pages  # [blocks, layers, 2, kv_heads, block_size, head_dim]
        self.context = context
        self.tp = communicators.get(self.layout.group_key("tp", shard.rank))
        self.pp = communicators.get(self.layout.group_key("pp", shard.rank))
        self.vocab_index = None
        if self.tp is not None and shard.is_last_stage:
            self.vocab_index = gathered_vocab_index(context.spec.vocab_size, self.layout.tp).to(context.device)

    @property
    def is_sampling(self) -> bool:
        """Whether this rank turns logits into tokens (tensor-parallel rank 0 of the last stage)."""
        return self.shard.is_last_stage and self.shard.tp_rank == 0

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum row-parallel partial outputs over the tensor-parallel group."""
        if self.tp is not None:
            self.tp.all_reduce(partial)
        return partial

    def forward(self, inputs: StepInputs) -> StageOutput | None:
        """Run this stage; on the last stage, its output (every tensor-parallel rank gets the
        gathered logits), elsewhere None."""
        context, shard = self.context, self.shard
        with torch.inference_mode():
            cos, sin = rotation(inputs.positions, context.inv_freq, context.dtype)
            num_tokens = inputs.token_ids.shape[0]
            if shard.is_first_stage:
                hidden = self.model.embed_tokens(inputs.token_ids)  # [num_tokens, hidden]
            else:
                hidden = torch.empty(num_tokens, context.spec.hidden_size, dtype=context.dtype, device=context.device)
                self.pp.recv(hidden, shard.pp_rank - 1)
            hidden = self.model(hidden, cos, sin, self.kv_pages, inputs.attention, self.reduce)
            if not shard.is_last_stage:
                self.pp.send(hidden, shard.pp_rank + 1)
                return None
            scores = None if inputs.scoring is None else self._score(hidden, inputs.scoring)
            if not inputs.sampled_ids:
                return None if scores is None else StageOutput(hidden.new_empty(0, 0, dtype=torch.float32), scores)
            return StageOutput(self._logits(hidden.index_select(0, inputs.sample_index)), scores)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [rows, vocab] of final hidden states, gathered across the tensor-parallel group."""
        logits = self.model.logits(hidden)  # [rows, vocab here]
        if self.vocab_index is not None:
            logits = gather_vocab(self.tp, logits, self.vocab_index)
        return logits

    def _score(self, hidden: torch.Tensor, scoring: PromptScoring) -> tuple[torch.Tensor, ...]:
        """The log-probabilities of the prompt tokens that follow the scored places, a chunk of
        places at a time."""
        parts = []
        for first in range(0, scoring.places.shape[0], SCORE_CHUNK):
            places = scoring.places[first : first + SCORE_CHUNK]
            logits = self._logits(hidden.index_select(0, places))
            parts.append(token_logprobs(logits, scoring.targets[first : first + SCORE_CHUNK], scoring.top))
        return tuple(torch.cat(column) for column in zip(*parts))


def group_uses(states) -> list[tuple[str, Communicator]]:
    """Each communicator the layouts' steps use and how ("tp": all-reduces, "pp": sends to the next
    stage), once each, in the layouts' order: the same order on every member of a group, since a
    group's members hold it in the same layouts and the same roles."""
    uses, seen = [], set()
    for state in states:
        for kind, communicator in (("tp", state.tp), ("pp", state.pp)):
            if communicator is not None and (kind, id(communicator)) not in seen:
                seen.add((kind, id(communicator)))
                uses.append((kind, communicator))
    return uses


def pass_along(pp: Communicator, tensor: torch.Tensor) -> None:
    """Send `tensor` down the pipeline as a step does: each stage receives it from the one before
    (into `tensor`) and sends it to the one after."""
    if pp.rank > 0:
        pp.recv(tensor, pp.rank - 1)
    if pp.rank < pp.size - 1:
        pp.send(tensor, pp.rank + 1)


def gathered_vocab_index(vocab_size: int, tp: int) -> torch.Tensor:
    """Positions of the real vocabulary rows in logits gathered from `tp` equally padded shards."""
    padded = padded_vocab_rows(vocab_size, tp)
    spans = split_evenly(vocab_size, tp)
    return torch.cat([torch.arange(span.size) + part * padded for part, span in enumerate(spans)])


def gather_vocab(tp: Communicator, logits: torch.Tensor, vocab_index: torch.Tensor) -> torch.Tensor:
    """Whole-vocabulary logits [rows, vocab] from each tensor-parallel rank's [rows, padded slice]."""
    gathered = tp.all_gather(logits.t().contiguous())  # [tp * padded slice, rows]
    return gathered.index_select(0, vocab_index).t()
