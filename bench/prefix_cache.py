"""Prefix caching: the same job with and without it, in one sitting (greedy, EOS ignored).

    python bench/prefix_cache.py --scenario shared      # 256 x (1,024 shared + 32 own) -> 32
    python bench/prefix_cache.py --scenario samples     # 32 prompts of 512, n = 8, 64 out, against 256 requests
    python bench/prefix_cache.py --scenario sharegpt    # ShareGPT-like lengths, nothing shared
    python bench/prefix_cache.py --scenario seesaw      # 64 x (1,024 shared + 32 own) -> 32 in seesaw mode (p2 -> t2)

Each run is a fresh engine in its own process, run one after another; the ratio of each run's
total-token throughput (prompt tokens counted whole, cached or not) to the last run's is printed.
`--repeats` runs each pair that many times, alternating, so a noisy machine shows its spread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="shared", choices=["shared", "samples", "sharegpt", "seesaw"])
    parser.add_argument("--model", default="default")
    parser.add_argument("--layout", default="t1")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--num-requests", type=int, default=None, help="default: the scenario's")
    parser.add_argument("--host-buffer-gb", type=float, default=None, help="default: 0.5 in seesaw mode, else 1")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: 512 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    # One run (what the scenario starts in a process of its own):
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output-json", default=None)
    return parser.parse_args(argv)


# ------------------------------------------------------------ workloads


def _tokens(rng: random.Random, count: int, vocab: int) -> list[int]:
    low = min(1000, vocab // 2)  # the lowest ids are special tokens
    return [rng.randrange(low, vocab) for _ in range(count)]


def _lognormal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(math.log(median), sigma))))


def workload(args: argparse.Namespace, run: str, vocab: int) -> list[tuple[list[int], int, int]]:
    """(prompt tokens, output tokens, n) per request of the scenario's run `run`."""
    rng = random.Random(args.seed)
    if args.scenario in ("shared", "seesaw"):
        count = args.num_requests or (64 if args.scenario == "seesaw" else 256)
        system = _tokens(rng, 1024, vocab)
        return [(system + _tokens(rng, 32, vocab), 32, 1) for _ in range(count)]
    if args.scenario == "samples":
        count = args.num_requests or 32
        prompts = [_tokens(rng, 512, vocab) for _ in range(count)]
        if run.startswith("n8"):
            return [(prompt, 64, 8) for prompt in prompts]
        return [(prompt, 64, 1) for prompt in prompts for _ in range(8)]
    count = args.num_requests or 64
    return [(_tokens(rng, _lognormal(rng, 160, 1.0, 4, 1024), vocab), _lognormal(rng, 160, 1.0, 4, 512), 1)
            for _ in range(count)]


def runs_of(scenario: str) -> list[str]:
    """The scenario's runs, the baseline last."""
    if scenario == "samples":
        return ["n8-cached", "separate-cached", "separate-uncached"]
    return ["cached", "uncached"]


# ------------------------------------------------------------ one run


def run_one(args: argparse.Namespace) -> dict:
    from seesaw.config import (
        CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig, default_cache_dir,
        default_token_budget,
    )
    from seesaw.engine import Engine
    from seesaw.frontend.local import LocalClient
    from seesaw.layout import Layout
    from seesaw.model.resolve import resolve_model
    from seesaw.sampling import SamplingParams

    is_seesaw = args.scenario == "seesaw"
    config = EngineConfig(
        model=ModelConfig(model=args.model),
        cache=CacheConfig(host_buffer_gb=_host_buffer_gb(args)),
        parallel=ParallelConfig(layout=Layout.parse("p2" if is_seesaw else args.layout),
                                decode_layout=Layout.parse("t2") if is_seesaw else None),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens or default_token_budget("cpu"),
                                  prefix_caching=not args.run.endswith("uncached")),
        cache_dir=default_cache_dir(),
    )
    resolved = resolve_model(args.model, config.cache_dir)
    requests = workload(args, args.run, resolved.spec.vocab_size)

    async def main():
        async with Engine(config, resolved) as engine, LocalClient(engine, "bench") as client:
            started = time.perf_counter()
            futures = [client.submit_choices(SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True),
                                             n, prompt_token_ids=prompt)
                       for prompt, output, n in requests]
            results = [result for choices in await asyncio.gather(*futures) for result in choices]
            elapsed = time.perf_counter() - started
            return elapsed, results, await engine.query_stats()

    elapsed, results, stats = asyncio.run(main())
    errors = [r.error for r in results if r.error]
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, the first: {errors[0]}")
    prompt_tokens = sum(len(prompt) * n for prompt, _, n in requests)  # every choice's prompt, as if computed
    output_tokens = sum(output * n for _, output, n in requests)
    totals = stats.totals
    return {
        "run": args.run,
        "elapsed_s": round(elapsed, 2),
        "requests": len(requests),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
        "cached_tokens": totals.cached_tokens,
        "engine_prompt_tokens": totals.prompt_tokens,
        "transitions": totals.counters.get("transitions", 0),
        "peak_host_fill": stats.run.peak_host_fill,
        "host_blocks": stats.kv.host_blocks,
    }


def _host_buffer_gb(args: argparse.Namespace) -> float:
    if args.host_buffer_gb is not None:
        return args.host_buffer_gb
    return 0.5 if args.scenario == "seesaw" else 1.0


# ------------------------------------------------------------ the sitting


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.run is not None:
        result = run_one(args)
        Path(args.output_json).write_text(json.dumps(result))
        return
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for run in runs_of(args.scenario):
            with tempfile.TemporaryDirectory() as scratch:
                out = Path(scratch) / "result.json"
                subprocess.run([sys.executable, __file__, *argv, "--run", run, "--output-json", str(out)], check=True)
                result = json.loads(out.read_text())
            results.setdefault(run, []).append(result)
            hit = result["cached_tokens"] / max(1, result["engine_prompt_tokens"])
            extra = ""
            if args.scenario == "seesaw":
                phases = (result["transitions"] + 2) // 2  # prefill phases: it starts in one
                held = result["requests"] / phases / _host_buffer_gb(args)
                extra = (f", {result['transitions']} transitions, {phases} prefill phases, {held:.0f} requests "
                         f"held per GiB of host buffer, host buffer peak {result['peak_host_fill']:.0%}")
            print(f"[{args.scenario} {run}] {result['elapsed_s']:.1f} s, {result['tokens_per_s']:.0f} total tokens/s, "
                  f"prefix cache hit {hit:.0%}{extra}", flush=True)
    runs = runs_of(args.scenario)
    base = runs[-1]
    for run in runs[:-1]:
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(results[run], results[base])]
        print(f"{args.scenario}: {run} / {base}: " + ", ".join(f"{r:.2f}x" for r in ratios), flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
