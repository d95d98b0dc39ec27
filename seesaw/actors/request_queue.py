"""RequestQueue actor: checks and tokenizes what front doors submit, fits each request's
max_tokens to the context, and turns tokens back into text, streamed pieces and results.

Inbox: Submit and CancelRequest (front doors); TokensGenerated and RequestFailed (Scheduler);
EngineFailed (Engine).
Sends: AddRequest and StopRequest to the Scheduler; TextDeltas and RequestFinished to the
submitting front door.

Submitted requests are tokenized in the order they came, by an intake task of their own: a text
prompt on a worker thread, so a long prompt stalls neither the head's event loop (where the
Scheduler runs) nor this actor's inbox (other requests' tokens keep streaming while it tokenizes).
A cancel or an engine failure reaches a request still waiting for its tokens too. One request's
bad input or failure is that request's error reply. A request keeps the id its front door's
EngineClient gave it (unique in the engine) from the front door to the workers and back.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq.asyncio

from seesaw.actors.base import Actor
from seesaw.text import IncrementalText, TextCodec, WholeText
from seesaw.messages import (
    AddRequest,
    CancelRequest,
    EngineFailed,
    ErrorCode,
    RequestFailed,
    RequestFinished,
    StopRequest,
    Submit,
    TextDelta,
    TextDeltas,
    TokenText,
    ToRequestQueue,
    TokensGenerated,
)
from seesaw.step import FinishReason, TokenLogprobs
from seesaw.transport.channels import Inbox, Outbox

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    request_id: str
    submit: Submit
    num_prompt_tokens: int
    text: IncrementalText | WholeText
    num_output_tokens: int = 0
    num_streamed_chars: int = 0
    num_streamed_tokens: int = 0
    prompt_ids: list[int] | None = None  # kept where its prompt's log-probabilities are reported
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)  # by position (a recompute rewrites)


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
        self._held: set[str] = set()  # ids of the requests here, from their Submit to their final answer
        self._replies: dict[str, Outbox] = {}
        self._pending_per_address: dict[str, int] = {}  # reply_to -> requests here (tokenizing or pending)
        self._intake: collections.deque[Submit] = collections.deque()  # waiting to be tokenized, in order
        self._intake_ready = asyncio.Event()
        self._tokenizing: Submit | None = None  # the one on the tokenizer now
        self._cancelled_while_tokenizing = False
        self._deltas: dict[str, list[TextDelta]] = {}  # reply_to -> streamed text not sent yet

    async def run(self) -> None:
        """The inbox and the intake run side by side; either one's failure ends both (and is the
        task's exception, as for any actor)."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._run_intake(), name=f"{self.name}-intake")
                await super().run()
        except ExceptionGroup as failures:
            raise failures.exceptions[0] from None

    def handle(self, message):
        match message:
            case Submit():
                self._on_submit(message)
            case CancelRequest():
                self._on_cancel(message)
            case TokensGenerated():
                self._on_tokens_generated(message)
            case RequestFailed():
                self._on_request_failed(message)
            case EngineFailed():
                self._on_engine_failed(message)

    def _on_submit(self, submit: Submit) -> None:
        if submit.request_id in self._held:  # a front door's mistake: the request holding the id goes on
            log.error("request id %r from %s is already in use; the second request is dropped", submit.request_id,
                      submit.reply_to)
            return
        if self.failure is not None:
            self._refuse(submit, self.failure, ErrorCode.ENGINE_FAILED)
            return
        self._hold(submit)
        self._intake.append(submit)
        self._intake_ready.set()

    async def _run_intake(self) -> None:
        while True:
            await self._intake_ready.wait()
            self._intake_ready.clear()
            while self._intake:
                submit = self._intake.popleft()
                if submit.prompt_token_ids is not None:  # only checked: no tokenizer, no thread hop
                    self._admit(submit, lambda: self._tokenize(submit))
                    continue
                self._tokenizing, self._cancelled_while_tokenizing = submit, False
                try:
                    outcome = await asyncio.to_thread(_outcome, self._tokenize, submit)
                finally:
                    self._tokenizing = None
                if self._cancelled_while_tokenizing:
                    self._release(submit, self._cancelled_reply(submit))
                elif self.failure is not None:  # the engine failed while this one tokenized
                    self._release(submit, self._refusal(submit, self.failure, ErrorCode.ENGINE_FAILED))
                else:
                    self._admit(submit, outcome.get)

    def _tokenize(self, submit: Submit) -> tuple[list[int], int]:
        """The prompt's token ids and the max_tokens it runs with, or the error that refuses it."""
        submit.sampling.check_vocabulary(self.vocab_size)
        prompt_ids = self._prompt_ids(submit)
        return prompt_ids, self._max_tokens(submit, len(prompt_ids))

    def _admit(self, submit: Submit, tokenized: Callable[[], tuple[list[int], int]]) -> None:
        """Name the request and hand it to the scheduler, or answer it with why it cannot run
        (`tokenized` gives the prompt's ids and max_tokens, or raises that reason)."""
        try:
            prompt_ids, max_tokens = tokenized()
        except _Refused as refusal:
            self._release(submit, self._refusal(submit, refusal.message, refusal.code, refusal.prompt_tokens))
            return
        except (ValueError, TypeError) as error:
            self._release(submit, self._refusal(submit, str(error), ErrorCode.INVALID_REQUEST))
            return
        except Exception as error:  # one request's failure is its own error, never the actor's end
            log.error("request %s from %s failed while tokenizing", submit.request_id, submit.reply_to, exc_info=error)
            self._release(submit, self._refusal(submit, f"tokenizing failed: {error!r}", ErrorCode.SERVER_ERROR))
            return
        request_id = submit.request_id
        self.pending[request_id] = _Pending(request_id, submit, len(prompt_ids), self._text(submit),
                                            prompt_ids=prompt_ids if submit.sampling.prompt_logprobs is not None else None)
        sampling = submit.sampling
        if sampling.fit_max_tokens or sampling.max_tokens != max_tokens:  # the scheduler takes it as it runs
            sampling = dataclasses.replace(sampling, max_tokens=max_tokens, fit_max_tokens=False,
                                           min_tokens=min(sampling.min_tokens, max_tokens))
        self.scheduler.send(AddRequest(request_id, prompt_ids, sampling))

    def _text(self, submit: Submit) -> IncrementalText | WholeText:
        """Text as tokens arrive where someone reads it as it grows (streaming, or stop strings to
        find); otherwise one decode at the end, which costs far less per token."""
        if submit.stream or submit.sampling.stop:
            return IncrementalText(self.codec, submit.sampling.stop_conditions())
        return WholeText(self.codec)

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
                if submit.tools and submit.tool_choice == "auto" and not self.codec.template_renders_tools:
                    raise ValueError("tool_choice auto needs a chat template that lays out tools and how a call "
                                     "looks; this model's does not (use tool_choice required or a named function)")
                ids = self.codec.encode_chat(submit.messages, submit.tools)
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
        request_id = message.request_id
        pending = self.pending.get(request_id)
        if pending is not None:
            self.scheduler.send(StopRequest(request_id))
            pending.text.finish()
            self._flush(pending, is_final=True)
            self._finish(pending, FinishReason.CANCELLED)
            return
        for submit in [s for s in self._intake if s.request_id == request_id]:
            self._intake.remove(submit)
            self._release(submit, self._cancelled_reply(submit))
        if self._tokenizing is not None and self._tokenizing.request_id == request_id:
            self._cancelled_while_tokenizing = True  # answered once its tokenizer call returns

    def _on_tokens_generated(self, message: TokensGenerated) -> None:
        """A step's tokens; the text they give streamed requests goes out as one TextDeltas per
        front door, not a message per request and token."""
        self._on_updates(message.updates)
        for address in list(self._deltas):
            self._send_deltas(address)

    def _on_updates(self, updates) -> None:
        for update in updates:
            pending = self.pending.get(update.request_id)
            if pending is None:
                continue  # finished already (stop string, cancel); the scheduler has been told
            pending.num_output_tokens += len(update.token_ids)
            pending.text.add(update.token_ids)
            if update.logprobs:
                pending.logprobs.extend(update.logprobs)
            if update.prompt_logprobs is not None:
                first = update.prompt_logprobs.first_position
                for offset, entry in enumerate(update.prompt_logprobs.entries):
                    pending.prompt_logprobs[first + offset] = entry
            if update.finish_reason is not None:
                pending.text.finish()  # the last tokens' text, where a stop string may still be
            if pending.text.is_stopped:
                if update.finish_reason is None:
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
        held = 0 if is_final else pending.text.stop.held_chars
        end = max(pending.num_streamed_chars, len(text) - held)
        if end > pending.num_streamed_chars:
            piece = text[pending.num_streamed_chars:end]
            token_ids = pending.text.token_ids[pending.num_streamed_tokens:]
            pending.num_streamed_chars, pending.num_streamed_tokens = end, len(pending.text.token_ids)
            self._deltas.setdefault(pending.submit.reply_to, []).append(TextDelta(pending.request_id, piece, token_ids))

    def _send_deltas(self, address: str) -> None:
        deltas = self._deltas.pop(address, None)
        if deltas:
            self._outbox(address).send(TextDeltas(deltas))

    def _on_request_failed(self, message: RequestFailed) -> None:
        pending = self.pending.get(message.request_id)
        if pending is not None:
            self._forget(pending)
            self._release(pending.submit, self._refusal(pending.submit, message.error, message.code,
                                                        pending.num_prompt_tokens))

    def _on_engine_failed(self, message: EngineFailed) -> None:
        """Answer every request in flight or waiting for its tokens with the reason, and refuse
        every later one."""
        if self.failure is not None:
            return
        self.failure = message.reason
        for pending in list(self.pending.values()):
            self._forget(pending)
            self._release(pending.submit, self._refusal(pending.submit, message.reason, ErrorCode.ENGINE_FAILED,
                                                        pending.num_prompt_tokens))
        while self._intake:
            submit = self._intake.popleft()
            self._release(submit, self._refusal(submit, message.reason, ErrorCode.ENGINE_FAILED))

    def _finish(self, pending: _Pending, finish_reason: FinishReason) -> None:
        self._forget(pending)
        submit = pending.submit
        token_ids = pending.text.token_ids
        logprobs = pending.logprobs[: len(token_ids)] if submit.sampling.logprobs is not None else None
        prompt_logprobs = None
        if pending.prompt_ids is not None:
            prompt_logprobs = [pending.prompt_logprobs.get(position) for position in range(len(pending.prompt_ids))]
        self._release(submit, RequestFinished(
            request_id=pending.request_id, kind=submit.kind, text=pending.text.text,
            finish_reason=finish_reason, prompt_tokens=pending.num_prompt_tokens,
            completion_tokens=pending.num_output_tokens, token_ids=token_ids, logprobs=logprobs,
            prompt_token_ids=pending.prompt_ids, prompt_logprobs=prompt_logprobs,
            token_texts=self._token_texts(token_ids, pending.prompt_ids, logprobs, prompt_logprobs),
        ))

    def _token_texts(self, token_ids: list[int], prompt_ids: list[int] | None, logprobs, prompt_logprobs) -> dict:
        """The text and bytes of every token the log-probabilities of a result name."""
        if logprobs is None and prompt_logprobs is None:
            return {}
        named = set(token_ids) | set(prompt_ids or ())
        for entry in [*(logprobs or ()), *(prompt_logprobs or ())]:
            if entry is not None:
                named.update(entry.top_ids)
        texts = {}
        for token_id in named:
            text, raw = self.codec.token_piece(token_id)
            texts[str(token_id)] = TokenText(text, list(raw))
        return texts

    def _forget(self, pending: _Pending) -> None:
        del self.pending[pending.request_id]

    def _refuse(self, submit: Submit, error: str, code: ErrorCode) -> None:
        """Answer a request this actor never held."""
        self._hold(submit)
        self._release(submit, self._refusal(submit, error, code))

    @staticmethod
    def _refusal(submit: Submit, error: str, code: ErrorCode, prompt_tokens: int = 0) -> RequestFinished:
        return RequestFinished(request_id=submit.request_id, kind=submit.kind, error=error, code=code,
                               prompt_tokens=prompt_tokens)

    @staticmethod
    def _cancelled_reply(submit: Submit) -> RequestFinished:
        """A request cancelled before the engine took it: nothing generated, no error."""
        return RequestFinished(request_id=submit.request_id, kind=submit.kind, finish_reason=FinishReason.CANCELLED)

    def _hold(self, submit: Submit) -> None:
        address = submit.reply_to
        self._pending_per_address[address] = self._pending_per_address.get(address, 0) + 1
        self._held.add(submit.request_id)

    def _release(self, submit: Submit, result: RequestFinished) -> None:
        """Send a request's one final answer; a front door with nothing left here loses its outbox."""
        address = submit.reply_to
        self._send_deltas(address)  # a request's text arrives before its answer
        self._outbox(address).send(result)
        self._held.discard(submit.request_id)
        self._pending_per_address[address] -= 1
        if not self._pending_per_address[address]:
            del self._pending_per_address[address]
            outbox = self._replies.pop(address, None)
            if outbox is not None:
                self.disconnect(outbox)

    def _outbox(self, address: str) -> Outbox:
        if address not in self._replies:
            self._replies[address] = self.connect(self.context, address)
        return self._replies[address]


class _Outcome:
    """What a call on a worker thread gave: its value, or the exception it raised (raised again by `get`)."""

    def __init__(self, value=None, error: Exception | None = None):
        self.value, self.error = value, error

    def get(self):
        if self.error is not None:
            raise self.error
        return self.value


def _outcome(call, *args) -> _Outcome:
    try:
        return _Outcome(call(*args))
    except Exception as error:  # handed back to the event loop, which answers the request with it
        return _Outcome(error=error)


class _Refused(ValueError):
    """A request that can never run as asked."""

    def __init__(self, message: str, prompt_tokens: int):
        super().__init__(message)
        self.message = message
        self.prompt_tokens = prompt_tokens
        self.code = ErrorCode.CONTEXT_LENGTH_EXCEEDED
