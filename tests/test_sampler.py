"""Sampling: greedy is argmax, truncation keeps exactly the right tokens, seeds make draws reproducible."""

from __future__ import annotations

import torch

from seesaw.step import RowSampling
from seesaw.model.sampler import Sampler, _truncate


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    tokens = Sampler(torch.device("cpu")).sample(logits, [RowSampling(0.0)] * 5).tolist()
    assert tokens == logits.argmax(-1).tolist()


def test_top_k_one_is_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    rows = [RowSampling(1.0, top_k=1, seed=s) for s in range(4)]
    assert Sampler(torch.device("cpu")).sample(logits, rows).tolist() == logits.argmax(-1).tolist()


def test_truncation_matches_a_brute_force_nucleus():
    generator = torch.Generator().manual_seed(2)
    for top_k, top_p in [(0, 0.5), (5, 1.0), (7, 0.8), (0, 0.99), (3, 0.1)]:
        logits = torch.randn(1, 30, generator=generator)
        kept = _truncate(logits, torch.tensor([top_p]), torch.tensor([float(top_k)]))[0] > float("-inf")
        order = logits[0].argsort(descending=True).tolist()
        if top_k:
            order = order[:top_k]
        probs = torch.softmax(logits[0, order], -1).tolist()
        expected, mass = set(), 0.0
        for token, p in zip(order, probs):
            if mass >= top_p and expected:
                break
            expected.add(token)
            mass += p
        assert set(torch.nonzero(kept).flatten().tolist()) == expected


def test_seeded_draws_do_not_depend_on_the_batch():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 40, generator=generator)
    row = RowSampling(0.9, top_p=0.95, seed=1234, output_index=5)
    alone = Sampler(torch.device("cpu"), seed=0).sample(logits[2:3], [row]).tolist()
    rows = [RowSampling(1.0)] * 6
    rows[2] = row
    together = Sampler(torch.device("cpu"), seed=99).sample(logits, rows).tolist()
    assert together[2] == alone[0]


def test_samples_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(torch.device("cpu"), seed=0)
    counts = torch.zeros(4)
    for index in range(4000):
        counts[sampler.sample(logits, [RowSampling(1.0, seed=7, output_index=index)])[0].item()] += 1
    assert torch.allclose(counts / 4000, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)


def test_a_step_with_random_rows_makes_no_blocking_copy_to_the_device(monkeypatch):
    """The random rows' parameters go up in one copy from pinned memory, never as tensors made
    from lists on the device (each a copy the host waits for); unseeded noise is one draw."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    sampler = Sampler(torch.device("cpu"))
    uploads = []
    upload = sampler.upload
    monkeypatch.setattr(sampler, "upload", lambda columns: uploads.append(columns) or upload(columns))
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(4))
    rows = [RowSampling(0.8, top_p=0.9, top_k=5)] * 4 + [RowSampling(0.0), RowSampling(1.0, seed=3)]
    with Ops() as ops:
        sampler.sample(logits, rows)
    assert len(uploads) == 1
    assert ops.names.count("exponential_.default") == 2  # the unseeded rows at once, the seeded row alone
