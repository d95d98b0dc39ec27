"""Every message survives the orjson wire encoding unchanged, nested parts included."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from stats_example import ENGINE_STATS

from seesaw import messages as m
from seesaw.layout import Layout
from seesaw.sampling import SamplingParams
from seesaw.step import FinishReason, RowSampling, StepRow, TokenUpdate

EXAMPLES = [
    m.Submit("a", "inproc://x", m.RequestKind.CHAT, SamplingParams(max_tokens=3, stop=["a"]),
             messages=[{"role": "user", "content": "hi"}], stream=True),
    m.CancelRequest("a"),
    m.TokensGenerated([TokenUpdate("r1", [1, 2], None), TokenUpdate("r2", [3], FinishReason.STOP)]),
    m.RequestFailed("r1", "boom", m.ErrorCode.SERVER_ERROR),
    m.RequestFinished("r1", m.RequestKind.COMPLETION, "text", FinishReason.LENGTH, 3, 4, [1, 2, 3, 4]),
    m.RequestFinished("b", m.RequestKind.CHAT, error="too long", code=m.ErrorCode.CONTEXT_LENGTH_EXCEEDED),
    m.TextDeltas([m.TextDelta("a", "hel", [5, 6]), m.TextDelta("b", "", [7])]), m.QueryStats(3, "inproc://x", True), m.StatsReport(3, ENGINE_STATS),
    m.RestartWorkers([0, 1]), m.WeightsStored(),
    m.AddRequest("r1", [1, 2, 3], SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, top_k=5, seed=11,
                                                  stop_token_ids=[9], ignore_eos=True)),
    m.StopRequest("r1"),
    m.StepDone(4, 0, [7, 8], 1.5),
    m.Resharded(1, Layout(tp=2), 0.01, 0.2, 1 << 20),
    m.EngineReady([100, 90], ["ipc://a", "tcp://b:1"]), m.EngineFailed("gone"),
    m.ReplicaLost(1, "worker 2 died"), m.ReplicaReady(1, 80, ["ipc://c", "ipc://d"]),
    m.KVSaved("r1", 4096, 0.5), m.KVLoaded("r1"), m.SaveKV("r1", 1, Layout(pp=2), [1, 2], [7, 8]), m.LoadKV("r1", 0, Layout(tp=2), [7, 8], [3, 4, 5]),
    m.SwappedOut(7, "r1", 1, 4096, 0.001), m.Prefetched(8, "r1", 1, 4096, 0.002),
    m.LoadShard({"model_type": "llama"}, "/w", m.WeightStoreSpec("seesaw-weights-x", "float32", 1024), 0,
                "float32", "cpu", [Layout(pp=2), Layout(tp=2)], 1, 16, 1 << 20, 0.9, 2,
                m.HostBufferSpec("seesaw-kv-x", 8, [2, 2, 1, 16, 8], "float32"),
                m.CollectiveSpec(m.Backend.NCCL, 2, [m.GroupSpec("ranks:2,3", [2, 3], [1, 2, 3])], first_rank=2),
                "tcp://h:1", "tcp://h:2"),
    m.PrepareGroups(1, m.Backend.GLOO, 2, 2, [m.GroupSpec("ranks:2,3", [2, 3])]),
    m.GroupsPrepared(0, m.CollectiveSpec(m.Backend.GLOO, 2, [m.GroupSpec("ranks:0,1", [0, 1])], "tcp://h:3"), 77),
    m.RankAssigned(3),
    m.RunStep(3, [StepRow("r1", [1, 2], 0, [5]), StepRow("r2", [], 4, [7], 1, RowSampling(0.0), awaits_token=True)],
              ["r0"]),
    m.Reshard(Layout(tp=2)),
    m.SwapOut(7, "r1", Layout(pp=2), [1], [2]), m.Prefetch(8, "r1", Layout(tp=2), [2], [1]), m.HeadAlive(), m.Shutdown(),
    m.WorkerHello(0, 123, "host", "ipc://w0"), m.WorkerHello(None, 124, "far", "tcp://h:9"), m.WorkerReady(0, [10, 10], 1.2, "cpu", 77),
    m.MakeNodeMemory(1, 40, 40, [2, 2, 1, 16, 8], "float32",
                     m.CheckpointSpec({"model_type": "llama"}, "bfloat16", "/w", 0, "tcp://h:4")),
    m.MakeNodeMemory(2, 80, 0, [2, 2, 1, 16, 8], "float32"),
    m.NodeMemoryMade(1, 2, m.HostBufferSpec("seesaw-kv-y", 40, [2, 2, 1, 16, 8], "float32", 40),
                     m.WeightStoreSpec("seesaw-weights-y", "float32", 1024), "the head's feed", 1.5, 77),
    m.WorkerFailed(0, "oom", "loading", 4242), m.WorkerFailed(1, "killed", None, None), m.Heartbeat(1), m.WorkersBusy([0, 1], "re-sharding to t2"),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda msg: type(msg).__name__)
def test_round_trip(message):
    decoded = m.decode(m.encode(message))
    assert decoded == message
    for field in dataclasses.fields(message):  # enums come back as enums, not as their strings
        assert type(getattr(decoded, field.name)) is type(getattr(message, field.name)), field.name


def test_every_message_belongs_to_an_inbox():
    inboxes = [m.ToRequestQueue, m.ToFrontDoor, m.ToScheduler, m.ToKVTier, m.ToShardWorker, m.ToSupervisor, m.ToEngine]
    assert set(m._TYPES.values()) == {cls for union in inboxes for cls in typing.get_args(union)}


def test_every_message_type_has_an_example():
    assert {type(msg).__name__ for msg in EXAMPLES} == set(m._TYPES)


def test_every_message_says_who_sends_it_to_whom():
    for cls in m._TYPES.values():
        assert dataclasses.is_dataclass(cls) and "->" in (cls.__doc__ or ""), cls.__name__


@pytest.mark.parametrize("data", [b"nope", b'["StopRequest"]', b'["StopRequest", {"id": 1}]', b'["StopRequest", 3]'])
def test_malformed_messages_are_rejected(data):
    with pytest.raises(ValueError, match="malformed"):
        m.decode(data)



def test_sampling_is_checked_as_it_is_made_and_gives_each_row_its_part():
    with pytest.raises(ValueError, match="top_k must be 0"):
        SamplingParams(top_k=-3)
    params = SamplingParams(max_tokens=4, temperature=0.5, top_p=0.9, top_k=7, seed=11, stop=["x"])
    with pytest.raises(ValueError, match="top_p must be"):
        dataclasses.replace(params, top_p=2.0)
    assert params.for_row(3) == RowSampling(0.5, 0.9, 7, 11, output_index=3)
    assert m.decode(m.encode(m.AddRequest("r", [1], params))).sampling == params


def test_an_inbox_decodes_only_the_messages_it_takes():
    to_scheduler = m.Decoder(m.ToScheduler)
    assert to_scheduler(m.encode(m.StopRequest("r1"))) == m.StopRequest("r1")
    with pytest.raises(ValueError, match="'RunStep' is not a message this inbox takes"):
        to_scheduler(m.encode(m.RunStep(1, [])))
    with pytest.raises(ValueError, match="'Nope' is an unknown type"):
        to_scheduler(b'["Nope", {}]')
    assert m.Decoder(m.Shutdown)(m.encode(m.Shutdown())) == m.Shutdown()
