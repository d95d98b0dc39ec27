"""The daemon's wire protocol, version 1 (docs/protocol.md): client frames checked against the
schema and turned into calls, and the frames the server answers with (pure: no sockets)."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from seesaw.protocol_terms import BUSY, CHAT, COMPLETIONS, SHUTTING_DOWN, UNSUPPORTED_VERSION, VERSION
from seesaw.frontend.batch_io import BatchItem, SamplingDefaults, parse_body, response_body
from seesaw.messages import ErrorCode, RequestFinished, RequestKind

MAX_LABEL_CHARS = 256
MAX_INLINE_LINES = 100_000
KINDS = {CHAT: RequestKind.CHAT, COMPLETIONS: RequestKind.COMPLETION}  # what each endpoint asks of the engine
_STATUS = {BUSY: 429, SHUTTING_DOWN: 503, ErrorCode.ENGINE_FAILED: 500, ErrorCode.SERVER_ERROR: 500}


class ProtocolError(ValueError):
    """A frame the server cannot take; `label` is the client's id when it could be read."""

    def __init__(self, message: str, label: str | None = None, code: str = ErrorCode.INVALID_REQUEST):
        super().__init__(message)
        self.message, self.label, self.code = message, label, code


@dataclass(frozen=True)
class SubmitCall:
    label: str
    item: BatchItem
    stream: bool


@dataclass(frozen=True)
class BatchCall:
    label: str
    path: str | None
    lines: list[str] | None
    max_pending: int | None


@dataclass(frozen=True)
class CancelCall:
    label: str | None
    job_id: str | None


@dataclass(frozen=True)
class JobStatusCall:
    label: str
    job_id: str


@dataclass(frozen=True)
class StatsCall:
    label: str


Call = SubmitCall | BatchCall | CancelCall | JobStatusCall | StatsCall


def parse_frames(frames: list[bytes], defaults: SamplingDefaults) -> Call:
    """The call one client message makes (the frames after the ROUTER's identity); ProtocolError
    names what is wrong."""
    if len(frames) == 2 and not frames[0]:
        frames = frames[1:]  # a REQ-style empty delimiter
    if len(frames) != 1:
        raise ProtocolError(f"a message is one frame (after an optional empty delimiter), got {len(frames)}")
    try:
        record = orjson.loads(frames[0])
    except orjson.JSONDecodeError as error:
        raise ProtocolError(f"the frame is not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise ProtocolError("a message must be a JSON object")
    label = _label(record)
    if record.get("v") != VERSION:
        raise ProtocolError(f"v must be {VERSION}, got {record.get('v')!r}", label, UNSUPPORTED_VERSION)
    kind = record.get("type")
    try:
        match kind:
            case "submit":
                return _submit(record, _required(label), defaults)
            case "batch":
                return _batch(record, _required(label))
            case "cancel":
                job_id = _optional_string(record, "job_id")
                if label is None and job_id is None:
                    raise ValueError("cancel needs the id of a request or batch, or a job_id")
                return CancelCall(label, job_id)
            case "job_status":
                job_id = _optional_string(record, "job_id")
                if job_id is None:
                    raise ValueError("job_status needs a job_id")
                return JobStatusCall(_required(label), job_id)
            case "stats":
                return StatsCall(_required(label))
            case _:
                raise ValueError(f"unknown type {kind!r}; one of submit, batch, cancel, job_status, stats")
    except ProtocolError:
        raise
    except ValueError as error:
        raise ProtocolError(str(error), label) from None


def _label(record: dict) -> str | None:
    label = record.get("id")
    if label is None:
        return None
    if not isinstance(label, str) or not 0 < len(label) <= MAX_LABEL_CHARS:
        raise ProtocolError(f"id must be a string of 1 to {MAX_LABEL_CHARS} characters")
    return label


def _required(label: str | None) -> str:
    if label is None:
        raise ValueError("id is required")
    return label


def _optional_string(record: dict, name: str) -> str | None:
    value = record.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value


def _submit(record: dict, label: str, defaults: SamplingDefaults) -> SubmitCall:
    endpoint = record.get("endpoint")
    if endpoint not in KINDS:
        raise ValueError(f"endpoint must be one of {', '.join(KINDS)}, got {endpoint!r}")
    body = record.get("body")
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    stream = record.get("stream", False)
    body_stream = body.get("stream", False)
    if not isinstance(stream, bool) or not isinstance(body_stream, bool):
        raise ValueError("stream must be true or false")
    kind = KINDS[endpoint]
    needed = "messages" if kind == RequestKind.CHAT else "prompt"
    if needed not in body:
        raise ValueError(f"body of a {endpoint} request needs {needed}")
    item = parse_body({**body, "stream": None}, kind, label, defaults, derive_seed=False)
    return SubmitCall(label, item, stream or body_stream)


def _batch(record: dict, label: str) -> BatchCall:
    path, lines = record.get("path"), record.get("lines")
    if (path is None) == (lines is None):
        raise ValueError("batch needs either path or lines")
    if path is not None and (not isinstance(path, str) or not path):
        raise ValueError("path must be a non-empty string")
    if lines is not None:
        if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
            raise ValueError("lines must be a list of strings")
        if len(lines) > MAX_INLINE_LINES:
            raise ValueError(f"lines holds at most {MAX_INLINE_LINES} lines; send a path for more")
    max_pending = record.get("max_pending")
    if max_pending is not None and (not isinstance(max_pending, int) or isinstance(max_pending, bool)
                                    or max_pending < 1):
        raise ValueError("max_pending must be a positive integer")
    return BatchCall(label, path, lines, max_pending)


# ---------------------------------------------------------------- server to client


def frame(kind: str, **fields) -> bytes:
    return orjson.dumps({"v": VERSION, "type": kind, **fields})


def error_frame(label: str | None, code: str, message: str, retry_after_s: float | None = None) -> bytes:
    status = _STATUS.get(code, 400)
    extra = {} if retry_after_s is None else {"retry_after_s": round(retry_after_s, 3)}
    return frame("error", id=label, status=status, code=str(code), message=message, **extra)


def result_frame(label: str, answer: list[RequestFinished], model: str, item: BatchItem) -> bytes:
    """The `result` frame of a finished request (`answer`: its choices' results in order), or the
    `error` frame of one whose choice failed (`answer`: that one result)."""
    failure = next((result for result in answer if result.error is not None), None)
    if failure is not None:
        return error_frame(label, failure.code or ErrorCode.SERVER_ERROR, failure.error)
    return frame("result", id=label, response=response_body(item, answer, model))
