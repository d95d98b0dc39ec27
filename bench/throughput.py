"""Offline throughput, with vLLM's flag names: fixed-length random-token prompts, EOS ignored, greedy.

    python bench/throughput.py --backend seesaw,hf --num-prompts 64 --input-len 128 --output-len 64
    python bench/throughput.py --compare p2-t2,t2,p2 --num-prompts 64 --input-len 128 --output-len 64

`--backend hf` runs Hugging Face transformers `generate` on the same workload (one padded batch,
or batches of --hf-batch-size). `--prefill-layout P --decode-layout D` runs Seesaw in seesaw mode.
`--compare` runs Seesaw once per listed layout (`P-D` for a seesaw pair). Several runs go one after
another, each in a fresh process, and the ratio of their total token throughputs to the last is printed.

A Seesaw run also prints its floor (bench/floor.py: weights and KV bytes at the device's measured
copy bandwidth, prefill FLOPs at its measured matmul rate) and how far its decode-only steps are from theirs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from floor import floor_lines, floors, measure_rates


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="seesaw", help="seesaw, hf, or a comma list such as seesaw,hf")
    parser.add_argument("--model", default="default")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--layout", default="t1")
    parser.add_argument("--prefill-layout", default=None, help="seesaw mode: prefill layout (with --decode-layout)")
    parser.add_argument("--decode-layout", default=None, help="seesaw mode: decode layout")
    parser.add_argument("--compare", default=None, help="Seesaw layouts to run in turn, e.g. p2-t2,t2,p2")
    parser.add_argument("--host-buffer-gb", type=float, default=1.0)
    parser.add_argument("--host-low-water", type=float, default=0.2)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: 512 on CPU, 8192 on CUDA")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--kv-cache-gb", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per worker (and for hf)")
    parser.add_argument("--hf-batch-size", type=int, default=None, help="hf: prompts per generate call (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-overlap", action="store_true", help="seesaw: one step in flight at a time")
    parser.add_argument("--output-json", default=None)
    return parser.parse_args(argv)


def random_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    # Skip the lowest ids, where tokenizers keep their special tokens.
    low = min(1000, vocab_size // 2)
    return torch.randint(low, vocab_size, (num_prompts, input_len), generator=generator).tolist()


def run_seesaw(args: argparse.Namespace) -> dict:
    from seesaw.config import (
        CacheConfig, EngineConfig, ModelConfig, ParallelConfig, default_cache_dir, default_token_budget,
    )
    from seesaw.engine import Engine
    from seesaw.frontend.local import LocalClient
    from seesaw.layout import Layout
    from seesaw.model.resolve import resolve_model
    from seesaw.sampling import SamplingParams
    from seesaw.config import SchedulerConfig

    is_seesaw = args.prefill_layout is not None
    config = EngineConfig(
        model=ModelConfig(model=args.model, device=args.device, dtype=args.dtype, seed=args.seed),
        cache=CacheConfig(kv_cache_gb=args.kv_cache_gb, host_buffer_gb=args.host_buffer_gb),
        parallel=ParallelConfig(
            layout=Layout.parse(args.prefill_layout if is_seesaw else args.layout),
            decode_layout=Layout.parse(args.decode_layout) if is_seesaw else None,
            threads_per_worker=args.threads,
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens or default_token_budget(args.device),
            max_num_seqs=args.max_num_seqs, host_low_water=args.host_low_water, overlap=not args.no_overlap,
        ),
        cache_dir=default_cache_dir(),
    )
    resolved = resolve_model(args.model, config.cache_dir)
    prompts = random_prompts(args.num_prompts, args.input_len, resolved.spec.vocab_size, args.seed)
    sampling = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    async def main() -> tuple[float, int, float, dict]:
        async with Engine(config, resolved) as engine, LocalClient(engine, "bench") as client:
            started = time.perf_counter()
            futures = [client.submit(sampling, prompt_token_ids=prompt) for prompt in prompts]
            results = await asyncio.gather(*futures)
            elapsed = time.perf_counter() - started
            errors = [r.error for r in results if r.error]
            if errors:
                raise SystemExit(f"{len(errors)} requests failed, first: {errors[0]}")
            return elapsed, sum(r.completion_tokens for r in results), engine.start_s, await engine.query_stats(with_timeline=True)

    elapsed, output_tokens, start_s, metrics = asyncio.run(main())
    totals = metrics.totals
    extra = {"engine_start_s": round(start_s, 2), "steps": totals.counters.get("steps", 0),
             "worker_compute_s": round(totals.compute_s, 2), "rows_ahead": totals.counters.get("rows_ahead", 0),
             "decode_steps": totals.decode_steps, "decode_s": totals.decode_s}
    note = f", {extra['steps']} steps, {extra['worker_compute_s']} s in the sampling worker's steps"
    details: list[str] = []
    if is_seesaw:
        from seesaw.frontend.report import phase_lines
        from seesaw.stats import to_json

        extra["metrics"] = {key: value for key, value in to_json(metrics).items() if key != "timeline"}
        details = phase_lines(metrics)
    result = _report(args, "seesaw", elapsed, output_tokens, extra=extra, note=note, details=details)
    rates = measure_rates(args.device, config.model.resolved_dtype)
    dtype_bytes = 4 if config.model.resolved_dtype == "float32" else 2
    found = floors(resolved.spec, dtype_bytes, rates, args.num_prompts, args.input_len, args.output_len,
                   args.max_num_seqs, totals)
    for line in floor_lines(result, rates, found):
        print(f"  {line}", flush=True)
    result["floor_s"] = found.total_s
    return result


def run_hf(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from seesaw.config import default_cache_dir
    from seesaw.model.resolve import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cache_dir = default_cache_dir()
    resolved = resolve_model(args.model, cache_dir)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    if resolved.weights_folder is not None:
        model = AutoModelForCausalLM.from_pretrained(resolved.weights_folder, dtype=dtype)
    else:
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**resolved.hf_config), dtype=dtype)
    model = model.to(args.device).eval()
    prompts = random_prompts(args.num_prompts, args.input_len, resolved.spec.vocab_size, args.seed)
    batch_size = args.hf_batch_size or len(prompts)
    output_tokens = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(prompts), batch_size):
            ids = torch.tensor(prompts[first : first + batch_size], device=args.device)
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.output_len,
                min_new_tokens=args.output_len, do_sample=False, pad_token_id=0,
            )
            output_tokens += (out.shape[1] - ids.shape[1]) * out.shape[0]
    if args.device == "cuda":
        torch.cuda.synchronize()
    return _report(args, "hf", time.perf_counter() - started, output_tokens)


def _report(
    args, backend: str, elapsed: float, output_tokens: int, extra: dict | None = None, note: str = "",
    details: list[str] = (),
) -> dict:
    total = args.num_prompts * args.input_len + output_tokens
    result = {
        "backend": backend,
        "model": args.model,
        "device": args.device,
        "layout": _layout_name(args) if backend == "seesaw" else None,
        "elapsed_time": elapsed,
        "num_requests": args.num_prompts,
        "total_num_tokens": total,
        "requests_per_second": args.num_prompts / elapsed,
        "tokens_per_second": total / elapsed,
        "output_tokens_per_second": output_tokens / elapsed,
        **(extra or {}),
    }
    print(
        f"[{backend}] Throughput: {result['requests_per_second']:.2f} requests/s, "
        f"{result['tokens_per_second']:.2f} total tokens/s, "
        f"{result['output_tokens_per_second']:.2f} output tokens/s ({elapsed:.1f} s{note})",
        flush=True,
    )
    for line in details:
        print(f"  {line}", flush=True)
    return result


def _layout_name(args: argparse.Namespace) -> str:
    return f"{args.prefill_layout}-{args.decode_layout}" if args.prefill_layout else args.layout


def _layout_flags(layout: str) -> list[str]:
    """The flags that run Seesaw in `layout` (`P-D`: seesaw mode)."""
    if "-" in layout:
        prefill, decode = layout.split("-", 1)
        return ["--prefill-layout", prefill, "--decode-layout", decode]
    return ["--layout", layout]


def run_each(args: argparse.Namespace, runs: list[list[str]], argv: list[str]) -> list[dict]:
    """Run each variant (extra flags) in its own process and collect their JSON results."""
    results = []
    rest = _without(argv, ("--backend", "--output-json", "--compare", "--layout", "--prefill-layout",
                           "--decode-layout"))
    for flags in runs:
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "result.json"
            subprocess.run([sys.executable, __file__, *flags, "--output-json", str(out), *rest], check=True)
            results.append(json.loads(out.read_text()))
    base = results[-1]
    for result in results[:-1]:
        ratio = result["tokens_per_second"] / base["tokens_per_second"]
        print(f"{_name(result)} / {_name(base)}: {ratio:.2f}x total tokens/s", flush=True)
    return results


def _name(result: dict) -> str:
    return f"seesaw {result['layout']}" if result["backend"] == "seesaw" else result["backend"]


def _without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in flags:
            skip = True
            continue
        if any(arg.startswith(flag + "=") for flag in flags):
            continue
        kept.append(arg)
    return kept


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    unknown = set(backends) - {"seesaw", "hf"}
    if unknown:
        raise SystemExit(f"unknown backend(s): {', '.join(sorted(unknown))}")
    layout_flags = _layout_flags(_layout_name(args))
    if args.compare:
        results = run_each(args, [["--backend", "seesaw", *_layout_flags(name.strip())]
                                  for name in args.compare.split(",") if name.strip()], argv)
    elif len(backends) > 1:
        results = run_each(args, [["--backend", backend, *layout_flags] for backend in backends], argv)
    else:
        results = [run_seesaw(args) if backends[0] == "seesaw" else run_hf(args)]
    if args.output_json:
        payload = results[0] if len(results) == 1 else results
        Path(args.output_json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
