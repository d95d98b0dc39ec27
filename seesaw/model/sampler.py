"""Pick each row's next token from its logits: greedy, or temperature / top-k / top-p sampling.

A seeded request draws its noise from (seed, output index) alone, so its tokens do not depend
on what it was batched with; unseeded requests share the worker's generator.
"""

from __future__ import annotations

import torch

from seesaw.step import RowSampling

_SEED_STRIDE = 1_000_003


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._row_generator = torch.Generator(device=device)

    def sample(self, logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
        """One token id per row of logits: [rows, vocab], float32 -> [rows] int64, on their device."""
        tokens = logits.argmax(dim=-1)  # [rows]
        random_rows = [index for index, row in enumerate(rows) if row.temperature > 0.0]
        if random_rows:
            chosen = torch.tensor(random_rows, device=logits.device)
            picked = self._sample_random(logits.index_select(0, chosen), [rows[i] for i in random_rows])
            tokens = tokens.index_copy(0, chosen, picked)
        return tokens

    def _sample_random(self, logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
        temperatures = torch.tensor([row.temperature for row in rows], device=logits.device)
        logits = logits / temperatures[:, None]
        if any(row.top_k > 0 for row in rows) or any(row.top_p < 1.0 for row in rows):
            logits = _truncate(logits, rows)
        probs = torch.softmax(logits, dim=-1)  # [rows, vocab]
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
        noise = torch.empty_like(probs)
        for index, row in enumerate(rows):
            noise[index].exponential_(generator=self._generator_for(row))
        return (probs / noise).argmax(dim=-1)

    def _generator_for(self, row: RowSampling) -> torch.Generator:
        if row.seed is None:
            return self.generator
        return self._row_generator.manual_seed((row.seed * _SEED_STRIDE + row.output_index) & (2**63 - 1))


def _truncate(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """Mask tokens outside each row's top-k and top-p nucleus to -inf."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [rows, vocab]
    top_k = torch.tensor([row.top_k if row.top_k > 0 else vocab for row in rows], device=logits.device)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= top_k[:, None]
    top_p = torch.tensor([row.top_p for row in rows], device=logits.device)
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep a token while the mass before it is below top_p; the most likely token always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
