"""The OpenAI HTTP API (`serve --http`) on the default model, in this process, with the official
`openai` package as the client: chat, completions, streaming, errors as its exception types,
files and batches, bad traffic, a client that leaves, and the page in a headless browser."""

from __future__ import annotations

import asyncio
import io
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
import pytest_asyncio

from helpers import engine_config
from seesaw.config import HttpConfig, ServeConfig
from seesaw.engine import Engine
from seesaw.frontend.batch_io import SamplingDefaults
from seesaw.frontend.http_server import HttpServer
from seesaw.model.resolve import resolve_model

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "sk-test-key"
CHAT = [{"role": "user", "content": "Name a colour."}]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine():
    config = engine_config("default", scheduler={"max_num_batched_tokens": 256, "max_num_seqs": 64})
    async with Engine(config, resolve_model("default", config.cache_dir)) as engine:
        yield engine


async def _start(engine, data_dir: Path, **http) -> HttpServer:
    config = ServeConfig(None, http=HttpConfig(host="127.0.0.1", port=0, data_dir=data_dir, **http))
    server = HttpServer(engine, config, SamplingDefaults(), "default")
    await server.start()
    return server


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(engine, tmp_path_factory):
    """An open server (no key) on the module's engine."""
    server = await _start(engine, tmp_path_factory.mktemp("http-data"))
    yield server
    await server.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def keyed(engine, tmp_path_factory):
    """A server that takes one key and streams one answer at a time."""
    server = await _start(engine, tmp_path_factory.mktemp("http-keyed"), api_keys=(KEY,), max_streams=1)
    yield server
    await server.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def strict(engine, tmp_path_factory):
    """A server with small bounds, for bad traffic."""
    server = await _start(engine, tmp_path_factory.mktemp("http-strict"), max_body_bytes=64 << 10,
                          max_upload_bytes=256 << 10, read_timeout_s=2.0)
    yield server
    await server.close()


def _client(server: HttpServer, key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=key, max_retries=0, timeout=120)


async def test_chat_and_completions_answer_as_openai_objects(server):
    client = _client(server)
    chat = await client.chat.completions.create(model="default", messages=CHAT, max_tokens=6, temperature=0)
    completion = await client.completions.create(model="default", prompt="The capital of France is", max_tokens=5,
                                                 temperature=0, extra_body={"ignore_eos": True})
    models = await client.models.list()
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 6
    assert completion.object == "text_completion" and completion.usage.completion_tokens == 5
    assert completion.choices[0].text and [model.id for model in models.data] == ["default"]


async def test_a_streamed_chat_joins_to_the_whole_answer_and_ends_with_the_usage(server):
    client = _client(server)
    whole = await client.chat.completions.create(model="default", messages=CHAT, max_tokens=12, temperature=0)
    stream = await client.chat.completions.create(model="default", messages=CHAT, max_tokens=12, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == whole.choices[0].message.content
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])


async def test_a_streamed_completion_without_include_usage_sends_no_usage(server):
    stream = await _client(server).completions.create(model="default", prompt="One, two,", max_tokens=4,
                                                      temperature=0, stream=True)
    chunks = [chunk async for chunk in stream]
    assert len(chunks) >= 2 and all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"]}}}]
PERSON = {"type": "json_schema", "json_schema": {"name": "person", "schema": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"]}}}


async def test_logprobs_schemas_and_tool_calls_through_the_client_plain_and_streamed(server):
    """Each extra field through the openai package, answered whole and streamed: a streamed
    choice's log-probabilities and tool call come whole in its finishing chunk."""
    client = _client(server)
    asks = {"logprobs": {"logprobs": True, "top_logprobs": 3},
            "schema": {"response_format": PERSON},
            "tool": {"tools": WEATHER, "tool_choice": "required"}}
    for name, fields in asks.items():
        whole = await client.chat.completions.create(model="default", messages=CHAT, max_tokens=40, temperature=0,
                                                     **fields)
        stream = await client.chat.completions.create(model="default", messages=CHAT, max_tokens=40, temperature=0,
                                                      stream=True, **fields)
        chunks = [chunk.choices[0] async for chunk in stream if chunk.choices]
        message, closing = whole.choices[0].message, chunks[-1]
        if name == "logprobs":
            assert len(whole.choices[0].logprobs.content) == whole.usage.completion_tokens
            streamed, answered = closing.logprobs.content, whole.choices[0].logprobs.content
            assert [entry.token for entry in streamed] == [entry.token for entry in answered]
            assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(streamed, answered))  # batched apart
            assert all(len(entry.top_logprobs) == 3 for entry in closing.logprobs.content)
        elif name == "schema":
            person = orjson.loads(message.content)
            assert set(person) == {"name", "age"} and isinstance(person["age"], int)
            assert "".join(chunk.delta.content or "" for chunk in chunks) == message.content
        else:
            (call,) = message.tool_calls
            assert call.function.name == "get_weather" and "city" in orjson.loads(call.function.arguments)
            assert whole.choices[0].finish_reason == closing.finish_reason == "tool_calls"
            assert closing.delta.tool_calls[0].function.arguments == call.function.arguments
            assert all(not chunk.delta.content for chunk in chunks)
    with pytest.raises(openai.BadRequestError, match="top_logprobs must be an integer from 0 to 20"):
        await client.chat.completions.create(model="default", messages=CHAT, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError, match="the JSON schema does not compile"):
        await client.chat.completions.create(model="default", messages=CHAT, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}})
    echo = await client.completions.create(model="default", prompt="One two three", max_tokens=2, temperature=0,
                                           logprobs=2, echo=True)
    logprobs = echo.choices[0].logprobs
    assert echo.choices[0].text.startswith("One two three") and logprobs.token_logprobs[0] is None
    assert len(logprobs.tokens) == echo.usage.prompt_tokens + echo.usage.completion_tokens


async def test_errors_arrive_as_the_openai_packages_exception_types(server, keyed):
    client = _client(server)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model="default", prompt="x", max_tokens=4, temperature="hot")
    assert "temperature" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model="default", prompt="x", extra_body={"frobnicate": 1})
    assert caught.value.body["param"] == "frobnicate"
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve("file-000000000000000000000000")
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve("batch_nope")
    with pytest.raises(openai.AuthenticationError):
        await _client(keyed, "sk-wrong").models.list()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{keyed.port}/v1/models") as response:
            assert response.status == 401 and (await response.json())["error"]["code"] == "invalid_api_key"
        async with session.get(f"http://127.0.0.1:{keyed.port}/health") as response:
            assert response.status == 200  # probes carry no key
    assert (await _client(keyed, KEY).models.list()).data[0].id == "default"


async def test_streams_past_the_bound_get_429_with_a_retry_after(keyed):
    client = _client(keyed, KEY)
    first = await client.completions.create(model="default", prompt="Count: one, two,", max_tokens=400,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.completions.create(model="default", prompt="x", max_tokens=2, stream=True)
        assert int(caught.value.response.headers["Retry-After"]) >= 1
    finally:
        await first.close()  # leaving cancels the request


async def test_a_client_that_goes_away_has_its_request_cancelled(server):
    url = f"http://127.0.0.1:{server.port}/v1/completions"
    before = server.book.counts["cancelled"]
    body = {"prompt": "Count: one, two,", "max_tokens": 600, "temperature": 0, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        # A plain request: the connection closes while the answer is being generated.
        with pytest.raises(TimeoutError):
            async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=1.0)) as response:
                raise AssertionError(f"answered {response.status}: {await response.text()}")
        # A stream: read one chunk, then leave.
        async with session.post(url, json={**body, "stream": True}) as response:
            await asyncio.wait_for(response.content.readline(), 60)
    await _until(lambda: server.book.counts["cancelled"] >= before + 2 and not server._open, 30)

    async def engine_idle():
        stats = await server.client.stats()
        return stats.requests.running == 0 and stats.requests.waiting == 0 or None

    await _until_async(engine_idle, 10)  # far sooner than 600 tokens each would take


async def test_files_and_a_batch_end_to_end(server):
    client = _client(server)
    prompts = ["The capital of France is", "Water boils at", "One, two, three,"]
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": prompt, "max_tokens": 6, "temperature": 0}} for i, prompt in enumerate(prompts)]
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/completions", "body": {"prompt": ""}})
    lines.append({"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"messages": [{"role": "user", "content": "Hi"}]}})  # not this batch's endpoint
    data = "".join(orjson.dumps(line).decode() + "\n" for line in lines).encode()
    uploaded = await client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    assert uploaded.bytes == len(data) and uploaded.purpose == "batch"
    assert (await client.files.content(uploaded.id)).content == data
    batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                        completion_window="24h", metadata={"run": "e2e"})
    assert batch.status == "in_progress" and batch.request_counts.total == 5
    batch = await _finished(client, batch.id)
    assert batch.status == "completed" and batch.metadata == {"run": "e2e"}
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 2)
    output = [orjson.loads(line) for line in (await client.files.content(batch.output_file_id)).content.splitlines()]
    errors = [orjson.loads(line) for line in (await client.files.content(batch.error_file_id)).content.splitlines()]
    assert sorted(line["custom_id"] for line in output) == ["q0", "q1", "q2"]
    assert sorted(line["custom_id"] for line in errors) == ["bad", "chat"]
    assert all(line["response"]["status_code"] == 400 for line in errors)
    assert "this batch's endpoint takes completion requests" in [e for e in errors if e["custom_id"] == "chat"][0][
        "error"]["message"]
    # Each greedy line reads as the same request sent on its own.
    for line in output:
        alone = await client.completions.create(model="default", prompt=prompts[int(line["custom_id"][1])],
                                                max_tokens=6, temperature=0)
        assert line["response"]["body"]["choices"][0]["text"] == alone.choices[0].text
    listed = await client.batches.list()
    assert batch.id in [entry.id for entry in listed.data]
    assert {uploaded.id, batch.output_file_id} <= {entry.id for entry in (await client.files.list()).data}
    with pytest.raises(openai.ConflictError):
        await client.batches.cancel(batch.id)
    assert (await client.files.delete(uploaded.id)).deleted
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(uploaded.id)


async def test_a_cancelled_batch_ends_cancelled_with_what_it_wrote(server):
    client = _client(server)
    lines = "".join(orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                  "body": {"prompt": "Count: one,", "max_tokens": 300, "ignore_eos": True}}).decode()
                    + "\n" for i in range(6))
    uploaded = await client.files.create(file=("c.jsonl", io.BytesIO(lines.encode())), purpose="batch")
    batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    assert (await client.batches.cancel(batch.id)).status in ("cancelling", "cancelled")
    batch = await _finished(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    output = [orjson.loads(line) for line in (await client.files.content(batch.output_file_id)).content.splitlines()]
    assert len({line["custom_id"] for line in output}) == len(output) <= 6
    ran_to_the_end = sum(line["response"]["body"]["choices"][0]["finish_reason"] != "cancelled" for line in output)
    assert batch.request_counts.completed == ran_to_the_end and batch.request_counts.total == 6


async def test_bad_traffic_gets_its_4xx_and_the_server_goes_on(strict):
    base = f"http://127.0.0.1:{strict.port}"
    rss_before = _rss_bytes()
    async with aiohttp.ClientSession() as session:
        async def post(path, data, headers=None) -> tuple[int, dict]:
            async with session.post(base + path, data=data, headers=headers or {}) as response:
                return response.status, await response.json(content_type=None)

        fixed = [b"{not json", b"[1, 2]", b'{"prompt": 5}', b'{"prompt": "x", "max_tokens": "many"}',
                 b'{"prompt": "x", "stream": "yes"}', b'{"prompt": "x", "unknown_field": 1}', b'{"messages": []}',
                 b'{"prompt": "x", "n": 0}', b'{"prompt": "x", "stream_options": {"include_usage": true}}']
        for data in fixed:
            status, body = await post("/v1/completions", data)
            assert status == 400 and body["error"]["message"] and body["error"]["type"] == "invalid_request_error", data
        status, body = await post("/v1/completions", b'{"prompt": "' + b"x" * (128 << 10) + b'"}')
        assert status == 413 and "max-body-bytes" in body["error"]["message"]
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", b'{"prompt": "x"}\n' * (20 << 10), filename="big.jsonl")
        status, body = await post("/v1/files", form)
        assert status == 413 and "max-upload-bytes" in body["error"]["message"]
        assert not list((strict.http.data_dir / "files").iterdir())  # nothing of it is kept
        status, body = await post("/v1/files", b"{}", {"Content-Type": "application/json"})
        assert status == 400
        status, body = await post("/v1/batches", b'{"input_file_id": 3, "endpoint": "/v1/completions", '
                                                 b'"completion_window": "24h"}')
        assert status == 400 and body["error"]["param"] == "input_file_id"
        async with session.get(base + "/v1/nowhere") as response:
            assert response.status == 404 and (await response.json())["error"]["message"]
        async with session.put(base + "/v1/completions") as response:
            assert response.status == 405 and "POST" in response.headers["Allow"]

        slow = asyncio.ensure_future(_slow_request(strict.port, b'{"prompt": "x", "max_tokens": 2}'))
        rng = random.Random(7)
        statuses = await asyncio.gather(*(post("/v1/completions", _malformed(rng)) for _ in range(1000)))
        assert all(400 <= status < 500 for status, _ in statuses)
        assert (await asyncio.wait_for(slow, 30)).startswith(b"HTTP/1.1 408")
        status, body = await post("/v1/completions", orjson.dumps({"prompt": "Hi", "max_tokens": 2}))
        assert status == 200 and body["usage"]["completion_tokens"] <= 2
    assert _rss_bytes() - rss_before < 64 << 20


async def test_health_and_metrics_are_served(server):
    await _client(server).completions.create(model="default", prompt="Hi", max_tokens=2)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{server.port}/health") as response:
            assert response.status == 200 and (await response.json())["status"] == "ok"
        await _until(lambda: server.latest_stats is not None and server.latest_stats.requests.done >= 1, 10)
        async with session.get(f"http://127.0.0.1:{server.port}/metrics") as response:
            text = await response.text()
    assert 'seesaw_requests_total{outcome="done"}' in text and "seesaw_kv_device_blocks " in text


async def test_the_page_shows_a_running_batchs_progress_as_the_api_counts_it(server, tmp_path):
    chromium = _chromium()
    client = _client(server)
    lines = "".join(orjson.dumps({"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
                                  "body": {"prompt": f"Count to {i}:", "max_tokens": 48, "ignore_eos": True,
                                           "temperature": 0}}).decode() + "\n" for i in range(40))
    uploaded = await client.files.create(file=("page.jsonl", io.BytesIO(lines.encode())), purpose="batch")
    batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    try:
        await _until_async(lambda: _completed(client, batch.id), 120)
        before, generated_before = await client.batches.retrieve(batch.id), server.latest_stats.tokens.generated
        url = f"http://127.0.0.1:{server.port}/"
        dom = await _browse(chromium, url, tmp_path, ["--dump-dom"])
        after, generated_after = await client.batches.retrieve(batch.id), server.latest_stats.tokens.generated
        assert before.status == "in_progress"
        row = _row(dom, batch.id)
        assert row["status"] in (before.status, after.status) and int(row["total"]) == before.request_counts.total == 40
        assert before.request_counts.completed <= int(row["completed"]) <= after.request_counts.completed
        assert int(row["failed"]) == 0 and 'data-loaded="yes"' in dom
        shown = re.search(r'id="generated">([\d,]+)<', dom)[1]
        assert generated_before <= int(shown.replace(",", "")) <= generated_after
        await _browse(chromium, url, tmp_path, ["--screenshot=" + str(tmp_path / "page.png"), "--window-size=1200,900"])
        assert (tmp_path / "page.png").stat().st_size > 10_000
    finally:
        await client.batches.cancel(batch.id)
        await _finished(client, batch.id)


# ---------------------------------------------------------------- helpers


async def _finished(client: openai.AsyncOpenAI, batch_id: str):
    async def ended():
        batch = await client.batches.retrieve(batch_id)
        return batch if batch.status in ("completed", "failed", "cancelled") else None

    return await _until_async(ended, 120)


async def _completed(client: openai.AsyncOpenAI, batch_id: str):
    batch = await client.batches.retrieve(batch_id)
    return batch if batch.request_counts.completed >= 2 else None


async def _until(predicate, timeout_s: float) -> None:
    async def check():
        return predicate() or None

    await _until_async(check, timeout_s)


async def _until_async(check, timeout_s: float):
    """The first truthy answer of `check()`, polled until `timeout_s` passes."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (answer := await check()) is None:
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)
    return answer


def _malformed(rng: random.Random) -> bytes:
    """A body that cannot run: broken JSON, a wrong type, an unknown field, a bad value."""
    good = {"prompt": "x", "max_tokens": 2}
    match rng.randrange(5):
        case 0:
            return orjson.dumps(good)[: rng.randrange(1, 10)]
        case 1:
            return orjson.dumps({**good, rng.choice(["max_tokens", "top_p", "seed", "stop"]): {"a": [1]}})
        case 2:
            return orjson.dumps({**good, f"field_{rng.randrange(10**6)}": 1})
        case 3:
            return orjson.dumps({**good, "temperature": -rng.random() - 0.1})
        case _:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))


async def _slow_request(port: int, body: bytes) -> bytes:
    """A request whose body arrives a byte at a time, slower than the server waits; the status line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        for byte in body:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                return await asyncio.wait_for(reader.readline(), 0.2)
            except TimeoutError:
                continue
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()


def _rss_bytes() -> int:
    return int(Path(f"/proc/{os.getpid()}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _chromium() -> str:
    """Debian's chromium, installed when missing (as root); the test is skipped, saying why, where
    it cannot be."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], env=environment,
                       capture_output=True, timeout=600)
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("no headless browser: Debian's chromium is not installed and apt-get could not install it")
    return found


async def _browse(chromium: str, url: str, folder: Path, action: list[str]) -> str:
    """Run headless chromium on `url` with `action` (--dump-dom, --screenshot=...); what it printed."""
    process = await asyncio.create_subprocess_exec(
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
        f"--user-data-dir={folder / 'chromium-profile'}", "--virtual-time-budget=4000", *action, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(process.communicate(), 90)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return out.decode()


def _row(dom: str, batch_id: str) -> dict[str, str]:
    """The cells of a batch's row in the page's table, by their data-field."""
    start = dom.index(f'data-batch-id="{batch_id}"')
    row = dom[start:dom.index("</tr>", start)]
    return dict(re.findall(r'<td data-field="(\w+)">([^<]*)', row))
