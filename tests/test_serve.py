"""The daemon: its socket, its clients and its bounds, on the default model (one engine for the
module) and, for the lifecycle, a `seesaw-cli serve` process."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import pytest_asyncio
import zmq
import zmq.asyncio

from helpers import engine_config
from seesaw.client import AsyncClient, ServerError
from seesaw.config import ServeConfig
from seesaw.engine import Engine
from seesaw.frontend.batch_io import SamplingDefaults
from seesaw.frontend.server import Server
from seesaw.model.resolve import resolve_model
from seesaw.transport.curve import write_keys

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPTS = ["The capital of France is", "One, two, three,", "Water boils at", "The opposite of up is",
           "A cat is a kind of"]


def body(index: int, max_tokens: int = 4, **extra) -> dict:
    return {"prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            **extra}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(tmp_path_factory):
    config = engine_config("default", scheduler={"max_num_batched_tokens": 256, "max_num_seqs": 64})
    async with Engine(config, resolve_model("default", config.cache_dir)) as engine:
        yield engine


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def address(engine, tmp_path_factory):
    """A server on the module's engine, at an ipc socket of its own."""
    path = tmp_path_factory.mktemp("serve") / "s.sock"
    server = Server(engine, ServeConfig(f"ipc://{path}", max_frame_bytes=1 << 20), SamplingDefaults(), "default")
    await server.start()
    yield f"ipc://{path}"
    await server.close()


async def test_four_clients_get_every_answer_once_under_their_own_ids(address):
    async def one_client(seed: int) -> list:
        async with AsyncClient(address, timeout_s=120) as client:
            order = list(range(25))
            random.Random(seed).shuffle(order)
            return [(index, await_result) for index, await_result in
                    zip(order, await client.submit_many([("completions", body(i)) for i in order], window=25))]

    answers = await asyncio.gather(*(one_client(seed) for seed in range(4)))
    texts: dict[int, set[str]] = {}
    for client_answers in answers:
        assert len(client_answers) == 25
        for index, response in client_answers:
            assert not isinstance(response, ServerError), response
            assert response["object"] == "text_completion" and response["usage"]["completion_tokens"] == 4
            texts.setdefault(index % len(PROMPTS), set()).add(response["choices"][0]["text"])
    # Greedy answers to the same prompt agree, whichever client and batch they came in.
    assert all(len(variants) == 1 for variants in texts.values()) and len(texts) == len(PROMPTS)


async def test_a_reused_id_is_two_requests_each_answered(address):
    frame = orjson.dumps({"v": 1, "type": "submit", "id": "same", "endpoint": "completions", "body": body(0)})
    context = zmq.asyncio.Context()
    raw = context.socket(zmq.DEALER)
    try:
        raw.connect(address)
        await raw.send(frame)
        await raw.send(frame)
        replies = [orjson.loads(await asyncio.wait_for(raw.recv(), 60)) for _ in range(2)]
    finally:
        raw.close(linger=0)
        context.term()
    assert [(r["type"], r["id"]) for r in replies] == [("result", "same")] * 2


async def test_streamed_tokens_arrive_in_order_and_join_to_the_final_text(address):
    async with AsyncClient(address, timeout_s=60) as client:
        whole = await client.complete(body(1, max_tokens=12), "completions")
        stream = client.stream(body(1, max_tokens=12), "completions")
        pieces = [piece async for piece in stream]
    assert len(pieces) > 1
    assert "".join(pieces) == stream.response["choices"][0]["text"] == whole["choices"][0]["text"]


@pytest.mark.parametrize("value", [0, -1, 129, 2.5, "2", True])
async def test_a_bad_n_is_an_error_naming_n_and_its_value(address, value):
    async with AsyncClient(address, timeout_s=60) as client:
        with pytest.raises(ServerError) as caught:
            await client.complete(body(0, n=value))
    assert caught.value.status == 400 and f"n must be an integer from 1 to 128, got {value!r}" in caught.value.message


async def test_n_greedy_choices_are_equal_and_indexed_and_count_the_prompt_once(address):
    async with AsyncClient(address, timeout_s=60) as client:
        single, three = await client.complete(body(0)), await client.complete(body(0, n=3))
    assert [(c["index"], c["text"]) for c in three["choices"]] == [(i, single["choices"][0]["text"]) for i in range(3)]
    assert three["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
    assert three["usage"]["completion_tokens"] == 12


async def test_streamed_choices_carry_their_index_and_join_to_each_choices_text(address):
    async with AsyncClient(address, timeout_s=60) as client:
        stream = client.stream(body(1, max_tokens=8, n=2, temperature=1.0, seed=3), "completions")
        pieces = {0: [], 1: []}
        async for piece in stream:
            pieces[stream.index].append(piece)
    choices = stream.response["choices"]
    assert ["".join(pieces[0]), "".join(pieces[1])] == [choices[0]["text"], choices[1]["text"]]
    assert choices[0]["text"] != choices[1]["text"]


async def test_cancelling_a_request_of_n_choices_cancels_every_choice(address):
    async with AsyncClient(address, timeout_s=60) as client:
        stream = client.stream(body(3, max_tokens=600, n=2), "completions")
        async for _ in stream:
            assert await client.cancel(id=stream.id) == 1  # one request, however many choices
            break
        async for _ in stream:
            pass
        assert [c["finish_reason"] for c in stream.response["choices"]] == ["cancelled", "cancelled"]
        assert stream.response["usage"]["completion_tokens"] < 1200


INVALID_FIELDS = {"max_tokens": ["?", -5, [None], 0], "top_p": ["?", -5, 2, {"a": 1}], "stop": [[None], {"a": 1}, 5],
                  "top_k": ["?", -5, 2.5], "seed": ["?", 2.5, [None]], "temperature": [-1, "hot", 1e300],
                  "prompt": [[], "", [1.5], [[1, 2], [3]]], "n": [0, -1, 129, 2.5, "2", True], "logprobs": [True]}


def malformed_frames(rng: random.Random) -> list[list[bytes]]:
    """One of each kind of bad message, then random ones."""
    good = {"v": 1, "type": "submit", "id": "x", "endpoint": "completions", "body": body(0)}
    fixed = [
        [b"\xff\xfe not json"], [b"[1, 2, 3]"], [b"{}"], [b"a", b"b", b"c"],
        [orjson.dumps({**good, "v": 2})], [orjson.dumps({**good, "type": "launch"})],
        [orjson.dumps({k: v for k, v in good.items() if k != "id"})],
        [orjson.dumps({**good, "id": 7})], [orjson.dumps({**good, "id": "x" * 1000})],
        [orjson.dumps({**good, "endpoint": "images"})], [orjson.dumps({**good, "body": "hi"})],
        [orjson.dumps({**good, "body": {"prompt": ["a", "b"]}})],
        [orjson.dumps({**good, "body": {"prompt": {"nested": [{"deep": None}]}}})],
        [orjson.dumps({**good, "body": {"prompt": "x", "max_tokens": "many"}})],
        [orjson.dumps({**good, "body": {"prompt": "x", "temperature": -1}})],
        [orjson.dumps({**good, "endpoint": "chat", "body": {"messages": [{"role": 5, "content": []}]}})],
        [orjson.dumps({**good, "endpoint": "chat", "body": {"messages": "hello"}})],
        [orjson.dumps({**good, "body": {"prompt": "word " * 9000, "max_tokens": 4}})],  # past the context
        [orjson.dumps({**good, "body": {"prompt": [10**9], "max_tokens": 4}})],  # not a token of the vocabulary
        [orjson.dumps({"v": 1, "type": "batch", "id": "b"})], [orjson.dumps({"v": 1, "type": "job_status", "id": "j"})],
        [orjson.dumps({"v": 1, "type": "cancel"})], [orjson.dumps({"v": 1, "type": "batch", "id": "b", "lines": [1]})],
    ]
    frames = list(fixed)
    while len(frames) < 1000:
        choice = rng.random()
        if choice < 0.4:
            frames.append([rng.randbytes(rng.randint(0, 200))])
        elif choice < 0.7:
            junk = {rng.choice(["v", "type", "id", "body", "endpoint", "zz"]): rng.choice([None, 1, "s", [], {}, 2.5])
                    for _ in range(rng.randint(1, 5))}
            frames.append([orjson.dumps(junk)])
        else:
            name, values = rng.choice(list(INVALID_FIELDS.items()))
            frames.append([orjson.dumps(dict(good, id=f"r{len(frames)}", body={**good["body"], name: rng.choice(values)}))])
    return frames


async def test_malformed_messages_each_get_an_error_and_the_server_goes_on(address):
    rss_before = _rss_bytes()
    context = zmq.asyncio.Context()
    raw = context.socket(zmq.DEALER)
    raw.connect(address)
    try:
        frames = malformed_frames(random.Random(3))
        for message in frames:
            await raw.send_multipart(message)
        replies = [orjson.loads(await asyncio.wait_for(raw.recv(), 30)) for _ in frames]
        assert len(replies) == 1000
        bad = [r for r in replies if r["type"] == "error"]
        assert len(bad) == 1000 and all(r["status"] == 400 and r["message"] for r in bad)
        codes = {r["code"] for r in bad}
        assert {"invalid_request", "context_length_exceeded", "unsupported_version"} <= codes
        # An oversized frame is dropped at the socket (its connection reset), unanswered.
        big = context.socket(zmq.DEALER)
        big.connect(address)
        await big.send(b"x" * (2 << 20))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(big.recv(), 1.0)
        big.close(linger=0)
    finally:
        raw.close(linger=0)
        context.term()
    async with AsyncClient(address, timeout_s=60) as client:
        response = await client.complete(body(2))
    assert response["usage"]["completion_tokens"] == 4
    assert _rss_bytes() - rss_before < 64 << 20


async def test_cancel_mid_generation_frees_the_requests_kv_blocks(address):
    async with AsyncClient(address, timeout_s=60) as client:
        generated_before = (await client.stats())["tokens"]["generated"]
        stream = client.stream(body(3, max_tokens=600), "completions")
        pieces = []
        async for piece in stream:
            pieces.append(piece)
            if len(pieces) == 2:
                used = (await client.stats())["kv"]["device_blocks_used"]
                assert used > 0
                assert await client.cancel(id=stream.id) == 1
        assert stream.response["choices"][0]["finish_reason"] == "cancelled"
        assert stream.response["usage"]["completion_tokens"] < 600
        # A step already running finishes first (at most one step later); nothing more is generated.
        deadline = asyncio.get_running_loop().time() + 5
        while (stats := await client.stats())["kv"]["device_blocks_used"] and asyncio.get_running_loop().time() < deadline:
            pass
    assert stats["kv"]["device_blocks_used"] == 0 and stats["requests"]["cancelled"] >= 1
    assert stats["tokens"]["generated"] < generated_before + 600


async def test_a_batch_job_streams_its_lines_and_reports_them(address, tmp_path):
    lines = [orjson.dumps({"custom_id": f"c{i}", "url": "/v1/completions", "body": body(i)}).decode() for i in range(6)]
    lines.append("{not json")
    async with AsyncClient(address, timeout_s=60) as client:
        before = (await client.stats())["requests"]
        job = client.run_job(lines=lines)
        out = [line async for line in job]
        after = (await client.stats())["requests"]
    assert sorted(line["custom_id"] for line in out) == [f"c{i}" for i in range(6)] + ["line-7"]
    assert job.summary["num_done"] == 6 and job.summary["num_failed"] == 1 and job.summary["num_cancelled"] == 0
    assert (after["done"] - before["done"], after["failed"] - before["failed"]) == (6, 1)  # the server counts them


SCHEMA = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 10}}, "required": ["word"]}


async def test_output_fields_through_the_socket_and_a_batch_job(address):
    """Log-probabilities, echo, a schema and a tool call answered on the socket and as batch lines
    (the batch runner the CLI uses), each a valid OpenAI object; a bad schema is a line's 400."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    tools = [{"type": "function", "function": {"name": "say", "parameters": SCHEMA}}]
    chat = {"messages": [{"role": "user", "content": "Say a word."}], "max_tokens": 24, "temperature": 0}
    bodies = {"lp": ("chat", {**chat, "logprobs": True, "top_logprobs": 2}),
              "schema": ("chat", {**chat, "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}),
              "tool": ("chat", {**chat, "tools": tools, "tool_choice": {"type": "function", "function": {"name": "say"}}}),
              "echo": ("completions", body(1, logprobs=1, echo=True))}
    async with AsyncClient(address, timeout_s=120) as client:
        answers = {name: await client.complete(body_, endpoint)
                   for name, (endpoint, body_) in bodies.items()}
        urls = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
        lines = [orjson.dumps({"custom_id": name, "url": urls[endpoint], "body": body_}).decode()
                 for name, (endpoint, body_) in bodies.items()]
        lines.append(orjson.dumps({"custom_id": "bad", "url": "/v1/chat/completions", "body": {
            **chat, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}}}).decode())
        out = {line["custom_id"]: line async for line in client.run_job(lines=lines)}
    for name, answer in answers.items():
        batch_answer = out[name]["response"]["body"]
        for response in (answer, batch_answer):
            parsed = ChatCompletion.model_validate(response) if name != "echo" else None
            if name == "lp":
                assert len(parsed.choices[0].logprobs.content) == parsed.usage.completion_tokens
            elif name == "schema":
                assert set(orjson.loads(parsed.choices[0].message.content)) == {"word"}
            elif name == "tool":
                assert "word" in orjson.loads(parsed.choices[0].message.tool_calls[0].function.arguments)
            else:
                logprobs = response["choices"][0]["logprobs"]
                assert logprobs["token_logprobs"][0] is None and len(logprobs["tokens"]) == (
                    response["usage"]["prompt_tokens"] + 4)
                assert Completion.model_validate({**response, "choices": []}).usage.completion_tokens == 4
    assert out["bad"]["response"]["status_code"] == 400
    assert "the JSON schema does not compile: Invalid type: strin" in out["bad"]["error"]["message"]


async def test_a_cancelled_jobs_lines_count_as_cancelled_not_done(address):
    lines = [orjson.dumps({"custom_id": f"c{i}", "url": "/v1/completions", "body": body(i, max_tokens=600)}).decode()
             for i in range(3)]
    async with AsyncClient(address, timeout_s=60) as client:
        job = client.run_job(lines=lines)
        reading = asyncio.create_task(_collect(job))
        async with asyncio.timeout(30):
            while job.job_id is None:  # the job's id comes with its first frame, read by `reading`
                await asyncio.sleep(0.01)
        assert await client.cancel(job_id=job.job_id) >= 1
        out = await asyncio.wait_for(reading, 60)
    assert len(out) == 3 and job.summary["num_cancelled"] == 3 and job.summary["num_done"] == 0


async def _collect(stream) -> list:
    return [item async for item in stream]


async def test_a_client_that_disconnects_has_its_requests_cancelled_with_one_warning(address, caplog):
    context = zmq.asyncio.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(address)
    async with AsyncClient(address, timeout_s=60) as client:
        before = (await client.stats())["requests"]["cancelled"]
        for n in range(5):
            await dealer.send(orjson.dumps({"v": 1, "type": "submit", "id": f"g{n}", "endpoint": "completions",
                                            "body": body(n, max_tokens=600), "stream": True}))
        await asyncio.wait_for(dealer.recv(), 30)  # a first token: the requests run
        dealer.close(linger=0)
        context.destroy(linger=0)
        async with asyncio.timeout(30):
            while (await client.stats())["requests"]["cancelled"] < before + 5:
                await asyncio.sleep(0.05)
    assert caplog.text.count("a client stopped listening (it disconnected); cancelling its 5 requests") == 1


async def test_curve_a_client_needs_the_servers_key(engine, tmp_path):
    public, secret = write_keys(tmp_path / "keys")
    other_public, _ = write_keys(tmp_path / "other")
    port = _free_port()
    server = Server(engine, ServeConfig(f"tcp://127.0.0.1:{port}", curve_secret_key=secret), SamplingDefaults(), "m")
    await server.start()
    try:
        async with AsyncClient(f"tcp://127.0.0.1:{port}", server_key=str(public), timeout_s=60) as client:
            assert (await client.complete(body(4)))["usage"]["completion_tokens"] == 4
        async with AsyncClient(f"tcp://127.0.0.1:{port}", server_key=str(other_public), timeout_s=2) as client:
            with pytest.raises(TimeoutError):
                await client.complete(body(4))
    finally:
        await server.close()


async def test_binding_a_public_address_without_keys_is_refused():
    with pytest.raises(ValueError, match="--curve-secret-key"):
        ServeConfig("tcp://0.0.0.0:5555")


def _serve_tiny(socket_path: Path, drain_timeout_s: int) -> subprocess.Popen:
    """`seesaw-cli serve` of the tiny model at an ipc socket, its stderr piped."""
    command = [str(Path(sys.executable).parent / "seesaw-cli"), "serve", "--model", "dummy:tiny", "--bind", f"ipc://{socket_path}",
               "--threads", "1", "--kv-cache-gb", "0.05", "--host-buffer-gb", "0.05", "--drain-timeout", str(drain_timeout_s)]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True)


async def test_sigterm_with_requests_in_flight_exits_cleanly(tmp_path):
    socket_path = tmp_path / "d.sock"
    process = _serve_tiny(socket_path, 60)
    try:
        await asyncio.wait_for(asyncio.to_thread(_line_with, process.stderr, "serving"), 120)
        children = _children(process.pid)
        async with AsyncClient(f"ipc://{socket_path}", timeout_s=60) as client:
            requests = [asyncio.ensure_future(client.complete({"prompt": [5, 6, 7], "max_tokens": 40,
                                                               "ignore_eos": True})) for _ in range(8)]
            await asyncio.sleep(0)  # let them go out before the signal
            stats = await client.stats()
            assert stats["requests"]["queued"] >= 1
            process.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*requests, return_exceptions=True)
        assert all(isinstance(r, dict) and r["usage"]["completion_tokens"] == 40 for r in results), results
        assert await asyncio.wait_for(asyncio.to_thread(process.wait), 60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not socket_path.exists() and not Path(f"{socket_path}.lock").exists()
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]


async def test_a_second_sigterm_stops_the_drain_at_once_and_exits_143(tmp_path):
    socket_path = tmp_path / "d.sock"
    process = _serve_tiny(socket_path, 600)
    try:
        await asyncio.wait_for(asyncio.to_thread(_line_with, process.stderr, "serving"), 120)
        async with AsyncClient(f"ipc://{socket_path}", timeout_s=60) as client:
            requests = [asyncio.ensure_future(client.complete({"prompt": [5, 6, 7], "max_tokens": 2000,
                                                               "ignore_eos": True})) for _ in range(4)]
            assert (await client.stats())["requests"]["queued"] >= 1
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.to_thread(_line_with, process.stderr, "SIGTERM: taking nothing new"), 30)
            process.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*requests, return_exceptions=True)
        assert all(isinstance(r, Exception) and "stopped at once" in str(r) for r in results), results
        assert await asyncio.wait_for(asyncio.to_thread(process.wait), 60) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not socket_path.exists() and not Path(f"{socket_path}.lock").exists()


def _line_with(stream, text: str) -> str:
    """Read lines until one holds `text` (the caller bounds the wait); an error if the stream ends."""
    while line := stream.readline():
        if text in line:
            return line
    raise AssertionError(f"the stream ended before a line with {text!r}")


def _children(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "stat").read_text().split()[3] == str(pid):
                    found.append(int(proc.name))
            except (OSError, IndexError):
                continue
    return found


def _rss_bytes() -> int:
    return int(Path(f"/proc/{os.getpid()}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_a_dead_worker_is_an_error_for_every_waiting_client(tmp_path):
    config = engine_config("dummy:tiny", transport={"max_restarts": 0})
    async with Engine(config, resolve_model("dummy:tiny", config.cache_dir)) as tiny:
        server = Server(tiny, ServeConfig(f"ipc://{tmp_path}/dead.sock"), SamplingDefaults(), "tiny")
        await server.start()
        try:
            async with AsyncClient(f"ipc://{tmp_path}/dead.sock", timeout_s=60) as client:
                long = {"prompt": [5, 6, 7], "max_tokens": 1500, "ignore_eos": True}
                requests = [asyncio.ensure_future(client.complete(long)) for _ in range(3)]
                while not (await client.stats())["tokens"]["generated"]:
                    pass  # every request is in the engine and generating
                os.kill(tiny._processes[0].pid, signal.SIGKILL)
                errors = await asyncio.gather(*requests, return_exceptions=True)
                assert all(isinstance(e, ServerError) and e.code == "engine_failed" for e in errors), errors
                assert "worker 0 failed" in errors[0].message and "SIGKILL" in errors[0].message
                with pytest.raises(ServerError, match="engine_failed"):
                    await client.complete(long)  # and later requests are refused at once
        finally:
            await server.close()


async def test_the_stats_are_served_as_prometheus_text(engine, tmp_path):
    import urllib.request

    from seesaw.frontend.prometheus import serve_metrics

    server = Server(engine, ServeConfig(f"ipc://{tmp_path}/m.sock"), SamplingDefaults(), "m")
    await server.start()
    stop = serve_metrics(port := _free_port(), lambda: server.latest_stats)
    try:
        async with AsyncClient(f"ipc://{tmp_path}/m.sock", timeout_s=60) as client:
            await client.complete(body(0))
            stats = await client.stats()
        url = f"http://127.0.0.1:{port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    finally:
        stop()
        await server.close()
    assert 'seesaw_requests_total{outcome="done"} 1.0' in text
    assert f"seesaw_tokens_total{{kind=\"generated\"}} {float(stats['tokens']['generated'])}" in text
    assert "seesaw_kv_device_blocks " in text
    assert f"seesaw_tokens_total{{kind=\"cached\"}} {float(stats['tokens']['cached'])}" in text
    assert "seesaw_prefix_cache_hit_rate " in text


async def test_submit_writes_a_files_results_in_the_batch_format(address, tmp_path):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(orjson.dumps({"custom_id": f"s{i}", "url": "/v1/completions", "body": body(i)}).decode()
                              + "\n" for i in range(5)) + "{broken\n")
    cli = str(Path(sys.executable).parent / "seesaw-cli")
    process = await asyncio.create_subprocess_exec(cli, "submit", str(source), "--server", address, "-o", str(output),
                                                   stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    lines = [orjson.loads(line) for line in output.read_text().splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert sorted(by_id) == ["line-6", "s0", "s1", "s2", "s3", "s4"]
    assert all(by_id[f"s{i}"]["response"]["body"]["usage"]["completion_tokens"] == 4 for i in range(5))
    assert by_id["line-6"]["response"]["status_code"] == 400
