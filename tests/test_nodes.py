"""Seesaw mode over two nodes: two network namespaces, each with its own /dev/shm (a test folder
bound there, so what is left in it can be seen afterwards), head and two workers in A, two
workers in B, `d2p2 -> d2t2` with one replica per node (root and `ip` needed, else skipped)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from seesaw.config import default_cache_dir
from seesaw.model.resolve import resolve_model

CLI = str(Path(sys.executable).parent / "seesaw-cli")
ENGINE = ["--model", "default", "--threads", "1", "--kv-cache-gb", "0.05", "--temperature", "0"]
SEESAW = ["--prefill-layout", "d2p2", "--decode-layout", "d2t2", "--host-buffer-gb", "0.01"]
# Bind the folder in $1 over /dev/shm (this namespace's own mounts), then run the rest.
ON_OWN_SHM = 'mount --bind "$1" /dev/shm && shift && exec "$@"'
# The same, then hide the folder $2 behind an empty $3 and start $4 workers, exiting with any failure.
WORKERS = ('mount --bind "$1" /dev/shm && mount --bind "$3" "$2" && n=$4 && shift 4 && pids="" && '
           'for i in $(seq "$n"); do "$@" & pids="$pids $!"; done; code=0; '
           'for p in $pids; do wait "$p" || code=1; done; exit $code')


def _write_prompts(path: Path, count: int) -> Path:
    path.write_text("".join(orjson.dumps({"custom_id": f"q{i}", "url": "/v1/completions",
                                          "body": {"prompt": f"Write number {i} in words, then count on:",
                                                   "max_tokens": 16, "ignore_eos": True}}).decode() + "\n"
                            for i in range(count)))
    return path


def _texts(path: Path) -> dict[str, str]:
    lines = [orjson.loads(line) for line in path.read_text().splitlines()]
    ids = [line["custom_id"] for line in lines]
    assert len(ids) == len(set(ids)), "a custom_id answered twice"
    return {line["custom_id"]: line["response"]["body"]["choices"][0]["text"] for line in lines}


class TwoNodes:
    """Processes on namespaces A and B, each seeing its own folder as /dev/shm."""

    def __init__(self, namespaces: tuple[str, str], root: Path, port: int):
        self.a, self.b = namespaces
        self.shm = {name: root / f"shm-{name}" for name in ("a", "b")}
        for folder in self.shm.values():
            folder.mkdir()
        self.empty = root / "empty"
        self.empty.mkdir()
        self.head_address = f"tcp://10.231.0.1:{port}"
        self.processes: list[subprocess.Popen] = []

    def head(self, source: Path, out: Path, *flags: str) -> subprocess.Popen:
        command = ["ip", "netns", "exec", self.a, "sh", "-c", ON_OWN_SHM, "sh", str(self.shm["a"]), CLI, "batch",
                   str(source), "-o", str(out), *ENGINE, "--head-address", self.head_address, *flags, "-v"]
        return self._start(command)

    def workers(self, count: int, hidden: Path) -> subprocess.Popen:
        """`count` workers on B, where the folder `hidden` (the checkpoint) cannot be read."""
        command = ["ip", "netns", "exec", self.b, "sh", "-c", WORKERS, "sh", str(self.shm["b"]), str(hidden),
                   str(self.empty), str(count), CLI, "worker", "--head", self.head_address, "--head-timeout", "5",
                   "-v"]
        return self._start(command)

    def _start(self, command: list[str]) -> subprocess.Popen:
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.processes.append(process)
        return process

    def left(self) -> dict[str, list[str]]:
        """What is in each node's /dev/shm, after a few seconds' grace for reapers still at work."""
        deadline = time.monotonic() + 10
        while True:
            found = {name: sorted(p.name for p in folder.iterdir()) for name, folder in self.shm.items()}
            if not any(found.values()) or time.monotonic() > deadline:
                return found
            time.sleep(0.2)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=30)


@pytest.fixture
def nodes(two_hosts, tmp_path):
    nodes = TwoNodes(two_hosts, tmp_path, 5600)  # each test has namespaces, so ports, of its own
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return resolve_model("default", default_cache_dir()).weights_folder


@pytest.fixture(scope="module")
def t1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t1")
    source = _write_prompts(folder / "in.jsonl", 32)
    done = subprocess.run([CLI, "batch", str(source), "-o", str(folder / "out.jsonl"), *ENGINE],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return source, _texts(folder / "out.jsonl")


def _finish(*processes: subprocess.Popen, timeout_s: float = 240) -> list[str]:
    return [process.communicate(timeout=timeout_s)[1] for process in processes]


def _wait_for_lines(out: Path, count: int, head: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while not (out.exists() and out.read_text().count("\n") >= count) and head.poll() is None:
        assert time.monotonic() < deadline, "no results within 240 s"
        time.sleep(0.1)


def test_seesaw_mode_over_two_nodes_gives_t1s_outputs_and_leaves_no_shared_memory(nodes, t1, checkpoint, tmp_path):
    source, expected = t1
    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    head = nodes.head(source, out, *SEESAW, "--local-workers", "2", "--metrics-json", str(metrics))
    workers = nodes.workers(2, hidden=checkpoint)
    head_log, workers_log = _finish(head, workers)
    assert head.returncode == 0, head_log + workers_log
    assert workers.returncode == 0, workers_log
    assert _texts(out) == expected
    transitions = orjson.loads(metrics.read_bytes())["transitions"]
    for replica in (0, 1):
        assert sum(t["replica"] == replica for t in transitions) >= 3, transitions
    # Node B cannot read the checkpoint: its keeper filled its store from the head, once.
    assert workers_log.count("node weight store filled from the head's checkpoint feed") == 1, workers_log
    assert "keeps the shared memory of node" in head_log
    assert nodes.left() == {"a": [], "b": []}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_neither_node_keeps_shared_memory_after_the_head_is_stopped_or_killed(nodes, t1, checkpoint, tmp_path, signum):
    source, _ = t1
    out = tmp_path / "out.jsonl"
    head = nodes.head(source, out, *SEESAW, "--local-workers", "2", "--max-num-seqs", "2", "--grace-s", "3")
    workers = nodes.workers(2, hidden=tmp_path / "empty")  # B reads the checkpoint as A does
    _wait_for_lines(out, 2, head)
    assert any(nodes.shm["a"].iterdir()) and any(nodes.shm["b"].iterdir()), "a node has no shared memory"
    os.kill(head.pid, signum)
    head_log, workers_log = _finish(head, workers, timeout_s=120)
    assert head.returncode == (143 if signum == signal.SIGTERM else -signal.SIGKILL), head_log
    assert nodes.left() == {"a": [], "b": []}, head_log + workers_log


def test_the_second_nodes_workers_killed_mid_run_leave_every_result_once(nodes, t1, tmp_path):
    source, expected = t1
    out = tmp_path / "out.jsonl"
    head = nodes.head(source, out, *SEESAW, "--local-workers", "2", "--max-num-seqs", "4")
    workers = nodes.workers(2, hidden=tmp_path / "empty")
    _wait_for_lines(out, 4, head)
    os.killpg(workers.pid, signal.SIGKILL)  # the whole of node B at once, keeper included: no word to the head
    head_log, _ = _finish(head, workers)
    assert head.returncode == 0, head_log
    assert "go on on the other replicas" in head_log
    assert _texts(out) == expected
    assert nodes.left() == {"a": [], "b": []}  # B's reaper removed what its killed keeper held


def test_a_seesaw_replica_spanning_two_nodes_is_refused_at_start(nodes, t1, tmp_path):
    source, _ = t1
    head = nodes.head(source, tmp_path / "out.jsonl", "--prefill-layout", "p2", "--decode-layout", "t2",
                      "--local-workers", "1")
    workers = nodes.workers(1, hidden=tmp_path / "empty")
    head_log, _ = _finish(head, workers, timeout_s=120)
    assert head.returncode == 1, head_log
    assert "replica 0 of p2 has workers on 2 nodes" in head_log and "each replica's 2 workers must run on one node" \
        in head_log, head_log
    assert "Traceback" not in head_log
    assert nodes.left() == {"a": [], "b": []}


def test_a_head_that_starts_no_worker_makes_no_shared_memory_and_the_workers_node_keeps_it(nodes, t1, tmp_path):
    source, expected = t1
    out = tmp_path / "out.jsonl"
    head = nodes.head(source, out, "--prefill-layout", "p2", "--decode-layout", "t2", "--host-buffer-gb", "0.01",
                      "--local-workers", "0")
    workers = nodes.workers(2, hidden=tmp_path / "empty")
    deadline = time.monotonic() + 240
    while not any(nodes.shm["b"].iterdir()) and head.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert not any(nodes.shm["a"].iterdir())  # the head keeps no store or buffer it would not use
    head_log, workers_log = _finish(head, workers)
    assert head.returncode == 0, head_log + workers_log
    assert "node weight store filled from" in workers_log
    assert _texts(out) == expected
    assert nodes.left() == {"a": [], "b": []}


def test_a_static_replica_on_the_second_node_parks_evicted_requests_in_that_nodes_buffer(nodes, t1, tmp_path):
    """`d2`, replica 1 on node B, device pools too small for the job: requests evicted on either
    node wait in their own node's host buffer and come back without being recomputed."""
    source, expected = t1
    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    head = nodes.head(source, out, "--layout", "d2", "--kv-cache-gb", "0.008", "--host-buffer-gb", "0.05",
                      "--local-workers", "1", "--metrics-json", str(metrics))
    workers = nodes.workers(1, hidden=tmp_path / "empty")
    head_log, workers_log = _finish(head, workers)
    assert head.returncode == 0, head_log + workers_log
    assert "node" in head_log and "shared memory for replica 1 ready" in head_log
    assert _texts(out) == expected
    totals = orjson.loads(metrics.read_bytes())["totals"]
    assert totals["evictions"] > 0 and totals["restores"] > 0 and totals["recomputes"] == 0, totals
    assert nodes.left() == {"a": [], "b": []}
