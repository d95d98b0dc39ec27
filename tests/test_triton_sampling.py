"""The sampling race kernel, run by Triton's CPU interpreter: one launch draws every random row of
a step, each row's token follows its probabilities, and a seeded row's token depends only on its
seed and output index."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is first imported: run the kernels on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests; tests/test_gpu.py runs on the GPU")
pytest.importorskip("triton")

from seesaw.model import triton_sampling  # noqa: E402
from seesaw.model.sampler import Sampler  # noqa: E402
from seesaw.model.triton_sampling import exponential_race_triton  # noqa: E402
from seesaw.step import RowSampling  # noqa: E402

CPU = torch.device("cpu")


def test_raced_draws_follow_the_distribution(monkeypatch):
    """500 rows of the same probabilities, each with its own key, in one launch (of narrow programs,
    for the interpreter's sake). Uniform noise in place of exponential would put 0.58 on the first."""
    monkeypatch.setattr(triton_sampling, "_COLUMNS", 16)
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05])
    probs = expected.expand(500, 4).contiguous()  # [rows, vocab]
    tokens = exponential_race_triton(probs, torch.arange(500, dtype=torch.int64) * 7919)
    assert torch.allclose(torch.bincount(tokens, minlength=4) / 500, expected, atol=0.05)


def test_a_key_wins_the_same_token_wherever_its_row_sits_and_past_the_first_columns():
    """Keys count tokens by their index, so a vocabulary of several loop iterations draws from all of
    them, and a row's token does not change with its neighbours."""
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(5, 3000, generator=generator) * 0.1, dim=-1)  # [rows, vocab]
    keys = torch.tensor([11, 22, 33, 44, 55])
    together = exponential_race_triton(probs, keys)
    alone = exponential_race_triton(probs[3:4].contiguous(), keys[3:4])
    assert together[3] == alone[0] and together.max() >= 1024  # nearly flat: most winners lie past the first 1,024


def test_every_random_row_of_a_step_draws_in_one_launch_and_seeded_rows_keep_their_tokens(monkeypatch):
    """Seeded and unseeded rows together: one launch of the race; a seeded row's token is the one it
    draws alone, under another worker seed."""
    launches = []
    kernel = triton_sampling._race_kernel

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(triton_sampling, "_race_kernel", Counted())
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(3))
    seeded = RowSampling(0.9, top_p=0.95, seed=1234, output_index=5)
    rows = [RowSampling(1.0), RowSampling(0.7, top_k=5), seeded, RowSampling(1.0, seed=9), RowSampling(0.0),
            RowSampling(1.0)]
    together = Sampler(CPU, seed=99, race=exponential_race_triton).sample(logits, rows).tolist()
    assert launches == [(5,)]  # the five random rows
    alone = Sampler(CPU, seed=0, race=exponential_race_triton).sample(logits[2:3], [seeded]).tolist()
    assert together[2] == alone[0] and together[4] == logits[4].argmax().item()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="probs must be"):
        exponential_race_triton(torch.rand(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="keys must be \\[rows\\] int64 for 3 rows"):
        exponential_race_triton(torch.rand(3, 4), torch.zeros(2, dtype=torch.int64))
