"""The run's books: a phase's seconds are those its steps ran, the wait for a new layout's weights
is the transition's, and idle time counts nowhere (worked out by hand on a made-up clock)."""

from __future__ import annotations

import pytest

from seesaw.scheduling.decisions import Phase
from seesaw.scheduling.metrics import TRANSITION, RunMetrics


def test_phase_seconds_follow_the_steps_not_the_switch_decisions():
    books = RunMetrics(100.0, [Phase.PREFILL])
    books.on_step(100.0, 0, 0, 0, 64, 4, 0.0)  # a prefill step, sent at once
    books.on_step(100.0, 0, 1, 0, 64, 4, 0.0)  # a second micro-batch behind it
    index = books.on_switch(100.5, 0, Phase.DECODE, "p2->t2")  # decided while both still run
    books.on_step(100.5, 0, 2, 4, 80, 4, 0.5)  # the first decode step, queued behind the re-shard
    books.on_step_done(102.0, 0, 0)  # prefill ran 2 s
    books.on_step_done(103.0, 0, 1)  # and 1 s more
    books.on_reloaded(104.0, index)  # the decode layout's weights are in 1 s later
    books.on_step_done(104.5, 0, 2)  # the decode step then took 0.5 s
    books.on_step(110.0, 0, 3, 4, 84, 4, 0.5)  # after 5.5 s with nothing to run
    books.on_step_done(110.25, 0, 3)
    assert books.phase_seconds == pytest.approx({"prefill": 3.0, TRANSITION: 1.0, "decode": 0.75})
    assert books.transitions[0].reloaded_at_s == pytest.approx(4.0)
    assert [span[1] for span in books.spans] == ["prefill", TRANSITION, "decode"]
    assert books.spans[-1][2:] == pytest.approx([4.0, 10.25])


def test_a_switch_within_one_layout_waits_for_nothing():
    books = RunMetrics(0.0, [Phase.PREFILL])
    books.on_step(0.0, 0, 0, 0, 8, 1, 0.0)
    books.on_switch(0.0, 0, Phase.DECODE, "t1->t1", reloads=False)
    books.on_step(0.0, 0, 1, 1, 9, 1, 0.0)
    books.on_step_done(1.0, 0, 0)
    books.on_step_done(1.5, 0, 1)
    assert books.phase_seconds == pytest.approx({"prefill": 1.0, "decode": 0.5})


def test_decode_only_steps_are_timed_from_the_step_before_them():
    books = RunMetrics(0.0, [Phase.MIXED])
    books.on_step(0.0, 0, 0, 1, 40, 2, 0.0)  # one prompt row and one decode row
    books.on_step(0.0, 0, 1, 2, 50, 2, 0.0)  # two decode rows
    books.on_step_done(1.0, 0, 0)
    books.on_step_done(1.25, 0, 1)
    assert books.decode == {"decode_steps": 1, "decode_s": 0.25, "decode_rows": 2, "decode_context_tokens": 50}
    assert books.summary(2.0).phase_seconds == pytest.approx({"mixed": 1.25})


def test_a_restarted_replica_forgets_its_steps_in_flight():
    books = RunMetrics(0.0, [Phase.PREFILL, Phase.PREFILL])
    books.on_step(0.0, 1, 0, 0, 8, 1, 0.0)
    books.on_restart(1.0, 1, Phase.PREFILL)
    books.on_step_done(2.0, 1, 0)  # a late answer from the replaced workers
    assert books.phase_seconds == {} and books.restarts == 1
