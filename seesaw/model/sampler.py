"""Pick each row's next token from its logits: greedy, or temperature / top-k / top-p sampling.

A seeded request draws its noise from (seed, output index) alone, so its tokens do not depend
on what it was batched with; unseeded requests share the worker's generator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from seesaw.step import RowSampling

_SEED_STRIDE = 1_000_003
_KEY_MASK = 2**63 - 1

# (probs [rows, vocab] float32, keys [rows] int64) -> tokens [rows] int64: an exponential race
# per row with noise from the row's key alone (seesaw.model.triton_sampling on GPUs)
Race = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Sampler:
    """On a GPU a step's sampling never waits for the device: the random rows' parameters reach it
    in non-blocking copies from pinned memory. With a `race` kernel (GPUs) every random row draws in
    one launch, from a key per row: its seed and output index for a seeded row, drawn from the
    worker's generator (one launch) for the others. Without one (CPUs), unseeded rows draw their
    noise in one launch and each seeded row its own, from its seed and output index."""

    def __init__(self, device: torch.device, seed: int = 0, race: Race | None = None):
        self.device = device
        self.race = race
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._row_generator = torch.Generator(device=device)

    def sample(self, logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
        """One token id per row of logits: [rows, vocab], float32 -> [rows] int64, on their device."""
        tokens = logits.argmax(dim=-1)  # [rows]
        random_rows = [index for index, row in enumerate(rows) if row.temperature > 0.0]
        if random_rows:
            chosen_rows = [rows[i] for i in random_rows]
            params = self.upload([random_rows, [row.temperature for row in chosen_rows],
                                   [row.top_p for row in chosen_rows], [row.top_k for row in chosen_rows]])
            chosen = params[0].long()  # [random rows]
            picked = self._sample_random(logits.index_select(0, chosen), chosen_rows, params[1:])
            tokens = tokens.index_copy(0, chosen, picked)
        return tokens

    def upload(self, columns: list[list[float]] | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[len(columns), n] on the device, without waiting for it (in float32, exact for indices
        and top-k below 2**24); a host tensor goes as it is."""
        host = columns if isinstance(columns, torch.Tensor) else torch.tensor(columns, dtype=dtype)  # [columns, n]
        if self.device.type == "cpu":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _keys(self, rows: list[RowSampling]) -> torch.Tensor:
        """[rows] int64 on the device: each seeded row's key from its seed and output index, each
        other row's drawn from the worker's generator."""
        seeded = self.upload([[_seed_key(row) if row.seed is not None else 0 for row in rows],
                               [row.seed is not None for row in rows]], torch.int64)  # [2, rows]
        if all(row.seed is not None for row in rows):
            return seeded[0]
        drawn = torch.randint(0, _KEY_MASK, (len(rows),), generator=self.generator, device=self.device)  # [rows]
        return torch.where(seeded[1].bool(), seeded[0], drawn)

    def _sample_random(self, logits: torch.Tensor, rows: list[RowSampling], params: torch.Tensor) -> torch.Tensor:
        temperatures, top_p, top_k = params  # [rows] each
        logits = logits / temperatures[:, None]
        if any(row.top_k > 0 for row in rows) or any(row.top_p < 1.0 for row in rows):
            logits = _truncate(logits, top_p, top_k)
        probs = torch.softmax(logits, dim=-1)  # [rows, vocab]
        if self.race is not None:
            return self.race(probs, self._keys(rows))
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
        noise = torch.empty_like(probs)
        if any(row.seed is None for row in rows):
            noise.exponential_(generator=self.generator)  # every row at once; seeded rows redraw below
        for index, row in enumerate(rows):
            if row.seed is not None:
                noise[index].exponential_(generator=self._seeded(row))
        return (probs / noise).argmax(dim=-1)

    def _seeded(self, row: RowSampling) -> torch.Generator:
        return self._row_generator.manual_seed(_seed_key(row))


def _seed_key(row: RowSampling) -> int:
    """A seeded row's key: its seed and output index, folded into 63 bits."""
    return (row.seed * _SEED_STRIDE + row.output_index) & _KEY_MASK


def _truncate(logits: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Mask tokens outside each row's top-k (0: all) and top-p nucleus to -inf; top_p and top_k
    are [rows] tensors on the logits' device."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [rows, vocab]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= torch.where(top_k > 0, top_k, vocab)[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep a token while the mass before it is below top_p; the most likely token always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
