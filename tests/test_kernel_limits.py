"""The Triton kernels' limits are checked when a worker starts, not at its first step."""

from __future__ import annotations

from dataclasses import replace

import torch

from seesaw.model.presets import PRESETS
from seesaw.model.spec import ModelSpec
from seesaw.runtime.worker_runtime import _gpu_attention, triton_limits

LLAMA3_8B = ModelSpec.from_hf_config(dict(PRESETS["llama3-8b"]))


def test_the_real_models_are_within_the_kernels_limits():
    assert triton_limits(LLAMA3_8B, 16) == []


def test_each_limit_is_named():
    assert "block size that is a power of two of at least 16, got --block-size 8" in triton_limits(LLAMA3_8B, 8)[0]
    assert "this model's is 80" in triton_limits(replace(LLAMA3_8B, head_dim=80), 16)[0]
    assert "hidden size is 12288" in triton_limits(replace(LLAMA3_8B, hidden_size=12288), 16)[0]


def test_past_a_limit_the_worker_attends_on_the_torch_path_and_says_why(caplog):
    kernels = _gpu_attention(8, LLAMA3_8B, torch.bfloat16)
    assert kernels.ragged_kernel is None and kernels.kv_writer is None
    assert "torch reference path" in caplog.text and "--block-size 8" in caplog.text
