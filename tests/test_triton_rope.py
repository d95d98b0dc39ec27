"""The Triton rotary kernel, run by Triton's CPU interpreter, agrees with the torch rotation."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is first imported: run the kernel on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests; tests/test_gpu.py runs the GPU")
pytest.importorskip("triton")

from seesaw.model.rope import apply_rotation, inverse_frequencies, rotation  # noqa: E402
from seesaw.model.spec import RopeSpec  # noqa: E402
from seesaw.model.triton_rope import apply_rotation_triton  # noqa: E402


def _angles(num_tokens: int, head_dim: int, dtype: torch.dtype = torch.float32):
    positions = torch.tensor([0, 1, 7, 100, 4095, 31, 2][:num_tokens])
    inv_freq = inverse_frequencies(RopeSpec(kind="default", theta=10000.0), head_dim)
    return rotation(positions, inv_freq, dtype)


@pytest.mark.parametrize(("num_heads", "head_dim"), [(1, 64), (3, 64), (9, 128), (32, 128)])
@pytest.mark.parametrize("num_tokens", [1, 7])
def test_matches_the_torch_rotation(num_heads, head_dim, num_tokens):
    x = torch.randn(num_tokens, num_heads, head_dim, generator=torch.Generator().manual_seed(num_heads))
    cos, sin = _angles(num_tokens, head_dim)
    torch.testing.assert_close(apply_rotation_triton(x, cos, sin), apply_rotation(x, cos, sin), rtol=1e-5, atol=1e-5)


def test_a_view_of_fused_qkv_is_read_in_place():
    """q and k come out of one projection as strided views, as the decoder layer has them."""
    qkv = torch.randn(5, (4 + 2 + 2) * 64, generator=torch.Generator().manual_seed(3))
    q, k, _ = qkv.split([4 * 64, 2 * 64, 2 * 64], dim=-1)
    cos, sin = _angles(5, 64)
    for part, heads in ((q, 4), (k, 2)):
        view = part.view(5, heads, 64)
        torch.testing.assert_close(apply_rotation_triton(view, cos, sin), apply_rotation(view, cos, sin),
                                   rtol=1e-5, atol=1e-5)


# bf16 is left out: the interpreter does not support operations on bfloat16.
def test_half_precision_rounds_once_from_fp32():
    x = torch.randn(7, 3, 64, generator=torch.Generator().manual_seed(4)).half()
    cos, sin = _angles(7, 64, torch.float16)
    expected = apply_rotation(x.float(), cos.float(), sin.float()).half()
    torch.testing.assert_close(apply_rotation_triton(x, cos, sin), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("x_shape", "table_shape", "named"), [
    ((3, 2, 64), (2, 64), "cos"), ((3, 64), (3, 64), "x must"), ((3, 2, 48), (3, 48), "head_dim"),
])
def test_bad_arguments_are_named(x_shape, table_shape, named):
    with pytest.raises(ValueError, match=named):
        apply_rotation_triton(torch.randn(x_shape), torch.randn(table_shape), torch.randn(table_shape))


def test_a_decoder_layer_gives_the_same_with_the_gpu_kernels():
    """The wiring: norms, the fused residual add, the rotation of q and k at once and the MLP's
    activation swapped in for torch's, with the layer before's output still to add."""
    from seesaw.layout import Layout, shard_for
    from seesaw.model.attention import RowShape, build_attention_batch
    from seesaw.model.llama import DecoderLayer, LayerKernels
    from seesaw.model.presets import PRESETS
    from seesaw.model.spec import ModelSpec
    from seesaw.model.triton_mlp import silu_mul_triton
    from seesaw.model.triton_norm import add_rms_norm_triton, rms_norm_triton

    spec = ModelSpec.from_hf_config(PRESETS["tiny"])
    generator = torch.Generator().manual_seed(6)
    layer = DecoderLayer(spec, shard_for(Layout(), spec.shape, 0),
                         lambda *shape: torch.randn(*shape, generator=generator) * 0.2)
    rows = [RowShape(0, 5, [3]), RowShape(20, 1, [0, 1])]
    positions = torch.tensor([0, 1, 2, 3, 4, 20])
    cos, sin = rotation(positions, inverse_frequencies(spec.rope, spec.head_dim), torch.float32)
    hidden, update = (torch.randn(6, spec.hidden_size, generator=generator) for _ in range(2))
    caches = [torch.randn(4, spec.num_kv_heads, 16, spec.head_dim, generator=generator) for _ in range(2)]

    def run(kernels: LayerKernels) -> tuple[torch.Tensor, torch.Tensor]:
        layer.kernels = kernels
        batch = build_attention_batch(rows, 16, spec.head_dim, "cpu")
        return layer(hidden, update, cos, sin, caches[0].clone(), caches[1].clone(), batch, lambda x: x)

    expected = run(LayerKernels())
    gpu = LayerKernels(rms_norm_triton, add_rms_norm_triton, apply_rotation_triton, silu_mul_triton)
    torch.testing.assert_close(run(gpu), expected, rtol=1e-5, atol=1e-5)
