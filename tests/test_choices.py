"""The OpenAI `n` field: each choice's seed, and n engine requests gathered into one answer (pure),
then n choices through the batch front door and the in-process client on a real engine."""

from __future__ import annotations

import asyncio
import io

import orjson
import pytest
import pytest_asyncio

from helpers import ListSink, engine_config
from seesaw.frontend.choices import MAX_N, Choices, check_n, choice_samplings
from seesaw.messages import ErrorCode, RequestFinished, RequestKind
from seesaw.sampling import SamplingParams


def result(request_id: str, text: str = "t", error: str | None = None) -> RequestFinished:
    return RequestFinished(request_id, RequestKind.COMPLETION, text, "length", 3, 2, error=error,
                           code=ErrorCode.SERVER_ERROR if error else None)


@pytest.mark.parametrize("value", [0, -1, MAX_N + 1, 2.5, "2", True])
def test_a_bad_n_is_a_value_error_naming_n_and_its_value(value):
    with pytest.raises(ValueError, match=f"n must be an integer from 1 to {MAX_N}, got {value!r}"):
        check_n(value)


def test_choice_zero_keeps_the_seed_and_the_others_get_their_own_the_same_every_time():
    samplings = choice_samplings(SamplingParams(temperature=1.0, seed=7), 4)
    seeds = [sampling.seed for sampling in samplings]
    assert seeds[0] == 7 and len(set(seeds)) == 4
    assert seeds == [sampling.seed for sampling in choice_samplings(SamplingParams(temperature=1.0, seed=7), 4)]
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert choice_samplings(SamplingParams(seed=8), 2)[1].seed not in seeds  # another request's choices differ


def test_an_unseeded_requests_choices_stay_unseeded():
    assert [sampling.seed for sampling in choice_samplings(SamplingParams(), 3)] == [None, None, None]


def test_choices_are_answered_once_all_are_in_and_in_choice_order():
    choices = Choices(["a", "b", "c"])
    assert not choices.take(result("c", "third")) and not choices.take(result("a", "first"))
    assert choices.unfinished_ids == ["b"]
    assert choices.take(result("b", "second"))
    assert [r.text for r in choices.answer] == ["first", "second", "third"] and choices.is_done
    assert choices.index("c") == 2


def test_the_first_failing_choice_decides_the_request_and_later_results_change_nothing():
    choices = Choices(["a", "b", "c"])
    assert not choices.take(result("a"))
    assert choices.take(result("b", error="boom"))
    assert choices.answer == [choices.failure] and choices.failure.error == "boom"
    assert choices.unfinished_ids == ["c"] and not choices.is_done
    assert not choices.take(result("c", error="cancelled too"))
    assert choices.failure.error == "boom" and choices.is_done


def test_an_undecided_requests_answer_is_refused():
    with pytest.raises(ValueError, match="1 of 2 choices are in"):
        choices = Choices(["a", "b"])
        choices.take(result("a"))
        choices.answer


# ---------------------------------------------------------------- on a real engine (the default model)

on_module_loop = pytest.mark.asyncio(loop_scope="module")
PROMPT = "The capital of France is"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine():
    from seesaw.engine import Engine
    from seesaw.model.resolve import resolve_model

    config = engine_config("default", scheduler={"max_num_batched_tokens": 256, "max_num_seqs": 16},
                           model={"max_model_len": 128})
    async with Engine(config, resolve_model("default", config.cache_dir)) as engine:
        yield engine


async def run_batch(engine, lines: list[dict]) -> dict[str, dict]:
    """Each output line of a batch of `lines`, by custom_id (each written once)."""
    from seesaw.frontend.batch import BatchRunner
    from seesaw.frontend.batch_io import SamplingDefaults

    sink = ListSink()
    runner = BatchRunner(engine, SamplingDefaults(max_tokens=4), "default", 8, sink)
    data = b"\n".join(orjson.dumps(line) for line in lines) + b"\n"
    await asyncio.wait_for(runner.run_source(io.BytesIO(data), len(data)), 120)
    custom_ids = [line["custom_id"] for line in sink.lines]
    assert len(custom_ids) == len(set(custom_ids)), f"a line answered twice: {custom_ids}"
    return {line["custom_id"]: line for line in sink.lines}


def completion(custom_id: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"prompt": PROMPT, "max_tokens": 4, "ignore_eos": True, **body}}


def texts(line: dict) -> list[str]:
    return [choice["text"] for choice in line["response"]["body"]["choices"]]


@on_module_loop
async def test_n_greedy_choices_are_equal_indexed_and_count_the_prompt_once(engine):
    out = await run_batch(engine, [completion("three", n=3, temperature=0), completion("one", temperature=0)])
    body, single = out["three"]["response"]["body"], out["one"]["response"]["body"]
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2]
    assert texts(out["three"]) == texts(out["one"]) * 3
    assert body["usage"] == {"prompt_tokens": single["usage"]["prompt_tokens"], "completion_tokens": 12,
                             "total_tokens": single["usage"]["prompt_tokens"] + 12}


@on_module_loop
async def test_n_seeded_choices_differ_from_each_other_and_are_the_same_every_run(engine):
    line = completion("four", n=4, temperature=1.0, seed=5, max_tokens=8)
    first, second = await run_batch(engine, [line]), await run_batch(engine, [line, completion("other", n=2)])
    assert texts(first["four"]) == texts(second["four"])
    assert len(set(texts(first["four"]))) == 4


@on_module_loop
async def test_a_line_with_a_bad_n_gets_a_400_naming_n_and_the_rest_of_the_batch_runs(engine):
    out = await run_batch(engine, [completion("zero", n=0), completion("big", n=MAX_N + 1),
                                   completion("text", n="2"), completion("ok", n=2, temperature=0)])
    for custom_id, line_number, value in (("zero", 1, "0"), ("big", 2, str(MAX_N + 1)), ("text", 3, "'2'")):
        assert out[custom_id]["response"]["status_code"] == 400
        assert out[custom_id]["error"]["message"] == (f"line {line_number}: n must be an integer from 1 to "
                                                      f"{MAX_N}, got {value}")
    assert len(texts(out["ok"])) == 2


@on_module_loop
async def test_a_failing_choice_makes_the_lines_one_error(engine):
    out = await run_batch(engine, [completion("long", n=3, max_tokens=500)])
    assert out["long"]["response"]["status_code"] == 400
    assert "context of 128 tokens" in out["long"]["error"]["message"]


@on_module_loop
async def test_chat_choices_through_the_batch_are_a_valid_openai_chat_completion(engine):
    openai_chat = pytest.importorskip("openai.types.chat")
    line = {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 3, "ignore_eos": True}}
    parsed = openai_chat.ChatCompletion.model_validate((await run_batch(engine, [line]))["chat"]["response"]["body"])
    assert [choice.index for choice in parsed.choices] == [0, 1] and parsed.usage.completion_tokens == 6


@on_module_loop
async def test_the_local_client_gives_n_choices_the_batch_gives_for_the_same_seed(engine):
    from seesaw.frontend.local import LocalClient

    sampling = SamplingParams(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    async with LocalClient(engine, "choices") as client:
        results = await asyncio.wait_for(client.generate_choices(sampling, 4, prompt=PROMPT), 120)
        with pytest.raises(ValueError, match="n must be an integer from 1 to 128, got 0"):
            client.submit_choices(sampling, 0, prompt=PROMPT)
    batch = await run_batch(engine, [completion("four", n=4, temperature=1.0, seed=5, max_tokens=8)])
    assert [result.text for result in results] == texts(batch["four"])
