"""Batch lines in and out: both input formats, every kind of bad line, and the OpenAI output shape."""

from __future__ import annotations

import orjson
import pytest

from seesaw.frontend.batch_io import LineError, SamplingDefaults, error_line, parse_line, response_body, result_line
from seesaw.messages import RequestFinished, RequestKind

DEFAULTS = SamplingDefaults(max_tokens=32, temperature=0.5)


def line(record) -> bytes:
    return orjson.dumps(record)


def test_openai_chat_line():
    item = parse_line(line({
        "custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "seed": 3,
                 "stop": "x", "top_k": -1},
    }), 1, DEFAULTS)
    assert (item.custom_id, item.kind, item.model) == ("a", "chat", "m")
    assert (item.sampling.max_tokens, item.sampling.temperature, item.sampling.seed) == (5, 0.5, 3)
    assert (item.sampling.stop, item.sampling.top_k) == (["x"], 0)


def test_openai_completion_line_with_token_ids():
    item = parse_line(line({"custom_id": "b", "method": "POST", "url": "/v1/completions",
                            "body": {"prompt": [5, 6, 7], "max_completion_tokens": 9}}), 2, DEFAULTS)
    assert (item.kind, item.prompt_token_ids, item.sampling.max_tokens) == ("completion", [5, 6, 7], 9)


def test_simple_lines_take_defaults_and_number_their_ids():
    item = parse_line(line({"prompt": "Once"}), 7, DEFAULTS)
    assert (item.custom_id, item.kind, item.prompt, item.sampling.max_tokens) == ("line-7", "completion", "Once", 32)
    chat = parse_line(line({"id": "q", "messages": [{"role": "user", "content": "x"}], "temperature": 0}), 8, DEFAULTS)
    assert (chat.custom_id, chat.kind, chat.sampling.temperature) == ("q", "chat", 0)
    named = parse_line(line({"custom_id": "c9", "prompt": "Once"}), 9, DEFAULTS)  # as OpenAI lines name theirs
    assert (named.custom_id, named.kind, named.prompt) == ("c9", "completion", "Once")


@pytest.mark.parametrize("raw,problem", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (line({"max_tokens": 3}), "has no prompt"),
    (line({"custom_id": "c", "url": "/v1/embeddings", "body": {}}), "unknown url"),
    (line({"custom_id": "c", "url": "/v1/completions", "body": {"messages": []}}), "needs prompt"),
    (line({"prompt": "x", "temperature": -1}), "temperature"),
    (line({"prompt": "x", "top_p": 0}), "top_p"),
    (line({"prompt": "x", "max_tokens": 0}), "max_tokens"),
    (line({"prompt": "x", "max_tokens": "many"}), "max_tokens"),
    (line({"prompt": "x", "n": 0}), "n must be an integer from 1 to 128, got 0"),
    (line({"prompt": "x", "n": -1}), "n must be an integer from 1 to 128, got -1"),
    (line({"prompt": "x", "n": 129}), "n must be an integer from 1 to 128, got 129"),
    (line({"prompt": "x", "n": 2.5}), "n must be an integer from 1 to 128, got 2.5"),
    (line({"prompt": "x", "n": "2"}), "n must be an integer from 1 to 128, got '2'"),
    (line({"prompt": "x", "n": True}), "n must be an integer from 1 to 128, got True"),
    (line({"prompt": "x", "logprobs": 21}), "logprobs must be an integer from 0 to 20"),
    (line({"prompt": ""}), "prompt is empty"),
    (line({"prompt": "x", "stop": [1]}), "stop"),
    (line({"messages": "hello"}), "messages must be a non-empty list"),
    (line({"prompt": "x", "seed": 1.5}), "seed must be an integer, got 1.5"),
    (b'{"prompt": "x", "seed": 123456789012345678901234}', "seed must be an integer within 64 bits: 1234567890"),
])
def test_bad_lines_name_the_problem_and_the_line(raw, problem):
    with pytest.raises(LineError) as caught:
        parse_line(raw, 12, DEFAULTS)
    assert problem in str(caught.value)
    assert str(caught.value).startswith("line 12:")


def test_n_is_read_from_the_body_and_defaults_to_one():
    assert parse_line(line({"prompt": "x", "n": 128}), 1, DEFAULTS).n == 128
    assert parse_line(line({"prompt": "x", "n": None}), 1, DEFAULTS).n == 1
    assert parse_line(line({"prompt": "x"}), 1, DEFAULTS).n == 1


def finished(text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
             kind: RequestKind = RequestKind.CHAT) -> RequestFinished:
    return RequestFinished("r", kind, text, finish_reason, prompt_tokens, completion_tokens)


def item_of(kind: RequestKind):
    body = {"messages": [{"role": "user", "content": "hi"}]} if kind == RequestKind.CHAT else {"prompt": "hi"}
    return parse_line(line(body), 1, DEFAULTS)


def test_result_line_has_the_openai_batch_shape():
    item = parse_line(line({"custom_id": "z", "url": "/v1/chat/completions", "method": "POST",
                            "body": {"messages": [{"role": "user", "content": "hi"}]}}), 1, DEFAULTS)
    out = result_line(item, [finished("hello", "stop", 4, 2)], "model-x")
    assert out["custom_id"] == "z" and out["error"] is None
    body = out["response"]["body"]
    assert out["response"]["status_code"] == 200
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "logprobs": None,
                                "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_a_body_of_n_choices_indexes_them_and_counts_the_prompt_once():
    body = response_body(item_of(RequestKind.COMPLETION), [finished("a", "length", 7, 3), finished("b", "stop", 7, 1),
                                                  finished("c", "length", 7, 3)], "m")
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "a", "length"), (1, "b", "stop"), (2, "c", "length")]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14}


@pytest.mark.parametrize("kind", [RequestKind.CHAT, RequestKind.COMPLETION])
def test_bodies_of_one_and_of_n_choices_are_valid_openai_objects(kind):
    openai_types = pytest.importorskip("openai.types")
    from openai.types.chat import ChatCompletion

    model = ChatCompletion if kind == RequestKind.CHAT else openai_types.Completion
    for count in (1, 3):
        body = response_body(item_of(kind), [finished(f"t{i}", "length", 5, 2, kind) for i in range(count)], "m")
        parsed = model.model_validate(body)
        assert [choice.index for choice in parsed.choices] == list(range(count))
        assert parsed.usage.prompt_tokens == 5 and parsed.usage.completion_tokens == 2 * count


def test_error_line_carries_status_and_line_number():
    out = error_line("c", 9, "bad thing")
    assert out["response"]["status_code"] == 400
    assert out["error"]["message"] == "line 9: bad thing"
    assert out["response"]["body"]["error"]["message"] == "line 9: bad thing"


def test_a_results_file_another_run_is_writing_is_refused(tmp_path):
    from seesaw.frontend.output import OutputError, ResultSink, open_locked

    path = tmp_path / "out.jsonl"
    path.write_text('{"custom_id": "a"}\n')
    with ResultSink(path, append=True) as sink:
        sink.write({"custom_id": "b"})
        with pytest.raises(OutputError, match=f"another run is writing {path}"):
            open_locked(path, append=False)
        assert path.read_text().count("\n") == 2  # the refused run emptied nothing
    open_locked(path, append=False).close()  # free once the first run is done
    assert path.read_text() == ""
