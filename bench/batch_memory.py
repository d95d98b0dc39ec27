"""Resident memory of `seesaw-cli batch` over long inputs, and the time a resume spends reading
what an earlier run wrote.

    python bench/batch_memory.py --lines 10000,1000000

Each run feeds LINES tiny requests (two prompt tokens, one output token, `dummy:tiny`, so the
front door and the scheduler are what is measured), samples the head process's resident memory
twice a second, and prints its peak and how much it grew after the first tenth of the results.
Then it times reading the output back as `--resume` does. Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", default="10000,1000000", help="input sizes, a comma list")
    parser.add_argument("--model", default="dummy:tiny")
    return parser.parse_args(argv)


def write_input(path: Path, count: int) -> None:
    with path.open("wb") as sink:
        for index in range(count):
            sink.write(b'{"id":"r%d","prompt":[%d,7],"max_tokens":1}\n' % (index, 5 + index % 50))


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run(count: int, model: str, folder: Path) -> None:
    source, out = folder / f"in-{count}.jsonl", folder / f"out-{count}.jsonl"
    write_input(source, count)
    command = [sys.executable, "-m", "seesaw_cli.main", "batch", str(source), "-o", str(out), "--model", model,
               "--threads", "1", "--kv-cache-gb", "0.05", "--host-buffer-gb", "0.01",
               "--max-num-batched-tokens", "2048"]
    started = time.perf_counter()
    head = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[int, int]] = []  # (output bytes, resident kB)
    while head.poll() is None:
        rss = rss_kb(head.pid)
        if rss is not None:
            samples.append((out.stat().st_size if out.exists() else 0, rss))
        time.sleep(0.5)
    elapsed = time.perf_counter() - started
    if head.returncode != 0:
        raise SystemExit(f"the batch failed:\n{head.stderr.read()}")
    final = out.stat().st_size
    peak = max(rss for _, rss in samples)
    early = next((rss for size, rss in samples if size >= final / 10), peak)
    print(f"{count:>9,} lines: {elapsed:6.1f} s, peak resident {peak / 1024:6.0f} MB, "
          f"grew {(peak - early) / 1024:5.0f} MB after the first tenth of the results", flush=True)
    from seesaw.frontend.output import finished_ids

    started = time.perf_counter()
    _, num_lines = finished_ids(out)
    seconds = time.perf_counter() - started
    print(f"{'':>9}  resume reads {num_lines:,} results in {seconds:.2f} s "
          f"({seconds / num_lines * 1e5:.2f} s per 100,000)", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="batch-memory-") as scratch:
        for count in (int(text) for text in args.lines.split(",")):
            run(count, args.model, Path(scratch))


if __name__ == "__main__":
    main()
