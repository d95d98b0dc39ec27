"""The Triton RMS-norm kernels, run by Triton's CPU interpreter, agree with llama.rms_norm and torch's add."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is first imported: run the kernels on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests")

pytest.importorskip("triton")

from seesaw.model.llama import rms_norm  # noqa: E402
from seesaw.model.triton_norm import add_rms_norm_triton, rms_norm_triton  # noqa: E402

EPS = 1e-6


def _inputs(num_tokens: int, hidden: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Rows of a residual stream, an update to it and a norm weight, all rounded to `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=generator) * 3  # [num_tokens, hidden]
    update = torch.randn(num_tokens, hidden, generator=generator)  # [num_tokens, hidden]
    weight = 1 + 0.1 * torch.randn(hidden, generator=generator)  # [hidden]
    return x.to(dtype), update.to(dtype), weight.to(dtype)


@pytest.mark.parametrize("hidden", [64, 576, 4096])
@pytest.mark.parametrize("num_tokens", [1, 7])
def test_rms_norm_matches_reference(num_tokens, hidden):
    x, _, weight = _inputs(num_tokens, hidden)
    out = rms_norm_triton(x, weight, EPS)
    torch.testing.assert_close(out, rms_norm(x, weight, EPS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden", [64, 576, 4096])
@pytest.mark.parametrize("num_tokens", [1, 7])
def test_add_rms_norm_matches_reference(num_tokens, hidden):
    hidden_states, update, weight = _inputs(num_tokens, hidden, seed=1)
    before = hidden_states.clone(), update.clone()
    total, out = add_rms_norm_triton(hidden_states, update, weight, EPS)
    expected_total = hidden_states + update
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, rms_norm(expected_total, weight, EPS), rtol=1e-5, atol=1e-5)
    assert torch.equal(hidden_states, before[0]) and torch.equal(update, before[1])


# bf16 is left out: the interpreter stores it as uint16 and does not support operations on it (Triton's
# debugging guide); here its sums come out a bf16 step off torch's, so bf16 needs a GPU run.
@pytest.mark.parametrize("dtype", [torch.float16])
def test_half_precision_matches_reference(dtype):
    hidden_states, update, weight = _inputs(7, 576, dtype, seed=2)
    total, out = add_rms_norm_triton(hidden_states, update, weight, EPS)
    expected_total = hidden_states + update  # torch adds in fp32 and rounds once, as the kernel does
    assert total.dtype == out.dtype == dtype
    torch.testing.assert_close(total, expected_total, rtol=0, atol=0)
    torch.testing.assert_close(out, rms_norm(expected_total, weight, EPS), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(rms_norm_triton(hidden_states, weight, EPS), rms_norm(hidden_states, weight, EPS),
                               rtol=2e-3, atol=2e-3)


def test_row_strided_inputs_match_reference():
    # Slices of wider tensors: rows 640 elements apart, 576 used, as a view into a fused projection gives.
    wide_hidden, wide_update, _ = _inputs(5, 640, seed=3)
    _, _, weight = _inputs(5, 576, seed=3)
    hidden_states, update = wide_hidden[:, 32:608], wide_update[:, :576]  # [5, 576], stride 640
    assert hidden_states.stride(0) == 640 and not hidden_states.is_contiguous()
    torch.testing.assert_close(rms_norm_triton(hidden_states, weight, EPS), rms_norm(hidden_states, weight, EPS),
                               rtol=1e-5, atol=1e-5)
    total, out = add_rms_norm_triton(hidden_states, update, weight, EPS)
    torch.testing.assert_close(total, hidden_states + update, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, rms_norm(hidden_states + update, weight, EPS), rtol=1e-5, atol=1e-5)


def test_no_tokens_gives_empty_outputs():
    x, update, weight = _inputs(0, 64)
    assert rms_norm_triton(x, weight, EPS).shape == (0, 64)
    total, out = add_rms_norm_triton(x, update, weight, EPS)
    assert total.shape == out.shape == (0, 64)


@pytest.mark.parametrize(("change", "named"), [
    (lambda a: {**a, "x": a["x"][0]}, "x must be"),
    (lambda a: {**a, "x": a["x"].double()}, "x must be"),
    (lambda a: {**a, "x": a["x"].t()}, "x's last dim"),
    (lambda a: {**a, "weight": a["weight"][:32]}, "weight"),
    (lambda a: {**a, "weight": a["weight"].half()}, "weight"),
])
def test_bad_rms_norm_arguments_are_named(change, named):
    x, _, weight = _inputs(64, 64)
    with pytest.raises(ValueError, match=named):
        rms_norm_triton(**change(dict(x=x, weight=weight, eps=EPS)))


@pytest.mark.parametrize(("change", "named"), [
    (lambda a: {**a, "hidden": a["hidden"].half()}, "update must match hidden"),
    (lambda a: {**a, "update": a["update"][:3]}, "update must match hidden"),
    (lambda a: {**a, "update": a["update"].unsqueeze(0)}, "update must be"),
    (lambda a: {**a, "hidden": torch.zeros(2, 8193), "update": torch.zeros(2, 8193)}, "hidden's hidden size"),
    (lambda a: {**a, "weight": a["weight"].unsqueeze(0)}, "weight"),
])
def test_bad_add_rms_norm_arguments_are_named(change, named):
    hidden_states, update, weight = _inputs(4, 64)
    with pytest.raises(ValueError, match=named):
        add_rms_norm_triton(**change(dict(hidden=hidden_states, update=update, weight=weight, eps=EPS)))
