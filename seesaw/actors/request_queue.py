"""RequestQueue actor: validates and tokenizes what front doors submit, names each request, and
turns tokens back into text, streamed pieces and results.

Inbox: Submit and CancelRequest (front doors); TokensGenerated and RequestFailed (Scheduler);
EngineFailed (Engine).
Sends: AddRequest and StopRequest to the Scheduler; TextDelta and RequestFinished to the
submitting front door.

Tokenizing runs on a worker thread, so a long prompt never stalls the head's event loop (where
the Scheduler runs). One request's bad input or failure is that request's error reply.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass

import zmq.asyncio

from seesaw.actors.base import Actor
from seesaw.text import IncrementalText, TextCodec
from seesaw.messages import (
    AddRequest,
    CancelRequest,
    EngineFailed,
    ErrorCode,
    RequestFailed,
    RequestFinished,
    RowSampling,
    StopRequest,
    Submit,
    TextDelta,
    ToRequestQueue,
    TokensGenerated,
)
from seesaw.step import FinishReason
from seesaw.transport.channels import Inbox, Outbox

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    request_id: str
    submit: Submit
    num_prompt_tokens: int
    text: IncrementalText
    num_output_tokens: int = 0
    num_streamed_chars: int = 0
    num_streamed_tokens: int = 0


class RequestQueue(Actor):
    name = "request-queue"
    accepts = ToRequestQueue

    def __init__(self, inbox: Inbox, context: zmq.asyncio.Context, scheduler: Outbox, codec: TextCodec,
                 max_model_len: int, vocab_size: int):
        super().__init__(inbox)
        self.context = context
        self.scheduler = scheduler
        self.codec = codec
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.pending: dict[str, _Pending] = {}  # by request id
        self.failure: str | None = None  # set once the engine failed: every later request is refused
        self._labels: dict[tuple[str, str], set[str]] = {}  # (reply_to, label) -> request ids pending
        self._replies: dict[str, Outbox] = {}
        self._pending_per_address: dict[str, int] = {}  # reply_to -> requests pending here
        self._next_ids = itertools.count()

    def handle(self, message):
        match message:
            case Submit():
                return self._on_submit(message)
            case CancelRequest():
                self._on_cancel(message)
            case TokensGenerated():
                self._on_tokens_generated(message)
            case RequestFailed():
                self._on_request_failed(message)
            case EngineFailed():
                self._on_engine_failed(message)

    async def _on_submit(self, submit: Submit) -> None:
        if self.failure is not None:
            self._refuse(submit, self.failure, ErrorCode.ENGINE_FAILED)
            return
        try:
            submit.sampling.validate()
            if submit.prompt_token_ids is not None:  # only checked: no tokenizer, no thread hop
                prompt_ids = self._prompt_ids(submit)
            else:
                prompt_ids = await asyncio.to_thread(self._prompt_ids, submit)
            max_tokens = self._max_tokens(submit, len(prompt_ids))
        except _Refused as refusal:
            self._refuse(submit, refusal.message, refusal.code, refusal.prompt_tokens)
            return
        except (ValueError, TypeError) as error:
            self._refuse(submit, str(error), ErrorCode.INVALID_REQUEST)
            return
        except Exception as error:  # one request's failure is its own error, never the actor's end
            log.exception("request %r from %s failed while tokenizing", submit.label, submit.reply_to)
            self._refuse(submit, f"tokenizing failed: {error!r}", ErrorCode.SERVER_ERROR)
            return
        request_id = f"req-{next(self._next_ids)}"
        self.pending[request_id] = _Pending(request_id, submit, len(prompt_ids),
                                            IncrementalText(self.codec, submit.sampling.stop))
        self._labels.setdefault((submit.reply_to, submit.label), set()).add(request_id)
        self._pending_per_address[submit.reply_to] = self._pending_per_address.get(submit.reply_to, 0) + 1
        sampling = submit.sampling
        self.scheduler.send(AddRequest(
            request_id=request_id, prompt_token_ids=prompt_ids, max_tokens=max_tokens,
            sampling=RowSampling(sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed),
            stop_token_ids=list(sampling.stop_token_ids), ignore_eos=sampling.ignore_eos,
        ))

    def _prompt_ids(self, submit: Submit) -> list[int]:
        """The prompt's token ids (a text prompt's are made on a worker thread)."""
        if submit.prompt_token_ids is not None:
            ids = submit.prompt_token_ids
            if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in ids
            ):
                raise ValueError(f"prompt token ids must be integers within the vocabulary (0 to {self.vocab_size - 1})")
            ids = list(ids)
        else:
            if submit.kind == "chat":
                ids = self.codec.encode_chat(submit.messages)
            elif isinstance(submit.prompt, str):
                ids = self.codec.encode_prompt(submit.prompt)
            else:
                raise ValueError("prompt must be a string or a list of token ids")
            if ids and max(ids) >= self.vocab_size:
                raise ValueError(f"the tokenizer gave token id {max(ids)}, outside the model's vocabulary of "
                                 f"{self.vocab_size}; send prompt token ids")
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def _max_tokens(self, submit: Submit, num_prompt: int) -> int:
        """The request's max_tokens, lowered to what the context leaves when it was only a default."""
        if num_prompt >= self.max_model_len:
            raise _Refused(f"the prompt has {num_prompt} tokens; the model's context is {self.max_model_len} "
                           f"tokens, which leaves no room to generate", num_prompt)
        room = self.max_model_len - num_prompt
        max_tokens = submit.sampling.max_tokens
        if max_tokens <= room:
            return max_tokens
        if submit.sampling.fit_max_tokens:
            return room
        raise _Refused(f"the prompt has {num_prompt} tokens and max_tokens is {max_tokens}: {num_prompt + max_tokens} "
                       f"tokens do not fit the model's context of {self.max_model_len} tokens (at most {room} new "
                       f"tokens fit)", num_prompt)

    def _on_cancel(self, message: CancelRequest) -> None:
        for request_id in sorted(self._labels.get((message.reply_to, message.label), ())):
            pending = self.pending[request_id]
            self.scheduler.send(StopRequest(request_id))
            self._flush(pending, is_final=True)
            self._finish(pending, FinishReason.CANCELLED)

    def _on_tokens_generated(self, message: TokensGenerated) -> None:
        for update in message.updates:
            pending = self.pending.get(update.request_id)
            if pending is None:
                continue  # finished already (stop string, cancel); the scheduler has been told
            pending.num_output_tokens += len(update.token_ids)
            pending.text.add(update.token_ids)
            if pending.text.is_stopped:
                self.scheduler.send(StopRequest(update.request_id))
                self._flush(pending, is_final=True)
                self._finish(pending, FinishReason.STOP)
            elif update.finish_reason is not None:
                self._flush(pending, is_final=True)
                self._finish(pending, update.finish_reason)
            else:
                self._flush(pending, is_final=False)

    def _flush(self, pending: _Pending, is_final: bool) -> None:
        """Stream the text a streaming request gained, holding back what may start a stop string."""
        if not pending.submit.stream:
            return
        text = pending.text.text
        held = 0 if is_final else max((len(s) for s in pending.submit.sampling.stop), default=1) - 1
        end = max(pending.num_streamed_chars, len(text) - held)
        if end > pending.num_streamed_chars:
            piece = text[pending.num_streamed_chars:end]
            token_ids = pending.text.token_ids[pending.num_streamed_tokens:]
            pending.num_streamed_chars, pending.num_streamed_tokens = end, len(pending.text.token_ids)
            self._outbox(pending.submit.reply_to).send(TextDelta(pending.submit.label, piece, token_ids))

    def _on_request_failed(self, message: RequestFailed) -> None:
        pending = self.pending.get(message.request_id)
        if pending is not None:
            self._forget(pending)
            self._refuse(pending.submit, message.error, message.code, pending.num_prompt_tokens, pending.request_id)

    def _on_engine_failed(self, message: EngineFailed) -> None:
        """Answer every request in flight with the reason, and refuse every later one."""
        if self.failure is not None:
            return
        self.failure = message.reason
        for pending in list(self.pending.values()):
            self._forget(pending)
            self._refuse(pending.submit, message.reason, ErrorCode.ENGINE_FAILED, pending.num_prompt_tokens,
                         pending.request_id)

    def _finish(self, pending: _Pending, finish_reason: FinishReason) -> None:
        self._forget(pending)
        submit = pending.submit
        self._reply_to(submit.reply_to, RequestFinished(
            label=submit.label, request_id=pending.request_id, kind=submit.kind, text=pending.text.text,
            finish_reason=finish_reason, prompt_tokens=pending.num_prompt_tokens,
            completion_tokens=pending.num_output_tokens, token_ids=pending.text.token_ids,
        ))

    def _forget(self, pending: _Pending) -> None:
        del self.pending[pending.request_id]
        address, key = pending.submit.reply_to, (pending.submit.reply_to, pending.submit.label)
        self._labels[key].discard(pending.request_id)
        if not self._labels[key]:
            del self._labels[key]
        self._pending_per_address[address] -= 1
        if not self._pending_per_address[address]:
            del self._pending_per_address[address]

    def _refuse(self, submit: Submit, error: str, code: ErrorCode, prompt_tokens: int = 0,
                request_id: str | None = None) -> None:
        self._reply_to(submit.reply_to, RequestFinished(
            label=submit.label, request_id=request_id, kind=submit.kind, error=error, code=code,
            prompt_tokens=prompt_tokens,
        ))

    def _reply_to(self, address: str, result: RequestFinished) -> None:
        self._outbox(address).send(result)
        if address not in self._pending_per_address:  # none of this front door's requests is left here
            outbox = self._replies.pop(address, None)
            if outbox is not None:
                self.disconnect(outbox)

    def _outbox(self, address: str) -> Outbox:
        if address not in self._replies:
            self._replies[address] = self.connect(self.context, address)
        return self._replies[address]


class _Refused(ValueError):
    """A request that can never run as asked."""

    def __init__(self, message: str, prompt_tokens: int):
        super().__init__(message)
        self.message = message
        self.prompt_tokens = prompt_tokens
        self.code = ErrorCode.CONTEXT_LENGTH_EXCEEDED
