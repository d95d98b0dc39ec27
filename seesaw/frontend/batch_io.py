"""Batch file lines in, OpenAI batch output lines out (pure: no I/O, no engine).

Input: OpenAI batch lines (`custom_id`, `method`, `url`, `body`) for `/v1/chat/completions` and
`/v1/completions`, or simple lines (`{"prompt": ...}` / `{"messages": [...]}` with an optional
`id` and sampling fields).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from seesaw.frontend.choices import check_n, mixed_seed
from seesaw.frontend.response_parts import chat_logprobs, completion_logprobs, tool_calls
from seesaw.frontend.structured import ToolChoice, check_tools, response_constraint, tool_choice, tool_constraint
from seesaw.messages import RequestFinished, RequestKind
from seesaw.sampling import MAX_TOP_LOGPROBS, SamplingParams
from seesaw.text import normalize_messages

CHAT_URL = "/v1/chat/completions"
COMPLETION_URL = "/v1/completions"
_UNSUPPORTED = ("suffix", "best_of", "min_p")
_CHAT_ONLY = ("top_logprobs", "tools", "tool_choice")
_COMPLETION_ONLY = ("echo",)


@dataclass(frozen=True)
class SamplingDefaults:
    """What a line gets for the sampling fields it leaves out."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0  # the run's seed: a line without one gets a seed derived from this and its custom_id


def derived_seed(run_seed: int, custom_id: str) -> int:
    """The sampling seed of a line that sets none: the same in every run (and every resumed run)
    with the same --seed, and independent of what else the line is batched with."""
    return mixed_seed(run_seed, custom_id)


@dataclass(frozen=True)
class BatchItem:
    """One runnable input line."""

    line_number: int
    custom_id: str
    kind: RequestKind
    sampling: SamplingParams
    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_token_ids: list[int] | None = None
    model: str | None = None
    n: int = 1  # choices to generate, each its own engine request
    echo: bool = False  # a completion's text (and log-probabilities) begin with its prompt's
    tools: list[dict] | None = None
    tool_choice: ToolChoice = ToolChoice("none")


@dataclass
class LineError(ValueError):
    """A line that cannot run; it still gets its own output line (under `line-N` when the line's
    own custom_id cannot be read)."""

    line_number: int
    custom_id: str
    message: str = field(default="")

    def __str__(self) -> str:
        return f"line {self.line_number}: {self.message}"


def parse_line(text: str | bytes, line_number: int, defaults: SamplingDefaults) -> BatchItem:
    """Parse one input line; LineError names the problem and the line number."""
    try:
        record = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise LineError(line_number, f"line-{line_number}", f"not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise LineError(line_number, f"line-{line_number}", "a line must be a JSON object")
    is_openai = "body" in record or "url" in record
    custom_id = record.get("custom_id") if is_openai else record.get("id", record.get("custom_id"))
    if custom_id is None:
        custom_id = f"line-{line_number}"
    elif not isinstance(custom_id, (str, int)):
        raise LineError(line_number, f"line-{line_number}", "custom_id must be a string")
    custom_id = str(custom_id)
    try:
        if is_openai:
            return _parse_openai(record, line_number, custom_id, defaults)
        return parse_body(record, _simple_kind(record), custom_id, defaults, line_number)
    except ValueError as error:
        raise LineError(line_number, custom_id, str(error)) from None


def _parse_openai(record: dict, line_number: int, custom_id: str, defaults: SamplingDefaults) -> BatchItem:
    method = record.get("method", "POST")
    if method != "POST":
        raise ValueError(f"method must be POST, got {method!r}")
    url = record.get("url")
    if url not in (CHAT_URL, COMPLETION_URL):
        raise ValueError(f"unknown url {url!r}; supported: {CHAT_URL}, {COMPLETION_URL}")
    body = record.get("body")
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    kind = RequestKind.CHAT if url == CHAT_URL else RequestKind.COMPLETION
    if kind == "chat" and "messages" not in body:
        raise ValueError(f"body of a {CHAT_URL} request needs messages")
    if kind == "completion" and "prompt" not in body:
        raise ValueError(f"body of a {COMPLETION_URL} request needs prompt")
    return parse_body(body, kind, custom_id, defaults, line_number)


def _simple_kind(record: dict) -> RequestKind:
    if "messages" in record:
        return RequestKind.CHAT
    if "prompt" in record:
        return RequestKind.COMPLETION
    raise ValueError("the line has no prompt: give prompt, messages, or an OpenAI batch body")


def parse_body(body: dict, kind: RequestKind, custom_id: str, defaults: SamplingDefaults, line_number: int = 0,
               derive_seed: bool = True) -> BatchItem:
    """One OpenAI request body as a runnable item; ValueError names the first bad field. Without a
    seed in the body, the item samples with one derived from `custom_id` (or, without
    `derive_seed`, with none: a fresh random stream)."""
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, False, 0, 1 if name == "best_of" else 0):
            raise ValueError(f"{name} is not supported")
    for name in _CHAT_ONLY if kind != "chat" else _COMPLETION_ONLY:
        if body.get(name) not in (None, False):
            raise ValueError(f"{name} is a field of {CHAT_URL if kind != 'chat' else COMPLETION_URL} requests")
    if body.get("stream"):
        raise ValueError("stream is not supported in a batch")
    n = check_n(body.get("n"))
    prompt, token_ids, messages = None, None, None
    if kind == "chat":
        messages = normalize_messages(body.get("messages"))  # checked and flattened once, here
    else:
        prompt, token_ids = _prompt(body.get("prompt"))
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise ValueError(f"echo must be true or false, got {echo!r}")
    tools = check_tools(body.get("tools"))
    choice = tool_choice(body.get("tool_choice"), tools)
    constraint = response_constraint(body.get("response_format"))
    if tools and choice.makes_calls:
        if constraint is not None:
            raise ValueError("response_format and a tool_choice that calls a function both constrain the output; "
                             "give one")
        constraint = tool_constraint(tools, choice)
    model = body.get("model")
    logprobs = _logprobs(body, kind)
    return BatchItem(
        line_number=line_number,
        custom_id=custom_id,
        kind=kind,
        sampling=_sampling(body, defaults, custom_id if derive_seed else None, logprobs,
                           logprobs if echo else None, constraint),
        prompt=prompt,
        messages=messages,
        prompt_token_ids=token_ids,
        model=model if isinstance(model, str) else None,
        n=n,
        echo=echo,
        tools=tools,
        tool_choice=choice,
    )


def _logprobs(body: dict, kind: RequestKind) -> int | None:
    """How many top alternatives each output token reports (None: no log-probabilities): a chat's
    `logprobs: true` with `top_logprobs`, a completion's `logprobs: k`."""
    value = body.get("logprobs")
    if kind == "chat":
        top = body.get("top_logprobs")
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"logprobs must be true or false in a chat request, got {value!r}")
        if top is not None and (not isinstance(top, int) or isinstance(top, bool)
                                or not 0 <= top <= MAX_TOP_LOGPROBS):
            raise ValueError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}")
        if top is not None and not value:
            raise ValueError("top_logprobs needs logprobs: true")
        return (top or 0) if value else None
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ValueError(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS} in a completions request "
                         f"(top alternatives per token), got {value!r}")
    return value


def _prompt(value) -> tuple[str | None, list[int] | None]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a one-element batch of prompts
    if isinstance(value, str):
        if not value:
            raise ValueError("prompt is empty")
        return value, None
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return None, value
    raise ValueError("prompt must be a non-empty string or a list of token ids")


def _sampling(body: dict, defaults: SamplingDefaults, custom_id: str | None, logprobs: int | None,
              prompt_logprobs: int | None, constraint) -> SamplingParams:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    seed = body.get("seed")
    return SamplingParams(
        max_tokens=defaults.max_tokens if max_tokens is None else max_tokens,
        fit_max_tokens=max_tokens is None,
        temperature=_default(body.get("temperature"), defaults.temperature),
        top_p=_default(body.get("top_p"), defaults.top_p),
        top_k=_top_k(body.get("top_k"), defaults.top_k),
        seed=derived_seed(defaults.seed, custom_id) if seed is None and custom_id is not None else seed,
        stop=[] if stop is None else stop,
        stop_token_ids=_default(body.get("stop_token_ids"), []),
        ignore_eos=_default(body.get("ignore_eos"), False),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        presence_penalty=_default(body.get("presence_penalty"), 0.0),
        frequency_penalty=_default(body.get("frequency_penalty"), 0.0),
        repetition_penalty=_default(body.get("repetition_penalty"), 1.0),
        logit_bias=_default(body.get("logit_bias"), {}),
        min_tokens=_default(body.get("min_tokens"), 0),
        constraint=constraint,
    )


def _default(value, default):
    return default if value is None else value


def _top_k(value, default: int):
    # vLLM spells "no top-k" as -1; accept it.
    if value == -1:
        return 0
    return default if value is None else value


def result_line(item: BatchItem, results: Sequence[RequestFinished], model: str) -> dict:
    """The OpenAI batch output line of a finished request: `results` holds its choices in order."""
    body = response_body(item, results, model)
    return {
        "id": f"batch_req_{secrets.token_hex(12)}",
        "custom_id": item.custom_id,
        "response": {"status_code": 200, "request_id": body["id"], "body": body},
        "error": None,
    }


def response_body(item: BatchItem, results: Sequence[RequestFinished], model: str) -> dict:
    """The OpenAI chat.completion or text_completion object of a finished request whose choices,
    in order, are `results` (one engine request each, all of the same prompt): the prompt's tokens
    count once in `usage`, the choices' tokens add up."""
    if item.kind == "chat":
        choices = [_chat_choice(item, index, result) for index, result in enumerate(results)]
        obj, prefix = "chat.completion", "chatcmpl"
    else:
        choices = [{"index": index, "text": (item.prompt or "") + result.text if item.echo else result.text,
                    "logprobs": completion_logprobs(result, item.echo), "finish_reason": result.finish_reason}
                   for index, result in enumerate(results)]
        obj, prefix = "text_completion", "cmpl"
    prompt_tokens = results[0].prompt_tokens
    completion_tokens = sum(result.completion_tokens for result in results)
    return {
        "id": f"{prefix}-{secrets.token_hex(12)}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _chat_choice(item: BatchItem, index: int, result: RequestFinished) -> dict:
    """One chat choice: the assistant's text, or the tool calls it makes (finish_reason tool_calls
    once a call is whole)."""
    message = {"role": "assistant", "content": result.text}
    finish_reason = result.finish_reason
    calls = tool_calls(result.text, item.tool_choice) if item.tools else None
    if calls:
        message = {"role": "assistant", "content": None, "tool_calls": calls}
        if finish_reason == "stop":
            finish_reason = "tool_calls"
    return {"index": index, "message": message, "logprobs": chat_logprobs(result), "finish_reason": finish_reason}


DUPLICATE_CODE = "duplicate_custom_id"  # the error code of a line that repeats an earlier line's custom_id


def error_line(custom_id: str | None, line_number: int, message: str, status_code: int = 400,
               code: str | None = None) -> dict:
    """The output line of a request that could not run; the message names the input line."""
    text = f"line {line_number}: {message}"
    kind = "invalid_request_error" if status_code == 400 else "server_error"
    code = code or ("invalid_request" if status_code == 400 else "server_error")
    return {
        "id": f"batch_req_{secrets.token_hex(12)}",
        "custom_id": custom_id,
        "response": {
            "status_code": status_code,
            "request_id": None,
            "body": {"error": {"message": text, "type": kind, "param": None, "code": None}},
        },
        "error": {"code": code, "message": text},
    }
