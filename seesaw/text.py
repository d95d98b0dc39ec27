"""Text in and out: prompts and chat messages to token ids, and token ids back to text as they arrive."""

from __future__ import annotations

import json
import re
from functools import cache
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
        self._pieces: dict[int, tuple[str, bytes]] = {}
        self._is_byte_level = self.tokenizer is not None and "ByteLevel" in _decoder_name(self.tokenizer)
        # A fast tokenizer that cleans no spaces up decodes the same in its Rust core, at a third of
        # the cost: text is decoded twice per token of every request.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(self.tokenizer, "clean_up_tokenization_spaces", True):
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        elif self.tokenizer is not None:
            self._decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def template_renders_tools(self) -> bool:
        """Whether the chat template itself lays out `tools` (and so how a call looks)."""
        template = self.tokenizer.chat_template if self.tokenizer is not None else None
        return isinstance(template, str) and "tools" in template

    def token_piece(self, token_id: int) -> tuple[str, bytes]:
        """One token as text (a part of a character shows as U+FFFD) and as its own bytes."""
        piece = self._pieces.get(token_id)
        if piece is None:
            raw = self._token_bytes(token_id)
            piece = self._pieces[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return piece

    def _token_bytes(self, token_id: int) -> bytes:
        if self.tokenizer is None or not 0 <= token_id < self.vocab_size:
            return b""
        name = self.tokenizer.convert_ids_to_tokens(token_id)
        if self._is_byte_level:
            decoder = _byte_decoder()
            if all(char in decoder for char in name):
                return bytes(decoder[char] for char in name)
            return name.encode()
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", name)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return name.replace("\u2581", " ").encode()

    def encode_prompt(self, prompt: str) -> list[int]:
        self._require()
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of the rendered chat, ending with the assistant's turn opening; `messages` as
        `normalize_messages` gave them (the front door that took them made them so). `tools` go
        through the template where it lays them out, else into a system message of their own."""
        self._require()
        if self.tokenizer.chat_template is None:
            raise ValueError("this model has no chat template; use a completion prompt")
        from jinja2 import TemplateError

        extra = {}
        if tools and self.template_renders_tools:
            extra["tools"] = tools
        elif tools:
            messages = [{"role": "system", "content": tools_message(tools)}, *messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
        except (TemplateError, TypeError, KeyError) as error:
            raise ValueError(f"the model's chat template rejects these messages: {error}") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        known = [t for t in token_ids if 0 <= t < self.vocab_size]
        return self._decode(known)

    def _require(self) -> None:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; send prompt token ids")


def tools_message(tools: list[dict]) -> str:
    """The tools a request offers, as a system message for a template that does not lay them out."""
    listing = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    return ("You can call these functions. To call one, answer with only a JSON object "
            '{"name": <function name>, "arguments": <its arguments>}.\n' + listing)


def _decoder_name(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(backend.decoder).__name__ + repr(backend.decoder) if backend is not None and backend.decoder else ""


@cache
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's alphabet back to bytes: printable Latin-1 bytes stand for themselves, the
    others for the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[chr(byte)] = byte
        else:
            mapping[chr(256 + extra)] = byte
            extra += 1
    return mapping


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
