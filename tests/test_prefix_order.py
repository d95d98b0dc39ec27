"""The order a batch submits the lines it read ahead in: shared prompt prefixes together, within a
bound, every line once (pure), and the same results as in the input's order (a real engine)."""

from __future__ import annotations

import asyncio
import io
import random

import orjson
import pytest

from helpers import ListSink, engine_config
from seesaw.frontend.batch_io import SamplingDefaults, parse_line
from seesaw.frontend.prefix_order import PrefixOrder, prompt_key


def run_order(keys: list[tuple], window: int, max_passed: int | None = None,
              rng: random.Random | None = None) -> list[int]:
    """The order lines with `keys` (read in list order) are taken in, reading while the window has
    room and taking one whenever it is full or the input is read (or, with `rng`, at random)."""
    order, taken, read = PrefixOrder(window, max_passed), [], 0
    while read < len(keys) or order:
        can_read = read < len(keys) and not order.is_full
        if can_read and (rng is None or not order or rng.random() < 0.5):
            order.add(keys[read], read)
            read += 1
        else:
            taken.append(order.take())
    return taken


def passed_over(taken: list[int]) -> list[int]:
    """For each line (by read number), how many lines read after it were taken before it."""
    position = {line: index for index, line in enumerate(taken)}
    return [sum(1 for later in range(line + 1, len(taken)) if position[later] < position[line])
            for line in range(len(taken))]


def test_lines_sharing_a_prefix_are_taken_one_after_another():
    prefixes = ["system: be brief", "system: be kind", "translate:"]
    keys = [(1, f"{prefixes[index % 3]} question {index}") for index in range(12)]  # interleaved: a b c a b c ...
    taken = run_order(keys, window=12)
    groups = [keys[line][1].split(" question")[0] for line in taken]
    assert [group for index, group in enumerate(groups) if index == 0 or group != groups[index - 1]] == sorted(prefixes)


def test_a_line_with_a_prefix_of_its_own_waits_no_longer_than_the_bound():
    # A last-sorting line, then ever-growing keys just past the last taken: without the bound it would wait to the end.
    keys = [(0, (9,))] + [(0, (1, index)) for index in range(200)]
    taken = run_order(keys, window=16)
    assert passed_over(taken)[0] == 16
    assert max(passed_over(taken)) <= 16


@pytest.mark.parametrize("seed", range(5))
def test_every_line_is_taken_once_and_none_is_passed_over_more_than_the_bound(seed):
    rng = random.Random(seed)
    keys = [(0, tuple(rng.choice([1, 2, 3]) for _ in range(rng.randint(1, 4)))) for _ in range(300)]
    for window, max_passed in ((1, None), (8, None), (32, 5), (32, 0)):
        taken = run_order(keys, window, max_passed, rng)
        assert sorted(taken) == list(range(len(keys)))
        assert max(passed_over(taken)) <= (window if max_passed is None else max_passed)


def test_a_window_of_one_keeps_the_input_order():
    rng = random.Random(1)
    keys = [(0, (rng.randint(0, 9),)) for _ in range(20)]
    assert run_order(keys, window=1) == list(range(20))


def test_prompts_sort_by_their_tokens_text_or_messages():
    def key(record: dict) -> tuple:
        return prompt_key(parse_line(orjson.dumps(record), 1, SamplingDefaults()))

    assert key({"prompt": [5, 6, 7]}) < key({"prompt": [5, 7]}) < key({"prompt": "a"})
    chat = key({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "b"}]})
    assert key({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]}) < chat


# ---------------------------------------------------------------- on a real engine (the default model)


def test_a_batch_ordered_by_prefix_gives_each_line_what_the_input_order_gives():
    from seesaw.engine import Engine
    from seesaw.frontend.batch import BatchRunner
    from seesaw.model.resolve import resolve_model

    prefixes = ["You are a careful assistant. Answer in one word. ", "Translate into French: ",
                "Here is a list of animals: cat, dog, ", "The following numbers are prime: 2, 3, "]
    lines = [{"custom_id": f"r{index}", "prompt": f"{prefixes[index % 4]}item {index}", "max_tokens": 4,
              "temperature": 0 if index % 2 else 1.0, "ignore_eos": True} for index in range(24)]
    data = b"\n".join(orjson.dumps(line) for line in lines) + b"\n"
    config = engine_config("default", scheduler={"max_num_seqs": 4})

    class Runner(BatchRunner):
        """Notes the order lines go to the engine in."""

        submitted: list[str]

        def _submit(self, item) -> None:
            self.submitted.append(item.custom_id)
            super()._submit(item)

    async def main() -> list[tuple[list[str], dict[str, str]]]:
        runs = []
        async with Engine(config, resolve_model(config.model.model, config.cache_dir)) as engine:
            for window in (1, 16):
                sink = ListSink()
                runner = Runner(engine, SamplingDefaults(), "default", 4, sink, window=window)
                runner.submitted = []
                await runner.run_source(io.BytesIO(data), len(data))
                texts = {line["custom_id"]: line["response"]["body"]["choices"][0]["text"] for line in sink.lines}
                assert len(texts) == len(sink.lines) == 24
                runs.append((runner.submitted, texts))
        return runs

    (in_order, expected), (by_prefix, texts) = asyncio.run(asyncio.wait_for(main(), 300))
    assert in_order == [line["custom_id"] for line in lines]
    assert sorted(by_prefix) == sorted(in_order) and by_prefix != in_order
    assert texts == expected and all(texts.values())
