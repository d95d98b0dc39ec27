"""Structured outputs and tools on the default model: for a dozen JSON schemas every greedy and
sampled output parses and validates; json_object, regex, choice and grammar outputs match; a
constrained output cut by max_tokens ends with `length` and its text so far; tool_choice required
and a named function give calls whose arguments validate; auto, which this model's template does
not lay out, is refused; a schema only the engine refuses is a 400. Static and seesaw mode."""

from __future__ import annotations

import re
from dataclasses import replace

import jsonschema
import orjson
import pytest

from helpers import default_config, generate
from seesaw.frontend.batch_io import SamplingDefaults, parse_body, response_body
from seesaw.layout import Layout
from seesaw.messages import RequestKind

pytestmark = pytest.mark.slow
DEFAULTS = SamplingDefaults(max_tokens=96)

SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"]},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                          "maxItems": 3}}, "required": ["id", "tags"]}},
               "required": ["user"]},
    "enums": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "size": {"type": "integer", "enum": [1, 2, 3]}},
              "required": ["color", "size"]},
    "bounds": {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                                "lon": {"type": "number", "minimum": -180, "maximum": 180}},
               "required": ["lat", "lon"]},
    "pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
                "required": ["code"]},
    "order": {"type": "object", "properties": {"lines": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "maxLength": 6},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"]}}}, "required": ["lines"]},
    "nullable": {"type": "object", "properties": {"ok": {"type": "boolean"},
                                                  "note": {"anyOf": [{"type": "string", "maxLength": 10},
                                                                     {"type": "null"}]}},
                 "required": ["ok", "note"]},
    "refs": {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                                  "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                                 "required": ["x", "y"]}},
             "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
             "required": ["start", "end"]},
    "top_array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2,
                  "maxItems": 4},
    "optional": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 20},
                                                  "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                                                  "rating": {"type": "number", "minimum": 0, "maximum": 10}},
                 "required": ["title", "year"]},
    "const": {"type": "object", "properties": {"answer": {"const": "yes"}, "why": {"type": "string", "maxLength": 12}},
              "required": ["answer", "why"]},
    "date": {"type": "object", "properties": {"day": {"type": "string", "pattern": "^2026-(0[1-9]|1[0-2])-[0-3][0-9]$"},
                                              "done": {"type": "boolean"}}, "required": ["day", "done"]},
}
CHOICES = ["positive", "negative", "neutral"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 20},
                                               "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                          "required": ["city", "unit"]}}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": {"type": "object", "properties": {
                                               "a": {"type": "integer"}, "b": {"type": "integer"}},
                                                          "required": ["a", "b"]}}}]


def chat(text: str, **body):
    body = {"messages": [{"role": "user", "content": text}], **body}
    return body


def item_of(body: dict, custom_id: str):
    kind = RequestKind.CHAT if "messages" in body else RequestKind.COMPLETION
    return parse_body(body, kind, custom_id, DEFAULTS)


def run(config, bodies: dict[str, dict]):
    items = {name: item_of(body, name) for name, body in bodies.items()}
    requests = [{"sampling": item.sampling, "messages": item.messages, "prompt": item.prompt, "tools": item.tools,
                 "tool_choice": item.tool_choice.mode} for item in items.values()]
    results = generate(config, requests)
    return {name: (item, result) for (name, item), result in zip(items.items(), results)}


def bodies() -> dict[str, dict]:
    out = {}
    for name, schema in SCHEMAS.items():
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
        out[f"{name}/greedy"] = chat(f"Give an example of {name} data as JSON.", response_format=fmt, temperature=0)
        out[f"{name}/sampled"] = chat(f"Give an example of {name} data as JSON.", response_format=fmt,
                                      temperature=1.0, seed=11)
    out["object"] = chat("Give a JSON object with a cat's name and age.", response_format={"type": "json_object"},
                         temperature=0)
    out["regex"] = {"prompt": "My phone number is", "response_format": {"type": "regex", "regex": r"\d{3}-\d{4}"},
                    "temperature": 1.0, "seed": 5}
    out["choice"] = chat("Is 'I love it' positive, negative or neutral?", temperature=1.0, seed=3,
                         response_format={"type": "choice", "choices": CHOICES})
    out["grammar"] = chat("Is water wet?", temperature=0,
                          response_format={"type": "grammar", "grammar": 'root ::= ("Yes" | "No") ", " [a-z ]+ "."'})
    out["cut"] = chat("List many numbers as JSON.", max_tokens=6, temperature=0,
                      response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {
                          "type": "array", "items": {"type": "integer"}, "minItems": 50}}})
    out["required"] = chat("What is 2 plus 3?", tools=TOOLS, tool_choice="required", temperature=0)
    out["named"] = chat("How warm is Paris?", tools=TOOLS, temperature=0,
                        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    return out


@pytest.mark.parametrize("layout", ["t1", "p2->t2"])
def test_every_constrained_output_parses_and_validates(default_model, layout):
    prefill, _, decode = layout.partition("->")
    config = default_config(prefill)
    if decode:
        config = replace(config, parallel=replace(config.parallel, decode_layout=Layout.parse(decode)))
    results = run(config, bodies())
    for name, (item, result) in results.items():
        assert result.error is None, (name, result.error)
        if name == "cut":
            continue
        assert result.finish_reason == "stop", (name, result.text)
        if "/" in name:
            jsonschema.validate(orjson.loads(result.text), SCHEMAS[name.split("/")[0]])
    assert isinstance(orjson.loads(results["object"][1].text), dict)
    assert re.fullmatch(r"\d{3}-\d{4}", results["regex"][1].text)
    assert results["choice"][1].text in CHOICES
    assert re.fullmatch(r"(Yes|No), [a-z ]+\.", results["grammar"][1].text)
    item, cut = results["cut"]
    assert cut.finish_reason == "length" and cut.text.startswith("[") and len(cut.token_ids) == 6

    for name, function in (("required", None), ("named", "get_weather")):
        item, result = results[name]
        body = response_body(item, [result], "m")
        from openai.types.chat import ChatCompletion

        choice = ChatCompletion.model_validate(body).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert function is None or call.function.name == function
        (tool,) = [t["function"] for t in TOOLS if t["function"]["name"] == call.function.name]
        jsonschema.validate(orjson.loads(call.function.arguments), tool["parameters"])


def test_refusals_name_the_problem(default_model):
    """tool_choice auto with a template that lays out no tools, and a bias past the vocabulary,
    are refused by the engine with 400s naming them; the other requests run."""
    results = run(default_config("t1"), {
        "auto": chat("Weather in Oslo?", tools=TOOLS),
        "bias": chat("Hi", logit_bias={"49152": 5}, max_tokens=2),
        "fine": chat("Hi", max_tokens=2, logprobs=True, top_logprobs=2),
    })
    assert "tool_choice auto needs a chat template that lays out tools" in results["auto"][1].error
    assert results["bias"][1].status_code == 400
    assert "logit_bias names token 49152, outside the model's vocabulary" in results["bias"][1].error
    assert results["fine"][1].error is None and len(results["fine"][1].logprobs) == 2
