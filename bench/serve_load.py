"""What the daemon paths cost: the same workload through `seesaw-cli batch`, through
`seesaw-cli serve` with N clients on a local ZeroMQ socket, and through `seesaw-cli serve --http`
with N HTTP clients, plain and streamed, one after the other, each engine in its own process.
Fixed-length random-token prompts, EOS ignored, greedy.

    python bench/serve_load.py --num-clients 4 --num-requests 128 --input-len 128 --output-len 32

Prints requests/s, output tokens/s and, for the daemons, p50/p99 seconds per request (from a
client's send to its result, or its last streamed chunk), and each path's throughput as a share
of the batch's. Every throughput is measured from the first request to the last result (model
loading excluded). `--paths` picks which to run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CLI = str(Path(sys.executable).parent / "seesaw-cli")  # with PYTHONPATH set, it runs the code there
START_TIMEOUT_S = 600  # loading the model and starting the workers


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--num-clients", type=int, default=4)
    parser.add_argument("--num-requests", type=int, default=128, help="over all clients")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--kv-cache-gb", type=float, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--paths", default="zmq,http,http-stream", help="daemon paths beside the batch: zmq, http, http-stream")
    return parser.parse_args(argv)


def engine_flags(args) -> list[str]:
    flags = ["--model", args.model, "--device", args.device, "--max-num-seqs", str(args.max_num_seqs),
             "--max-tokens", str(args.output_len), "--temperature", "0"]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    if args.kv_cache_gb:
        flags += ["--kv-cache-gb", str(args.kv_cache_gb)]
    return flags


def workload(args) -> list[dict]:
    """The request bodies: random token ids of the model's vocabulary, above where tokenizers
    keep their special tokens."""
    import random

    from seesaw.config import default_cache_dir
    from seesaw.model.resolve import resolve_model

    vocab_size = resolve_model(args.model, default_cache_dir()).hf_config["vocab_size"]
    low = min(1000, vocab_size // 2)
    rng = random.Random(args.seed)
    return [{"prompt": [rng.randrange(low, vocab_size) for _ in range(args.input_len)], "max_tokens": args.output_len,
             "temperature": 0, "ignore_eos": True} for _ in range(args.num_requests)]


def run_batch(args, requests: list[dict], folder: Path) -> dict:
    source = folder / "load.jsonl"
    source.write_text("".join(json.dumps({"custom_id": f"r{i}", "url": "/v1/completions", "body": body}) + "\n"
                              for i, body in enumerate(requests)))
    done = subprocess.run([CLI, "batch", str(source), "-o", str(folder / "out.jsonl"), *engine_flags(args)],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        sys.exit(f"seesaw-cli batch failed:\n{done.stderr}")
    rates = re.search(r"throughput: ([\d.]+) requests/s, [\d.]+ total tokens/s, ([\d.]+) output tokens/s", done.stderr)
    return {"requests_per_s": float(rates[1]), "output_tokens_per_s": float(rates[2])}


def run_daemon(args, requests: list[dict], folder: Path) -> dict:
    address = f"ipc://{folder}/serve.sock"
    server = subprocess.Popen([CLI, "serve", "--bind", address, *engine_flags(args)], stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_serving(server, START_TIMEOUT_S)
        return asyncio.run(_load(address, requests, args.num_clients))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


def _wait_until_serving(server: subprocess.Popen, timeout_s: float) -> str:
    """Wait for the daemon's "serving" line (it says other things first, such as its host buffer);
    a thread reads its stderr to the end, so the pipe never fills while the load runs."""
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        for line in server.stderr:
            lines.put(line)
        lines.put(None)  # the daemon closed its stderr: it ended

    threading.Thread(target=drain, daemon=True).start()
    said: list[str] = []
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            sys.exit(f"seesaw-cli serve did not say it was serving within {timeout_s:.0f} s:\n{''.join(said)}")
        if line is None:
            sys.exit(f"seesaw-cli serve ended before serving:\n{''.join(said)}")
        said.append(line)
        if "serving" in line:
            return line


async def _load(address: str, requests: list[dict], num_clients: int) -> dict:
    from seesaw.client import AsyncClient

    latencies: list[float] = []
    tokens = 0

    async def one(client: AsyncClient, body: dict) -> None:
        nonlocal tokens
        sent = time.perf_counter()
        response = await client.complete(body)
        latencies.append(time.perf_counter() - sent)
        tokens += response["usage"]["completion_tokens"]

    clients = [AsyncClient(address, timeout_s=3600) for _ in range(num_clients)]
    elapsed = await _drive(clients, one, requests)
    return _rates(len(requests), tokens, elapsed, latencies)


def run_http(args, requests: list[dict], folder: Path, stream: bool) -> dict:
    server = subprocess.Popen([CLI, "serve", "--http", "127.0.0.1:0", "--data-dir", str(folder / "http-data"),
                               "--max-streams", str(max(1, len(requests))),  # every request is sent at once
                               *engine_flags(args)], stderr=subprocess.PIPE, text=True)
    try:
        line = _wait_until_serving(server, START_TIMEOUT_S)
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line)[1])
        return asyncio.run(_load_http(f"http://127.0.0.1:{port}/v1/completions", requests, args.num_clients, stream))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


async def _load_http(url: str, requests: list[dict], num_clients: int, stream: bool) -> dict:
    """N clients, each its own connection pool, sending every request at once (as the ZeroMQ load does)."""
    import aiohttp

    latencies: list[float] = []
    tokens = 0

    async def one(session: aiohttp.ClientSession, body: dict) -> None:
        nonlocal tokens
        sent = time.perf_counter()
        if stream:
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with session.post(url, json=body) as response:
            if response.status != 200:
                sys.exit(f"the HTTP server answered {response.status}: {await response.text()}")
            if stream:
                usage = None
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        usage = json.loads(line[6:]).get("usage") or usage
            else:
                usage = (await response.json())["usage"]
        latencies.append(time.perf_counter() - sent)
        tokens += usage["completion_tokens"]

    timeout = aiohttp.ClientTimeout(total=3600)
    sessions = [aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
                for _ in range(num_clients)]
    elapsed = await _drive(sessions, one, requests)
    return _rates(len(requests), tokens, elapsed, latencies)


async def _drive(clients: list, one, requests: list[dict]) -> float:
    """Send every request at once, spread over the clients in turn; the seconds until the last
    answer. The clients are closed after."""
    started = time.perf_counter()
    try:
        await asyncio.gather(*(one(clients[i % len(clients)], body) for i, body in enumerate(requests)))
    finally:
        for client in clients:
            await client.close()
    return time.perf_counter() - started


def _rates(num_requests: int, tokens: int, elapsed: float, latencies: list[float]) -> dict:
    latencies.sort()
    return {"requests_per_s": num_requests / elapsed, "output_tokens_per_s": tokens / elapsed,
            "p50_s": latencies[len(latencies) // 2], "p99_s": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}


PATHS = {"zmq": ("daemon (ZeroMQ)", run_daemon),
         "http": ("HTTP", lambda args, requests, folder: run_http(args, requests, folder, stream=False)),
         "http-stream": ("HTTP streamed", lambda args, requests, folder: run_http(args, requests, folder, stream=True))}


def main(argv=None) -> None:
    args = parse_args(argv)
    paths = [path.strip() for path in args.paths.split(",") if path.strip()]
    unknown = [path for path in paths if path not in PATHS]
    if unknown:
        sys.exit(f"unknown --paths {unknown}; pick from {', '.join(PATHS)}")
    requests = workload(args)
    results = {}
    with tempfile.TemporaryDirectory(prefix="serve-load-") as folder:
        batch = run_batch(args, requests, Path(folder))
        for path in paths:
            results[path] = PATHS[path][1](args, requests, Path(folder))
    print(f"workload: {args.num_requests} requests x {args.input_len} prompt + {args.output_len} output tokens, "
          f"{args.model} on {args.device} ({os.cpu_count()} cores), {args.num_clients} clients")
    print(f"batch:  {batch['requests_per_s']:.2f} requests/s, {batch['output_tokens_per_s']:.1f} output tokens/s")
    for path, result in results.items():
        print(f"{PATHS[path][0]}: {result['requests_per_s']:.2f} requests/s, {result['output_tokens_per_s']:.1f} "
              f"output tokens/s, p50 {result['p50_s']:.2f} s, p99 {result['p99_s']:.2f} s per request, "
              f"{result['output_tokens_per_s'] / batch['output_tokens_per_s']:.3f} of the batch")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"batch": batch, **results, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
