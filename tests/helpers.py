"""Test helpers: tiny random Llama-family models as real safetensors folders, a real engine run,
and Hugging Face transformers as the reference."""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import replace
from pathlib import Path

import torch

from seesaw.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, TransportConfig, default_cache_dir
from seesaw.layout import Layout
from seesaw.model.resolve import resolve_model
from seesaw.sampling import SamplingParams
from seesaw.config import SchedulerConfig
from seesaw.worker import WorkerOptions

TINY_VOCAB = 320

# name -> (transformers config class name, config fields)
TINY_MODELS = {
    "llama-gqa-tied": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )),
    "llama-mqa-llama3-rope": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    )),
    "llama-mha-linear-rope": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    )),
    "qwen2-bias": ("Qwen2Config", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )),
    "mistral": ("MistralConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )),
}


def make_tiny_model(folder: Path, name: str) -> Path:
    """Save a tiny random model of the named family as a Hugging Face folder."""
    import transformers

    config_class, fields = TINY_MODELS[name]
    config = getattr(transformers, config_class)(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, **fields,
    )
    torch.manual_seed(sum(map(ord, name)))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.uniform_(0.8, 1.2)
            else:
                param.normal_(0.0, 0.15)  # wide logits keep greedy choices away from near-ties
    model.save_pretrained(folder)
    return folder


def engine_config(source: str, **overrides) -> EngineConfig:
    """A small CPU engine: one thread per worker, little memory, short timeouts."""
    layout = overrides.pop("layout", "t1")
    config = EngineConfig(
        model=ModelConfig(model=source),
        cache=CacheConfig(kv_cache_gb=0.05, host_buffer_gb=0.05),
        parallel=ParallelConfig(layout=Layout.parse(layout), threads_per_worker=1),
        scheduler=SchedulerConfig(max_num_batched_tokens=256),
        transport=TransportConfig(worker_start_timeout_s=120, step_timeout_s=120, heartbeat_timeout_s=30),
        cache_dir=default_cache_dir(),
    )
    for slice_name, values in overrides.items():
        config = replace(config, **{slice_name: replace(getattr(config, slice_name), **values)})
    return config


def generate(config: EngineConfig, requests: list[dict], sequential: bool = False, timeout_s: float = 300,
             stats: dict | None = None, metrics: list | None = None):
    """Run requests (keyword arguments of LocalClient.submit plus `sampling`) through a fresh engine;
    `stats` and `metrics`, when given, receive the scheduling cores' counters by name and the
    engine's stats at the end (an EngineStats)."""
    from seesaw.engine import Engine
    from seesaw.frontend.local import LocalClient

    resolved = resolve_model(config.model.model, config.cache_dir)

    async def main():
        async with Engine(config, resolved) as engine, LocalClient(engine, "test") as client:
            if sequential:
                results = [await client.generate(**request) for request in requests]
            else:
                results = await asyncio.gather(*(client.submit(**request) for request in requests))
            if stats is not None or metrics is not None:
                report = await engine.query_stats(with_timeline=True)
                (stats if stats is not None else {}).update(report.totals.counters)
                (metrics if metrics is not None else []).append(report)
            return results

    return asyncio.run(asyncio.wait_for(main(), timeout_s))


class ListSink:
    """A batch's output lines (a BatchRunner's sink), kept in the order written."""

    is_backlogged = False

    def __init__(self):
        self.lines: list[dict] = []

    def write(self, line: dict, is_error: bool = False) -> None:
        self.lines.append(line)


def greedy(max_tokens: int, **fields) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **fields)


def greedy_requests(prompts: list[list[int]], max_tokens: int) -> list[dict]:
    return [{"sampling": greedy(max_tokens), "prompt_token_ids": prompt} for prompt in prompts]


def default_config(layout: str = "t1", **overrides) -> EngineConfig:
    """The default model with a 256-token step budget, as the layout tests run it."""
    scheduler = {"max_num_batched_tokens": 256, **overrides.pop("scheduler", {})}
    return engine_config("default", layout=layout, scheduler=scheduler, **overrides)


def hf_greedy(folder: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Reference continuations from Hugging Face transformers, one prompt at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            # No end-of-sequence token: neither stop at one nor suppress it (as ignore_eos does).
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
            outputs.append(out[0, len(prompt):].tolist())
    return outputs


def random_prompts(count: int, lengths: list[int], vocab: int = TINY_VOCAB, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (lengths[i % len(lengths)],), generator=generator).tolist() for i in range(count)]


def check_block_deltas(tables, core, plan) -> None:
    """Apply a plan's block deltas as a worker does (`tables`: its BlockTables) and check that the
    worker's tables are the core's and cover every row's tokens."""
    tables.release(plan.released)
    tables.update(plan.rows)
    for row in plan.rows:
        state = core.requests[row.request_id]
        assert tables.blocks[row.request_id] == state.block_ids, f"the workers' table of {row.request_id} is stale"
        assert len(state.block_ids) >= -(-(row.start + row.num_new_tokens) // core.block_size)
    assert not set(plan.released) & {row.request_id for row in plan.rows if row.first_new_block}


def ragged_attention_batch(shapes, block_size: int, head_dim: int, device: str, kernel):
    """The attention metadata a GPU worker builds for rows of these shapes (RowShape: each row a
    request seen for the first time), through the worker's own step builder."""
    from seesaw.runtime.step_inputs import AttentionKernels, BlockTables, Uploader, build_step_inputs
    from seesaw.step import StepRow

    rows = [StepRow(f"r{i}", [0] * shape.num_new, shape.start, list(shape.block_ids)) for i, shape in enumerate(shapes)]
    kernels = AttentionKernels(block_size, head_dim, torch.float32, ragged_kernel=kernel)
    tables = BlockTables(torch.device(device), mirrored=True)
    return build_step_inputs(rows, [], tables, None, kernels, Uploader(torch.device(device))).attention


def spawned_worker_options(cmdline: bytes) -> WorkerOptions | None:
    """The options a worker process the head spawned was started with, read from its
    /proc/PID/cmdline; None for any other process."""
    args = cmdline.split(b"\0")
    try:
        return WorkerOptions.decode(args[args.index(b"seesaw.worker") + 1].decode())
    except (IndexError, ValueError):  # not a spawned worker (a UnicodeDecodeError is a ValueError too)
        return None


def check_block_holders(core, plan, rows_in_flight=()):
    """Every device block's count of holders equals the block tables holding it (so no block
    that went back to the pool is still in a table), and every block a row of the plan, or of a
    step still in flight, writes into is held by that row's request alone."""
    held: dict[int, int] = {}
    for state in core.requests.values():
        for block in state.block_ids:
            held[block] = held.get(block, 0) + 1
    pool = core.pool
    for block, count in held.items():
        assert pool.holders(block) == count, f"block {block}: {pool.holders(block)} holders counted, {count} tables"
    assert pool.num_used == len(held), f"{pool.num_used} blocks held, {len(held)} in tables"
    size = core.block_size
    for row in [*plan.rows, *rows_in_flight]:
        if row.request_id not in core.requests:
            continue
        table = core.requests[row.request_id].block_ids
        end = row.start + row.num_new_tokens
        for index in range(row.start // size, -(-end // size)):
            assert held[table[index]] == 1, f"{row.request_id} writes block {table[index]}, which others hold"


def prompt_of(request_id: str, num_tokens: int, shared: int = 0) -> list[int]:
    """A made-up prompt for a scheduling core: its first `shared` tokens are every such prompt's,
    the rest its request's own (different requests' prompts share no prefix past `shared`)."""
    own = 1000 + zlib.crc32(request_id.encode()) % 30_000
    tokens = list(range(10, 10 + min(shared, num_tokens)))
    return tokens + [own + index for index in range(num_tokens - len(tokens))]
