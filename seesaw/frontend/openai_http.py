"""The OpenAI HTTP API's shapes (pure: no sockets, no engine): request bodies checked field by
field, errors in OpenAI's error object, and the chunks of a streamed answer."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import orjson

from seesaw.frontend.batch_io import CHAT_URL, COMPLETION_URL, BatchItem, SamplingDefaults, parse_body, response_body
from seesaw.messages import ErrorCode, RequestFinished, RequestKind

ENDPOINTS = {CHAT_URL: RequestKind.CHAT, COMPLETION_URL: RequestKind.COMPLETION}
# Every top-level field a body may carry; the batch reader decides which values it can run
# (and names a field it does not support), so a field it takes is listed here too.
_COMMON_FIELDS = {
    "model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
    "n", "stream", "stream_options", "user", "logprobs", "top_logprobs", "logit_bias", "presence_penalty",
    "frequency_penalty", "response_format", "min_p", "repetition_penalty", "min_tokens", "metadata", "store",
}
BODY_FIELDS = {
    RequestKind.CHAT: _COMMON_FIELDS | {"messages", "max_completion_tokens", "tools", "tool_choice",
                                        "parallel_tool_calls"},
    RequestKind.COMPLETION: _COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"},
}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                408: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "server_error"}
_CODE_STATUS = {ErrorCode.INVALID_REQUEST: 400, ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
                ErrorCode.ENGINE_FAILED: 500, ErrorCode.SERVER_ERROR: 500}


class ApiError(Exception):
    """A request the API answers with an error: its HTTP status, message, code, the field it
    names (`param`) and, for 429 and 503, when to try again."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after_s = retry_after_s

    @property
    def body(self) -> dict:
        return error_body(self.status, self.message, self.code, self.param)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error object."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def result_error(result: RequestFinished) -> ApiError:
    """The error a failed request answers with."""
    code = result.code or ErrorCode.SERVER_ERROR
    return ApiError(_CODE_STATUS.get(code, 500), result.error or "the request failed", str(code))


@dataclass(frozen=True)
class ApiRequest:
    """A chat or completions request as the API took it."""

    item: BatchItem
    stream: bool
    include_usage: bool  # streamed: send a last chunk with the usage


def parse_request(raw: bytes, kind: RequestKind, defaults: SamplingDefaults) -> ApiRequest:
    """One chat or completions request body; ApiError (400) names the first bad field."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise ApiError(400, f"the body is not valid JSON ({error})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - BODY_FIELDS[kind])
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r} in the body", param=unknown[0])
    needed = "messages" if kind == RequestKind.CHAT else "prompt"
    if needed not in body:
        raise ApiError(400, f"the body needs {needed}", param=needed)
    stream, options = body.pop("stream", False), body.pop("stream_options", None)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", param="stream")
    include_usage = _include_usage(options, stream)
    for name in ("user", "metadata", "store"):
        body.pop(name, None)  # labels for the caller's books; nothing to run
    try:
        item = parse_body(body, kind, "request", defaults, derive_seed=False)
    except (ValueError, TypeError) as error:
        raise ApiError(400, str(error), param=_field_named(str(error), body)) from None
    return ApiRequest(item, stream, include_usage)


def _include_usage(options, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise ApiError(400, "stream_options is only allowed with stream true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise ApiError(400, "stream_options must be an object with include_usage", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "stream_options.include_usage must be true or false", param="stream_options")
    return include_usage


def _field_named(message: str, body: dict) -> str | None:
    """The body field an error message starts with, if any."""
    name = message.split(" ", 1)[0]
    return name if name in body else None


class StreamChunks:
    """The chunks of one streamed answer: `chat.completion.chunk` or streamed `text_completion`
    objects sharing one id, each choice's text as it grows, its finish, and the usage. A choice's
    log-probabilities come whole in its finishing chunk (a client joins them across chunks), and
    a tool call, whose text is not streamed, comes whole there too."""

    def __init__(self, item: BatchItem, model: str, include_usage: bool):
        kind = item.kind
        self.item, self.kind, self.model, self.include_usage = item, kind, model, include_usage
        self.streams_text = not (item.tools and item.tool_choice.makes_calls) and not item.echo
        is_chat = kind == RequestKind.CHAT
        self.id = f"{'chatcmpl' if is_chat else 'cmpl'}-{secrets.token_hex(12)}"
        self.object = "chat.completion.chunk" if is_chat else "text_completion"
        self.created = int(time.time())

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        chunk = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                 "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage
        return chunk

    def _choice(self, index: int, text: str | None, finish_reason: str | None, role: bool = False) -> dict:
        if self.kind != RequestKind.CHAT:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        delta = {} if text is None else {"content": text}
        if role:
            delta = {"role": "assistant", **delta}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def start(self, num_choices: int) -> dict | None:
        """A chat answer's first chunk (each choice's role); completions have none."""
        if self.kind != RequestKind.CHAT:
            return None
        return self._chunk([self._choice(index, "", None, role=True) for index in range(num_choices)])

    def text(self, index: int, text: str) -> dict:
        return self._chunk([self._choice(index, text, None)])

    def finish(self, answer: list[RequestFinished]) -> list[dict]:
        """The closing chunks: each choice's finish reason (with its log-probabilities, and its
        text where it was not streamed), then the usage if asked for."""
        whole = response_body(self.item, answer, self.model)["choices"]
        chunks = [self._chunk([self._closing(index, choice)]) for index, choice in enumerate(whole)]
        if self.include_usage:
            prompt_tokens = answer[0].prompt_tokens
            completion_tokens = sum(result.completion_tokens for result in answer)
            chunks.append(self._chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                           "total_tokens": prompt_tokens + completion_tokens}))
        return chunks

    def _closing(self, index: int, choice: dict) -> dict:
        closing = self._choice(index, None, choice["finish_reason"])
        closing["logprobs"] = choice["logprobs"]
        if self.kind != RequestKind.CHAT:
            closing["text"] = "" if self.streams_text else choice["text"]
        elif not self.streams_text:
            message = choice["message"]
            closing["delta"] = {key: value for key, value in message.items() if key != "role" and value is not None}
            if "tool_calls" in closing["delta"]:
                closing["delta"]["tool_calls"] = [{"index": place, **call}
                                                  for place, call in enumerate(message["tool_calls"])]
        return closing


def sse(data: dict | str) -> bytes:
    """One server-sent event carrying `data` (JSON, or the literal `[DONE]`)."""
    payload = data.encode() if isinstance(data, str) else orjson.dumps(data)
    return b"data: " + payload + b"\n\n"
