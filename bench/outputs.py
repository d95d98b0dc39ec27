"""What structured outputs and log-probabilities cost: the same job with and without them, in one
sitting (greedy, 256 chat requests of 64 output tokens each by default).

    python bench/outputs.py --job json      # json_schema against unconstrained
    python bench/outputs.py --job logprobs  # top_logprobs 5 against none
    python bench/outputs.py --job json --repeats 2

The json job's schema asks for a list of at least 40 records, so no constrained output ends before
its 64 tokens, and the unconstrained run ignores the end token: both runs make the same number of
tokens, and their throughputs compare the work per token. Each run is a fresh engine in its own
process, one after another; the ratio of each run's output throughput to the baseline's (the
last run) is printed. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

SCHEMA = {"type": "array", "minItems": 40, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                     "score": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["name", "score"]}}
TOPICS = ["players", "cities", "books", "rivers", "planets", "songs", "films", "birds"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="json", choices=["json", "logprobs"])
    parser.add_argument("--model", default="default")
    parser.add_argument("--layout", default="t1")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def bodies(args: argparse.Namespace, run: str) -> list[dict]:
    """The OpenAI chat bodies of a run: `with` adds the job's field, `without` leaves it out."""
    out = []
    for index in range(args.num_requests):
        topic = TOPICS[index % len(TOPICS)]
        body = {"messages": [{"role": "user", "content": f"List {topic} number {index} with a score each, as JSON."}],
                "max_tokens": args.output_len, "temperature": 0}
        if run == "with" and args.job == "json":
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "list", "schema": SCHEMA}}
        elif run == "with":
            body.update(logprobs=True, top_logprobs=5)
        if run == "without" or args.job == "logprobs":
            body["ignore_eos"] = True
        out.append(body)
    return out


async def one_run(args: argparse.Namespace, run: str) -> dict:
    from seesaw.config import EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig, default_cache_dir
    from seesaw.config import default_token_budget
    from seesaw.engine import Engine
    from seesaw.frontend.batch_io import SamplingDefaults, parse_body
    from seesaw.frontend.local import LocalClient
    from seesaw.layout import Layout
    from seesaw.messages import RequestKind
    from seesaw.model.resolve import resolve_model

    config = EngineConfig(model=ModelConfig(model=args.model), parallel=ParallelConfig(layout=Layout.parse(args.layout)),
                          scheduler=SchedulerConfig(max_num_batched_tokens=default_token_budget("cpu")),
                          cache_dir=default_cache_dir())
    items = [parse_body(body, RequestKind.CHAT, f"r{index}", SamplingDefaults())
             for index, body in enumerate(bodies(args, run))]
    async with Engine(config, resolve_model(args.model, config.cache_dir)) as engine, \
            LocalClient(engine, "bench") as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(client.submit(item.sampling, messages=item.messages) for item in items))
        seconds = time.perf_counter() - started
    errors = [result.error for result in results if result.error]
    tokens = sum(result.completion_tokens for result in results)
    return {"run": run, "seconds": seconds, "output_tokens": tokens, "tokens_per_s": tokens / seconds,
            "errors": len(errors), "first_error": errors[0] if errors else None}


def main() -> None:
    args = parse_args()
    if args.run is not None:
        print(json.dumps(asyncio.run(one_run(args, args.run))))
        return
    runs = ["with", "without"]
    figures: dict[str, list[dict]] = {run: [] for run in runs}
    for _ in range(args.repeats):
        for run in runs:
            command = [sys.executable, __file__, "--run", run, "--job", args.job, "--model", args.model,
                       "--layout", args.layout, "--num-requests", str(args.num_requests),
                       "--output-len", str(args.output_len)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            figure = json.loads(out.strip().splitlines()[-1])
            figures[run].append(figure)
            print(f"{args.job:8s} {run:8s} {figure['seconds']:7.1f} s  {figure['output_tokens']:6d} tokens  "
                  f"{figure['tokens_per_s']:7.1f} tok/s  errors {figure['errors']}", flush=True)
    best = {run: max(figure["tokens_per_s"] for figure in figures[run]) for run in runs}
    print(f"{args.job}: with / without = {best['with'] / best['without']:.3f} (best of {args.repeats}; "
          f"{args.num_requests} requests, {args.output_len} output tokens, {args.model} at {args.layout})")


if __name__ == "__main__":
    main()
