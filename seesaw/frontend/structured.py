"""What a body asks its output to be: `response_format` (JSON, a JSON schema, and this engine's
regex, choice and grammar types) and `tools` with `tool_choice`, as the one Constraint the
scheduler's grammar engine compiles (pure: no tokenizer, no engine).

response_format:
    {"type": "text"}                                    no constraint
    {"type": "json_object"}                             any JSON object
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}
    {"type": "regex", "regex": "..."}                   the whole output matches the expression
    {"type": "choice", "choices": ["yes", "no", ...]}   the output is one of the strings
    {"type": "grammar", "grammar": "..."}               a Lark grammar (from `start`) or a GBNF one (from `root`)

tool_choice (with `tools`): "none" (the tools are shown, nothing is constrained), "required" (the
output is one call of one of the tools, as {"name": ..., "arguments": {...}}), a named function
({"type": "function", "function": {"name": ...}}: the output is that function's arguments) or
"auto" (where the chat template lays out tools and how a call looks).

As in OpenAI's strict mode, an object schema that does not say whether it takes properties beyond
its own takes none: the output holds the properties the schema names, and ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

from seesaw.sampling import Constraint
from seesaw.scheduling.grammars import GrammarError, check_constraint

MAX_SPEC_CHARS = 1 << 20  # a schema, expression or grammar, as text
MAX_TOOLS = 128
MAX_CHOICES = 1024


@dataclass(frozen=True)
class ToolChoice:
    """How a chat's tools are used: `mode` is none, auto, required or function (`name` then)."""

    mode: str
    name: str | None = None

    @property
    def makes_calls(self) -> bool:
        """Whether the output is read as a tool call (and constrained to one)."""
        return self.mode in ("required", "function")


def response_constraint(value) -> Constraint | None:
    """The constraint of a body's `response_format` (None: plain text), compiled once without a
    tokenizer to find what the grammar engine refuses; ValueError names the problem."""
    constraint = _response_constraint(value)
    if constraint is not None:
        try:
            check_constraint(constraint)
        except GrammarError as error:
            raise ValueError(f"response_format: {error}") from None
    return constraint


def _response_constraint(value) -> Constraint | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("response_format must be an object with a type")
    kind = value.get("type")
    match kind:
        case "text":
            return None
        case "json_object":
            return Constraint("json_object")
        case "json_schema":
            holder = value.get("json_schema")
            if not isinstance(holder, dict):
                raise ValueError("response_format.json_schema must be an object holding a schema")
            schema = holder.get("schema", {})
            return Constraint("json_schema", _schema_text(closed(schema), "response_format.json_schema.schema"))
        case "regex":
            return Constraint("regex", _regex(value.get("regex")))
        case "choice":
            return Constraint("choice", _choices(value.get("choices")))
        case "grammar":
            grammar = value.get("grammar")
            if not isinstance(grammar, str) or not grammar.strip() or len(grammar) > MAX_SPEC_CHARS:
                raise ValueError("response_format.grammar must be a non-empty Lark or GBNF grammar")
            return Constraint("grammar", grammar)
        case _:
            raise ValueError(f"response_format.type must be one of text, json_object, json_schema, regex, choice, "
                             f"grammar; got {kind!r}")


def check_tools(tools) -> list[dict] | None:
    """A chat's `tools`, each a function with a name and a parameters schema; ValueError names the bad one."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not tools or len(tools) > MAX_TOOLS:
        raise ValueError(f"tools must be a list of 1 to {MAX_TOOLS} functions")
    names = set()
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise ValueError(f"tools[{index}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ValueError(f"tools[{index}].function.name must be 1 to 64 letters, digits, _ . or -; got {name!r}")
        if name in names:
            raise ValueError(f"tools[{index}].function.name {name!r} repeats an earlier tool's")
        names.add(name)
        _schema_text(function.get("parameters", {"type": "object"}), f"tools[{index}].function.parameters")
    return tools


def tool_choice(value, tools: list[dict] | None) -> ToolChoice:
    """A body's `tool_choice` (default: auto with tools, none without); ValueError names the problem."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if value in ("none", "auto", "required"):
        if value != "none" and not tools:
            raise ValueError(f"tool_choice {value!r} needs tools")
        return ToolChoice(value)
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ValueError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                         '{"name": ...}}')
    if name not in [tool["function"]["name"] for tool in tools or ()]:
        raise ValueError(f"tool_choice names function {name!r}, which is not among tools")
    return ToolChoice("function", name)


def tool_constraint(tools: list[dict], choice: ToolChoice) -> Constraint | None:
    """What a call must look like: a named function's arguments, or one of the tools as
    {"name": ..., "arguments": ...}."""
    if choice.mode == "function":
        (function,) = [tool["function"] for tool in tools if tool["function"]["name"] == choice.name]
        return _checked_tool_schema(_schema_text(closed(function.get("parameters", {"type": "object"})), "parameters"))
    if choice.mode != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"const": tool["function"]["name"]},
                                               "arguments": closed(tool["function"].get("parameters",
                                                                                        {"type": "object"}))},
              "required": ["name", "arguments"], "additionalProperties": False} for tool in tools]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return _checked_tool_schema(orjson.dumps(schema).decode())


def _checked_tool_schema(text: str) -> Constraint:
    constraint = Constraint("json_schema", text)
    try:
        check_constraint(constraint)
    except GrammarError as error:
        raise ValueError(f"tools: a function's parameters: {error}") from None
    return constraint


def closed(schema):
    """The schema with `additionalProperties: false` on every object schema in it that does not set it."""
    if isinstance(schema, list):
        return [closed(part) for part in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) if key in _SUBSCHEMAS else value for key, value in schema.items()}
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            out[key] = {name: closed(value) for name, value in schema[key].items()}
    is_object = schema.get("type") == "object" or "properties" in schema
    if is_object and "additionalProperties" not in schema and "patternProperties" not in schema:
        out["additionalProperties"] = False
    return out


_SUBSCHEMAS = ("items", "prefixItems", "anyOf", "oneOf", "allOf", "additionalProperties", "contains", "not")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def _schema_text(schema, where: str) -> str:
    if isinstance(schema, bool):
        schema = {} if schema else None
    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be a JSON schema object")
    text = orjson.dumps(schema).decode()
    if len(text) > MAX_SPEC_CHARS:
        raise ValueError(f"{where} is {len(text)} characters; at most {MAX_SPEC_CHARS}")
    return text


def _regex(value) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_SPEC_CHARS:
        raise ValueError("response_format.regex must be a non-empty regular expression")
    return value


def _choices(value) -> str:
    if (not isinstance(value, list) or not 0 < len(value) <= MAX_CHOICES
            or not all(isinstance(choice, str) and choice for choice in value)):
        raise ValueError(f"response_format.choices must be a list of 1 to {MAX_CHOICES} non-empty strings")
    return orjson.dumps(value).decode()
