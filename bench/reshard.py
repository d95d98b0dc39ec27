"""The cost of a transition and of KV swaps, each against its floor, for one worker at a time.

    python bench/reshard.py --model default --layouts p2,t2 --kv-gb 0.5
    python bench/reshard.py --model dummy:llama3-8b --device cuda --layouts "t1;p2,t2" --kv-gb 1

Builds the host weight store and host KV buffer as the engine does, then, for each rank of the
layouts, that worker's runtime with a KV pool just large enough for the swaps (no profiling step:
the worker runs no forward pass here). Transition: the worker copies its shard of the other layout
from the store into its weight arena (what a re-shard does), timed against one plain copy of as
many bytes between the same two buffers (on a GPU the store is registered with CUDA, so that is
the pinned-memory floor, and nothing more is allocated). KV: the worker's share of --kv-gb of KV
blocks is swapped out to the host buffer and back in, checked bit for bit, and timed against one
plain copy between the KV pool and the host buffer in each direction.
With one layout, the transition reloads that layout's shard. Several sets of layouts, separated by
`;`, share one weight store. Medians of --iters; no assertions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--layouts", default="p2,t2", help="prefill,decode (one layout: reload it); sets split by ;")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--kv-gb", type=float, default=0.5, help="KV of the whole model to swap, in GiB")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: cores / workers)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _median_s(run, iters: int, sync) -> float:
    run()
    sync()
    samples = []
    for _ in range(iters):
        started = time.perf_counter()
        run()
        sync()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main(argv=None) -> None:
    args = parse_args(argv)

    from seesaw.config import default_cache_dir
    from seesaw.layout import Layout
    from seesaw.model.resolve import resolve_model
    from seesaw.model.weights import RandomSource, SafetensorsSource, neutral_shapes
    from seesaw.transport.host_buffer import HostBuffer, torch_dtype
    from seesaw.transport.weight_store import WeightStore

    resolved = resolve_model(args.model, default_cache_dir())
    spec = resolved.spec
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    layout_sets = [[Layout.parse(text) for text in group.split(",")] for group in args.layouts.split(";")]
    itemsize = torch_dtype(dtype).itemsize
    block_shape = [spec.num_layers, 2, spec.num_kv_heads, args.block_size, spec.head_dim]
    block_bytes = spec.num_layers * 2 * spec.num_kv_heads * args.block_size * spec.head_dim * itemsize
    num_blocks = max(1, int(args.kv_gb * (1 << 30)) // block_bytes)
    print(f"{resolved.name}, {dtype}, {args.device}; KV: {num_blocks} blocks of {block_bytes / 1e6:.2f} MB",
          flush=True)

    store = WeightStore.create(neutral_shapes(spec), dtype)
    host = HostBuffer.create(num_blocks, block_shape, dtype)
    try:
        source = (SafetensorsSource(resolved.weights_folder) if resolved.weights_folder
                  else RandomSource(spec, args.seed))
        started = time.perf_counter()
        fill_in_parallel(store, source, os.cpu_count() or 1)
        print(f"weight store: {store.spec.num_bytes / 1e6:.0f} MB filled in {time.perf_counter() - started:.1f} s")
        for layouts in layout_sets:
            _each_rank(layouts, store, host, spec, dtype, block_bytes, num_blocks, args)
    finally:
        store.close()
        host.close()


def fill_in_parallel(store, source, num_threads: int) -> None:
    """Fill the store one tensor per thread: seeded random values are drawn by one core per tensor,
    and torch releases the GIL while it draws, so a 16 GB store fills in seconds, not a minute."""
    import torch

    def fill(name: str) -> None:
        with torch.no_grad():
            store.rows(name).copy_(source.rows(name))

    with ThreadPoolExecutor(num_threads) as pool:
        list(pool.map(fill, store.shapes))


def kv_pool_bytes_for(num_blocks: int, block_bytes: int) -> int:
    """A KV pool that holds the swapped blocks under any layout (a page is at most a whole
    model's block), with a little room to spare."""
    return num_blocks * block_bytes + (1 << 24)


def device_plan(spec, layouts, rank: int, dtype: str, num_blocks: int, block_bytes: int):
    """What one worker of this benchmark puts on its device: its larger shard and the KV pool."""
    from seesaw.layout import shard_for
    from seesaw.model.llama import ShardModel
    from seesaw.runtime.arena import measure
    from seesaw.runtime.memory_plan import DevicePlan
    from seesaw.transport.host_buffer import torch_dtype

    shards = [shard_for(layout, spec.shape, rank) for layout in layouts]
    weights = max(measure(lambda a, s=s: ShardModel(spec, s, a), torch_dtype(dtype)) for s in shards)
    return DevicePlan().add("weights", weights).add("KV pool", kv_pool_bytes_for(num_blocks, block_bytes))


def _each_rank(layouts, store, host, spec, dtype, block_bytes, num_blocks, args) -> None:
    from seesaw.runtime.worker_runtime import RuntimeConfig, WorkerRuntime
    from seesaw.transport.host_buffer import HostBuffer
    from seesaw.transport.weight_store import WeightStore

    world = layouts[0].world_size
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    print(f"layouts {','.join(map(str, layouts))}, {threads} threads per worker", flush=True)
    for rank in range(world):
        kv_bytes = kv_pool_bytes_for(num_blocks, block_bytes)
        if args.device == "cuda":
            import torch

            device_plan(spec, layouts, rank, dtype, num_blocks, block_bytes).check(
                torch.cuda.mem_get_info()[1], 0.95, f"rank {rank} of {','.join(map(str, layouts))}")
        config = RuntimeConfig(spec, rank, tuple(layouts), dtype, args.device, args.block_size,
                               kv_cache_bytes=kv_bytes, memory_fraction=0.9, num_threads=threads, seed=args.seed)
        # The worker's own attachments, as in the engine (closing the runtime closes them).
        weights = WeightStore.attach(store.spec, store.shapes)
        runtime = WorkerRuntime(config, {}, weights, HostBuffer.attach(host.spec))
        try:
            _transitions(runtime, layouts, args, rank)
            _swaps(runtime, layouts, num_blocks, args, rank)
        finally:
            runtime.close()
            del runtime


def _sync(runtime):
    import torch

    return torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)


def _floor_s(num_bytes: int, runtime, path: str, iters: int) -> float:
    """One plain copy of `num_bytes` between the buffers the real copy uses (`path`: "weights",
    store to weight arena; "kv-out", KV pool to host buffer; "kv-in", back). On a GPU the store and
    the host buffer are registered with CUDA: these are pinned-memory copies, and allocate nothing."""
    import torch

    host_kv = runtime.host_buffer.blocks.view(-1).view(torch.uint8)[:num_bytes]
    device_kv = runtime.kv_arena.bytes[:num_bytes]
    src, dst = {
        "weights": (runtime.weights.flat.view(torch.uint8)[:num_bytes], runtime.weight_arena.bytes[:num_bytes]),
        "kv-out": (device_kv, host_kv),
        "kv-in": (host_kv, device_kv),
    }[path]
    return _median_s(lambda: dst.copy_(src, non_blocking=True), iters, _sync(runtime))


def _transitions(runtime, layouts, args, rank: int) -> None:
    pairs = list(zip(layouts, layouts[1:] + layouts[:1])) if len(layouts) > 1 else [(layouts[0], layouts[0])]
    for old, new in pairs:
        def switch():
            runtime.load(old)
            return runtime.load(new)

        samples = [switch() for _ in range(args.iters + 1)][1:]
        seconds = statistics.median(s for s, _ in samples)
        num_bytes = samples[0][1]
        floor = _floor_s(num_bytes, runtime, "weights", args.iters)
        print(f"rank {rank} {old}->{new}: {num_bytes / 1e6:8.1f} MB in {seconds * 1e3:7.1f} ms "
              f"({num_bytes / seconds / 1e9:5.1f} GB/s); plain copy {floor * 1e3:7.1f} ms: "
              f"{seconds / floor:.2f}x the floor", flush=True)


def _swaps(runtime, layouts, num_blocks: int, args, rank: int) -> None:
    import torch

    blocks = list(range(min(num_blocks, runtime.num_blocks)))
    for layout in dict.fromkeys(layouts):
        pages = runtime.states[layout].kv_pages
        generator = torch.Generator(device=runtime.device).manual_seed(rank)
        original = torch.randn(pages[blocks].shape, generator=generator, device=runtime.device).to(pages.dtype)
        pages[blocks] = original
        num_bytes = runtime.swap_out(layout, blocks, blocks)
        out_s = _median_s(lambda: runtime.swap_out(layout, blocks, blocks), args.iters, _sync(runtime))
        pages[blocks] = 0
        in_s = _median_s(lambda: runtime.prefetch(layout, blocks, blocks), args.iters, _sync(runtime))
        exact = torch.equal(pages[blocks], original)
        floor_out = _floor_s(num_bytes, runtime, "kv-out", args.iters)
        floor_in = _floor_s(num_bytes, runtime, "kv-in", args.iters)
        print(f"rank {rank} KV in {layout}: {num_bytes / 1e6:7.1f} MB; swap-out {num_bytes / out_s / 1e9:5.1f} GB/s "
              f"({floor_out / out_s:.0%} of a plain copy's {num_bytes / floor_out / 1e9:.1f}), swap-in "
              f"{num_bytes / in_s / 1e9:5.1f} GB/s ({floor_in / in_s:.0%} of {num_bytes / floor_in / 1e9:.1f}); "
              f"round trip {'exact' if exact else 'WRONG'}", flush=True)


if __name__ == "__main__":
    main()
