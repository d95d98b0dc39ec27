"""Workers as separate commands: joining a head over TCP, and dying mid-batch without a hang."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson

from helpers import random_prompts, spawned_worker_options

CLI = [sys.executable, "-m", "seesaw_cli.main"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _token_batch(path: Path, count: int, max_tokens: int) -> list[list[int]]:
    prompts = random_prompts(count, [6, 20, 33], seed=21)
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}
        for i, p in enumerate(prompts)
    ]
    path.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    return prompts


def _results(path: Path) -> dict[str, dict]:
    return {r["custom_id"]: r for r in map(orjson.loads, path.read_text().splitlines())}


def _common(folder: Path) -> list[str]:
    return ["--model", str(folder), "--threads", "1", "--kv-cache-gb", "0.05", "--host-buffer-gb", "0.02"]


def test_workers_started_as_separate_commands_join_over_tcp(tiny_models, tmp_path):
    folder = tiny_models["llama-gqa-tied"]
    source = tmp_path / "in.jsonl"
    _token_batch(source, 6, 8)
    reference = tmp_path / "t1.jsonl"
    local = subprocess.run([*CLI, "batch", source, "-o", reference, *_common(folder)],
                           capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stderr

    head_address = f"tcp://127.0.0.1:{_free_port()}"
    output = tmp_path / "t2.jsonl"
    head = subprocess.Popen([*CLI, "batch", source, "-o", output, *_common(folder), "--layout", "t2",
                             "--head-address", head_address, "--local-workers", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = [subprocess.Popen([*CLI, "worker", "--head", head_address]) for _ in range(2)]
    try:
        _, stderr = head.communicate(timeout=180)
        assert head.returncode == 0, stderr
        for worker in workers:
            assert worker.wait(timeout=30) == 0  # the head's shutdown ends them
    finally:
        for process in (head, *workers):
            if process.poll() is None:
                process.kill()
                process.wait()
    expected = {cid: r["response"]["body"]["choices"][0]["text"] for cid, r in _results(reference).items()}
    got = {cid: r["response"]["body"]["choices"][0]["text"] for cid, r in _results(output).items()}
    assert got == expected and len(got) == 6


def _worker_pids(parent: int) -> dict[int, int]:
    """Rank -> pid of the worker processes the head started."""
    pids = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            options = spawned_worker_options(cmdline) if ppid == parent else None
            if options is not None:
                pids[options.rank] = int(proc.name)
    return pids


def _kill_a_worker_mid_batch(folder: Path, source: Path, output: Path, *flags: str) -> tuple[int, str]:
    """Run a t2 batch, SIGKILL worker 1 once two results are written; the exit code and stderr."""
    # One request at a time keeps the batch going long enough to kill a worker in the middle.
    head = subprocess.Popen([*CLI, "batch", source, "-o", output, *_common(folder), "--layout", "t2",
                             "--max-num-seqs", "1", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (output.exists() and output.read_text().count("\n") >= 2):
            assert head.poll() is None and time.monotonic() < deadline, "the batch did not start"
            time.sleep(0.05)
        victims = _worker_pids(head.pid)
        assert len(victims) == 2
        os.kill(victims[1], signal.SIGKILL)
        _, stderr = head.communicate(timeout=120)
    finally:
        if head.poll() is None:
            head.kill()
            head.wait()
    return head.returncode, stderr


def test_a_killed_worker_is_restarted_and_the_batch_completes_with_every_request_once(tiny_models, tmp_path):
    folder = tiny_models["llama-gqa-tied"]
    source, reference, output = tmp_path / "in.jsonl", tmp_path / "t1.jsonl", tmp_path / "out.jsonl"
    _token_batch(source, 40, 60)
    done = subprocess.run([*CLI, "batch", source, "-o", reference, *_common(folder)], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    code, stderr = _kill_a_worker_mid_batch(folder, source, output)
    assert code == 0, stderr
    assert "restarting replica 0" in stderr and "requests: 40 ok, 0 failed" in stderr
    lines = output.read_text().splitlines()
    assert len(lines) == 40  # every request answered, none twice
    expected = {cid: r["response"]["body"]["choices"][0]["text"] for cid, r in _results(reference).items()}
    got = {cid: r["response"]["body"]["choices"][0]["text"] for cid, r in _results(output).items()}
    assert got == expected  # the requests in flight started over and generated the same tokens


def test_past_the_restart_limit_a_killed_worker_stops_the_batch_with_a_clear_error(tiny_models, tmp_path):
    folder = tiny_models["llama-gqa-tied"]
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _token_batch(source, 40, 60)
    started = time.monotonic()
    code, stderr = _kill_a_worker_mid_batch(folder, source, output, "--max-restarts", "0")
    assert time.monotonic() - started < 150
    assert code == 1
    assert "worker 1 failed while running steps: the process was killed by SIGKILL" in stderr
    assert "--max-restarts" in stderr and "--resume" in stderr
    written = _results(output)
    assert 2 <= len(written) < 40
    assert all(r["response"]["status_code"] == 200 for r in written.values())
