"""The parts of an OpenAI response a finished request's extras make: log-probabilities in the chat
and the completions shapes (with the prompt's, for echo), and a tool call read from the output
(pure: the token texts come with the result)."""

from __future__ import annotations

import re
import secrets

import orjson

from seesaw.frontend.structured import ToolChoice
from seesaw.messages import RequestFinished
from seesaw.step import TokenLogprobs

_TAGGED_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


def chat_logprobs(result: RequestFinished) -> dict | None:
    """`choices[].logprobs` of a chat completion: each output token with its bytes, its
    log-probability and its top alternatives."""
    if result.logprobs is None:
        return None
    content = []
    for token_id, entry in zip(result.token_ids, result.logprobs):
        top = [_chat_token(result, top_id, value) for top_id, value in zip(entry.top_ids, entry.top_logprobs)]
        content.append({**_chat_token(result, token_id, entry.logprob), "top_logprobs": top})
    return {"content": content, "refusal": None}


def _chat_token(result: RequestFinished, token_id: int, logprob: float) -> dict:
    piece = result.token_texts.get(str(token_id))
    text, raw = (piece.text, piece.bytes) if piece is not None else ("", [])
    return {"token": text, "logprob": logprob, "bytes": raw}


def completion_logprobs(result: RequestFinished, echo: bool) -> dict | None:
    """`choices[].logprobs` of a text completion: tokens, their log-probabilities, their top
    alternatives (token text -> log-probability) and where each starts in the text; with `echo`
    the prompt's tokens come first, the very first without a log-probability."""
    if result.logprobs is None and not (echo and result.prompt_logprobs is not None):
        return None
    pairs: list[tuple[int, TokenLogprobs | None]] = []
    if echo and result.prompt_token_ids is not None:
        pairs += list(zip(result.prompt_token_ids, result.prompt_logprobs or [None] * len(result.prompt_token_ids)))
    pairs += list(zip(result.token_ids, result.logprobs or [None] * len(result.token_ids)))
    tokens, values, tops, offsets, offset = [], [], [], [], 0
    for token_id, entry in pairs:
        text = _text(result, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        values.append(None if entry is None else entry.logprob)
        tops.append(None if entry is None else {_text(result, top_id): value
                                                for top_id, value in zip(entry.top_ids, entry.top_logprobs)})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _text(result: RequestFinished, token_id: int) -> str:
    piece = result.token_texts.get(str(token_id))
    return piece.text if piece is not None else ""


def tool_calls(text: str, choice: ToolChoice) -> list[dict] | None:
    """The calls an output makes: a named function's arguments, one {"name", "arguments"} object
    (required, or auto where the output is one), or such objects between <tool_call> tags (auto);
    None where it makes none (or was cut before its call was whole)."""
    if choice.mode == "function":
        return [_call(choice.name, text)] if _is_json(text) else None
    if choice.mode not in ("required", "auto"):
        return None
    found = [match.group(1) for match in _TAGGED_CALL.finditer(text)] or [text]
    calls = []
    for candidate in found:
        call = _parsed(candidate)
        if call is None:
            return None
        calls.append(call)
    return calls


def _parsed(text: str) -> dict | None:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or "arguments" not in value:
        return None
    arguments = value["arguments"]
    return _call(value["name"], arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode())


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _is_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True
