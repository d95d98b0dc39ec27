"""The OpenAI `n` field: each choice's seed, and n engine requests gathered into one answer (pure)."""

from __future__ import annotations

import pytest

from seesaw.frontend.choices import MAX_N, Choices, check_n, choice_samplings
from seesaw.messages import ErrorCode, RequestFinished, RequestKind
from seesaw.sampling import SamplingParams


def result(request_id: str, text: str = "t", error: str | None = None) -> RequestFinished:
    return RequestFinished(request_id, RequestKind.COMPLETION, text, "length", 3, 2, error=error,
                           code=ErrorCode.SERVER_ERROR if error else None)


@pytest.mark.parametrize("value", [0, -1, MAX_N + 1, 2.5, "2", True])
def test_a_bad_n_is_a_value_error_naming_n_and_its_value(value):
    with pytest.raises(ValueError, match=f"n must be an integer from 1 to {MAX_N}, got {value!r}"):
        check_n(value)


def test_choice_zero_keeps_the_seed_and_the_others_get_their_own_the_same_every_time():
    samplings = choice_samplings(SamplingParams(temperature=1.0, seed=7), 4)
    seeds = [sampling.seed for sampling in samplings]
    assert seeds[0] == 7 and len(set(seeds)) == 4
    assert seeds == [sampling.seed for sampling in choice_samplings(SamplingParams(temperature=1.0, seed=7), 4)]
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert choice_samplings(SamplingParams(seed=8), 2)[1].seed not in seeds  # another request's choices differ


def test_an_unseeded_requests_choices_stay_unseeded():
    assert [sampling.seed for sampling in choice_samplings(SamplingParams(), 3)] == [None, None, None]


def test_choices_are_answered_once_all_are_in_and_in_choice_order():
    choices = Choices(["a", "b", "c"])
    assert not choices.take(result("c", "third")) and not choices.take(result("a", "first"))
    assert choices.unfinished_ids == ["b"]
    assert choices.take(result("b", "second"))
    assert [r.text for r in choices.answer] == ["first", "second", "third"] and choices.is_done
    assert choices.index("c") == 2


def test_the_first_failing_choice_decides_the_request_and_later_results_change_nothing():
    choices = Choices(["a", "b", "c"])
    assert not choices.take(result("a"))
    assert choices.take(result("b", error="boom"))
    assert choices.answer == [choices.failure] and choices.failure.error == "boom"
    assert choices.unfinished_ids == ["c"] and not choices.is_done
    assert not choices.take(result("c", error="cancelled too"))
    assert choices.failure.error == "boom" and choices.is_done


def test_an_undecided_requests_answer_is_refused():
    with pytest.raises(ValueError, match="1 of 2 choices are in"):
        choices = Choices(["a", "b"])
        choices.take(result("a"))
        choices.answer

