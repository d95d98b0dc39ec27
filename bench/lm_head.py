"""LM head under tensor parallelism: a vocabulary-sharded head with an all_gather of the logits,
against a head replicated on every rank, for the sampled rows of one step.

    python bench/lm_head.py --tp 2 --rows 1,16,64,256

Each of `--tp` worker processes gets `cores / tp` threads, as in the engine. Sharded: every rank
multiplies by its slice of the vocabulary (padded to equal size) and the logits are gathered with
the engine's own `gather_vocab` over the Communicator. Replicated: every rank multiplies by the
whole head and nothing moves. Both give every rank the whole logits. Prints milliseconds per call
(median of --iters) and the head's memory per rank.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="a model as --model takes it; only its shape is used")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--rows", default="1,16,64,256", help="sampled rows per step, a comma list")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per rank (default: cores / tp)")
    return parser.parse_args(argv)


def _time_ms(run, iters: int, communicator) -> float:
    run()  # warm up
    samples = []
    for _ in range(iters):
        communicator.barrier()
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


def _rank_main(rank: int, args: argparse.Namespace, threads: int, shape: tuple[int, int], address: str, results) -> None:
    import torch
    import torch.nn.functional as F

    from seesaw.layout import padded_vocab_rows, split_evenly
    from seesaw.transport.specs import GroupSpec
    from seesaw.runtime.layout_state import gather_vocab, gathered_vocab_index
    from seesaw.transport.collective import gloo_groups, leave_groups

    vocab_size, hidden_size = shape
    torch.set_num_threads(threads)
    communicators = gloo_groups(address, rank, args.tp, [GroupSpec("tp", list(range(args.tp)))], timeout_s=120)
    tp = communicators["tp"]
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(vocab_size, hidden_size, generator=generator).to(dtype)
    padded = padded_vocab_rows(vocab_size, args.tp)
    span = split_evenly(vocab_size, args.tp)[rank]
    part = torch.zeros(padded, hidden_size, dtype=dtype)
    part[: span.size] = full[span.start : span.end]
    index = gathered_vocab_index(vocab_size, args.tp)
    for rows in [int(r) for r in args.rows.split(",")]:
        x = torch.randn(rows, hidden_size, generator=generator).to(dtype)
        with torch.inference_mode():
            sharded = gather_vocab(tp, F.linear(x, part).float(), index)
            torch.testing.assert_close(sharded, F.linear(x, full).float(), rtol=1e-4, atol=1e-3)
            sharded_ms = _time_ms(lambda x=x: gather_vocab(tp, F.linear(x, part).float(), index), args.iters, tp)
            replicated_ms = _time_ms(lambda x=x: F.linear(x, full).float(), args.iters, tp)
        if rank == 0:
            results.put((rows, sharded_ms, replicated_ms))
    if rank == 0:
        bytes_per = dtype.itemsize
        results.put(("memory", padded * hidden_size * bytes_per, vocab_size * hidden_size * bytes_per))
    tp.barrier()
    leave_groups(communicators)


def main(argv=None) -> None:
    import multiprocessing

    from seesaw.config import default_cache_dir
    from seesaw.model.resolve import resolve_model
    from seesaw.transport.collective import free_tcp_address

    args = parse_args(argv)
    spec = resolve_model(args.model, default_cache_dir()).spec
    shape = (spec.vocab_size, spec.hidden_size)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.tp)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    address = free_tcp_address()
    ranks = [context.Process(target=_rank_main, args=(r, args, threads, shape, address, results)) for r in range(args.tp)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=600)
        if process.is_alive():
            process.kill()
            raise SystemExit(f"rank {ranks.index(process)} did not finish within 600 s")
        if process.exitcode != 0:
            raise SystemExit(f"rank {ranks.index(process)} exited with code {process.exitcode}")
    print(f"LM head {spec.vocab_size} x {spec.hidden_size} {args.dtype}, tp={args.tp}, "
          f"{threads} threads per rank")
    print(f"{'rows':>6} {'sharded+gather ms':>18} {'replicated ms':>14} {'replicated/sharded':>19}")
    for _ in range(len(args.rows.split(",")) + 1):
        item = results.get(timeout=10)
        if item[0] == "memory":
            print(f"head memory per rank: sharded {item[1] / 2**20:.0f} MiB, replicated {item[2] / 2**20:.0f} MiB")
        else:
            rows, sharded_ms, replicated_ms = item
            print(f"{rows:>6} {sharded_ms:>18.2f} {replicated_ms:>14.2f} {replicated_ms / sharded_ms:>19.2f}")


if __name__ == "__main__":
    main()
