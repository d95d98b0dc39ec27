"""`seesaw-cli batch` as users run it: a separate process, a file in, a file out, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest

LINES = [
    {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6}},
    {"id": "plain", "prompt": "The sun rises in the", "max_tokens": 5},
    "this is not json",
    {"id": "no-prompt", "max_tokens": 3},
    {"custom_id": "embed", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
    {"id": "hot", "prompt": "x", "temperature": 500},
    {"id": "too-long", "prompt": "word " * 200},
    {"id": "stop", "prompt": "1, 2, 3, 4, 5, 6, 7,", "max_tokens": 30, "stop": ["10"]},
]


def run_cli(*args, timeout_s=240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "seesaw_cli.main", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env={**os.environ})


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory, default_model):
    folder = tmp_path_factory.mktemp("batch")
    source, results = folder / "in.jsonl", folder / "out.jsonl"
    source.write_text("\n".join(line if isinstance(line, str) else orjson.dumps(line).decode() for line in LINES) + "\n")
    done = run_cli("batch", source, "-o", results, "--temperature", "0", "--max-tokens", "8",
                   "--max-model-len", "128", "--threads", "1", "--kv-cache-gb", "0.1", "--host-buffer-gb", "0.05")
    return done, [orjson.loads(line) for line in results.read_text().splitlines()]


def test_every_line_gets_exactly_one_result(batch_run):
    done, results = batch_run
    assert done.returncode == 0, done.stderr
    assert sorted(str(r["custom_id"]) for r in results) == sorted(
        ["chat", "plain", "line-3", "no-prompt", "embed", "hot", "too-long", "stop"]
    )


def test_good_lines_succeed_in_openai_batch_format(batch_run):
    _, results = batch_run
    by_id = {r["custom_id"]: r for r in results}
    chat = by_id["chat"]["response"]
    assert chat["status_code"] == 200 and chat["body"]["object"] == "chat.completion"
    assert chat["body"]["choices"][0]["message"]["role"] == "assistant"
    usage = chat["body"]["usage"]
    assert 0 < usage["completion_tokens"] <= 6 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    plain = by_id["plain"]["response"]["body"]
    assert plain["choices"][0]["finish_reason"] == "length" and plain["usage"]["completion_tokens"] == 5
    stopped = by_id["stop"]["response"]["body"]["choices"][0]
    assert stopped["finish_reason"] == "stop" and "10" not in stopped["text"]


@pytest.mark.parametrize("custom_id,line,problem", [
    ("line-3", 3, "not valid JSON"),
    ("no-prompt", 4, "has no prompt"),
    ("embed", 5, "unknown url"),
    ("hot", 6, "temperature"),
    ("too-long", 7, "context is 128 tokens"),
])
def test_bad_lines_get_a_400_naming_the_line(batch_run, custom_id, line, problem):
    _, results = batch_run
    (result,) = [r for r in results if r["custom_id"] == custom_id]
    assert result["response"]["status_code"] == 400
    assert result["error"]["message"].startswith(f"line {line}:") and problem in result["error"]["message"]


def test_summary_reports_counts_and_throughput(batch_run):
    done, _ = batch_run
    assert "requests: 3 ok, 5 failed" in done.stderr
    assert "total tokens/s" in done.stderr and "engine ready in" in done.stderr
    assert "prefix cache: " in done.stderr and "of prompt tokens served from cache" in done.stderr


def test_missing_input_is_a_one_line_error(tmp_path):
    done = run_cli("batch", tmp_path / "absent.jsonl", timeout_s=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: input file {tmp_path / 'absent.jsonl'} not found"]


def test_unknown_model_is_a_one_line_error(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "x"}\n')
    done = run_cli("batch", source, "--model", "no/such/model", timeout_s=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "model 'no/such/model' is not" in done.stderr


@pytest.mark.parametrize("flags,problem", [
    (["--layout", "t4"], "t4 needs at least 4 KV heads; this model has 3"),
    (["--max-pending", "0"], "max_pending must be at least 1"),
    (["--layout", "q2"], "layout 'q2' is not of the form"),
])
def test_bad_engine_options_are_one_line_errors(tmp_path, flags, problem):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "x"}\n')
    done = run_cli("batch", source, *flags, timeout_s=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert problem in done.stderr


def test_a_file_to_write_in_a_missing_folder_is_refused_before_the_model_loads(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "x"}\n')
    metrics = tmp_path / "missing" / "metrics.json"
    done = run_cli("batch", source, "-o", tmp_path / "out.jsonl", "--metrics-json", metrics, timeout_s=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: --metrics-json {metrics}: the folder {metrics.parent} does not exist"]
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("flags,problem", [
    (["--prefill-layout", "p2"], "--prefill-layout and --decode-layout go together"),
    (["--prefill-layout", "p2", "--decode-layout", "t3"], "prefill layout p2 has 2 workers and decode layout t3 has 3"),
    (["--prefill-layout", "d2", "--decode-layout", "t2"], "both need the same dp"),
    (["--layout", "t2", "--prefill-layout", "p2", "--decode-layout", "t2"], "--layout is static mode"),
    (["--prefill-layout", "p2", "--decode-layout", "t2", "--host-buffer-gb", "0"], "--host-buffer-gb must be positive"),
    (["--prefill-layout", "p2", "--decode-layout", "t2", "--host-low-water", "1.5"], "host_low_water must be in [0, 1)"),
])
def test_bad_seesaw_options_are_one_line_errors(tmp_path, flags, problem):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "x"}\n')
    done = run_cli("batch", source, *flags, timeout_s=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert problem in done.stderr


def test_seesaw_batch_reports_its_phases_and_writes_metrics_and_a_timeline(tiny_models, tmp_path):
    source, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": f"r{i}", "prompt": [5 + i] * (8 + 5 * i), "max_tokens": 6, "temperature": 0} for i in range(8)]
    source.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    metrics, timeline = tmp_path / "metrics.json", tmp_path / "timeline.png"
    done = run_cli("batch", source, "-o", results, "--model", tiny_models["llama-gqa-tied"], "--threads", "1",
                   "--kv-cache-gb", "0.05", "--host-buffer-gb", str(6 * 3 * 2 * 2 * 16 * 16 * 4 / 2**30),
                   "--prefill-layout", "p2", "--decode-layout", "t2",
                   "--metrics-json", metrics, "--timeline", timeline)
    assert done.returncode == 0, done.stderr
    assert len(results.read_text().splitlines()) == len(lines)
    assert "p2 -> t2" in done.stderr and "transitions:" in done.stderr and "phases:" in done.stderr
    report = orjson.loads(metrics.read_bytes())
    assert len(report["transitions"]) >= 2 and report["steps"]["prefill"] > 0 and report["steps"]["decode"] > 0
    assert report["totals"]["written_bytes"] > 0 and report["peak_host_fill"] > 0
    # Phase time is measured from the steps that ran, and drawn as the steps ran it.
    assert report["phase_seconds"]["prefill"] > 0 and report["phase_seconds"]["decode"] > 0
    assert sum(report["phase_seconds"].values()) <= report["elapsed_s"]
    assert {span[1] for span in report["timeline"]["spans"]} >= {"prefill", "decode"}
    assert timeline.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
