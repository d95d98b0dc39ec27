"""The daemon's clients and CURVE helpers against a fake daemon: a ROUTER socket in the test that
answers as docs/protocol.md says, with canned replies (the real server is tested elsewhere)."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import tempfile
from pathlib import Path

import orjson
import pytest
import zmq
import zmq.asyncio
from typer.testing import CliRunner

from cli.client_commands import job_source, register
from cli.main import app
from seesaw.client import AsyncClient, Client, ServerError
from seesaw.config import is_loopback
from seesaw.transport.curve import (
    default_address, ensure_socket_folder, read_public, read_secret, secure_server, write_keys,
)

WAIT_S = 10.0  # the most any test waits for something it expects


class FakeServer:
    """A stand-in for `seesaw-cli serve`: answers each frame it reads with `answer(frame)`'s replies
    (to the peer that sent it); `received` holds the frames read, in order."""

    def __init__(self, address: str, answer, secret_path=None):
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if secret_path is not None:
            secure_server(self.socket, secret_path)
        self.socket.bind(address)
        self.answer, self.received, self.task = answer, [], None
        self.arrived = asyncio.Event()  # set on each frame read

    async def __aenter__(self) -> FakeServer:
        self.task = asyncio.create_task(self._serve())
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await asyncio.wait([self.task], timeout=WAIT_S)
        self.context.destroy(linger=0)
        if not self.task.cancelled() and self.task.exception() is not None:
            raise self.task.exception()

    async def _serve(self) -> None:
        while True:
            identity, *frames = await self.socket.recv_multipart()
            frame = orjson.loads(frames[-1])
            self.received.append(frame)
            self.arrived.set()
            for reply in self.answer(frame):
                await self.socket.send_multipart([identity, orjson.dumps({"v": 1, **reply})])


    async def frame_of(self, kind: str) -> dict:
        """The first frame of `kind` read, waited for (at most WAIT_S)."""
        async with asyncio.timeout(WAIT_S):
            while not any(frame["type"] == kind for frame in self.received):
                self.arrived.clear()
                await self.arrived.wait()
        return next(frame for frame in self.received if frame["type"] == kind)


def canned(frame: dict) -> list[dict]:
    """What a healthy daemon answers: a completion echoing the prompt (streamed word by word when
    asked), a job answering each line, stats, cancels."""
    match frame["type"]:
        case "submit":
            text = frame["body"]["prompt"]
            pieces = re.findall(r"\s*\S+", text) if frame.get("stream") else []
            tokens = [{"type": "token", "id": frame["id"], "text": piece, "token_ids": [n]} for n, piece in enumerate(pieces)]
            return tokens + [{"type": "result", "id": frame["id"], "response": {"object": "text_completion",
                                                                               "choices": [{"text": text}]}}]
        case "batch":
            lines = frame["lines"] if "lines" in frame else Path(frame["path"]).read_text().splitlines()
            answers = [{"type": "job_line", "job_id": "j1", "line": {"custom_id": orjson.loads(line)["custom_id"],
                                                                     "response": {"status_code": 200}}}
                       for line in lines if line.strip()]
            return [{"type": "job", "id": frame["id"], "job_id": "j1"}, *answers,
                    {"type": "job_done", "job_id": "j1", "num_done": len(answers), "num_failed": 0, "num_cancelled": 0}]
        case "stats":
            return [{"type": "stats", "id": frame["id"], "stats": {"requests": {"done": 3}, "jobs": {"running": 0}}}]
        case "cancel":
            return [{"type": "cancelled", "id": frame.get("id"), "job_id": frame.get("job_id"), "num_requests": 1}]
    return [{"type": "error", "id": frame.get("id"), "status": 400, "code": "invalid_request", "message": "type"}]


class Reversed:
    """Holds submits until `count` have come, then answers them last first."""

    def __init__(self, count: int):
        self.count, self.held = count, []

    def __call__(self, frame: dict) -> list[dict]:
        self.held.append(frame)
        if len(self.held) < self.count:
            return []
        held, self.held = self.held[::-1], []
        return [reply for earlier in held for reply in canned(earlier)]


def busy(frame: dict) -> list[dict]:
    return [{"type": "error", "id": frame["id"], "status": 429, "code": "busy", "message": "full", "retry_after_s": 0.01}]


def prompt(n: int) -> dict:
    return {"prompt": f"request number {n}", "max_tokens": 4}


@pytest.fixture
def address(tmp_path) -> str:
    return f"ipc://{tmp_path}/seesaw.sock"


async def test_concurrent_requests_each_get_their_own_answer(address):
    async with FakeServer(address, Reversed(20)), AsyncClient(address, timeout_s=WAIT_S) as client:
        responses = await asyncio.gather(*(client.complete(prompt(n)) for n in range(20)))
    assert [response["choices"][0]["text"] for response in responses] == [prompt(n)["prompt"] for n in range(20)]


async def test_submit_many_returns_results_in_input_order(address):
    requests = [("completions", prompt(n)) for n in range(20)]
    async with FakeServer(address, Reversed(5)) as server, AsyncClient(address, timeout_s=WAIT_S) as client:
        results = await client.submit_many(requests, window=5)
    assert [result["choices"][0]["text"] for result in results] == [body["prompt"] for _, body in requests]
    assert len({frame["id"] for frame in server.received}) == 20


async def test_busy_is_retried_until_answered(address):
    answers = iter([busy, busy, canned])
    async with FakeServer(address, lambda frame: next(answers)(frame)) as server, \
            AsyncClient(address, timeout_s=WAIT_S) as client:
        response = await client.complete(prompt(1))
    assert response["choices"][0]["text"] == prompt(1)["prompt"]
    assert len(server.received) == 3 and len({frame["id"] for frame in server.received}) == 1


async def test_busy_past_max_retries_raises(address):
    async with FakeServer(address, busy) as server, AsyncClient(address, timeout_s=WAIT_S, max_retries=2) as client:
        with pytest.raises(ServerError) as raised:
            await client.complete(prompt(1))
    assert raised.value.code == "busy" and raised.value.status == 429
    assert len(server.received) == 3


async def test_error_frame_raises_server_error(address):
    def too_long(frame):
        return [{"type": "error", "id": frame["id"], "status": 400, "code": "context_length_exceeded", "message": "long"}]

    async with FakeServer(address, too_long), AsyncClient(address, timeout_s=WAIT_S) as client:
        results = await client.submit_many([("chat", prompt(1))])
    assert isinstance(results[0], ServerError) and results[0].code == "context_length_exceeded"


async def test_silent_server_times_out(address):
    async with FakeServer(address, lambda frame: []), AsyncClient(address, timeout_s=0.5) as client:
        with pytest.raises(TimeoutError, match=re.escape(address)):
            await client.complete(prompt(1))


async def test_stream_yields_the_tokens_then_keeps_the_result(address):
    async with FakeServer(address, canned), AsyncClient(address, timeout_s=WAIT_S) as client:
        stream = client.stream(prompt(7), endpoint="completions")
        pieces = [text async for text in stream]
    assert len(pieces) == 3 and "".join(pieces) == prompt(7)["prompt"]
    assert stream.response["choices"][0]["text"] == prompt(7)["prompt"]


async def test_leaving_a_stream_early_cancels_it(address):
    async with FakeServer(address, canned) as server, AsyncClient(address, timeout_s=WAIT_S) as client:
        stream = client.stream(prompt(5), endpoint="completions")
        first = await anext(stream)
        await stream.aclose()
        cancel = await server.frame_of("cancel")
    assert first == "request" and cancel["id"] == stream.id


async def test_breaking_out_of_a_stream_block_cancels_it_and_a_finished_one_sends_nothing(address):
    async with FakeServer(address, canned) as server, AsyncClient(address, timeout_s=WAIT_S) as client:
        async with client.stream(prompt(5), endpoint="completions") as stream:
            async for _ in stream:
                break
        cancel = await server.frame_of("cancel")
        async with client.stream(prompt(3), endpoint="completions") as whole:
            pieces = [text async for text in whole]
        await client.stats()  # a round trip after the block: a cancel sent by it would have arrived
    assert cancel["id"] == stream.id
    assert "".join(pieces) == prompt(3)["prompt"] and [f["id"] for f in server.received if f["type"] == "cancel"] == [stream.id]

    def use_sync_client():
        with Client(address, timeout_s=WAIT_S) as sync_client, sync_client.stream(prompt(4)) as sync_stream:
            next(sync_stream)
            return sync_stream.id

    async with FakeServer(address, canned) as server:
        request_id = await asyncio.wait_for(asyncio.to_thread(use_sync_client), WAIT_S)
        assert (await server.frame_of("cancel"))["id"] == request_id


async def test_closing_fails_the_requests_still_waiting(address):
    async with FakeServer(address, lambda frame: []) as server:
        client = AsyncClient(address, timeout_s=WAIT_S)
        waiting = asyncio.ensure_future(client.complete(prompt(1)))
        await server.frame_of("submit")
        await client.close()
        with pytest.raises(ConnectionError, match="closed"):
            await asyncio.wait_for(waiting, WAIT_S)


async def test_sync_client_streams_and_reads_stats(address):
    def use_sync_client():
        with Client(address, timeout_s=WAIT_S) as client:
            return "".join(client.stream(prompt(3))), client.last_result, client.stats()

    async with FakeServer(address, canned):
        text, result, stats = await asyncio.wait_for(asyncio.to_thread(use_sync_client), WAIT_S)
    assert text == prompt(3)["prompt"] and result["choices"][0]["text"] == text
    assert stats["requests"]["done"] == 3


async def test_job_lines_arrive_then_the_summary(address, tmp_path):
    lines = [orjson.dumps({"custom_id": f"c{n}", "prompt": "x"}).decode() for n in range(4)]
    async with FakeServer(address, canned), AsyncClient(address, timeout_s=WAIT_S) as client:
        job = client.run_job(lines=lines + [""])
        answered = [line["custom_id"] async for line in job]
        cancelled = await client.cancel(job_id=job.job_id)
    assert answered == ["c0", "c1", "c2", "c3"] and job.job_id == "j1"
    assert job.summary["num_done"] == 4 and client.last_job_summary == job.summary
    assert cancelled == 1


async def test_curve_right_key_answers_wrong_key_times_out(address, tmp_path):
    public_path, secret_path = write_keys(tmp_path / "keys")
    async with FakeServer(address, canned, secret_path=secret_path) as server:
        async with AsyncClient(address, server_key=str(public_path), timeout_s=WAIT_S) as client:
            assert (await client.complete(prompt(2)))["choices"][0]["text"] == prompt(2)["prompt"]
        async with AsyncClient(address, server_key=zmq.curve_keypair()[0], timeout_s=0.5) as stranger:
            with pytest.raises(TimeoutError):
                await stranger.complete(prompt(2))
    assert len(server.received) == 1  # the stranger's frame never got through the handshake


def test_key_files_are_one_pair_and_never_overwritten(tmp_path):
    public_path, secret_path = write_keys(tmp_path)
    public, secret = read_secret(secret_path)
    assert read_public(str(public_path)) == public == zmq.curve_public(secret)
    assert read_public(public.decode()) == public
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError, match="server.key"):
        write_keys(tmp_path)
    public_path.write_text("not a key\n")
    with pytest.raises(ValueError, match=re.escape(str(public_path))):
        read_public(str(public_path))


@pytest.mark.parametrize(("address", "expected"), [
    ("ipc:///run/seesaw.sock", True), ("inproc://x", True), ("tcp://127.0.0.1:5555", True),
    ("tcp://127.3.2.1:5555", True), ("tcp://localhost:5555", True), ("tcp://[::1]:5555", True),
    ("tcp://::1:5555", True), ("tcp://*:5555", False), ("tcp://0.0.0.0:5555", False),
    ("tcp://10.0.0.7:5555", False), ("tcp://example.com:5555", False), ("tcp://[::]:5555", False),
    ("tcp://128.0.0.1:5555", False),
])
def test_is_loopback(address, expected):
    assert is_loopback(address) is expected


def test_default_address_prefers_the_runtime_folder(tmp_path):
    assert default_address({"XDG_RUNTIME_DIR": str(tmp_path)}) == f"ipc://{tmp_path}/seesaw/seesaw.sock"
    fallback = f"ipc://{tempfile.gettempdir()}/seesaw-{os.getuid()}/seesaw.sock"
    assert default_address({}) == default_address({"XDG_RUNTIME_DIR": str(tmp_path / "missing")}) == fallback
    ensure_socket_folder(default_address({"XDG_RUNTIME_DIR": str(tmp_path)}))
    assert stat.S_IMODE((tmp_path / "seesaw").stat().st_mode) == 0o700


def test_job_source_sends_lines_off_this_host(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"custom_id": "a"}\n')
    assert job_source("ipc:///x.sock", source) == {"path": source.resolve()}
    assert job_source("tcp://10.0.0.7:5555", source) == {"lines": ['{"custom_id": "a"}']}


async def test_submit_command_writes_each_job_line(address, tmp_path):
    register(app)
    register(app)  # a second call (as cli/main.py may make) adds nothing
    source = tmp_path / "in.jsonl"
    source.write_text("".join(orjson.dumps({"custom_id": f"c{n}", "prompt": "x"}).decode() + "\n" for n in range(3)))
    arguments = ["submit", str(source), "--server", address, "--timeout-s", str(WAIT_S)]
    async with FakeServer(address, canned) as server:
        result = await asyncio.wait_for(asyncio.to_thread(CliRunner().invoke, app, arguments), 2 * WAIT_S)
    assert result.exit_code == 0, result.output
    written = [orjson.loads(line) for line in (tmp_path / "in.results.jsonl").read_text().splitlines()]
    assert [line["custom_id"] for line in written] == ["c0", "c1", "c2"]
    assert server.received[0]["path"] == str(source.resolve())
    assert "3 done, 0 failed" in result.stderr


def test_keys_command_writes_a_pair_once(tmp_path):
    register(app)
    first = CliRunner().invoke(app, ["keys", str(tmp_path / "keys")])
    again = CliRunner().invoke(app, ["keys", str(tmp_path / "keys")])
    assert first.exit_code == 0 and f"--server-key {tmp_path / 'keys' / 'server.key'}" in first.stdout
    assert again.exit_code == 2 and again.stderr.startswith("error: ") and "already exists" in again.stderr


def test_status_command_reports_a_missing_server_without_a_traceback(tmp_path):
    register(app)
    result = CliRunner().invoke(app, ["status", "--server", f"ipc://{tmp_path}/none.sock"])  # 10 s by default
    assert result.exit_code == 1 and result.stderr.startswith(f"error: no server at ipc://{tmp_path}/none.sock")
    assert "is `seesaw-cli serve` running?" in result.stderr


def test_submit_to_no_server_fails_at_once_and_writes_nothing(tmp_path):
    register(app)
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"prompt": "x"}\n')
    result = CliRunner().invoke(app, ["submit", str(source), "-o", str(output), "--server", f"ipc://{tmp_path}/none.sock"])
    assert result.exit_code == 1 and "no server at" in result.stderr and not output.exists()
    result = CliRunner().invoke(app, ["submit", str(source), "-o", str(tmp_path), "--server", f"ipc://{tmp_path}/x.sock"])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: the output {tmp_path} is a folder; give a file with -o"


async def test_a_terminated_submit_cancels_its_job_and_a_second_one_may_not_share_its_output(address, tmp_path):
    import signal
    import subprocess
    import sys

    def silent_job(frame: dict) -> list[dict]:  # a job that produces nothing until cancelled
        if frame["type"] == "batch":
            return [{"type": "job", "id": frame["id"], "job_id": "j1"}]
        return [{"type": "cancelled", "id": frame["id"], "job_id": "j1", "num_requests": 1}] if frame["type"] == "cancel" else []

    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"custom_id": "a", "prompt": "x"}\n')
    command = [sys.executable, "-m", "cli.main", "submit", str(source), "-o", str(output), "--server", address]
    async with FakeServer(address, silent_job) as server:
        first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
        try:
            batch = await server.frame_of("batch")
            second = await asyncio.to_thread(subprocess.run, command + ["--overwrite"], capture_output=True, text=True,
                                             timeout=2 * WAIT_S, cwd=Path(__file__).parents[1])
            assert second.returncode == 2 and f"another run is writing {output}" in second.stderr
            await asyncio.sleep(1.0)  # the submit waits for lines, inside its stream
            first.send_signal(signal.SIGTERM)
            cancel = await server.frame_of("cancel")
            assert cancel["id"] == batch["id"]  # the job's request, given up on
            _, errors = await asyncio.to_thread(first.communicate, timeout=2 * WAIT_S)
            assert first.returncode == 130 and "asynchronous generator" not in errors and "Traceback" not in errors
        finally:
            first.kill()


def test_submit_command_refuses_an_output_in_a_missing_folder_before_asking(tmp_path):
    register(app)
    source, output = tmp_path / "in.jsonl", tmp_path / "missing" / "out.jsonl"
    source.write_text('{"prompt": "x"}\n')
    result = CliRunner().invoke(app, ["submit", str(source), "-o", str(output),
                                      "--server", f"ipc://{tmp_path}/none.sock", "--timeout-s", "0.3"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: --output {output}: the folder {output.parent} does not exist"
