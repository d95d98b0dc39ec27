"""Text in and out: prompts and chat messages to token ids, and token ids back to text as they arrive."""

from __future__ import annotations

from pathlib import Path

from seesaw.sampling import StopConditions

_ROLES = ("system", "user", "assistant", "developer", "tool")


class TextCodec:
    """The model's tokenizer and chat template."""

    def __init__(self, folder: Path | None):
        from transformers import AutoTokenizer

        has_tokenizer = folder is not None and any(
            (Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        )
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder)) if has_tokenizer else None
        self.vocab_size = len(self.tokenizer) if self.tokenizer is not None else 0

    def encode_prompt(self, prompt: str) -> list[int]:
        self._require()
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of the rendered chat, ending with the assistant's turn opening; `messages` as
        `normalize_messages` gave them (the front door that took them made them so)."""
        self._require()
        if self.tokenizer.chat_template is None:
            raise ValueError("this model has no chat template; use a completion prompt")
        from jinja2 import TemplateError

        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except (TemplateError, TypeError, KeyError) as error:
            raise ValueError(f"the model's chat template rejects these messages: {error}") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        known = [t for t in token_ids if 0 <= t < self.vocab_size]
        return self.tokenizer.decode(known, skip_special_tokens=True)

    def _require(self) -> None:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; send prompt token ids")


def normalize_messages(messages) -> list[dict]:
    """Check chat messages and flatten content parts to plain text; ValueError names the message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise ValueError(f"messages[{index}].role must be one of {', '.join(_ROLES)}, got {role!r}")
        if isinstance(content, list):
            parts = []
            for part_index, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{index}].content[{part_index}] must be a text part")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ValueError(f"messages[{index}].content must be a string or a list of text parts")
        normalized.append({"role": role, "content": content})
    return normalized


class IncrementalText:
    """Text of a growing token list, emitted only once complete characters are known, cut at the
    first of the request's stop strings."""

    def __init__(self, codec: TextCodec, stop: StopConditions):
        self.codec = codec
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""
        self.is_stopped = False
        self._prefix_offset = 0  # tokens before this only give context for the next piece
        self._read_offset = 0  # tokens before this are already in `text`

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the text they completed (empty while a character is partial)."""
        self.token_ids.extend(token_ids)
        context = self.codec.decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = self.codec.decode(self.token_ids[self._prefix_offset :])
        if len(full) <= len(context) or full.endswith("\ufffd"):
            return ""
        piece = full[len(context) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return self._append(piece)

    def finish(self) -> str:
        """No more tokens come: add the text of the last ones, less a character they left
        unfinished (stop strings still apply); returns what it added."""
        if self.is_stopped or self._read_offset == len(self.token_ids):
            return ""
        context = self.codec.decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = self.codec.decode(self.token_ids[self._prefix_offset :]).rstrip("\ufffd")
        self._prefix_offset = self._read_offset = len(self.token_ids)
        return self._append(full[len(context) :]) if len(full) > len(context) else ""

    def _append(self, piece: str) -> str:
        before = len(self.text)
        self.text += piece
        if self.stop.strings:
            cut = self.stop.first_string(self.text, max(0, before - self.stop.held_chars))
            if cut is not None:
                self.text = self.text[:cut]
                self.is_stopped = True
        return self.text[before:]


class WholeText:
    """The text of a request nobody reads before it finishes (not streamed, no stop strings): its
    tokens are kept and decoded once, at the end, instead of piece by piece as they arrive."""

    is_stopped = False

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.token_ids: list[int] = []

    def add(self, token_ids: list[int]) -> str:
        self.token_ids.extend(token_ids)
        return ""

    def finish(self) -> str:
        return ""

    @property
    def text(self) -> str:
        """The whole text, less a character the last tokens left unfinished."""
        return self.codec.decode(self.token_ids).rstrip("\ufffd")
