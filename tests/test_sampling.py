"""Every condition that ends a request is decided by its StopConditions, made from its sampling."""

from __future__ import annotations

from seesaw.sampling import SamplingParams
from seesaw.step import FinishReason

EOS = frozenset({2})


def test_token_conditions_stop_on_a_stop_token_or_an_end_token_and_at_either_length():
    stop = SamplingParams(max_tokens=3, stop_token_ids=[9]).stop_conditions(EOS, max_context=10)
    assert stop.after_token(9, 1, 5) == FinishReason.STOP
    assert stop.after_token(2, 1, 5) == FinishReason.STOP
    assert stop.after_token(7, 2, 5) is None
    assert stop.after_token(7, 3, 5) == FinishReason.LENGTH  # max_tokens
    assert stop.after_token(7, 1, 10) == FinishReason.LENGTH  # the model's context
    ignoring = SamplingParams(max_tokens=3, ignore_eos=True).stop_conditions(EOS, max_context=None)
    assert ignoring.after_token(2, 1, 10_000) is None


def test_stop_strings_are_found_from_where_the_search_starts_and_set_what_streaming_holds_back():
    stop = SamplingParams(stop=["three", "o t"]).stop_conditions()
    assert stop.first_string("one two three", 0) == 6  # "o t", the earlier of the two found
    assert stop.first_string("one two three", 7) == 8
    assert stop.first_string("one two", 3) is None
    assert stop.held_chars == 4
    assert SamplingParams().stop_conditions().held_chars == 0
