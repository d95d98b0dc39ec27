"""Layout arithmetic: notation, rank order, and shards that tile the model exactly once."""

from __future__ import annotations

import itertools

import pytest

from seesaw.layout import Layout, ModelShape, shard_for, split_evenly


@pytest.mark.parametrize("text,expected", [
    ("t1", Layout()), ("t4", Layout(tp=4)), ("p2", Layout(pp=2)), ("t2p2", Layout(tp=2, pp=2)),
    ("d2t4", Layout(dp=2, tp=4)), ("d2", Layout(dp=2)), ("D2T2P2", Layout(2, 2, 2)),
])
def test_parse_and_print_round_trip(text, expected):
    layout = Layout.parse(text)
    assert layout == expected
    assert Layout.parse(str(layout)) == layout


@pytest.mark.parametrize("text", ["", "x2", "t0", "p2t2", "t", "t2t2", "d-1"])
def test_bad_notation_is_rejected_with_the_form_expected(text):
    with pytest.raises(ValueError, match="layout"):
        Layout.parse(text)


def test_rank_order_is_dp_then_pp_then_tp():
    layout = Layout(dp=2, tp=2, pp=2)
    assert [layout.coordinates(r) for r in range(8)] == list(itertools.product(range(2), range(2), range(2)))
    assert layout.tp_group(5) == [4, 5]
    assert layout.pp_group(5) == [5, 7]
    assert layout.dp_group(5) == [1, 5]
    assert list(layout.replica_ranks(1)) == [4, 5, 6, 7]


def test_impossible_layout_names_the_reason():
    shape = ModelShape(num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536)
    with pytest.raises(ValueError, match="t4 needs at least 4 KV heads; this model has 3"):
        shard_for(Layout(tp=4), shape, 0)
    with pytest.raises(ValueError, match="at least 31 layers"):
        shard_for(Layout(pp=31), shape, 0)


def test_uneven_heads_split_by_whole_groups():
    shape = ModelShape(num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536)
    shards = [shard_for(Layout(tp=2), shape, r) for r in range(2)]
    assert [(s.kv_heads.size, s.heads.size) for s in shards] == [(2, 6), (1, 3)]


SHAPES = [
    ModelShape(30, 9, 3, 1536),
    ModelShape(32, 32, 8, 14336),
    ModelShape(7, 12, 4, 100),
    ModelShape(3, 4, 1, 96),
    ModelShape(28, 28, 4, 18944),
]


def _layouts_up_to(world: int):
    for dp, tp, pp in itertools.product(range(1, world + 1), repeat=3):
        if dp * tp * pp <= world:
            yield Layout(dp, tp, pp)


def _tiles(spans, total) -> bool:
    """True when the spans cover range(total) exactly once."""
    position = 0
    for span in sorted(spans):
        if span.start != position:
            return False
        position = span.end
    return position == total


@pytest.mark.parametrize("shape", SHAPES)
def test_shards_tile_every_layer_and_head_exactly_once(shape):
    group = shape.num_heads // shape.num_kv_heads
    for layout in _layouts_up_to(8):
        if layout.tp > shape.num_kv_heads or layout.pp > shape.num_layers:
            continue
        for dp_rank in range(layout.dp):
            shards = [
                shard_for(layout, shape, layout.rank_of(dp_rank, p, t))
                for p in range(layout.pp) for t in range(layout.tp)
            ]
            for shard in shards:
                assert shard.heads == (shard.kv_heads.start * group, shard.kv_heads.end * group)
            for layer in range(shape.num_layers):
                owners = [s for s in shards if s.layers.start <= layer < s.layers.end]
                assert len(owners) == layout.tp, (layout, layer)
                assert _tiles([s.heads for s in owners], shape.num_heads), (layout, layer)
                assert _tiles([s.kv_heads for s in owners], shape.num_kv_heads), (layout, layer)
                assert _tiles([s.ffn for s in owners], shape.intermediate_size), (layout, layer)
            assert _tiles({s.layers for s in shards}, shape.num_layers), layout


def test_split_evenly_sizes_differ_by_at_most_one():
    for total, parts in itertools.product(range(1, 40), range(1, 9)):
        sizes = [span.size for span in split_evenly(total, parts)]
        assert sum(sizes) == total and max(sizes) - min(sizes) <= 1


def test_workers_joining_without_a_rank_fill_their_nodes_units_first():
    from seesaw.actors.supervisor import choose_rank

    tp_groups = [[0, 1], [2, 3], [4, 5], [6, 7]]  # t2p4: each pair all-reduces every layer
    nodes = {0: "head", 1: "head"}  # the head runs ranks 0 and 1
    joined = []
    for node in ["b", "c", "b", "c", "b", "b"]:  # node b brings four workers, c two, joining interleaved
        free = [rank for rank in range(8) if rank not in nodes]
        rank = choose_rank(free, tp_groups, nodes, node)
        nodes[rank] = node
        joined.append(rank)
    assert joined == [6, 4, 7, 5, 2, 3]  # by joining order alone, b would have split two groups with c
    assert all(len({nodes[r] for r in group}) == 1 for group in tp_groups)
    # Whole units never split while one is free; a third node takes what is left.
    assert choose_rank([3], tp_groups, {r: "x" for r in range(3)}, "y") == 3
    # The head's rank 0 not joined yet (so not offered): the joining worker takes its group's other rank.
    assert choose_rank([1], [[0, 1]], {}, "b") == 1
