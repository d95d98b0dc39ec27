"""The token counts penalties read, kept on a sampling worker's device beside its block tables: for
each request with a presence, frequency or repetition penalty, which tokens its prompt and output
hold and how often its output holds each. A count starts from the tokens a row brings (the first
row that samples after the request's table started over) and grows by each token the worker
samples for it, so no step waits for the host to send what the device already has."""

from __future__ import annotations

import torch

from seesaw.model.logits import TokenHistory
from seesaw.step import StepRow


class TokenCounts:
    """Rows of [capacity, vocab] tensors, one row per counted request, grown by doubling."""

    def __init__(self, device: torch.device, vocab_size: int):
        self.device = device
        self.vocab_size = vocab_size
        self.slots: dict[str, int] = {}
        self._free: list[int] = []
        self.seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)  # [capacity, vocab]
        self.counts = torch.zeros(0, vocab_size, dtype=torch.float32, device=device)

    def forget(self, request_ids) -> None:
        for request_id in request_ids:
            slot = self.slots.pop(request_id, None)
            if slot is not None:
                self._free.append(slot)

    def take(self, rows: list[StepRow]) -> None:
        """Before a step: a row whose block table starts over starts its count over too, and a row
        bringing its request's tokens starts the count from them."""
        self.forget([row.request_id for row in rows if row.first_new_block == 0])
        for row in rows:
            adjustments = row.sampling.adjustments if row.sampling is not None else None
            if adjustments is None or adjustments.history_prompt is None:
                continue
            if adjustments.history_output is None:
                raise ValueError(f"request {row.request_id}'s row brings its prompt's tokens but not its output's")
            self.forget([row.request_id])
            slot = self._slot(row.request_id)
            prompt = torch.tensor(adjustments.history_prompt, dtype=torch.long, device=self.device)
            output = torch.tensor(adjustments.history_output, dtype=torch.long, device=self.device)
            self.seen[slot] = False
            self.counts[slot] = 0.0
            self.seen[slot, prompt] = True
            self.seen[slot, output] = True
            self.counts[slot].index_add_(0, output, torch.ones(output.shape[0], device=self.device))

    def history(self, request_ids: list[str]) -> TokenHistory:
        """The counts of `request_ids` ([rows, vocab] each); ValueError names one without a count."""
        missing = [request_id for request_id in request_ids if request_id not in self.slots]
        if missing:
            raise ValueError(f"request {missing[0]}'s row has penalties, but this worker holds no count of its "
                             f"tokens (its row did not bring them)")
        index = torch.tensor([self.slots[request_id] for request_id in request_ids], dtype=torch.long,
                             device=self.device)
        return TokenHistory(self.seen.index_select(0, index), self.counts.index_select(0, index))

    def add(self, request_ids: list[str], tokens: torch.Tensor) -> None:
        """Count the tokens just sampled ([rows] on the device) into their requests' output."""
        if not request_ids:
            return
        index = torch.tensor([self.slots[request_id] for request_id in request_ids], dtype=torch.long,
                             device=self.device)
        tokens = tokens.long()
        self.seen[index, tokens] = True
        self.counts.index_put_((index, tokens), torch.ones(tokens.shape[0], device=self.device), accumulate=True)

    def _slot(self, request_id: str) -> int:
        if self._free:
            slot = self._free.pop()
        else:
            slot = len(self.slots)
            if slot >= self.seen.shape[0]:
                capacity = max(8, 2 * self.seen.shape[0])
                self.seen = _grown(self.seen, capacity)
                self.counts = _grown(self.counts, capacity)
        self.slots[request_id] = slot
        return slot


def _grown(table: torch.Tensor, capacity: int) -> torch.Tensor:
    grown = torch.zeros(capacity, table.shape[1], dtype=table.dtype, device=table.device)
    grown[: table.shape[0]] = table
    return grown
