"""Workers on two hosts: two network namespaces joined by a veth pair stand in for them (root and
`ip` needed, else skipped), and a world that cannot form says why within the join timeout."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

CLI = str(Path(sys.executable).parent / "seesaw-cli")
PROMPTS = ["The capital of France is", "One, two, three,", "Water boils at", "A cat is a kind of"]
ENGINE = ["--model", "default", "--threads", "1", "--kv-cache-gb", "0.05", "--max-tokens", "8", "--temperature", "0"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _prompts(path: Path) -> Path:
    path.write_text("".join(orjson.dumps({"custom_id": f"p{i}", "url": "/v1/completions",
                                          "body": {"prompt": text, "ignore_eos": True}}).decode() + "\n"
                            for i, text in enumerate(PROMPTS)))
    return path


def _texts(path: Path) -> dict[str, str]:
    lines = [orjson.loads(line) for line in path.read_text().splitlines()]
    return {line["custom_id"]: line["response"]["body"]["choices"][0]["text"] for line in lines}


def _wait_for(head: subprocess.Popen, worker: subprocess.Popen, head_timeout_s: float) -> tuple[str, str]:
    """Both processes' stderr once they exit; whatever outlives its timeout is killed."""
    try:
        _, head_errors = head.communicate(timeout=head_timeout_s)
        _, worker_errors = worker.communicate(timeout=60)
    finally:
        for process in (head, worker):
            if process.poll() is None:
                process.kill()
                process.wait()
    return head_errors, worker_errors


def test_a_worker_given_a_wrong_head_address_says_so_within_the_join_timeout():
    started = time.monotonic()
    done = subprocess.run([CLI, "worker", "--head", f"tcp://127.0.0.1:{_free_port()}", "--join-timeout", "3"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and time.monotonic() - started < 30
    assert "heard nothing from the head within 3 s" in done.stderr and "--advertise-address" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_worker_the_head_cannot_reach_fails_the_run_within_the_join_timeout(tmp_path):
    port = _free_port()
    head = subprocess.Popen([CLI, "batch", str(_prompts(tmp_path / "in.jsonl")), "-o", str(tmp_path / "out.jsonl"),
                             *ENGINE, "--layout", "t2", "--head-address", f"tcp://127.0.0.1:{port}",
                             "--local-workers", "1", "--join-timeout", "8"], stderr=subprocess.PIPE, text=True)
    # 198.51.100.7 is a documentation address: nothing of ours answers there, as with a worker behind NAT.
    worker = subprocess.Popen([CLI, "worker", "--head", f"tcp://127.0.0.1:{port}", "--advertise-address", "198.51.100.7",
                               "--join-timeout", "8"], stderr=subprocess.PIPE, text=True)
    head_errors, worker_errors = _wait_for(head, worker, head_timeout_s=90)
    assert head.returncode == 1 and worker.returncode != 0
    assert "worker 1 failed while joining" in head_errors and "198.51.100.7" in head_errors
    assert "--advertise-address" in head_errors and "Traceback" not in head_errors + worker_errors


@pytest.fixture(scope="module")
def t1_texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t1")
    done = subprocess.run([CLI, "batch", str(_prompts(folder / "in.jsonl")), "-o", str(folder / "out.jsonl"), *ENGINE],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return _texts(folder / "out.jsonl")


@pytest.mark.parametrize("layout", ["t2", "p2"])
def test_a_head_and_a_worker_on_two_hosts_give_t1s_outputs(two_hosts, t1_texts, layout, tmp_path):
    a, b = two_hosts
    head = subprocess.Popen(["ip", "netns", "exec", a, CLI, "batch", str(_prompts(tmp_path / "in.jsonl")),
                             "-o", str(tmp_path / "out.jsonl"), *ENGINE, "--layout", layout,
                             "--head-address", "tcp://10.231.0.1:5555", "--local-workers", "1"],
                            stderr=subprocess.PIPE, text=True)
    worker = subprocess.Popen(["ip", "netns", "exec", b, CLI, "worker", "--head", "tcp://10.231.0.1:5555"],
                              stderr=subprocess.PIPE, text=True)
    head_errors, worker_errors = _wait_for(head, worker, head_timeout_s=240)
    assert head.returncode == 0, head_errors + worker_errors
    assert worker.returncode == 0, worker_errors
    assert _texts(tmp_path / "out.jsonl") == t1_texts


def test_a_replica_on_another_host_lost_mid_run_hands_its_requests_to_the_others(two_hosts, tmp_path):
    """d2 with replica 1 on host B: B's worker killed with SIGKILL mid-run, the head cannot restart
    it, so its requests go on on replica 0 and every line is answered once, as t1 answers it."""
    a, b = two_hosts
    prompts = [f"Write number {i} in words, then count on:" for i in range(12)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(orjson.dumps({"custom_id": f"q{i}", "url": "/v1/completions",
                                            "body": {"prompt": text, "max_tokens": 24, "ignore_eos": True}}).decode() + "\n"
                              for i, text in enumerate(prompts)))
    engine = [flag for flag in ENGINE if flag not in ("--max-tokens", "8")]
    done = subprocess.run([CLI, "batch", str(source), "-o", str(tmp_path / "t1.jsonl"), *engine],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    head = subprocess.Popen(["ip", "netns", "exec", a, CLI, "batch", str(source), "-o", str(tmp_path / "out.jsonl"),
                             *engine, "--layout", "d2", "--max-num-seqs", "4",
                             "--head-address", "tcp://10.231.0.1:5556", "--local-workers", "1"],
                            stderr=subprocess.PIPE, text=True)
    worker = subprocess.Popen(["ip", "netns", "exec", b, CLI, "worker", "--head", "tcp://10.231.0.1:5556"],
                              stderr=subprocess.PIPE, text=True)
    out = tmp_path / "out.jsonl"
    deadline = time.monotonic() + 240
    while not (out.exists() and out.read_text().count("\n") >= 2) and head.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    worker.kill()  # the whole host B gone at once: no word to the head
    head_errors, _ = _wait_for(head, worker, head_timeout_s=240)
    assert head.returncode == 0, head_errors
    assert "go on on the other replicas" in head_errors
    lines = [orjson.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"q{i}" for i in range(12))
    assert _texts(out) == _texts(tmp_path / "t1.jsonl")
