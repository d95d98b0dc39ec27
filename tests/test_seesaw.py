"""Seesaw mode end to end on CPU workers with gloo: prefill in one layout, decode in another,
re-sharding between them, every request's KV through the host buffer; outputs as at t1."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from helpers import default_config, engine_config, generate, greedy_requests, random_prompts
from seesaw.engine import Engine, EngineError
from seesaw.actors.scheduler import Scheduler
from seesaw.frontend.local import LocalClient
from seesaw.layout import Layout
from seesaw.model.resolve import resolve_model

GIB = 1 << 30


def _seesaw(config, prefill: str, decode: str, host_blocks: int, block_bytes: int):
    """`config` in seesaw mode, with a host buffer of `host_blocks` blocks per replica."""
    from dataclasses import replace

    layout = Layout.parse(prefill)
    parallel = replace(config.parallel, layout=layout, decode_layout=Layout.parse(decode))
    cache = replace(config.cache, host_buffer_gb=host_blocks * layout.dp * block_bytes / GIB)
    return replace(config, parallel=parallel, cache=cache)


# ---------------------------------------------------------------- the default model, two workers

DEFAULT_BLOCK_BYTES = 30 * 2 * 3 * 16 * 64 * 4  # layers x (k, v) x KV heads x block x head_dim x float32


@pytest.mark.parametrize("prefill,decode", [("p2", "t2"), ("t2", "p2")])
def test_default_model_switching_layouts_gives_t1_outputs(default_t1, default_prompts, prefill, decode):
    config = _seesaw(default_config(), prefill, decode, host_blocks=8, block_bytes=DEFAULT_BLOCK_BYTES)
    metrics: list = []
    results = generate(config, greedy_requests(default_prompts, 24), metrics=metrics)
    assert len(results) == len(default_prompts) and all(r.error is None for r in results)
    assert all(len(r.token_ids) == 24 for r in results)  # each request finished once, whole
    matches = sum(r.token_ids == expected for r, expected in zip(results, default_t1))
    assert matches >= 0.95 * len(default_prompts)  # the layouts tests' tolerance
    (stats,) = metrics
    transitions = stats.run.transitions
    assert len(transitions) >= 5
    assert {t.direction for t in transitions} == {f"{prefill}->{decode}", f"{decode}->{prefill}"}
    assert all(t.num_workers_done == 2 and t.num_bytes > 0 for t in transitions)
    totals = stats.totals
    # Each request's KV is read back once, but blocks of a prefix another request saved were not
    # written again, and blocks found on the device in the decode layout were not read again.
    counters = totals.counters
    shared_bytes = (counters["host_shared_blocks"] - counters["load_shared_blocks"]) * DEFAULT_BLOCK_BYTES
    assert totals.written_bytes > 0 and totals.read_bytes == totals.written_bytes + shared_bytes


# ---------------------------------------------------------------- a tiny model, four workers

TINY_BLOCK_BYTES = 3 * 2 * 4 * 16 * 16 * 4  # the MHA tiny model: 3 layers, 4 KV heads, head_dim 16


@pytest.fixture(scope="module")
def tiny_mha(tiny_models):
    return str(tiny_models["llama-mha-linear-rope"])


@pytest.fixture(scope="module")
def tiny_prompts():
    return random_prompts(16, [4, 50, 17, 90, 1, 30], seed=11)


@pytest.fixture(scope="module")
def tiny_t1(tiny_mha, tiny_prompts):
    config = engine_config(tiny_mha, scheduler={"max_num_batched_tokens": 48})
    return [r.token_ids for r in generate(config, greedy_requests(tiny_prompts, 12))]


@pytest.mark.parametrize("prefill,decode", [("t2p2", "t4"), ("d2p2", "d2t2"), ("t1", "t1")])
def test_tiny_model_switching_layouts_gives_t1_outputs(tiny_mha, tiny_prompts, tiny_t1, prefill, decode):
    # 7 blocks per replica hold the longest request (102 tokens) and little else.
    config = _seesaw(engine_config(tiny_mha, scheduler={"max_num_batched_tokens": 48}), prefill, decode,
                     host_blocks=7, block_bytes=TINY_BLOCK_BYTES)
    metrics: list = []
    results = generate(config, greedy_requests(tiny_prompts, 12), metrics=metrics)
    assert [r.token_ids for r in results] == tiny_t1
    (stats,) = metrics
    replicas = Layout.parse(prefill).dp
    for replica in range(replicas):
        assert sum(t.replica == replica for t in stats.run.transitions) >= 5
    if prefill == decode:  # one layout: phases switch, the KV still goes through the host, no weights move
        assert all(t.num_bytes == 0 for t in stats.run.transitions)
        assert stats.totals.written_bytes > 0


def test_tiny_model_moves_paused_requests_to_the_host_for_prompts_and_keeps_t1_outputs(tiny_mha, tiny_prompts,
                                                                                     tiny_t1):
    # A device pool of 14 blocks (224 tokens) per replica and a host buffer of 12: when the host
    # buffer drains, requests still decoding hold most of the pool and the next prompts need it.
    page = 2 * 2 * 2 * 16 * 16 * 4  # the largest block of either layout: t2p2's 2 layers x 2 KV heads
    config = _seesaw(engine_config(tiny_mha, scheduler={"max_num_batched_tokens": 48},
                                   cache={"kv_cache_gb": 14 * page / GIB}),
                     "t2p2", "t4", host_blocks=12, block_bytes=TINY_BLOCK_BYTES)
    metrics: list = []
    results = generate(config, greedy_requests(tiny_prompts, 12), metrics=metrics)
    assert [r.token_ids for r in results] == tiny_t1
    assert metrics[0].totals.counters["paused_to_host"] > 0


def test_a_worker_killed_during_a_transition_fails_the_run_naming_it(tiny_mha, tiny_prompts):
    config = _seesaw(engine_config(tiny_mha, scheduler={"max_num_batched_tokens": 48},
                                   transport={"step_timeout_s": 60, "max_restarts": 0}), "p2", "t2",
                     host_blocks=9, block_bytes=TINY_BLOCK_BYTES)
    resolved = resolve_model(config.model.model, config.cache_dir)

    async def run() -> str:
        async with Engine(config, resolved) as engine, LocalClient(engine, "kill") as client:
            scheduler = _scheduler_of(engine)
            start_reshard = scheduler._start_reshard

            def reshard_then_kill(replica, layout, index):
                start_reshard(replica, layout, index)
                if engine.config.parallel.layouts[0] != layout:
                    os.kill(engine._processes[1].pid, signal.SIGKILL)  # right behind the Reshard command

            scheduler._start_reshard = reshard_then_kill
            futures = [client.submit(**request) for request in greedy_requests(tiny_prompts, 12)]
            results = await asyncio.gather(*futures, return_exceptions=True)
            assert all(isinstance(r, EngineError) or r.status_code == 500 for r in results)
            return engine.failure, [str(r) if isinstance(r, EngineError) else r.error for r in results]

    failure, errors = asyncio.run(asyncio.wait_for(run(), 120))
    assert "worker 1 failed while re-sharding to t2" in failure and "SIGKILL" in failure
    assert errors == [failure] * len(tiny_prompts)  # every request is answered, with the reason


def test_a_worker_killed_during_a_transition_is_restarted_and_outputs_stay_as_at_t1(tiny_mha, tiny_prompts, tiny_t1):
    config = _seesaw(engine_config(tiny_mha, scheduler={"max_num_batched_tokens": 48},
                                   transport={"step_timeout_s": 60}), "p2", "t2",
                     host_blocks=7, block_bytes=TINY_BLOCK_BYTES)
    resolved = resolve_model(config.model.model, config.cache_dir)

    async def run():
        async with Engine(config, resolved) as engine, LocalClient(engine, "restart") as client:
            scheduler = _scheduler_of(engine)
            start_reshard = scheduler._start_reshard
            killed = []

            def reshard_then_kill(replica, layout, index):
                start_reshard(replica, layout, index)
                if not killed and engine.config.parallel.layouts[0] != layout:
                    killed.append(engine._processes[1].pid)
                    os.kill(killed[0], signal.SIGKILL)

            scheduler._start_reshard = reshard_then_kill
            results = await asyncio.gather(*(client.submit(**r) for r in greedy_requests(tiny_prompts, 12)))
            return results, await engine.query_stats(with_timeline=True), killed

    results, metrics, killed = asyncio.run(asyncio.wait_for(run(), 240))
    assert killed and metrics.run.replica_restarts == 1
    assert [r.token_ids for r in results] == tiny_t1


def _scheduler_of(engine: Engine) -> Scheduler:
    """The engine's Scheduler actor, for a test that injects a fault right behind its Reshard."""
    return next(actor for actor in engine._actors if isinstance(actor, Scheduler))
