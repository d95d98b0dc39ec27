"""The body fields for log-probabilities, penalties, biases, min_tokens, structured outputs and
tools: how a line is read, the 400 each bad value gets (naming the field and the line), and the
response shapes they make, checked against the openai package's models."""

from __future__ import annotations

import orjson
import pytest

from seesaw.frontend.batch_io import LineError, SamplingDefaults, parse_line, response_body
from seesaw.messages import RequestFinished, RequestKind, TokenText
from seesaw.step import TokenLogprobs

DEFAULTS = SamplingDefaults()
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]


def parse(body: dict, url: str = "/v1/chat/completions"):
    return parse_line(orjson.dumps({"custom_id": "c", "url": url, "body": body}), 4, DEFAULTS)


def completion(body: dict):
    return parse({"prompt": "x", **body}, "/v1/completions")


def test_the_fields_are_read_into_the_requests_sampling():
    chat = parse({**CHAT, "logprobs": True, "top_logprobs": 4, "presence_penalty": 0.5, "frequency_penalty": -0.5,
                  "repetition_penalty": 1.2, "logit_bias": {"11": -100, "7": 2.5}, "min_tokens": 3,
                  "response_format": {"type": "json_object"}})
    sampling = chat.sampling
    assert (sampling.logprobs, sampling.prompt_logprobs) == (4, None)
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.repetition_penalty) == (0.5, -0.5, 1.2)
    assert sampling.logit_bias == {"11": -100, "7": 2.5} and sampling.min_tokens == 3
    assert sampling.constraint.kind == "json_object"
    assert parse({**CHAT, "logprobs": True}).sampling.logprobs == 0
    assert parse({**CHAT, "logprobs": False, "top_logprobs": None}).sampling.logprobs is None
    echo = completion({"logprobs": 2, "echo": True})
    assert (echo.sampling.logprobs, echo.sampling.prompt_logprobs, echo.echo) == (2, 2, True)
    assert completion({"echo": True}).sampling.prompt_logprobs is None


@pytest.mark.parametrize("format_, kind", [
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}}, "json_schema"),
    ({"type": "regex", "regex": r"\d{3}-\d{4}"}, "regex"),
    ({"type": "choice", "choices": ["yes", "no", "say \"maybe\""]}, "choice"),
    ({"type": "grammar", "grammar": 'root ::= "a" root | "b"'}, "grammar"),
    ({"type": "text"}, None),
])
def test_each_response_format_is_one_constraint(format_, kind):
    constraint = parse({**CHAT, "response_format": format_}).sampling.constraint
    assert (constraint.kind if constraint else None) == kind


def test_tool_choices_constrain_to_a_call():
    named = parse({**CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "add"}}})
    assert named.tool_choice.mode == "function" and orjson.loads(named.sampling.constraint.spec)["properties"]["a"]
    required = parse({**CHAT, "tools": TOOLS, "tool_choice": "required"})
    schema = orjson.loads(required.sampling.constraint.spec)
    assert [option["properties"]["name"]["const"] for option in schema["anyOf"]] == ["get_weather", "add"]
    assert parse({**CHAT, "tools": TOOLS}).tool_choice.mode == "auto"
    assert parse({**CHAT, "tools": TOOLS, "tool_choice": "none"}).sampling.constraint is None


@pytest.mark.parametrize("body, problem", [
    ({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs must be an integer from 0 to 20, got 21"),
    ({**CHAT, "logprobs": True, "top_logprobs": "3"}, "top_logprobs must be an integer from 0 to 20"),
    ({**CHAT, "top_logprobs": 3}, "top_logprobs needs logprobs: true"),
    ({**CHAT, "logprobs": 3}, "logprobs must be true or false in a chat request, got 3"),
    ({"prompt": "x", "logprobs": True}, "logprobs must be an integer from 0 to 20 in a completions request"),
    ({"prompt": "x", "logprobs": 21}, "logprobs must be an integer from 0 to 20"),
    ({"prompt": "x", "echo": "yes"}, "echo must be true or false"),
    ({**CHAT, "echo": True}, "echo is a field of /v1/completions requests"),
    ({"prompt": "x", "tools": TOOLS}, "tools is a field of /v1/chat/completions requests"),
    ({**CHAT, "presence_penalty": 2.5}, "presence_penalty must be a number in [-2, 2], got 2.5"),
    ({**CHAT, "frequency_penalty": "high"}, "frequency_penalty must be a number in [-2, 2]"),
    ({**CHAT, "repetition_penalty": 0}, "repetition_penalty must be a number in (0, 10]"),
    ({**CHAT, "logit_bias": {"5": 101}}, "logit_bias[5] must be a number in [-100, 100], got 101"),
    ({**CHAT, "logit_bias": {"tok": 1}}, "logit_bias keys must be token ids"),
    ({**CHAT, "logit_bias": [1, 2]}, "logit_bias must be an object"),
    ({**CHAT, "min_tokens": -1}, "min_tokens must be an integer from 0 to max_tokens"),
    ({**CHAT, "min_tokens": 9, "max_tokens": 4}, "min_tokens must be an integer from 0 to max_tokens (4), got 9"),
    ({**CHAT, "response_format": {"type": "xml"}}, "response_format.type must be one of"),
    ({**CHAT, "response_format": {"type": "json_schema"}}, "response_format.json_schema must be an object"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}},
     "response_format: the JSON schema does not compile"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
     "response_format: the JSON schema does not compile"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": "object"}}},
     "response_format.json_schema.schema must be a JSON schema object"),
    ({**CHAT, "response_format": {"type": "regex", "regex": "(ab"}}, "response_format: the regex does not compile"),
    ({**CHAT, "response_format": {"type": "grammar", "grammar": "root ::= missing"}},
     "response_format: the grammar does not compile"),
    ({**CHAT, "response_format": {"type": "choice", "choices": []}}, "response_format.choices must be a list"),
    ({**CHAT, "tools": [{"type": "function"}]}, "tools[0] must be"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name must be"),
    ({**CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice names function 'nope', which is not among tools"),
    ({**CHAT, "tool_choice": "required"}, "tool_choice 'required' needs tools"),
    ({**CHAT, "tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "both constrain the output"),
])
def test_bad_values_are_a_400_naming_the_field_and_the_line(body, problem):
    url = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    with pytest.raises(LineError) as caught:
        parse(body, url)
    assert problem in str(caught.value) and str(caught.value).startswith("line 4:")


def finished(kind: RequestKind, text: str, token_ids: list[int], **fields) -> RequestFinished:
    texts = {str(t): TokenText(f"<{t}>", list(f"<{t}>".encode())) for t in range(100)}
    return RequestFinished("r", kind, text, "stop", 3, len(token_ids), token_ids, token_texts=texts, **fields)


def entries(token_ids: list[int], top: int) -> list[TokenLogprobs]:
    return [TokenLogprobs(-0.5 * (i + 1), list(range(top)), [-0.1 * (k + 1) for k in range(top)])
            for i, _ in enumerate(token_ids)]


def test_chat_logprobs_and_tool_calls_are_valid_openai_objects():
    from openai.types.chat import ChatCompletion

    item = parse({**CHAT, "logprobs": True, "top_logprobs": 2})
    body = response_body(item, [finished(RequestKind.CHAT, "ab", [10, 11], logprobs=entries([10, 11], 2))], "m")
    parsed = ChatCompletion.model_validate(body)
    content = parsed.choices[0].logprobs.content
    assert [c.token for c in content] == ["<10>", "<11>"] and content[1].logprob == -1.0
    assert [t.token for t in content[0].top_logprobs] == ["<0>", "<1>"] and content[0].bytes == list(b"<10>")

    tool = parse({**CHAT, "tools": TOOLS, "tool_choice": "required"})
    call_text = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    body = response_body(tool, [finished(RequestKind.CHAT, call_text, [1, 2])], "m")
    parsed = ChatCompletion.model_validate(body)
    (call,) = parsed.choices[0].message.tool_calls
    assert call.function.name == "add" and orjson.loads(call.function.arguments) == {"a": 1, "b": 2}
    assert parsed.choices[0].finish_reason == "tool_calls" and parsed.choices[0].message.content is None

    named = parse({**CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    body = response_body(named, [finished(RequestKind.CHAT, '{"city": "Oslo"}', [1])], "m")
    call = ChatCompletion.model_validate(body).choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and call.function.arguments == '{"city": "Oslo"}'

    cut = response_body(named, [RequestFinished("r", RequestKind.CHAT, '{"ci', "length", 3, 2, [1, 2])], "m")
    assert cut["choices"][0]["message"] == {"role": "assistant", "content": '{"ci'}  # cut before the call was whole
    assert cut["choices"][0]["finish_reason"] == "length"


def test_completion_logprobs_with_echo_are_valid_openai_objects():
    from openai.types import Completion

    item = completion({"prompt": "PQ", "logprobs": 1, "echo": True})
    prompt_entries = [None, *entries([21], 1)]
    body = response_body(item, [finished(RequestKind.COMPLETION, "ab", [10, 11], logprobs=entries([10, 11], 1),
                                         prompt_token_ids=[20, 21], prompt_logprobs=prompt_entries)], "m")
    # The first prompt token has no log-probability: null, as the OpenAI API gives it, which the
    # package's model types leave out; every other field validates as it is.
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    strict = orjson.loads(orjson.dumps(body))
    strict["choices"][0]["logprobs"]["token_logprobs"][0] = 0.0
    strict["choices"][0]["logprobs"]["top_logprobs"][0] = {}
    Completion.model_validate(strict)
    choice = Completion.model_validate(strict).choices[0]
    assert choice.text == "PQab"
    assert choice.logprobs.tokens == ["<20>", "<21>", "<10>", "<11>"]
    assert logprobs["token_logprobs"] == [None, -0.5, -0.5, -1.0]
    assert logprobs["top_logprobs"] == [None, {"<0>": -0.1}, {"<0>": -0.1}, {"<0>": -0.1}]
    assert choice.logprobs.text_offset == [0, 4, 8, 12]
