"""Batch jobs that survive: results on disk as they finish, resume after kill -9 or a torn line,
SIGTERM with a grace period, duplicate ids, an errors file, max_tokens against the context."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from helpers import engine_config, generate
from seesaw.frontend.batch_io import DUPLICATE_CODE, SamplingDefaults, derived_seed, error_line, parse_line
from seesaw.frontend.output import KeySet, OutputError, check_output, finished_ids, id_key
from seesaw.sampling import SamplingParams

CLI = [sys.executable, "-m", "seesaw_cli.main"]


# ---------------------------------------------------------------- pure parts


def _result(custom_id: str) -> bytes:
    return orjson.dumps({"id": "batch_req_x", "custom_id": custom_id, "response": {}, "error": None}) + b"\n"


def test_a_torn_last_line_is_cut_off_and_whole_lines_count(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(_result("a") + _result("b") + _result("c")[:20])
    done, count = finished_ids(out)
    assert count == 2 and len(done) == 2 and id_key("a") in done and id_key("b") in done and id_key("c") not in done
    assert out.read_bytes() == _result("a") + _result("b")


def test_the_key_set_agrees_with_a_python_set():
    import random

    rng = random.Random(1)
    keys = [rng.getrandbits(64) or 1 for _ in range(5000)] + [id_key(str(i)) for i in range(3000)]
    compact, reference = KeySet(), set()
    for key in keys + keys[:100]:
        compact.add(key)
        reference.add(key)
    assert len(compact) == len(reference)
    assert all(key in compact for key in reference)
    assert not any(rng.getrandbits(64) in compact for _ in range(2000))


def test_a_damaged_line_in_the_middle_is_an_error_naming_it(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(_result("a") + b"garbage\n" + _result("b"))
    with pytest.raises(OutputError, match="line 2: not a batch result"):
        finished_ids(out)


def test_a_duplicate_lines_400_does_not_count_as_the_requests_result(tmp_path):
    out = tmp_path / "out.jsonl"
    duplicate = error_line("a", 2, "custom_id 'a' appears on an earlier line", code=DUPLICATE_CODE)
    unreadable = error_line("line-5", 5, "not valid JSON")
    out.write_bytes(orjson.dumps(duplicate) + b"\n" + orjson.dumps(unreadable) + b"\n")
    done, count = finished_ids(out)
    assert count == 2 and id_key("a") not in done and id_key("line-5") in done


def test_an_existing_output_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "out.jsonl"
    check_output(out, resume=False, overwrite=False)  # absent: fine
    out.write_bytes(b"")
    check_output(out, resume=False, overwrite=False)  # empty: fine
    out.write_bytes(_result("a"))
    with pytest.raises(OutputError, match="--resume .* --overwrite"):
        check_output(out, resume=False, overwrite=False)
    check_output(out, resume=True, overwrite=False)
    with pytest.raises(OutputError, match="contradict"):
        check_output(out, resume=True, overwrite=True)


def test_lines_without_a_seed_get_one_from_the_run_seed_and_their_custom_id():
    defaults = SamplingDefaults(seed=7)
    first = parse_line(b'{"id": "a", "prompt": "x"}', 1, defaults).sampling
    again = parse_line(b'{"id": "a", "prompt": "x", "temperature": 0.5}', 9, defaults).sampling
    other = parse_line(b'{"id": "b", "prompt": "x"}', 1, defaults).sampling
    assert first.seed == again.seed == derived_seed(7, "a") != other.seed
    assert parse_line(b'{"id": "a", "prompt": "x"}', 1, SamplingDefaults(seed=8)).sampling.seed != first.seed
    assert parse_line(b'{"id": "a", "prompt": "x", "seed": 3}', 1, defaults).sampling.seed == 3


def test_only_a_defaulted_max_tokens_may_be_lowered_to_fit():
    assert parse_line(b'{"prompt": "x"}', 1, SamplingDefaults()).sampling.fit_max_tokens
    assert not parse_line(b'{"prompt": "x", "max_tokens": 9}', 1, SamplingDefaults()).sampling.fit_max_tokens


def test_max_tokens_past_the_context_is_a_400_naming_both_numbers_unless_it_was_a_default(tiny_models):
    config = engine_config(str(tiny_models["llama-gqa-tied"]), model={"max_model_len": 64})
    results = generate(config, [
        {"sampling": SamplingParams(max_tokens=100_000_000, temperature=0.0), "prompt_token_ids": [5] * 10},
        {"sampling": SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True, fit_max_tokens=True),
         "prompt_token_ids": [5] * 10},
    ])
    assert results[0].status_code == 400
    assert all(number in results[0].error for number in ("10 tokens", "100000000", "context of 64 tokens"))
    assert results[1].error is None and len(results[1].token_ids) == 54  # capped to what fits


# ---------------------------------------------------------------- the CLI, as users run it


def _batch_input(path: Path, count: int) -> None:
    lines = []
    for index in range(count):
        body = {"prompt": [5 + index % 40] * (3 + index % 11), "max_tokens": 6, "ignore_eos": True}
        if index % 3 == 1:
            body["temperature"] = 0.9  # sampled, seed derived from the run's and the custom_id
        elif index % 3 == 2:
            body.update(temperature=0.7, seed=index)
        else:
            body["temperature"] = 0
        lines.append({"custom_id": f"r{index}", "method": "POST", "url": "/v1/completions", "body": body})
    path.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")


def _cli(folder, *args) -> list[str]:
    return [*CLI, "batch", *map(str, args), "--model", str(folder), "--threads", "1", "--kv-cache-gb", "0.05",
            "--host-buffer-gb", "0.01", "--max-pending", "4", "--max-num-seqs", "4"]


def _texts(path: Path) -> dict[str, str]:
    results = {}
    for line in path.read_bytes().splitlines():
        record = orjson.loads(line)
        assert record["custom_id"] not in results, f"{record['custom_id']} written twice"
        results[record["custom_id"]] = record["response"]["body"]["choices"][0]["text"]
    return results


def _wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        assert process.poll() is None, "the batch ended before the test could interrupt it"
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} results after {timeout_s} s")


def _own_segments(pid: int) -> list[str]:
    return [p.name for p in Path("/dev/shm").glob(f"seesaw-*-{pid}-*")]


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    source, out = folder / "in.jsonl", folder / "out.jsonl"
    _batch_input(source, 40)
    done = subprocess.run(_cli(tiny_models["llama-gqa-tied"], source, "-o", out), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    return source, _texts(out)


def test_kill_9_then_resume_gives_every_result_once_as_an_uninterrupted_run_would(tiny_models, tmp_path, uninterrupted):
    source, expected = uninterrupted
    out = tmp_path / "out.jsonl"
    head = subprocess.Popen(_cli(tiny_models["llama-gqa-tied"], source, "-o", out), stderr=subprocess.DEVNULL)
    _wait_for_lines(out, 5, head)
    head.kill()
    head.wait(timeout=30)
    assert 5 <= len(_texts(out)) < len(expected)
    refused = subprocess.run(_cli(tiny_models["llama-gqa-tied"], source, "-o", out), capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2 and "--resume" in refused.stderr and "--overwrite" in refused.stderr
    resumed = subprocess.run(_cli(tiny_models["llama-gqa-tied"], source, "-o", out, "--resume"),
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert "already done" in resumed.stderr
    assert _texts(out) == expected  # greedy and sampled alike, each custom_id once
    assert not _own_segments(head.pid)  # the killed run's shared memory was reclaimed


def test_sigterm_stops_within_the_grace_period_and_says_how_to_resume(tiny_models, tmp_path, uninterrupted):
    source, expected = uninterrupted
    out = tmp_path / "out.jsonl"
    head = subprocess.Popen(_cli(tiny_models["llama-gqa-tied"], source, "-o", out, "--grace-s", "20"),
                            stderr=subprocess.PIPE, text=True)
    _wait_for_lines(out, 3, head)
    head.send_signal(signal.SIGTERM)
    _, stderr = head.communicate(timeout=60)
    assert head.returncode == 143, stderr
    assert "--resume" in stderr and "requests:" in stderr
    partial = _texts(out)  # every line whole, no custom_id twice
    assert partial and all(expected[key] == text for key, text in partial.items())
    assert not _own_segments(head.pid)


def test_a_line_torn_by_a_crash_is_repaired_on_resume(tiny_models, tmp_path, uninterrupted):
    source, expected = uninterrupted
    out = tmp_path / "out.jsonl"
    lines = [orjson.dumps({"id": "batch_req_x", "custom_id": key, "error": None,
                           "response": {"status_code": 200, "body": {"choices": [{"text": text}]}}})
             for key, text in list(expected.items())[:4]]
    out.write_bytes(b"\n".join(lines[:3]) + b"\n" + lines[3][: len(lines[3]) // 2])
    resumed = subprocess.run(_cli(tiny_models["llama-gqa-tied"], source, "-o", out, "--resume"),
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert _texts(out) == expected


def test_a_repeated_custom_id_gets_its_own_400_and_errors_can_go_to_their_own_file(tiny_models, tmp_path):
    source, out, errors = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    lines = [{"id": "a", "prompt": [5, 6], "max_tokens": 3}, {"id": "b", "prompt": [7], "max_tokens": 3},
             {"id": "a", "prompt": [8], "max_tokens": 3}, {"id": "c", "prompt": [9], "max_tokens": 10_000},
             {"id": "d", "prompt": [9], "max_tokens": -1}, {"id": "d", "prompt": [9], "max_tokens": 2}]
    source.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    done = subprocess.run([*_cli(tiny_models["llama-gqa-tied"], source, "-o", out, "--errors", errors)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(orjson.loads(line)["custom_id"] for line in out.read_bytes().splitlines()) == ["a", "b"]
    failed = {orjson.loads(line)["error"]["message"] for line in errors.read_bytes().splitlines()}
    assert any(message.startswith("line 3: custom_id 'a' appears on an earlier line") for message in failed)
    assert any(message.startswith("line 4:") and "max_tokens is 10000" in message for message in failed)
    assert any(message.startswith("line 6: custom_id 'd' appears on an earlier line") for message in failed)


def test_progress_counts_tokens_as_they_are_generated_and_estimates_the_time_left(tiny_models, tmp_path):
    from seesaw.frontend.progress import Snapshot

    snapshot = Snapshot(fraction_read=0.25, num_lines=100, num_done=50, num_failed=1, num_running=10,
                        num_waiting=40, generated_tokens=1000, elapsed_s=10.0)
    assert snapshot.tokens_per_s == 100.0
    assert snapshot.eta_s == pytest.approx(70.0)  # 400 lines expected, 350 to go at 5 per second
    text = snapshot.describe()
    assert all(part in text for part in ("50 done", "1 failed", "10 running", "40 waiting", "100 tok/s", "ETA 00:01:10"))
    assert "cache" not in text  # no prompt yet: no hit rate
    cached = Snapshot(fraction_read=0.25, num_lines=100, num_done=50, num_failed=1, num_running=10,
                      num_waiting=40, generated_tokens=1000, elapsed_s=10.0, cache_hit_rate=0.875)
    assert "100 tok/s | cache 88% | ETA" in cached.describe()


def test_a_million_line_batch_keeps_resident_memory_flat(tmp_path):
    """The input is read lazily and nothing is kept per finished request but its 8-byte key."""
    import importlib.util

    # bench/batch_memory.py writes the input and reads the head's resident memory.
    spec = importlib.util.spec_from_file_location("batch_memory", Path(__file__).parent.parent / "bench" / "batch_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    count = 1_000_000
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    bench.write_input(source, count)
    head = subprocess.Popen([*CLI, "batch", source, "-o", out, "--model", "dummy:tiny", "--threads", "1",
                             "--kv-cache-gb", "0.05", "--host-buffer-gb", "0.01", "--max-num-batched-tokens", "2048"],
                            stderr=subprocess.PIPE)
    samples = []
    try:
        while head.poll() is None:
            rss = bench.rss_kb(head.pid)
            if rss is not None:
                samples.append((out.stat().st_size if out.exists() else 0, rss))
            time.sleep(0.5)
        assert head.returncode == 0, head.stderr.read().decode()[-2000:]
        with out.open("rb") as results:
            assert sum(chunk.count(b"\n") for chunk in iter(lambda: results.read(1 << 24), b"")) == count
        final = out.stat().st_size
        peak = max(rss for _, rss in samples)
        after_a_tenth = next(rss for size, rss in samples if size >= final / 10)
        assert peak - after_a_tenth < 150 * 1024, f"grew from {after_a_tenth} kB to {peak} kB"
        assert peak < 1536 * 1024
    finally:
        if head.poll() is None:
            head.kill()
            head.wait()
        source.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
