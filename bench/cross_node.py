"""What crossing hosts costs in seesaw mode: the same batch with `--prefill-layout d2p2
--decode-layout d2t2` run twice, on one namespace with its four workers started by the head, and
on two network namespaces joined by a veth pair, each with its own /dev/shm, the head and replica
0 in the first and replica 1's two workers (its node's keeper making that node's weight store and
host buffer) in the second. Every replica has as many host blocks in both (`--host-buffer-gb` is
the whole buffer of the one-node run). The runs alternate, `--rounds` times. Needs root and
`ip netns`.

    sudo .venv/bin/python bench/cross_node.py --num-requests 64 --output-len 32 --rounds 2

Prints each run's wall time (start to exit, the weight stores' filling included), its run time
(first request to last result, from --metrics-json) and tokens/s over the run time, and the
two-node run's throughput as a share of the one-node run's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = str(Path(sys.executable).parent / "seesaw-cli")
ON_OWN_SHM = 'mount --bind "$1" /dev/shm && shift && exec "$@"'
WORKERS = ('mount --bind "$1" /dev/shm && shift && { "$@" & a=$!; "$@" & b=$!; '
           'wait $a; x=$?; wait $b; y=$?; exit $((x | y)); }')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--host-buffer-gb", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=2)
    return parser.parse_args(argv)


def namespaces(tag: str) -> tuple[str, str]:
    a, b = f"seesaw-bench-a-{tag}", f"seesaw-bench-b-{tag}"
    steps = [["ip", "netns", "add", a], ["ip", "netns", "add", b],
             ["ip", "link", "add", f"sba{tag}", "type", "veth", "peer", "name", f"sbb{tag}"],
             ["ip", "link", "set", f"sba{tag}", "netns", a], ["ip", "link", "set", f"sbb{tag}", "netns", b],
             ["ip", "-n", a, "addr", "add", "10.232.0.1/24", "dev", f"sba{tag}"],
             ["ip", "-n", b, "addr", "add", "10.232.0.2/24", "dev", f"sbb{tag}"]]
    steps += [["ip", "-n", ns, "link", "set", dev, "up"]
              for ns, dev in ((a, f"sba{tag}"), (b, f"sbb{tag}"), (a, "lo"), (b, "lo"))]
    for step in steps:
        subprocess.run(step, check=True, capture_output=True)
    return a, b


def write_prompts(path: Path, count: int, output_len: int) -> None:
    with path.open("w") as out:
        for i in range(count):
            body = {"prompt": f"Write the number {i} in words, then count on from it:", "max_tokens": output_len,
                    "ignore_eos": True, "temperature": 0}
            out.write(json.dumps({"custom_id": f"q{i}", "url": "/v1/completions", "body": body}) + "\n")


def run(args, folder: Path, a: str, b: str, two_nodes: bool, round_index: int) -> dict:
    name = f"{'two' if two_nodes else 'one'}-{round_index}"
    shm_a, shm_b = folder / f"shm-a-{name}", folder / f"shm-b-{name}"
    shm_a.mkdir()
    shm_b.mkdir()
    metrics, out = folder / f"{name}.json", folder / f"{name}.jsonl"
    # --host-buffer-gb is the head node's, for its replicas: halved where it has one of the two, so
    # that every replica has as many host blocks in both runs.
    host_buffer_gb = args.host_buffer_gb / 2 if two_nodes else args.host_buffer_gb
    engine = ["--model", args.model, "--prefill-layout", "d2p2", "--decode-layout", "d2t2",
              "--host-buffer-gb", f"{host_buffer_gb:g}", "--threads", "1", "--metrics-json", str(metrics)]
    head_flags = ["--head-address", "tcp://10.232.0.1:5800", "--local-workers", "2"] if two_nodes else []
    started = time.perf_counter()
    head = subprocess.Popen(["ip", "netns", "exec", a, "sh", "-c", ON_OWN_SHM, "sh", str(shm_a), CLI, "batch",
                             str(folder / "in.jsonl"), "-o", str(out), *engine, *head_flags],
                            stderr=subprocess.PIPE, text=True)
    workers = None
    if two_nodes:
        workers = subprocess.Popen(["ip", "netns", "exec", b, "sh", "-c", WORKERS, "sh", str(shm_b), CLI, "worker",
                                    "--head", "tcp://10.232.0.1:5800", "--head-timeout", "10"],
                                   stderr=subprocess.PIPE, text=True)
    _, errors = head.communicate(timeout=3600)
    if workers is not None:
        workers.communicate(timeout=120)
    wall_s = time.perf_counter() - started
    if head.returncode != 0:
        sys.exit(f"{name} failed:\n{errors[-3000:]}")
    figures = json.loads(metrics.read_text())
    tokens = figures["totals"]["prompt_tokens"] + figures["totals"]["generated_tokens"]
    left = [str(p) for folder in (shm_a, shm_b) for p in folder.iterdir()]
    return {"run": name, "wall_s": wall_s, "run_s": figures["elapsed_s"], "tokens_per_s": tokens / figures["elapsed_s"],
            "transitions": figures["num_transitions"], "left_in_shm": left}


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("needs root (network and mount namespaces)")
    tag = str(os.getpid() % 10000)
    a, b = namespaces(tag)
    try:
        with tempfile.TemporaryDirectory(prefix="cross-node-") as name:
            folder = Path(name)
            write_prompts(folder / "in.jsonl", args.num_requests, args.output_len)
            results = []
            for round_index in range(args.rounds):
                for two_nodes in (False, True):
                    result = run(args, folder, a, b, two_nodes, round_index)
                    results.append(result)
                    print(f"{result['run']:>6}: wall {result['wall_s']:6.1f} s, run {result['run_s']:6.1f} s, "
                          f"{result['tokens_per_s']:7.1f} tok/s, {result['transitions']} transitions, "
                          f"left in /dev/shm: {result['left_in_shm'] or 'nothing'}", flush=True)
            for round_index in range(args.rounds):
                one, two = results[2 * round_index], results[2 * round_index + 1]
                print(f"round {round_index + 1}: two nodes / one node = {two['tokens_per_s'] / one['tokens_per_s']:.3f} "
                      f"(run), {one['wall_s'] / two['wall_s']:.3f} (wall)")
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
