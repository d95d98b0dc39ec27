"""`seesaw-cli serve --http` as a process on the tiny model: a batch survives SIGKILL and answers
every custom_id once with `seesaw-cli batch`'s lines, SIGTERM lets requests finish and leaves
batches to resume, and a public address needs a key."""

from __future__ import annotations

import io
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

ENGINE_FLAGS = ["--model", "dummy:tiny", "--threads", "1", "--kv-cache-gb", "0.05", "--host-buffer-gb", "0.05"]
NUM_LINES = 300


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "seesaw_cli.main", *args]


class _Daemon:
    """A `seesaw-cli serve --http 127.0.0.1:0` process; its stderr read by a thread so it never fills."""

    def __init__(self, data_dir: Path, *flags: str):
        self.process = subprocess.Popen(_cli("serve", "--http", "127.0.0.1:0", "--data-dir", str(data_dir),
                                             *ENGINE_FLAGS, *flags), stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.said: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        line = self.wait_for("serving", 120)
        self.port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line)[1])
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0,
                                    timeout=60)

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"the server ended before saying {text!r}:\n{''.join(self.said)}")
            self.said.append(line)
            if text in line:
                return line

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


def _input(folder: Path, max_tokens: int = 24) -> Path:
    """NUM_LINES greedy lines of token-id prompts, of `max_tokens` and up to 15 more."""
    path = folder / "in.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                        "body": {"prompt": [5 + i % 50, 6, 7], "max_tokens": max_tokens + i % 16,
                                                 "temperature": 0, "ignore_eos": True}}) + "\n"
                            for i in range(NUM_LINES)))
    return path


def _start_batch(daemon: _Daemon, source: Path) -> str:
    uploaded = daemon.client.files.create(file=("in.jsonl", io.BytesIO(source.read_bytes())), purpose="batch")
    return daemon.client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                        completion_window="24h").id


def _poll(daemon: _Daemon, batch_id: str, done, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while not done(batch := daemon.client.batches.retrieve(batch_id)):
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}: {batch.request_counts}"
        time.sleep(0.02)
    return batch


def _by_id(text: str) -> dict[str, dict]:
    lines = [json.loads(line) for line in text.splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "a custom_id was answered twice"
    return by_id


def test_a_batch_killed_with_sigkill_resumes_and_answers_each_custom_id_once_as_batch_does(tmp_path):
    source = _input(tmp_path)
    daemon = _Daemon(tmp_path / "data")
    try:
        batch_id = _start_batch(daemon, source)
        _poll(daemon, batch_id, lambda batch: batch.request_counts.completed >= 20, 60)
        daemon.process.send_signal(signal.SIGKILL)
        daemon.stop()
    finally:
        daemon.stop()
    output = tmp_path / "data" / "files" / f"{json.loads((tmp_path / 'data' / 'batches' / f'{batch_id}.json').read_text())['_output_id']}.jsonl"
    assert 0 < len(output.read_text().splitlines()) < NUM_LINES  # it was stopped part way
    daemon = _Daemon(tmp_path / "data")
    try:
        batch = _poll(daemon, batch_id, lambda batch: batch.status == "completed", 120)
        resumed = _by_id(daemon.client.files.content(batch.output_file_id).text)
        assert batch.request_counts.completed == NUM_LINES and batch.error_file_id is None
    finally:
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=60) == 0
        daemon.stop()
    reference = tmp_path / "batch.jsonl"
    done = subprocess.run(_cli("batch", str(source), "-o", str(reference), *ENGINE_FLAGS), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = _by_id(reference.read_text())
    assert sorted(resumed) == sorted(expected)
    for custom_id, line in expected.items():
        ours, theirs = resumed[custom_id]["response"]["body"], line["response"]["body"]
        assert ours["choices"][0]["text"] == theirs["choices"][0]["text"], custom_id
        assert ours["usage"] == theirs["usage"], custom_id


def test_sigterm_finishes_requests_in_flight_and_leaves_the_batch_to_resume(tmp_path):
    daemon = _Daemon(tmp_path / "data", "--drain-timeout", "60")
    try:
        batch_id = _start_batch(daemon, _input(tmp_path, max_tokens=400))
        _poll(daemon, batch_id, lambda batch: batch.request_counts.completed >= 5, 60)
        stream = daemon.client.completions.create(model="x", prompt=[5, 6, 7], max_tokens=120, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True})
        first = next(iter(stream))
        daemon.process.send_signal(signal.SIGTERM)
        chunks = [first, *stream]
        assert chunks[-1].choices[0].finish_reason == "length"
        assert daemon.process.wait(timeout=60) == 0
    finally:
        daemon.stop()
    record = json.loads((tmp_path / "data" / "batches" / f"{batch_id}.json").read_text())
    assert record["status"] == "in_progress"  # the next start resumes it
    output = tmp_path / "data" / "files" / f"{record['_output_id']}.jsonl"
    assert len(_by_id(output.read_text())) < NUM_LINES


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0"])
def test_a_public_address_without_a_key_is_refused_at_start(tmp_path, address):
    done = subprocess.run(_cli("serve", "--http", address, "--data-dir", str(tmp_path), *ENGINE_FLAGS),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--api-key" in done.stderr and "reachable from other hosts" in done.stderr
