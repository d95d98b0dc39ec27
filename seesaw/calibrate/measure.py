"""Calibration: measure this machine with torch, the real gloo communicators and the real engine,
and fit the profile entries the simulator reads (the one module of `seesaw.sim` that runs torch).

A CPU "device" here is one worker's share of the cores (cores / workers threads), so a profile is
written per worker count: `NAME-w1`, `NAME-w2`, ... each with its own link entry for the gloo
all-reduce and send/recv figures of that many workers.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class FitRuns:
    """The engine runs a device entry is fitted to: the model and device they run on, the token
    budget and host buffer, and each run's shape as (prompts, input tokens, output tokens)."""

    model: str = "default"
    device: str = "cpu"
    threads: int | None = None  # per worker, on CPU
    token_budget: int = 512
    host_buffer_gb: float = 1.0
    prefill: tuple[int, int, int] = (32, 256, 2)  # prefill-heavy: scales the efficiencies
    decode: tuple[int, int, int] = (32, 16, 64)  # decode-heavy: the per-row overhead, the link latency per hop
    copies: tuple[int, int, int] = (64, 64, 4)  # a seesaw run of short requests: the host link's latency per copy


def _best_s(run: Callable[[], object], repeats: int = 5, min_s: float = 0.05) -> float:
    """The fastest of `repeats` timings of `run`, each repeated until it lasts `min_s`."""
    run()
    best = float("inf")
    for _ in range(repeats):
        count, started = 0, time.perf_counter()
        while True:
            run()
            count += 1
            elapsed = time.perf_counter() - started
            if elapsed >= min_s:
                break
        best = min(best, elapsed / count)
    return best


def _collective_s(run: Callable[[], object], count: int, repeats: int = 3) -> float:
    """The fastest of `repeats` timings of `count` calls of a collective, per call: every rank
    makes the same number of calls (a time-based count would differ between ranks and hang)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(count):
            run()
        best = min(best, (time.perf_counter() - started) / count)
    return best


def compute_rates(threads: int, hidden: int, intermediate: int, token_budget: int) -> dict[str, float]:
    """Matmul and memory rates with `threads` threads, at the shapes a model of this size runs."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    big = torch.randn(1536, 1536)
    peak = 2 * 1536**3 / _best_s(lambda: big @ big)
    rates = []
    weight = torch.randn(intermediate, hidden)
    for rows in (64, token_budget // 2, token_budget):
        x = torch.randn(rows, hidden)
        rates.append(2 * rows * hidden * intermediate / _best_s(lambda x=x: x @ weight.T))
    source = torch.empty(64 << 20, dtype=torch.uint8)
    target = torch.empty_like(source)
    copy_bandwidth = 2 * source.numel() / _best_s(lambda: target.copy_(source))  # read and write
    cold_copy = _cold_copy_bandwidth(source)
    vector = torch.randn(1, hidden)
    stream = weight.numel() * 4 / _best_s(lambda: vector @ weight.T)  # a decode-shaped matmul reads the weight once
    heads, head_dim, tokens = max(1, hidden // 64), 64, min(token_budget, 512)
    q = torch.randn(1, heads, tokens, head_dim)
    attention = 2 * heads * head_dim * tokens * tokens / _best_s(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
    return {"peak_flops": peak, "model_matmul_flops": statistics.mean(rates), "copy_bandwidth": copy_bandwidth,
            "cold_copy_bandwidth": cold_copy,
            "weight_stream_bandwidth": stream, "attention_flops": attention}


def _cold_copy_bandwidth(source) -> float:
    """Bytes per second copied into shared memory never touched before, as KV first lands in the
    host buffer (each page faults in on its first write); the best of three fresh segments."""
    from multiprocessing import shared_memory

    import numpy as np

    best = float("inf")
    for _ in range(3):
        segment = shared_memory.SharedMemory(create=True, size=source.numel())
        try:
            target = np.ndarray((source.numel(),), dtype=np.uint8, buffer=segment.buf)
            started = time.perf_counter()
            np.copyto(target, source.numpy())
            best = min(best, time.perf_counter() - started)
            del target
        finally:
            segment.close()
            segment.unlink()
    return source.numel() / best


def _rates_worker(threads: int, hidden: int, intermediate: int, token_budget: int, start, results) -> None:
    import torch  # noqa: F401  (imported before the barrier, so every process starts measuring together)

    start.wait()
    results.put(compute_rates(threads, hidden, intermediate, token_budget))


def concurrent_rates(count: int, threads: int, hidden: int, intermediate: int, token_budget: int) -> dict[str, float]:
    """`compute_rates` measured in `count` processes at once, as that many workers run: each
    one's rates while the others compete for the same cores and memory (the mean over them)."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(count)
    measured = _in_processes(context, _rates_worker, [(threads, hidden, intermediate, token_budget, start)] * count,
                             count, timeout_s=600)
    return {key: statistics.mean(rates[key] for rates in measured) for key in measured[0]}


def _in_processes(context, target, args: list[tuple], num_results: int, timeout_s: float) -> list:
    """Run `target(*args[i], results)` in one process each and take `num_results` results from the
    queue (each wait bounded by `timeout_s`), then wait for the processes to end."""
    results = context.Queue()
    processes = [context.Process(target=target, args=(*each, results)) for each in args]
    for process in processes:
        process.start()
    try:
        return [results.get(timeout=timeout_s) for _ in range(num_results)]
    finally:
        for process in processes:
            process.join(timeout=60)


def _communicator_worker(rank: int, size: int, address: str, threads: int, results) -> None:
    import torch

    from seesaw.transport.specs import GroupSpec
    from seesaw.transport.collective import gloo_groups, leave_groups

    torch.set_num_threads(threads)
    ranks = list(range(size))
    communicators = gloo_groups(address, rank, size, [GroupSpec(f"ranks:{','.join(map(str, ranks))}", ranks)], 60)
    communicator = next(iter(communicators.values()))
    timings = {}
    for num_bytes, count in ((4096, 200), (1 << 20, 20), (16 << 20, 4)):
        tensor = torch.ones(num_bytes // 4)
        communicator.barrier()
        timings[f"all_reduce_{num_bytes}"] = _collective_s(lambda t=tensor: communicator.all_reduce(t), count)
    tensor = torch.ones(4 << 20)
    communicator.barrier()

    def exchange():
        if rank == 0:
            communicator.send(tensor, 1)
            communicator.recv(tensor, 1)
        elif rank == 1:
            communicator.recv(tensor, 0)
            communicator.send(tensor, 0)

    timings["round_trip_16MiB"] = _collective_s(exchange, 4)
    if rank == 0:
        results.put(timings)
    communicator.barrier()
    leave_groups(communicators)


def communicator_rates(size: int, threads: int) -> dict[str, float]:
    """Ring all-reduce bus bandwidth, per-hop latency and send/recv bandwidth over `size` gloo ranks."""
    from seesaw.transport.collective import free_tcp_address

    address = free_tcp_address()
    (timings,) = _in_processes(multiprocessing.get_context("spawn"), _communicator_worker,
                               [(rank, size, address, threads) for rank in range(size)], 1, timeout_s=300)
    hops = 2 * (size - 1)
    latency_s = timings["all_reduce_4096"] / hops
    big = 16 << 20
    bus_bandwidth = hops / size * big / max(1e-9, timings[f"all_reduce_{big}"] - hops * latency_s)
    send_bandwidth = 2 * (16 << 20) / timings["round_trip_16MiB"]
    return {"latency_s": latency_s, "all_reduce_bus_bandwidth": bus_bandwidth, "send_bandwidth": send_bandwidth}


def run_engine(model: str, run: str, num_prompts: int, input_len: int, output_len: int,
               threads: int | None = None, token_budget: int = 512, host_buffer_gb: float = 1.0,
               kv_cache_gb: float | None = None, device: str = "cpu") -> dict:
    """One real engine run of fixed-length random prompts (greedy, EOS ignored) as `run`, a layout
    or `PREFILL-DECODE`: seconds from the first request to the last result, steps, and the engine's
    stats."""
    from seesaw.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig, default_cache_dir
    from seesaw.engine import Engine
    from seesaw.frontend.local import LocalClient
    from seesaw.model.resolve import resolve_model
    from seesaw.sampling import SamplingParams
    from seesaw.sim.simulator import RunSpec

    layouts = RunSpec.parse(run)
    config = EngineConfig(
        model=ModelConfig(model=model, device=device),
        cache=CacheConfig(host_buffer_gb=host_buffer_gb, kv_cache_gb=kv_cache_gb),
        parallel=ParallelConfig(layout=layouts.layout, decode_layout=layouts.decode_layout,
                                threads_per_worker=threads),
        # Every prompt is computed: the warm-up's prompts are the measured run's.
        scheduler=SchedulerConfig(max_num_batched_tokens=token_budget, prefix_caching=False),
        cache_dir=default_cache_dir(),
    )
    resolved = resolve_model(model, config.cache_dir)
    vocab = resolved.spec.vocab_size
    low = min(1000, vocab // 2)  # above the ids tokenizers keep for special tokens
    prompts = [[low + (7919 * i + 104729 * j) % (vocab - low) for j in range(input_len)] for i in range(num_prompts)]
    sampling = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    async def main() -> dict:
        async with Engine(config, resolved) as engine, LocalClient(engine, "calibrate") as client:
            # A short warm-up: first touches of the KV pool and first calls of each kernel are slow.
            warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            await asyncio.gather(*(client.submit(warm, prompt_token_ids=p[:input_len]) for p in prompts[:4]))
            before = await engine.query_stats()
            started = time.perf_counter()
            results = await asyncio.gather(*(client.submit(sampling, prompt_token_ids=p) for p in prompts))
            elapsed = time.perf_counter() - started
            errors = [r.error for r in results if r.error]
            if errors:
                raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
            stats = await engine.query_stats()
            return {"elapsed_s": elapsed, "stats": stats,  # steps and phase switches of this run, not the warm-up's
                    "steps": stats.totals.counters.get("steps", 0) - before.totals.counters.get("steps", 0),
                    "transitions": stats.run.num_transitions - before.run.num_transitions}

    return asyncio.run(main())


def step_overhead_ms(model: str = "dummy:tiny", log: Callable[[str], None] = print, device: str = "cpu") -> float:
    """The engine's own time per step: steps of a model this small cost little else. The least of
    three runs, since a shared machine sometimes stalls one."""
    runs = [run_engine(model, "t1", 32, 8, 48, token_budget=512, device=device) for _ in range(3)]
    overhead = min(1000 * run["elapsed_s"] / max(1, run["steps"]) for run in runs)
    log(f"engine step overhead ({model}, t1, {device}): {overhead:.2f} ms "
        f"(least of 3 runs of {runs[0]['steps']} steps)")
    return overhead


def calibrate(name: str, worker_counts: list[int], model: str = "dummy:tiny",
              log: Callable[[str], None] = print, shape_model: str = "default",
              overhead_ms: float | None = None) -> dict:
    """Measure this machine and return a profile file's content: one device and one link entry
    per worker count (`overhead_ms` given: the step overhead is not measured again)."""
    from seesaw.config import default_cache_dir
    from seesaw.model.resolve import resolve_model

    cores = os.cpu_count() or 1
    spec = resolve_model(shape_model, default_cache_dir()).spec
    overhead_ms = step_overhead_ms(model, log) if overhead_ms is None else overhead_ms
    gpus, links = {}, {}
    for count in worker_counts:
        threads = max(1, cores // count)
        rates = concurrent_rates(count, threads, spec.hidden_size, spec.intermediate_size, 512)
        log(f"{count} worker(s), {threads} thread(s) each: peak {rates['peak_flops'] / 1e9:.0f} GFLOP/s, "
            f"model-shaped {rates['model_matmul_flops'] / 1e9:.0f} GFLOP/s, copy {rates['copy_bandwidth'] / GB:.1f} GB/s")
        link_name = f"{name}-gloo-w{count}"
        link = {"bandwidth_gbs": rates["copy_bandwidth"] / GB, "efficiency": 1.0, "latency_us": 0.0,
                "source": f"calibrated: shared-memory copies with {threads} thread(s)"}
        if count > 1:
            comm = communicator_rates(count, threads)
            log(f"  gloo over {count} ranks: all-reduce bus {comm['all_reduce_bus_bandwidth'] / GB:.2f} GB/s, "
                f"latency {1e6 * comm['latency_s']:.0f} us per hop, send/recv {comm['send_bandwidth'] / GB:.2f} GB/s")
            link = {"bandwidth_gbs": comm["send_bandwidth"] / GB, "efficiency": 1.0,
                    "latency_us": 1e6 * comm["latency_s"],
                    "all_reduce_gbs": {str(count): comm["all_reduce_bus_bandwidth"] / GB},
                    "source": f"calibrated: gloo over {count} local ranks, {threads} thread(s) each"}
        links[link_name] = link
        links[f"{name}-host-w{count}"] = {"bandwidth_gbs": rates["cold_copy_bandwidth"] / GB, "efficiency": 1.0,
                                          "latency_us": 0.0,
                                          "source": "calibrated: copies into fresh shared memory (pages fault in)"}
        peak = rates["peak_flops"]
        entry = {
            "memory_gb": 16, "memory_bandwidth_gbs": rates["copy_bandwidth"] / GB, "peak_tflops": peak / 1e12,
            "interconnect": link_name, "host_link": f"{name}-host-w{count}", "host_memory_gb": 4, "dtype_bytes": 4,
            "matmul_efficiency": min(1.0, rates["model_matmul_flops"] / peak),
            "memory_efficiency": min(1.0, rates["weight_stream_bandwidth"] / rates["copy_bandwidth"]),
            "attention_efficiency": min(1.0, rates["attention_flops"] / peak),
            "step_overhead_ms": overhead_ms, "kv_cache_gb": 2.0, "token_budget": 512, "copy_overlap": 0.0, "device": "cpu",
            "source": f"calibrated on this machine: {count} worker(s) of {threads} thread(s), float32",
        }
        runs = FitRuns(threads=threads)
        gpus[f"{name}-w{count}"] = fit_to_engine(f"{name}-w{count}", entry, links, spec, runs, log)
        if count > 1:
            links[link_name] = fit_link_to_engine(f"{name}-w{count}", gpus[f"{name}-w{count}"], links, link_name,
                                                  spec, count, runs, log)
        host_name = f"{name}-host-w{count}"
        links[host_name] = fit_host_link_to_engine(f"{name}-w{count}", gpus[f"{name}-w{count}"], links, host_name,
                                                   spec, count, runs, log)
    return {"about": f"written by seesaw-cli calibrate on a machine with {cores} cores", "gpus": gpus, "links": links}


def fit_to_engine(name: str, entry: dict, links: dict, spec, runs: FitRuns, log: Callable[[str], None]) -> dict:
    """Fit a device entry to the real engine: scale its efficiencies so that a simulated
    prefill-heavy run of one worker takes as long as the engine's, then give the time a
    decode-heavy run still lacks to a per-row overhead; or, if the engine decodes faster than that
    scale allows (a GPU's memory rate need not follow its compute rate), raise the memory rate
    alone until it decodes as fast. (Validation runs use other shapes.)"""
    prefills = _engine_runs("t1", runs.prefill, runs)
    prefill, slowest = prefills[0], prefills[-1]["elapsed_s"]
    model = _simulated_run(name, entry, links, spec, "t1", runs.prefill, runs)
    overhead_s = model.num_steps * entry["step_overhead_ms"] / 1000
    scale = (model.elapsed_s - overhead_s) / max(1e-9, prefill["elapsed_s"] - overhead_s)
    fitted = scaled_rates(entry, scale)
    decode = _engine_runs("t1", runs.decode, runs)[0]
    decode_s = decode["elapsed_s"]
    model = _simulated_run(name, fitted, links, spec, "t1", runs.decode, runs)
    num_prompts, _, output_len = runs.decode
    rows = num_prompts * (output_len + 1)  # every output token is a row, and each prompt is one more
    fitted["row_overhead_us"] = max(0.0, 1e6 * (decode_s - model.elapsed_s) / rows)
    memory = 1.0
    if decode_s < model.elapsed_s:
        def faster(factor: float) -> float:  # minus the simulated decode run's time: grows with the factor
            return -_simulated_run(name, scaled_rates(fitted, 1.0, factor), links, spec, "t1", runs.decode,
                                   runs).elapsed_s

        memory = _least_reaching(faster, -decode_s, 1.0, model.elapsed_s / decode_s, most=100.0)
        fitted = scaled_rates(fitted, 1.0, memory)
    log(f"  fitted to the engine: prefill run {prefill['elapsed_s']:.1f} s (efficiencies x{scale:.2f}), "
        f"decode run {decode_s:.1f} s (" + (f"memory rate x{memory:.2f} more" if memory != 1.0 else
                                              f"per-row overhead {fitted['row_overhead_us']:.0f} us") + ")")
    if scale < 0.5 or slowest > 1.25 * prefill["elapsed_s"]:
        log(f"  warning: the engine ran at {scale:.0%} of the measured rates, and its two prefill runs took "
            f"{prefill['elapsed_s']:.1f} and {slowest:.1f} s: the machine was probably busy; calibrate again")
    return fitted


def scaled_rates(entry: dict, scale: float, memory_scale: float | None = None) -> dict:
    """The entry with the rates it reaches times `scale` (matmul and attention) and `memory_scale`
    (memory; `scale` if None): the efficiencies scale, and a rate past its peak raises the peak
    instead (efficiencies stay shares, the rates are the same)."""
    memory_scale = scale if memory_scale is None else memory_scale
    peak, bandwidth = entry["peak_tflops"], entry["memory_bandwidth_gbs"]
    matmul = peak * entry["matmul_efficiency"] * scale
    attention = peak * entry["attention_efficiency"] * scale
    memory = bandwidth * entry["memory_efficiency"] * memory_scale
    peak, bandwidth = max(peak, matmul, attention), max(bandwidth, memory)
    return {**entry, "peak_tflops": peak, "memory_bandwidth_gbs": bandwidth, "matmul_efficiency": matmul / peak,
            "attention_efficiency": attention / peak, "memory_efficiency": memory / bandwidth}


def fit_link_to_engine(name: str, entry: dict, links: dict, link_name: str, spec, count: int, runs: FitRuns,
                       log: Callable[[str], None]) -> dict:
    """Fit a link's latency per hop to the real engine. Measured on idle ranks, a collective is
    faster than in a run, where each one also waits for the slowest rank to reach it; a
    decode-heavy run at `t{count}` (many small all-reduces) against its simulation gives that wait,
    spread over the run's all-reduce hops. The device entry is fitted first (`fit_to_engine`)."""
    engine = _engine_runs(f"t{count}", runs.decode, runs)[0]
    model = _simulated_run(name, entry, links, spec, f"t{count}", runs.decode, runs)
    hops = model.num_steps * spec.num_layers * 2 * 2 * (count - 1)  # two all-reduces per layer, ring hops each
    link = links[link_name]
    latency_us = max(0.0, link["latency_us"] + 1e6 * (engine["elapsed_s"] - model.elapsed_s) / hops)
    log(f"  fitted to the engine: t{count} decode run {engine['elapsed_s']:.1f} s against {model.elapsed_s:.1f} s "
        f"simulated: latency per hop {latency_us:.0f} us (idle ranks: {link['latency_us']:.0f} us)")
    return {**link, "latency_us": latency_us,
            "source": f"{link['source']}; latency fitted to a t{count} engine run"}


def fit_host_link_to_engine(name: str, entry: dict, links: dict, link_name: str, spec, count: int, runs: FitRuns,
                            log: Callable[[str], None]) -> dict:
    """Fit the host link's latency per KV copy to the real engine. Measured alone, a copy into
    shared memory moves at the link's bandwidth; in a seesaw run each copy also waits for the
    messages that start and confirm it and shares the cores with the steps beside it. A seesaw run
    of many short requests (each copied to the host buffer after its prefill and back for its
    decode) against its simulation gives that time: the least latency per copy at which the
    simulated run takes as long (where copies overlap compute, as on GPUs, only the part on the
    run's critical path shows). The device entry and the interconnect are fitted first."""
    run = f"p{count}-t{count}"
    engine = _engine_runs(run, runs.copies, runs)[0]
    link = links[link_name]

    def simulated(latency_us: float):
        return _simulated_run(name, entry, {**links, link_name: {**link, "latency_us": latency_us}}, spec, run,
                              runs.copies, runs)

    model = simulated(link["latency_us"])
    # The engine meets the batch in the decode phase its warm-up left it in, so it switches once
    # more than the simulation: that switch's reload is not the copies' time.
    switches = len(model.transitions)
    extra_s = max(0, engine["transitions"] - switches) * (model.reload_s / switches if switches else 0.0)
    target_s = engine["elapsed_s"] - extra_s
    latency_us = link["latency_us"]
    if model.elapsed_s < target_s:  # first guess: every copy on the critical path (no overlap)
        first = latency_us + 1e6 * (target_s - model.elapsed_s) / max(1, model.num_kv_copies)
        latency_us = _least_reaching(lambda value: simulated(value).elapsed_s, target_s, latency_us, first)
    log(f"  fitted to the engine: {run} run {engine['elapsed_s']:.1f} s ({engine['transitions']} phase switches) "
        f"against {model.elapsed_s:.1f} s simulated ({switches}, {model.num_kv_copies} KV copies): "
        f"{latency_us / 1000:.1f} ms per copy beyond the bandwidth")
    return {**link, "latency_us": latency_us, "source": f"{link['source']}; latency fitted to a {run} engine run"}


def _least_reaching(simulated_s: Callable[[float], float], target_s: float, low: float, first: float,
                    most: float = 1e7) -> float:
    """The least value from `low` up (to `most`) at which `simulated_s` (growing with it) reaches
    `target_s`, within 0.1%: doubling from `first` until it does, then halving the interval."""
    high = min(most, max(first, low * 1.001, low + 1e-6))
    while simulated_s(high) < target_s and high < most:  # by default ten seconds per copy: past any machine
        low, high = high, min(most, 2 * high)
    for _ in range(40):
        if high - low <= 1e-3 * high:
            break
        middle = (low + high) / 2
        if simulated_s(middle) < target_s:
            low = middle
        else:
            high = middle
    return high


def _engine_runs(run: str, shape: tuple[int, int, int], runs: FitRuns) -> list[dict]:
    """Two engine runs of `shape` (prompts, input, output), the faster first: a shared machine's
    stalls only ever make a run slower, so each fit takes the faster. `run` is a layout, or
    `PREFILL-DECODE`."""
    done = [run_engine(runs.model, run, *shape, threads=runs.threads, token_budget=runs.token_budget,
                       host_buffer_gb=runs.host_buffer_gb, device=runs.device) for _ in range(2)]
    return sorted(done, key=lambda each: each["elapsed_s"])


def _simulated_run(name: str, entry: dict, links: dict, spec, run: str, shape: tuple[int, int, int],
                   runs: FitRuns = FitRuns()):
    """A calibration run simulated on a node of the entry's devices: `run` is a layout, or
    `PREFILL-DECODE`, and `shape` (prompts, input, output), as for `_engine_runs`."""
    from seesaw.config import SchedulerConfig
    from seesaw.sim.catalog import Catalog
    from seesaw.sim.cost import CostModel
    from seesaw.sim.simulator import RunSpec, simulate
    from seesaw.sim.workload import fixed

    catalog = Catalog()
    catalog.add({"gpus": {name: entry}, "links": links}, "calibration")
    run_spec = RunSpec.parse(run, host_buffer_gb=runs.host_buffer_gb,
                             scheduler=SchedulerConfig(max_num_batched_tokens=runs.token_budget))
    node = catalog.node(f"{run_spec.layout.world_size}x{name}")
    return simulate(CostModel(spec, node), run_spec, fixed(*shape))
