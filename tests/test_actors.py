"""Actor message flows over real in-process ZeroMQ channels, with the test playing the peers."""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import replace as dataclasses_replace

import pytest
import zmq.asyncio

from seesaw import messages as m
from seesaw.actors.kv_tier import KVTier
from seesaw.actors.request_queue import RequestQueue
from seesaw.actors.scheduler import Scheduler
from seesaw.actors.supervisor import Supervisor
from seesaw.config import SchedulerConfig, TransportConfig
from seesaw.kv.host_index import HostBlockConflict
from seesaw.text import TextCodec
from seesaw.layout import Layout
from seesaw.sampling import SamplingParams
from seesaw.scheduling.decisions import Phase
from seesaw.scheduling.engine_core import ModelLimits
from seesaw.stats import RequestCounts
from seesaw.step import FinishReason, TokenUpdate
from seesaw.transport.channels import Inbox, Outbox

_names = itertools.count()


class Wiring:
    """Inboxes the test reads (standing in for peers) and outboxes into the actor under test."""

    def __init__(self):
        self.context = zmq.asyncio.Context()
        self.closables = []
        self.actors = []

    def start(self, actor):
        """Start an actor under test; it is stopped at teardown even if the test fails first."""
        self.actors.append(actor)
        actor.start()
        return actor

    def address(self) -> str:
        return f"inproc://test-{next(_names)}"

    def inbox(self) -> Inbox:
        box = Inbox(self.context, self.address())
        self.closables.append(box)
        return box

    def outbox(self, inbox: Inbox) -> Outbox:
        box = Outbox(self.context, inbox.addresses[0])
        self.closables.append(box)
        return box

    async def close(self):
        for actor in self.actors:
            await actor.stop()
        for box in self.closables:
            box.close() if isinstance(box, Inbox) else box.close(linger_s=0)
        self.context.term()


@pytest.fixture
async def wiring():
    wires = Wiring()
    yield wires
    await wires.close()


async def expect(inbox: Inbox, kind: type, timeout_s: float = 5.0):
    message = await inbox.recv(timeout_s=timeout_s)
    assert isinstance(message, kind), message
    return message


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


async def test_scheduler_runs_steps_and_reports_tokens(wiring):
    worker, kv, queue, supervisor = wiring.inbox(), wiring.inbox(), wiring.inbox(), wiring.inbox()
    engine, inbox, front_door = wiring.inbox(), wiring.inbox(), wiring.inbox()
    actor = Scheduler(inbox, wiring.context, SchedulerConfig(max_num_batched_tokens=8), {Phase.MIXED: Layout()},
                      ModelLimits(block_size=4, max_model_len=64, eos_token_ids=(2,), num_host_blocks=0),
                      wiring.outbox(kv), wiring.outbox(queue), wiring.outbox(supervisor), wiring.outbox(engine), 30.0)
    wiring.start(actor)
    to_actor = wiring.outbox(inbox)
    # 1. A request that arrives before the engine is ready waits for it.
    to_actor.send(m.AddRequest("a", [5, 6, 7, 8, 9, 10], greedy(2)))
    to_actor.send(m.EngineReady(num_device_blocks=[8], worker_addresses=worker.addresses))
    step = await expect(worker, m.RunStep)
    assert [(r.request_id, r.token_ids, r.start) for r in step.rows] == [("a", [5, 6, 7, 8, 9, 10], 0)]
    # 2. The next step goes out at once, its row awaiting the token the first one samples.
    ahead = await expect(worker, m.RunStep)
    assert [(r.token_ids, r.start, r.awaits_token) for r in ahead.rows] == [([], 6, True)]
    to_actor.send(m.StepDone(step.step_id, 0, [42], 1.0))
    assert (await expect(queue, m.TokensGenerated)).updates == [TokenUpdate("a", [42], None)]
    # 3. The second token reaches max_tokens.
    to_actor.send(m.StepDone(ahead.step_id, 0, [43], 1.0))
    assert (await expect(queue, m.TokensGenerated)).updates == [TokenUpdate("a", [43], FinishReason.LENGTH)]
    # 4. A request larger than the pool is refused with a reason.
    to_actor.send(m.AddRequest("huge", [1] * 60, greedy(60)))
    failed = await expect(queue, m.RequestFailed)
    assert failed.request_id == "huge" and failed.code == m.ErrorCode.INVALID_REQUEST
    # 5. Stats answer whoever asks: requests, tokens and the KV pool in use.
    to_actor.send(m.AddRequest("b", [5, 6], greedy(4)))
    await expect(worker, m.RunStep)
    to_actor.send(m.QueryStats(7, front_door.addresses[0]))
    report = await expect(front_door, m.StatsReport)
    assert report.query_id == 7 and report.stats.requests == RequestCounts(running=1, waiting=0)
    assert report.stats.totals.generated_tokens == 2 and report.stats.totals.requests_added == 3
    assert report.stats.kv.device_blocks == 8 and report.stats.kv.device_blocks_used == 1
    # 6. An engine failure (which the RequestQueue answers) drops every request: nothing more runs.
    to_actor.send(m.EngineFailed("worker 0 died"))
    to_actor.send(m.QueryStats(8, front_door.addresses[0]))
    report = await expect(front_door, m.StatsReport)
    assert report.stats.kv.device_blocks_used == 0 and report.stats.failure == "worker 0 died"
    with pytest.raises(TimeoutError):
        await engine.recv(timeout_s=0.2)  # nothing stalled
    await actor.stop()


async def test_kv_tier_counts_every_worker_before_reporting(wiring):
    workers, scheduler, inbox = [wiring.inbox(), wiring.inbox()], wiring.inbox(), wiring.inbox()
    actor = KVTier(inbox, wiring.context, Layout(tp=2), wiring.outbox(scheduler))
    wiring.start(actor)
    to_actor = wiring.outbox(inbox)
    to_actor.send(m.EngineReady([100], [w.addresses[0] for w in workers]))
    # 1. A save goes to every worker of the replica; the scheduler hears once both have copied.
    to_actor.send(m.SaveKV("a", 0, Layout(tp=2), [7, 8, 9], [0, 1, 2]))
    copies = [await expect(w, m.SwapOut) for w in workers]
    assert copies[0] == copies[1] and (copies[0].request_id, copies[0].block_ids) == ("a", [7, 8, 9])
    saving = copies[0].transfer_id
    to_actor.send(m.SwappedOut(saving, "a", 1, 300, 0.5))
    with pytest.raises(TimeoutError):
        await scheduler.recv(timeout_s=0.2)
    to_actor.send(m.SwappedOut(saving, "a", 0, 300, 0.5))
    assert await expect(scheduler, m.KVSaved) == m.KVSaved("a", 600, 1.0)
    # 2. A load prefetches on every worker and is reported once all are done.
    to_actor.send(m.LoadKV("a", 0, Layout(tp=2), [0, 1, 2], [3, 4, 5, 6]))
    prefetches = [await expect(w, m.Prefetch) for w in workers]
    assert (prefetches[0].host_block_ids, prefetches[0].block_ids) == ([0, 1, 2], [3, 4, 5, 6])
    for rank in (0, 1):
        to_actor.send(m.Prefetched(prefetches[0].transfer_id, "a", rank, 200, 0.25))
    assert await expect(scheduler, m.KVLoaded) == m.KVLoaded("a", 400, 0.5)
    # 3. When a replica is lost, answers to its transfers no longer count, even for the same request.
    to_actor.send(m.SaveKV("a", 0, Layout(tp=2), [1], [5]))
    stale = (await expect(workers[0], m.SwapOut)).transfer_id
    await expect(workers[1], m.SwapOut)
    to_actor.send(m.ReplicaLost(0, "worker 1 died"))
    to_actor.send(m.ReplicaReady(0, 100, [w.addresses[0] for w in workers]))
    to_actor.send(m.SaveKV("a", 0, Layout(tp=2), [2], [6]))
    fresh = (await expect(workers[0], m.SwapOut)).transfer_id
    await expect(workers[1], m.SwapOut)
    for rank in (0, 1):
        to_actor.send(m.SwappedOut(stale, "a", rank, 1, 0.0))
    with pytest.raises(TimeoutError):
        await scheduler.recv(timeout_s=0.2)
    for rank in (0, 1):
        to_actor.send(m.SwappedOut(fresh, "a", rank, 1, 0.0))
    assert await expect(scheduler, m.KVSaved) == m.KVSaved("a", 2, 0.0)
    await actor.stop()


@pytest.fixture(scope="module")
def codec(default_model):
    return TextCodec(default_model.tokenizer_folder)


async def test_request_queue_tokenizes_detokenizes_and_applies_stop_strings(wiring, codec):
    scheduler, replies, inbox = wiring.inbox(), wiring.inbox(), wiring.inbox()
    actor = RequestQueue(inbox, wiring.context, wiring.outbox(scheduler), codec, max_model_len=64, vocab_size=49152)
    wiring.start(actor)
    to_actor = wiring.outbox(inbox)
    reply_to = replies.addresses[0]
    completion = m.RequestKind.COMPLETION
    # 1. A prompt is tokenized and handed to the scheduler under the id its front door gave it; a
    #    second request under an id in use is dropped (logged), the first going on.
    to_actor.send(m.Submit("r", reply_to, completion, SamplingParams(max_tokens=20, stop=["three"]), prompt="Count:",
                           stream=True))
    added = await expect(scheduler, m.AddRequest)
    assert added.prompt_token_ids == codec.encode_prompt("Count:") and added.sampling.max_tokens == 20
    assert added.request_id == "r"
    to_actor.send(m.Submit("r", reply_to, completion, SamplingParams(max_tokens=20), prompt="Twice:"))
    to_actor.send(m.Submit("r2", reply_to, completion, SamplingParams(max_tokens=20), prompt="Again:"))
    again = await expect(scheduler, m.AddRequest)
    assert (again.request_id, again.prompt_token_ids) == ("r2", codec.encode_prompt("Again:"))
    # 2. Tokens come back and stream as text; the stop string ends the request and tells the scheduler.
    for token in codec.encode_prompt(" one two three four"):
        to_actor.send(m.TokensGenerated([TokenUpdate(added.request_id, [token])]))
    assert await expect(scheduler, m.StopRequest) == m.StopRequest(added.request_id)
    streamed = ""
    while not isinstance(message := await replies.recv(timeout_s=5), m.RequestFinished):
        assert isinstance(message, m.TextDeltas) and [delta.request_id for delta in message.deltas] == ["r"]
        streamed += message.deltas[0].text
    assert message.request_id == "r"
    assert (message.text, message.finish_reason, message.error) == (" one two ", FinishReason.STOP, None)
    assert streamed == message.text  # nothing of the stop string was streamed
    # 3. Invalid requests are answered at once and never reach the scheduler.
    to_actor.send(m.Submit("bad", reply_to, completion, SamplingParams(), prompt_token_ids=[5, 10**6]))
    to_actor.send(m.Submit("long", reply_to, completion, SamplingParams(), prompt_token_ids=[5] * 64))
    to_actor.send(m.Submit("empty", reply_to, completion, SamplingParams(), prompt_token_ids=[]))
    # Each reply may travel on its own socket, so they can arrive in either order.
    answers = {r.request_id: r for r in [await expect(replies, m.RequestFinished) for _ in range(3)]}
    assert "within the vocabulary" in answers["bad"].error and answers["bad"].status_code == 400
    assert "context is 64 tokens" in answers["long"].error and answers["long"].code == m.ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert "prompt is empty" in answers["empty"].error
    with pytest.raises(TimeoutError):
        await scheduler.recv(timeout_s=0.2)
    # 4. A cancel stops the request and answers it as cancelled.
    to_actor.send(m.CancelRequest("r2"))
    assert await expect(scheduler, m.StopRequest) == m.StopRequest("r2")
    cancelled = await expect(replies, m.RequestFinished)
    assert (cancelled.request_id, cancelled.finish_reason) == ("r2", FinishReason.CANCELLED)
    # 5. An engine failure answers what is pending and refuses what comes later.
    to_actor.send(m.Submit("c", reply_to, completion, SamplingParams(max_tokens=4), prompt="x"))
    await expect(scheduler, m.AddRequest)
    to_actor.send(m.EngineFailed("worker 0 died"))
    to_actor.send(m.Submit("d", reply_to, completion, SamplingParams(), prompt="x"))
    answers = {r.request_id: r for r in [await expect(replies, m.RequestFinished) for _ in range(2)]}
    assert sorted(answers) == ["c", "d"]
    assert all((a.code, a.error) == (m.ErrorCode.ENGINE_FAILED, "worker 0 died") for a in answers.values())
    await actor.stop()


async def test_supervisor_loads_workers_and_fails_the_engine_on_silence(wiring):
    workers, scheduler, kv, inbox = [wiring.inbox(), wiring.inbox()], wiring.inbox(), wiring.inbox(), wiring.inbox()

    def load_command(rank, collective, memory):
        return m.LoadShard({}, None, None, 0, "float32", "cpu", [Layout(tp=2)], rank, 16, 1, 0.9, 1, None, collective, "s", "k")

    engine = wiring.inbox()
    actor = Supervisor(inbox, wiring.context, TransportConfig(heartbeat_timeout_s=1.0, max_restarts=0),
                       [Layout(tp=2)], m.Backend.GLOO, load_command, [wiring.outbox(scheduler), wiring.outbox(kv)],
                       wiring.outbox(engine), num_local_workers=1)
    wiring.start(actor)
    to_actor = wiring.outbox(inbox)
    beating_ranks = {0, 1}

    async def beat():
        while True:
            for rank in beating_ranks:
                to_actor.send(m.Heartbeat(rank))
            await asyncio.sleep(0.05)

    beating = asyncio.ensure_future(beat())
    # 1. Rank 0 joins with its rank, a remote worker asks for one; once the world is complete,
    #    rank 0 prepares the communicator groups.
    to_actor.send(m.WorkerHello(0, 100, "host", workers[0].addresses[0]))
    to_actor.send(m.WorkerHello(None, 101, "far", workers[1].addresses[0]))  # pids 100 and 101
    assert await expect(workers[1], m.RankAssigned) == m.RankAssigned(1)
    prepare = await expect(workers[0], m.PrepareGroups)
    assert [(g.key, g.ranks) for g in prepare.groups] == [("ranks:0,1", [0, 1])]  # groups of one need none
    # 2. The prepared rendezvous goes to every worker with its own shard.
    assert (prepare.replica, prepare.world_size, prepare.first_rank) == (0, 2, 0)
    collective = m.CollectiveSpec(m.Backend.GLOO, 2, prepare.groups, "tcp://127.0.0.1:1")
    to_actor.send(m.GroupsPrepared(0, collective, 999))  # from a process that is not rank 0's: ignored
    to_actor.send(m.GroupsPrepared(0, collective, 100))
    loads = [await expect(w, m.LoadShard) for w in workers]
    assert [(c.rank, c.collective) for c in loads] == [(0, collective), (1, collective)]
    # 3. Once all are ready the scheduler, the KV tier and the engine learn the pool and the addresses.
    #    (and how long the slowest took to pin the shared memory for its GPU, to be said at start).
    to_actor.send(m.WorkerReady(0, [50], 1.0, "cpu", 100, pin_s=0.25))
    to_actor.send(m.WorkerReady(1, [40], 1.0, "cpu", 101, pin_s=0.5))
    expected = m.EngineReady([40], [w.addresses[0] for w in workers], pin_s=0.5)
    assert await expect(scheduler, m.EngineReady) == expected == await expect(kv, m.EngineReady)
    assert await expect(engine, m.EngineReady) == expected

    # 4. Worker 1 keeps beating, worker 0 goes silent: the engine is told once, naming worker 0.
    beating_ranks.discard(0)
    failed = await expect(engine, m.EngineFailed, timeout_s=5.0)
    beating.cancel()
    assert "worker 0" in failed.reason and "no heartbeat" in failed.reason and "--max-restarts" in failed.reason
    with pytest.raises(TimeoutError):
        await engine.recv(timeout_s=0.3)
    await actor.stop()


async def test_supervisor_fails_the_engine_when_workers_miss_the_start_timeout(wiring):
    engine, inbox = wiring.inbox(), wiring.inbox()
    actor = Supervisor(inbox, wiring.context, TransportConfig(worker_start_timeout_s=0.3), [Layout(tp=2)],
                       m.Backend.GLOO, lambda rank, collective: None, [], wiring.outbox(engine), num_local_workers=2)
    wiring.start(actor)
    failed = await expect(engine, m.EngineFailed)
    assert "not ready within 0 s (0 of 2 joined" in failed.reason
    await actor.stop()


async def test_the_kv_tier_fails_on_a_load_of_blocks_that_do_not_hold_the_request(wiring):
    workers, scheduler, inbox = [wiring.inbox(), wiring.inbox()], wiring.inbox(), wiring.inbox()
    actor = KVTier(inbox, wiring.context, Layout(tp=2), wiring.outbox(scheduler))
    task = wiring.start(actor).task
    to_actor = wiring.outbox(inbox)
    to_actor.send(m.EngineReady([100], [w.addresses[0] for w in workers]))
    to_actor.send(m.SaveKV("a", 0, Layout(tp=2), [7, 8], [0, 1]))
    saving = (await expect(workers[0], m.SwapOut)).transfer_id
    for rank in (0, 1):
        to_actor.send(m.SwappedOut(saving, "a", rank, 10, 0.0))
    await expect(scheduler, m.KVSaved)
    to_actor.send(m.LoadKV("b", 0, Layout(tp=2), [0], [3]))  # block 0 holds a's KV, not b's
    with pytest.raises(HostBlockConflict, match="host block 0, which holds request a's KV"):
        await asyncio.wait_for(task, 5)


async def test_a_malformed_frame_is_dropped_and_the_actor_goes_on(wiring):
    worker, scheduler, inbox = wiring.inbox(), wiring.inbox(), wiring.inbox()
    actor = KVTier(inbox, wiring.context, Layout(), wiring.outbox(scheduler))
    wiring.start(actor)
    raw = wiring.context.socket(zmq.PUSH)
    raw.connect(inbox.addresses[0])
    await raw.send(b"not a message")
    await raw.send(b'["SaveKV", {"request_id": "x", "nonsense": 1}]')
    await raw.send(m.encode(m.RunStep(1, [])))  # a real message, but not one a KVTier takes
    raw.close(linger=0)
    to_actor = wiring.outbox(inbox)
    to_actor.send(m.EngineReady([10], worker.addresses))
    to_actor.send(m.SaveKV("a", 0, Layout(), [1, 2, 3], [0, 1, 2]))
    assert (await expect(worker, m.SwapOut)).block_ids == [1, 2, 3]
    await actor.stop()


class _GatedCodec:
    """The real codec, except that a prompt starting with "slow" waits for the test to open the gate."""

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.gate = threading.Event()
        self.entered = threading.Event()

    def encode_prompt(self, prompt: str) -> list[int]:
        if prompt.startswith("slow"):
            self.entered.set()
            assert self.gate.wait(timeout=30), "the test never opened the gate"
        return self.codec.encode_prompt(prompt)

    def __getattr__(self, name):
        return getattr(self.codec, name)


def _gated_request_queue(wiring, codec):
    """A started RequestQueue on a gated codec: (actor, codec, scheduler inbox, replies inbox, outbox to the actor)."""
    scheduler, replies, inbox = wiring.inbox(), wiring.inbox(), wiring.inbox()
    gated = _GatedCodec(codec)
    actor = wiring.start(RequestQueue(inbox, wiring.context, wiring.outbox(scheduler), gated, max_model_len=64,
                                      vocab_size=49152))
    return actor, gated, scheduler, replies, wiring.outbox(inbox)


async def test_a_prompt_being_tokenized_delays_no_other_requests_tokens(wiring, codec):
    actor, gated, scheduler, replies, to_actor = _gated_request_queue(wiring, codec)
    reply_to = replies.addresses[0]
    completion = m.RequestKind.COMPLETION
    to_actor.send(m.Submit("a", reply_to, completion, SamplingParams(max_tokens=2), prompt="Hello", stream=True))
    running = await expect(scheduler, m.AddRequest)
    # 1. A prompt stuck in the tokenizer; requests behind it wait their turn (order is kept) ...
    to_actor.send(m.Submit("slow", reply_to, completion, SamplingParams(max_tokens=2), prompt="slow one"))
    to_actor.send(m.Submit("next", reply_to, completion, SamplingParams(max_tokens=2), prompt_token_ids=[1, 2]))
    assert await asyncio.to_thread(gated.entered.wait, 5)
    # 2. ... but the running request's tokens stream and finish it meanwhile.
    token = codec.encode_prompt(" world")[0]
    to_actor.send(m.TokensGenerated([TokenUpdate(running.request_id, [token])]))
    assert [delta.request_id for delta in (await expect(replies, m.TextDeltas)).deltas] == ["a"]
    to_actor.send(m.TokensGenerated([TokenUpdate(running.request_id, [token], FinishReason.LENGTH)]))
    while isinstance(finished := await replies.recv(timeout_s=5), m.TextDeltas):
        pass
    assert (finished.request_id, finished.finish_reason, finished.completion_tokens) == ("a", FinishReason.LENGTH, 2)
    # 3. A request waiting behind the tokenizer can be cancelled; it never reaches the scheduler.
    to_actor.send(m.CancelRequest("next"))
    cancelled = await expect(replies, m.RequestFinished)
    assert (cancelled.request_id, cancelled.finish_reason, cancelled.completion_tokens) == ("next", FinishReason.CANCELLED, 0)
    with pytest.raises(TimeoutError):
        await scheduler.recv(timeout_s=0.2)
    # 4. Once the tokenizer returns, the slow prompt goes on to the scheduler.
    gated.gate.set()
    added = await expect(scheduler, m.AddRequest)
    assert added.prompt_token_ids == codec.encode_prompt("slow one")
    await actor.stop()


async def test_a_cancel_or_failure_reaches_a_request_while_it_tokenizes(wiring, codec):
    actor, gated, scheduler, replies, to_actor = _gated_request_queue(wiring, codec)
    reply_to = replies.addresses[0]
    completion = m.RequestKind.COMPLETION
    # 1. Cancelled while on the tokenizer: answered as cancelled when the call returns, never run.
    to_actor.send(m.Submit("slow-1", reply_to, completion, SamplingParams(), prompt="slow one"))
    assert await asyncio.to_thread(gated.entered.wait, 5)
    to_actor.send(m.CancelRequest("slow-1"))
    to_actor.send(m.Submit("behind", reply_to, completion, SamplingParams(max_tokens=4), prompt="x"))
    await asyncio.sleep(0.2)  # let the cancel and the queued request reach the actor
    gated.gate.set()
    answer = await expect(replies, m.RequestFinished)
    assert (answer.request_id, answer.finish_reason, answer.error) == ("slow-1", FinishReason.CANCELLED, None)
    assert (await expect(scheduler, m.AddRequest)).prompt_token_ids == codec.encode_prompt("x")
    # 2. The engine fails while a prompt tokenizes and another waits: they are answered with the
    #    reason, as is the one already running.
    gated.gate.clear()
    gated.entered.clear()
    to_actor.send(m.Submit("slow-2", reply_to, completion, SamplingParams(), prompt="slow two"))
    to_actor.send(m.Submit("waiting", reply_to, completion, SamplingParams(), prompt="y"))
    assert await asyncio.to_thread(gated.entered.wait, 5)
    to_actor.send(m.EngineFailed("worker 1 died"))
    answers = {r.request_id: r for r in [await expect(replies, m.RequestFinished) for _ in range(2)]}
    assert sorted(answers) == ["behind", "waiting"]
    assert all((a.code, a.error) == (m.ErrorCode.ENGINE_FAILED, "worker 1 died") for a in answers.values())
    gated.gate.set()
    slow = await expect(replies, m.RequestFinished)
    assert (slow.request_id, slow.code) == ("slow-2", m.ErrorCode.ENGINE_FAILED)
    with pytest.raises(TimeoutError):
        await scheduler.recv(timeout_s=0.2)
    await actor.stop()


async def test_an_outbox_whose_inbox_has_closed_drops_instead_of_blocking(wiring):
    inbox = Inbox(wiring.context, wiring.address())
    outbox = wiring.outbox(inbox)
    assert outbox.send(m.HeadAlive())
    assert isinstance(await inbox.recv(timeout_s=5.0), m.HeadAlive)
    inbox.close()  # a front door that went away before its stats answer came
    await asyncio.sleep(0.05)
    started = asyncio.get_running_loop().time()
    assert outbox.send(m.HeadAlive()) is False
    assert asyncio.get_running_loop().time() - started < 1.0


def _node_memory_supervisor(wiring, layouts, num_local_workers, loads):
    """A Supervisor of `layouts` whose head is on node "head" and starts `num_local_workers`."""
    from seesaw.actors.node_memory import NodeMemoryPlan

    def load_command(rank, collective, memory):
        loads[rank] = memory
        return m.LoadShard({}, None, None, 0, "float32", "cpu", layouts, rank, 16, 1, 0.9, 1, None, collective, "s", "k")

    engine, inbox = wiring.inbox(), wiring.inbox()
    checkpoint = m.CheckpointSpec({}, "float32", "/w", 0, "tcp://head:9")
    plan = NodeMemoryPlan("head", True, [(0, 10), (10, 10)], [2, 2, 1, 16, 8], "float32", checkpoint)
    actor = Supervisor(inbox, wiring.context, TransportConfig(heartbeat_timeout_s=30.0), layouts, m.Backend.GLOO,
                       load_command, [wiring.outbox(wiring.inbox())], wiring.outbox(engine), num_local_workers,
                       node_memory=plan)
    wiring.start(actor)
    return actor, wiring.outbox(inbox), engine


async def test_a_replica_on_another_node_loads_once_its_keeper_made_that_nodes_memory(wiring):
    layouts = [Layout(dp=2, pp=2), Layout(dp=2, tp=2)]
    workers = [wiring.inbox() for _ in range(4)]
    loads: dict = {}
    actor, to_actor, _ = _node_memory_supervisor(wiring, layouts, 2, loads)
    for rank in (0, 1):
        to_actor.send(m.WorkerHello(rank, 100 + rank, "a", workers[rank].addresses[0], "head"))
    for rank in (2, 3):  # join without ranks from node "b"
        to_actor.send(m.WorkerHello(None, 100 + rank, "b", workers[rank].addresses[0], "b"))
    for rank in (2, 3):
        assert await expect(workers[rank], m.RankAssigned) == m.RankAssigned(rank)
    # Replica 0 uses the head's memory; replica 1's lowest rank keeps node b's and is asked first.
    assert (await expect(workers[0], m.PrepareGroups)).replica == 0
    make = await expect(workers[2], m.MakeNodeMemory)
    assert (make.replica, make.first_block, make.num_blocks) == (1, 10, 10) and make.checkpoint.feed_address
    with pytest.raises(TimeoutError):  # no groups before the memory is there
        await workers[2].recv(timeout_s=0.3)
    made = m.NodeMemoryMade(1, 2, m.HostBufferSpec("kv-b", 10, [2, 2, 1, 16, 8], "float32", 10),
                            m.WeightStoreSpec("weights-b", "float32", 64), "the head's feed", 0.1, 102)
    to_actor.send(dataclasses_replace(made, pid=999))  # from a process that is not rank 2's: ignored
    with pytest.raises(TimeoutError):
        await workers[2].recv(timeout_s=0.3)
    to_actor.send(made)
    prepare = await expect(workers[2], m.PrepareGroups)
    to_actor.send(m.GroupsPrepared(1, m.CollectiveSpec(m.Backend.GLOO, 2, prepare.groups, "tcp://b:1", 2), 102))
    for rank in (2, 3):
        await expect(workers[rank], m.LoadShard)
    assert loads[2] == loads[3] == made
    await actor.stop()


async def test_a_seesaw_replica_whose_workers_are_on_two_nodes_is_refused_naming_them(wiring):
    layouts = [Layout(pp=2), Layout(tp=2)]
    workers = [wiring.inbox() for _ in range(2)]
    actor, to_actor, engine = _node_memory_supervisor(wiring, layouts, 1, {})
    to_actor.send(m.WorkerHello(0, 100, "a", workers[0].addresses[0], "head"))
    to_actor.send(m.WorkerHello(None, 101, "b", workers[1].addresses[0], "b"))
    failed = await expect(engine, m.EngineFailed)
    assert "replica 0 of p2 has workers on 2 nodes (b: ranks 1; head: ranks 0)" in failed.reason
    assert "must run on one node" in failed.reason
    with pytest.raises(TimeoutError):  # no groups are formed for it
        await workers[0].recv(timeout_s=0.3)
    await actor.stop()


async def test_a_replica_lost_on_another_node_after_the_start_does_not_trip_the_join_deadline(wiring):
    workers, listener, engine, inbox = [wiring.inbox(), wiring.inbox()], wiring.inbox(), wiring.inbox(), wiring.inbox()

    def load_command(rank, collective, memory):
        return m.LoadShard({}, None, None, 0, "float32", "cpu", [Layout(dp=2)], rank, 16, 1, 0.9, 1, None, collective,
                           "s", "k")

    actor = Supervisor(inbox, wiring.context, TransportConfig(join_timeout_s=1.5, heartbeat_timeout_s=30.0),
                       [Layout(dp=2)], m.Backend.GLOO, load_command, [wiring.outbox(listener)], wiring.outbox(engine),
                       num_local_workers=1)
    wiring.start(actor)
    to_actor = wiring.outbox(inbox)
    to_actor.send(m.WorkerHello(0, 100, "a", workers[0].addresses[0], "a"))
    to_actor.send(m.WorkerHello(None, 101, "b", workers[1].addresses[0], "b"))
    assert await expect(workers[1], m.RankAssigned) == m.RankAssigned(1)
    for rank in (0, 1):
        await expect(workers[rank], m.LoadShard)
        to_actor.send(m.WorkerReady(rank, [10], 0.1, "cpu", 100 + rank))
    assert isinstance(await expect(engine, m.EngineReady), m.EngineReady)
    await expect(listener, m.EngineReady)
    to_actor.send(m.WorkerFailed(1, "the process was killed", "running steps", 101))
    assert (await expect(listener, m.ReplicaLost)).is_gone  # judged a second later, before the join timeout
    with pytest.raises(TimeoutError):  # replica 1's rank is missing past the join timeout: not a failure
        await engine.recv(timeout_s=2.0)
    await actor.stop()
