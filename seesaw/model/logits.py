"""What happens to a step's logits between the model and the sampler, and what is reported from
them: each row's adjustments (penalties on the tokens its request holds, fixed biases), its banned
tokens and its grammar's mask; and log-probabilities of the model's own distribution. Pure torch,
on the logits' device: only the values a row asked for travel back to the host."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from seesaw.step import RowSampling, TokenLogprobs

# (columns of numbers, or a host tensor; dtype) -> [len(columns), n] on the device, without waiting
# for it (the sampler's)
Upload = Callable[[list[list[float]] | torch.Tensor, torch.dtype], torch.Tensor]


@dataclass
class TokenHistory:
    """Each penalised row's token counts, [rows, vocab] on the device: `seen` whether its prompt or
    output holds a token, `counts` how often its output does."""

    seen: torch.Tensor  # bool
    counts: torch.Tensor  # float32


def adjusted_logits(logits: torch.Tensor, rows: list[RowSampling], history: TokenHistory | None,
                    upload: Upload) -> torch.Tensor:
    """The logits [rows, vocab] float32 the sampler draws from: penalties for the rows that count
    tokens (in order, `history` holds theirs), then biases, banned tokens and grammar masks. The
    input is left as it is (its values are the model's own, which log-probabilities report)."""
    penalised = [index for index, row in enumerate(rows) if row.adjustments and row.adjustments.counts_tokens]
    biased = [(index, row) for index, row in enumerate(rows) if row.adjustments and row.adjustments.bias_ids]
    banned = [(index, row) for index, row in enumerate(rows) if row.banned_ids]
    masked = [index for index, row in enumerate(rows) if row.allowed is not None]
    if not (penalised or biased or banned or masked):
        return logits
    out = logits.clone() if penalised or biased or banned else logits
    if penalised:
        _penalise(out, [rows[i] for i in penalised], penalised, history, upload)
    if biased:
        places = [(index, token, value) for index, row in biased
                  for token, value in zip(row.adjustments.bias_ids, row.adjustments.bias_values)]
        where = upload([[p[0] for p in places], [p[1] for p in places]], torch.int64)  # [2, entries]
        values = upload([[p[2] for p in places]], torch.float32)[0]
        out.index_put_((where[0], where[1]), values, accumulate=True)
    if banned:
        places = [(index, token) for index, row in banned for token in row.banned_ids]
        where = upload([[p[0] for p in places], [p[1] for p in places]], torch.int64)
        out.index_put_((where[0], where[1]), torch.tensor(float("-inf"), device=out.device))
    if masked:
        refused = ~unpack_masks([rows[i].allowed for i in masked], logits.shape[-1], upload)  # [masked, vocab]
        if len(masked) == len(rows):
            out = out.masked_fill(refused, float("-inf")) if out is logits else out.masked_fill_(refused, float("-inf"))
        else:
            index = upload([masked], torch.int64)[0]
            out = out.clone() if out is logits else out
            out[index] = out[index].masked_fill(refused, float("-inf"))
    return out


def _penalise(out: torch.Tensor, rows: list[RowSampling], places: list[int], history: TokenHistory,
              upload: Upload) -> None:
    """Repetition divides a seen token's positive logit and multiplies its negative one; frequency
    subtracts per time the output holds the token, presence once if it does."""
    params = upload([[row.adjustments.repetition for row in rows], [row.adjustments.frequency for row in rows],
                     [row.adjustments.presence for row in rows]], torch.float32)  # [3, rows]
    repetition, frequency, presence = params[:, :, None]  # [rows, 1] each
    index = upload([places], torch.int64)[0]
    part = out.index_select(0, index)  # [rows, vocab]
    repeated = torch.where(part > 0, part / repetition, part * repetition)
    part = torch.where(history.seen, repeated, part)
    part = part - history.counts * frequency - (history.counts > 0).float() * presence
    out.index_copy_(0, index, part)


def unpack_masks(packed: list[str], vocab_size: int, upload: Upload) -> torch.Tensor:
    """[rows, vocab] bool on the device: which tokens each packed bitmask allows (tokens past its
    words are not allowed). Unpacked on the host, where numpy does it in one pass."""
    width = -(-vocab_size // 32)
    words = np.zeros((len(packed), width), dtype=np.int32)
    for index, text in enumerate(packed):
        row = np.frombuffer(base64.b64decode(text), dtype=np.int32)[:width]
        words[index, : row.shape[0]] = row
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]  # little-endian words
    return upload(torch.from_numpy(bits.view(np.bool_)), torch.bool)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
    """Log-probabilities under `logits` ([rows, vocab] float32) of `tokens` ([rows]) and each row's
    `top` most likely tokens: (chosen [rows], top values [rows, top], top ids [rows, top])."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, tokens.long()[:, None])[:, 0]
    if top == 0:
        empty = logprobs.new_empty(logprobs.shape[0], 0)
        return chosen, empty, empty.long()
    values, ids = logprobs.topk(top, dim=-1)
    return chosen, values, ids


def as_entries(chosen: list[float], values: list[list[float]], ids: list[list[int]],
               tops: list[int]) -> list[TokenLogprobs]:
    """Host lists of `token_logprobs`' results as one entry per row, each cut to its own `top`."""
    return [TokenLogprobs(value, row_ids[:top], row_values[:top])
            for value, row_values, row_ids, top in zip(chosen, values, ids, tops)]
