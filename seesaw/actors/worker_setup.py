"""Turns a worker's load command into its runtime: joins the communicator groups, attaches the
node's shared memory, picks the weight source; the runtime and the model never see a message."""

from __future__ import annotations

from pathlib import Path

import torch

from seesaw.messages import LoadShard
from seesaw.model.spec import ModelSpec
from seesaw.model.weights import RandomSource, SafetensorsSource, WeightSource, neutral_shapes
from seesaw.runtime.worker_runtime import RuntimeConfig, WorkerRuntime, device_for
from seesaw.transport.collective import join_groups
from seesaw.transport.host_buffer import HostBuffer
from seesaw.transport.weight_store import WeightStore


def runtime_config(command: LoadShard, device_index: int = 0) -> RuntimeConfig:
    return RuntimeConfig(
        spec=ModelSpec.from_hf_config(command.hf_config),
        rank=command.rank,
        layouts=tuple(command.layouts),
        dtype=command.dtype,
        device=command.device,
        block_size=command.block_size,
        kv_cache_bytes=command.kv_cache_bytes,
        memory_fraction=command.memory_fraction,
        num_threads=command.num_threads,
        seed=command.dummy_seed,
        device_index=device_index,
        max_step_tokens=command.max_step_tokens,
        max_step_rows=command.max_step_rows,
        max_model_len=command.max_model_len,
    )


def build_runtime(command: LoadShard, device_index: int = 0) -> WorkerRuntime:
    """`device_index`: which of this host's GPUs the worker owns (its local rank)."""
    config = runtime_config(command, device_index)
    device = device_for(config.device, config.device_index)
    if device.type == "cuda":  # before anything touches a GPU, NCCL's set-up included
        torch.cuda.set_device(device)
    communicators = join_groups(command.collective, command.rank, device, command.join_timeout_s)
    weights: WeightSource
    if command.weight_store is not None:
        weights = WeightStore.attach(command.weight_store, neutral_shapes(config.spec))
    elif command.weights_folder:
        weights = SafetensorsSource(Path(command.weights_folder))
    else:
        weights = RandomSource(config.spec, command.dummy_seed, device)
    host_buffer = HostBuffer.attach(command.host_buffer) if command.host_buffer else None
    return WorkerRuntime(config, communicators, weights, host_buffer)
