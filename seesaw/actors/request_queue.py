"""RequestQueue actor: validates and tokenizes what front doors submit, and turns tokens back into results.

Inbox: Submit (front doors), TokensGenerated and RequestFailed (Scheduler).
Sends: AddRequest and StopRequest to the Scheduler, RequestFinished to the submitting front door.
"""

from __future__ import annotations

import zmq.asyncio
from dataclasses import dataclass

from seesaw.actors.base import Actor
from seesaw.frontend.text import IncrementalText, TextCodec
from seesaw.messages import (
    AddRequest,
    RequestFailed,
    RequestFinished,
    RowSampling,
    StopRequest,
    Submit,
    TokensGenerated,
)
from seesaw.transport.channels import Inbox, Outbox


@dataclass
class _Pending:
    submit: Submit
    num_prompt_tokens: int
    text: IncrementalText
    num_output_tokens: int = 0


class RequestQueue(Actor):
    name = "request-queue"

    def __init__(
        self,
        inbox: Inbox,
        context: zmq.asyncio.Context,
        scheduler: Outbox,
        codec: TextCodec,
        max_model_len: int,
        vocab_size: int,
    ):
        super().__init__(inbox)
        self.context = context
        self.scheduler = scheduler
        self.codec = codec
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.pending: dict[str, _Pending] = {}
        self._replies: dict[str, Outbox] = {}
        self._pending_per_address: dict[str, int] = {}  # reply_to -> requests pending here
        self.num_generated_tokens = 0  # every token generated so far, for live progress

    def handle(self, message):
        match message:
            case Submit():
                self._on_submit(message)
            case TokensGenerated():
                self._on_tokens_generated(message)
            case RequestFailed():
                self._on_request_failed(message)
            case _:
                raise ValueError(f"{self.name} cannot handle {type(message).__name__}")

    def _on_submit(self, submit: Submit) -> None:
        if submit.request_id in self.pending:
            self._reply(submit, error=f"request id {submit.request_id!r} is already in flight")
            return
        try:
            submit.sampling.validate()
            prompt_ids = self._prompt_ids(submit)
        except ValueError as error:
            self._reply(submit, error=str(error))
            return
        if not prompt_ids:
            self._reply(submit, error="the prompt is empty")
            return
        num_prompt = len(prompt_ids)
        if num_prompt >= self.max_model_len:
            self._reply(submit, error=(
                f"the prompt has {num_prompt} tokens; the model's context is "
                f"{self.max_model_len} tokens, which leaves no room to generate"
            ), prompt_tokens=num_prompt)
            return
        sampling = submit.sampling
        room = self.max_model_len - num_prompt
        max_tokens = sampling.max_tokens
        if max_tokens > room:
            if not sampling.fit_max_tokens:
                self._reply(submit, error=(
                    f"the prompt has {num_prompt} tokens and max_tokens is {max_tokens}: {num_prompt + max_tokens} "
                    f"tokens do not fit the model's context of {self.max_model_len} tokens (at most {room} "
                    f"new tokens fit)"
                ), prompt_tokens=num_prompt)
                return
            max_tokens = room
        self.pending[submit.request_id] = _Pending(submit, len(prompt_ids), IncrementalText(self.codec, sampling.stop))
        self._pending_per_address[submit.reply_to] = self._pending_per_address.get(submit.reply_to, 0) + 1
        self.scheduler.send(AddRequest(
            request_id=submit.request_id,
            prompt_token_ids=prompt_ids,
            max_tokens=max_tokens,
            sampling=RowSampling(sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed),
            stop_token_ids=list(sampling.stop_token_ids),
            ignore_eos=sampling.ignore_eos,
        ))

    def _prompt_ids(self, submit: Submit) -> list[int]:
        if submit.prompt_token_ids is not None:
            ids = submit.prompt_token_ids
            if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
                raise ValueError(f"prompt token ids must be integers within the vocabulary (0 to {self.vocab_size - 1})")
            return list(ids)
        if submit.kind == "chat":
            return self.codec.encode_chat(submit.messages)
        return self.codec.encode_prompt(submit.prompt)

    def _on_tokens_generated(self, message: TokensGenerated) -> None:
        for update in message.updates:
            self.num_generated_tokens += len(update.token_ids)
            pending = self.pending.get(update.request_id)
            if pending is None:
                continue  # finished already by a stop string; the scheduler has been told
            pending.num_output_tokens += len(update.token_ids)
            pending.text.add(update.token_ids)
            if pending.text.is_stopped:
                self.scheduler.send(StopRequest(update.request_id))
                self._finish(pending, "stop")
            elif update.finish_reason is not None:
                self._finish(pending, update.finish_reason)

    def _on_request_failed(self, message: RequestFailed) -> None:
        pending = self.pending.get(message.request_id)
        if pending is not None:
            self._forget(pending)
            self._reply(pending.submit, error=message.error, status_code=message.status_code,
                        prompt_tokens=pending.num_prompt_tokens)

    def _finish(self, pending: _Pending, finish_reason: str) -> None:
        self._forget(pending)
        self._reply_to(pending.submit.reply_to, RequestFinished(
            request_id=pending.submit.request_id,
            kind=pending.submit.kind,
            text=pending.text.text,
            finish_reason=finish_reason,
            prompt_tokens=pending.num_prompt_tokens,
            completion_tokens=pending.num_output_tokens,
            token_ids=pending.text.token_ids,
        ))

    def _forget(self, pending: _Pending) -> None:
        del self.pending[pending.submit.request_id]
        address = pending.submit.reply_to
        self._pending_per_address[address] -= 1
        if not self._pending_per_address[address]:
            del self._pending_per_address[address]

    def _reply(self, submit: Submit, error: str, status_code: int = 400, prompt_tokens: int = 0) -> None:
        self._reply_to(submit.reply_to, RequestFinished(
            request_id=submit.request_id, kind=submit.kind, error=error,
            status_code=status_code, prompt_tokens=prompt_tokens,
        ))

    def _reply_to(self, address: str, result: RequestFinished) -> None:
        self._outbox(address).send(result)
        self._release_outbox(address)

    def _outbox(self, address: str) -> Outbox:
        if address not in self._replies:
            self._replies[address] = Outbox(self.context, address)
        return self._replies[address]

    def _release_outbox(self, address: str) -> None:
        """Close a front door's outbox once none of its requests is pending here."""
        if address not in self._pending_per_address:
            outbox = self._replies.pop(address, None)
            if outbox is not None:
                outbox.close()

    async def stop(self) -> None:
        await super().stop()
        for outbox in self._replies.values():
            outbox.close()
