"""Tokenizing prompts and chats, and detokenizing token by token with stop strings."""

from __future__ import annotations

import pytest

from seesaw.sampling import SamplingParams
from seesaw.text import IncrementalText, TextCodec, WholeText, normalize_messages


@pytest.fixture(scope="module")
def codec(default_model):
    return TextCodec(default_model.tokenizer_folder)


def test_incremental_text_equals_the_full_decode(codec):
    text = "Héllo wörld! 東京 🎉 — naïve café, ünïcödé ✓"
    ids = codec.encode_prompt(text)
    stream = IncrementalText(codec, SamplingParams().stop_conditions())
    pieces = [stream.add([token]) for token in ids]
    assert "".join(pieces) == stream.text == codec.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)



def test_a_text_decoded_once_at_the_end_equals_the_one_built_token_by_token(codec):
    """Whatever token it stops at (mid-character too), a request decoded once at its end gets the
    text a streamed one gets piece by piece."""
    ids = codec.encode_prompt("Héllo wörld! 東京 🎉 — naïve café, ünïcödé ✓ " * 3)
    for end in range(1, len(ids) + 1):
        stream, whole = IncrementalText(codec, SamplingParams().stop_conditions()), WholeText(codec)
        pieces = [stream.add([token]) for token in ids[:end]] + [stream.finish()]
        whole.add(ids[:end])
        assert "".join(pieces) == stream.text == whole.text, end
        assert not whole.text.endswith("\ufffd")


def test_a_stop_string_in_the_last_tokens_text_is_found_when_the_request_ends(codec):
    ids = codec.encode_prompt("x ab 🎉")[:-1]  # ends inside the emoji: " ab" then a held-back " " and part of it
    stream = IncrementalText(codec, SamplingParams(stop=["ab "]).stop_conditions())
    for token in ids:
        stream.add([token])
    assert not stream.is_stopped and stream.text == "x ab"
    stream.finish()
    assert stream.is_stopped and stream.text == "x "

def test_stop_string_spanning_tokens_truncates_before_it(codec):
    ids = codec.encode_prompt("one two three four five")
    stream = IncrementalText(codec, SamplingParams(stop=["ee fo"]).stop_conditions())
    for token in ids:
        stream.add([token])
        if stream.is_stopped:
            break
    assert stream.is_stopped and stream.text == "one two thr"


def test_chat_template_ends_with_the_assistant_turn(codec):
    ids = codec.encode_chat(normalize_messages([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]))
    assert codec.decode(ids).rstrip().endswith("assistant")


@pytest.mark.parametrize("messages,problem", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "image_url"}]}], "messages[1].content[0]"),
])
def test_bad_messages_name_the_message(messages, problem):
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        normalize_messages(messages)


def test_a_template_that_rejects_the_messages_is_a_value_error(default_model):
    codec = TextCodec(default_model.tokenizer_folder)
    codec.tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(ValueError, match="roles must alternate"):
        codec.encode_chat([{"role": "user", "content": "hi"}])
