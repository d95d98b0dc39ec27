"""A node keeper's shared memory: host buffers numbered as the engine numbers host blocks, a weight
store filled from the checkpoint as this host sees it or from the head's feed, all removed on close."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import zmq.asyncio

from seesaw.actors.node_keeper import NodeKeeper
from seesaw.messages import CheckpointSpec, MakeNodeMemory
from seesaw.model.resolve import resolve_model
from seesaw.model.spec import ModelSpec
from seesaw.model.weights import RandomSource, SafetensorsSource, neutral_shapes
from seesaw.transport.checkpoint_feed import CheckpointFeed, FedCheckpoint
from seesaw.transport.host_buffer import HostBuffer
from seesaw.transport.weight_store import WeightStore

BLOCK_SHAPE = [3, 2, 2, 16, 16]


@pytest.fixture(scope="module")
def tiny(tiny_models):
    folder = tiny_models["llama-gqa-tied"]
    return folder, resolve_model(str(folder), Path("/nonexistent")).hf_config


def _store_equals(spec, shapes, read) -> bool:
    store = WeightStore.attach(spec, shapes)
    try:
        return all(torch.equal(store.rows(name), read(name).to(torch.float32)) for name in shapes)
    finally:
        store.close()


def test_a_host_buffer_holds_the_engines_block_numbers_from_its_first_block():
    buffer = HostBuffer.create(4, BLOCK_SHAPE, "float32", first_block=12)
    try:
        assert buffer.spec.first_block == 12
        assert buffer.local([12, 15, 13]) == [0, 3, 1]
        with pytest.raises(ValueError, match=r"host blocks \[11, 16\] are not in this node's buffer .*12 \.\. 15"):
            buffer.local([11, 12, 16])
    finally:
        buffer.close()


def test_a_keeper_makes_a_buffer_per_replica_and_one_store_and_removes_them(tiny):
    folder, hf_config = tiny
    keeper = NodeKeeper()
    checkpoint = CheckpointSpec(hf_config, "float32", str(folder), 0)
    first = keeper.make(MakeNodeMemory(2, 40, 20, BLOCK_SHAPE, "float32", checkpoint), rank=4, pid=1)
    second = keeper.make(MakeNodeMemory(3, 60, 20, BLOCK_SHAPE, "float32", checkpoint), rank=4, pid=1)
    again = keeper.make(MakeNodeMemory(2, 40, 20, BLOCK_SHAPE, "float32", checkpoint), rank=4, pid=1)
    names = [first.host_buffer.name, second.host_buffer.name, first.weight_store.name]
    try:
        assert (first.host_buffer.first_block, first.host_buffer.num_blocks) == (40, 20)
        assert second.host_buffer.first_block == 60 and second.host_buffer.name != first.host_buffer.name
        assert again.host_buffer == first.host_buffer  # asked twice (a replica back after a loss): the same
        assert first.weight_store == second.weight_store  # one store per node
        assert first.source == f"{folder} on this host" and second.source == "nothing new"
        shapes = neutral_shapes(ModelSpec.from_hf_config(hf_config))
        assert _store_equals(first.weight_store, shapes, SafetensorsSource(folder).rows)
        assert all((Path("/dev/shm") / name).exists() for name in names)
    finally:
        keeper.close()
    assert not any((Path("/dev/shm") / name).exists() for name in names)


def test_a_model_without_a_folder_fills_the_store_with_the_heads_seeded_weights(tiny):
    _, hf_config = tiny
    keeper = NodeKeeper()
    try:
        made = keeper.make(MakeNodeMemory(0, 0, 0, BLOCK_SHAPE, "float32", CheckpointSpec(hf_config, "float32", None, 7)),
                           rank=1, pid=1)
        assert made.host_buffer is None and "seed 7" in made.source
        spec = ModelSpec.from_hf_config(hf_config)
        assert _store_equals(made.weight_store, neutral_shapes(spec), RandomSource(spec, 7).rows)
    finally:
        keeper.close()


def test_a_node_that_cannot_read_the_folder_is_fed_the_checkpoint_by_the_head(tiny, tmp_path):
    folder, hf_config = tiny
    missing = str(tmp_path / "not-on-this-host")

    async def run():
        context = zmq.asyncio.Context()
        feed = CheckpointFeed(context, "tcp://127.0.0.1:*", SafetensorsSource(folder).rows, "bfloat16")
        feed.start()
        keeper = NodeKeeper()
        try:
            checkpoint = CheckpointSpec(hf_config, "bfloat16", missing, 0, feed.bound_address)
            made = await asyncio.to_thread(keeper.make, MakeNodeMemory(1, 8, 8, BLOCK_SHAPE, "float32", checkpoint),
                                           2, 1)
            assert made.source == f"the head's checkpoint feed at {feed.bound_address}"
            shapes = neutral_shapes(ModelSpec.from_hf_config(hf_config))
            store = WeightStore.attach(made.weight_store, shapes)
            reference = SafetensorsSource(folder)
            assert all(torch.equal(store.rows(name), reference.rows(name).to(torch.bfloat16)) for name in shapes)
            store.close()
            # A tensor the checkpoint lacks is named in the error, and the feed goes on serving.
            fed = FedCheckpoint(feed.bound_address, {"no.such.tensor": (4, 4)}, "bfloat16", timeout_s=10)
            with pytest.raises(ValueError, match="could not send no.such.tensor"):
                await asyncio.to_thread(fed.rows, "no.such.tensor")
            fed.close()
            fed = FedCheckpoint(feed.bound_address, shapes, "bfloat16", timeout_s=10)
            assert torch.equal(await asyncio.to_thread(fed.rows, "embed"), reference.rows("embed").to(torch.bfloat16))
            fed.close()
        finally:
            keeper.close()
            await feed.close()
            context.term()

    asyncio.run(run())


def test_a_silent_feed_times_out_and_an_unreadable_folder_without_a_feed_says_what_to_do(tiny, tmp_path):
    _, hf_config = tiny
    shapes = neutral_shapes(ModelSpec.from_hf_config(hf_config))
    silent = zmq.Context().socket(zmq.ROUTER)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    fed = FedCheckpoint(f"tcp://127.0.0.1:{port}", shapes, "float32", timeout_s=0.5)
    with pytest.raises(TimeoutError, match="did not send embed rows"):
        fed.rows("embed")
    fed.close()
    silent.close(linger=0)
    keeper = NodeKeeper()
    try:
        with pytest.raises(ValueError, match="cannot read the checkpoint .* shared file system"):
            keeper.make(MakeNodeMemory(0, 0, 4, BLOCK_SHAPE, "float32",
                                       CheckpointSpec(hf_config, "float32", str(tmp_path / "gone"), 0)), 1, 1)
    finally:
        keeper.close()


def test_the_book_asks_one_keeper_a_node_and_forgets_a_node_whose_keeper_was_lost():
    from seesaw.actors.node_memory import NodeMemoryBook, NodeMemoryPlan
    from seesaw.layout import Layout
    from seesaw.messages import NodeMemoryMade

    checkpoint = CheckpointSpec({}, "float32", "/w", 0)
    plan = NodeMemoryPlan("a", True, [(0, 5), (5, 5), (10, 5)], BLOCK_SHAPE, "float32", checkpoint)
    book = NodeMemoryBook(plan, Layout(dp=3, tp=2), num_local_workers=2)
    nodes = {0: "a", 1: "a", 2: "b", 3: "b", 4: "b", 5: "b"}
    up = set(nodes)
    assert book.ask(0, nodes, up.__contains__) == []  # the head's own replica: the head's memory
    (keeper, command), = book.ask(1, nodes, up.__contains__)
    assert keeper == 2 and (command.first_block, command.num_blocks, command.checkpoint) == (5, 5, checkpoint)
    (keeper, command), = book.ask(2, nodes, up.__contains__)
    assert keeper == 2 and command.first_block == 10  # the same node's keeper, for its second replica
    made = NodeMemoryMade(1, 2, None, None, "x", 0.0)
    assert book.made("b", made) and book.memory("b", 1) == made and book.memory("a", 0) is None
    book.lost(2)  # not the keeper's replica: node b keeps its memory and its keeper
    assert book.keepers == {"b": 2} and book.memory("b", 1) == made
    book.lost(1)  # the keeper's: node b's memory went with it
    assert book.keepers == {} and book.memory("b", 1) is None
    up -= {2, 3}
    (keeper, _), = book.ask(2, nodes, up.__contains__)
    assert keeper == 4  # a new keeper among the workers there now
    # A worker beside the head on its node, in a replica the head does not start, gets a keeper
    # that makes only a buffer: the head's store serves the whole node.
    (keeper, command), = NodeMemoryBook(plan, Layout(dp=3, tp=2), 2).ask(1, {**nodes, 2: "a", 3: "a"}, up.__contains__)
    assert keeper == 2 and command.checkpoint is None and command.num_blocks == 5
