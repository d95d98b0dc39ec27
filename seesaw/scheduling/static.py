"""Continuous batching with chunked prefill under a token budget, for one static layout (pure).

Each step takes, in order: running requests (decode tokens and unfinished prefill chunks),
then requests coming back from the host buffer, then new requests, until the token budget or
the device KV pool runs out. When a running request needs a block and none is free, the newest
running request is evicted to the host buffer (or, if the host buffer has no room, recomputed
later). The core owns its replica's device blocks and host slots and returns decisions.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator

from seesaw.config import SchedulerConfig
from seesaw.kv.block_pool import ROOT_KEY, BlockPool, BlockTokens, blocks_for, chain_key
from seesaw.kv.host_slots import HostSlots
from seesaw.scheduling.decisions import Phase, StepPlan, ToDevice, ToHost
from seesaw.scheduling.request import NewRequest, RequestState, RequestStatus
from seesaw.step import PromptLogprobs, StepRow, TokenLogprobs, TokenUpdate

_MOVING = (RequestStatus.EVICTING, RequestStatus.RESTORING)
_HOLDS_BLOCKS = (RequestStatus.RUNNING, RequestStatus.RESTORING, RequestStatus.EVICTING, RequestStatus.PAUSED)


class StaticScheduler:
    """The scheduling core of one replica: owns request states, the device block pool and the
    replica's host slots; no I/O."""

    def __init__(
        self,
        config: SchedulerConfig,
        num_device_blocks: int,
        block_size: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
        num_micro_batches: int = 1,
        host: HostSlots | None = None,
        first_step_id: int = 0,
    ):
        self.config = config
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.pool = BlockPool(num_device_blocks)
        self.host = host or HostSlots(0, block_size)
        self.watermark_blocks = int(config.watermark * num_device_blocks)
        self._pipeline_depth = num_micro_batches  # steps in flight at once in the current layout
        self.phase = Phase.MIXED
        self.requests: dict[str, RequestState] = {}
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []  # in arrival order
        self.swapped: deque[RequestState] = deque()
        self._in_flight: dict[int, list[StepRow]] = {}
        self._moves: list[ToHost | ToDevice] = []  # decided outside schedule(), sent with the next plan
        self._released: list[str] = []  # block tables the workers may drop, sent with the next step
        self._naming: list[int] = []  # blocks the plan being made fills and names
        self._writing: dict[int, list[int]] = {}  # by step in flight: the named blocks it fills
        self._loading: dict[str, list[int]] = {}  # by request on its way back: the named blocks its load fills
        self._next_step_id = first_step_id  # a replica restarted keeps counting: late answers stay unmatched
        self._next_arrival = 0
        self._evicting_blocks = 0
        self._num_restoring = 0  # requests whose KV is on its way back from the host buffer
        # rows_ahead: rows planned before the token they start with was sampled (two steps in flight)
        # cached_tokens: prompt tokens whose KV a request found in the prefix cache when it first started
        # host_shared_blocks: blocks of host slots that shared a prefix another request saved
        # load_shared_blocks: blocks requests coming back from the host buffer found on the device
        self.counters = {"steps": 0, "evictions": 0, "restores": 0, "recomputes": 0, "rows_ahead": 0,
                         "cached_tokens": 0, "host_shared_blocks": 0, "load_shared_blocks": 0}

    # ------------------------------------------------------------ queries

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_in_flight_steps(self) -> int:
        return len(self._in_flight)

    @property
    def max_in_flight_steps(self) -> int:
        """Steps that may be in flight at once: one per pipeline stage of the current layout, or,
        for a single stage with overlap on, two (the next step is planned while one runs)."""
        return 2 if self._overlaps else self._pipeline_depth

    @property
    def _overlaps(self) -> bool:
        return self._pipeline_depth == 1 and self.config.overlap

    @property
    def num_active(self) -> int:
        """Requests that run or are about to: running, or on their way back from the host buffer.
        `max_num_seqs` caps this number, so no step ever has more rows than it."""
        return len(self.running) + self._num_restoring

    @property
    def has_room_for_active(self) -> bool:
        return self.num_active < self.config.max_num_seqs

    @property
    def has_kv_moves(self) -> bool:
        """Whether some request is on its way to or from the host buffer."""
        return any(s.status in _MOVING for s in self.requests.values())

    @property
    def load(self) -> tuple[int, int]:
        """How busy this core is, for placing new requests: tokens still to produce, blocks held."""
        pending = sum(state.max_tokens - len(state.output_token_ids) + state.num_pending_tokens
                      for state in self.requests.values())
        return pending, self.pool.num_used

    def longest(self, num_prompt_tokens: int, max_tokens: int) -> tuple[int, int]:
        """The most tokens a request of this size can hold, and the KV blocks they take."""
        longest = min(num_prompt_tokens + max_tokens, self.max_model_len)
        return longest, blocks_for(longest, self.block_size)

    def capacity_error(self, num_prompt_tokens: int, max_tokens: int) -> str | None:
        """Why a request of this size can never fit the device KV pool, or None."""
        longest, needed = self.longest(num_prompt_tokens, max_tokens)
        if needed > self.pool.num_blocks:
            return (
                f"the request may grow to {longest} tokens ({needed} KV blocks); the device "
                f"KV pool holds {self.pool.num_blocks} blocks"
            )
        return None

    # ------------------------------------------------------------ commands

    def add(self, request: NewRequest) -> None:
        """Queue a request; call `capacity_error` first."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        state = RequestState(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,  # read only: requests may share one list
            sampling=request.sampling,
            stop=request.sampling.stop_conditions(self.eos_token_ids, self.max_model_len),
            arrival=self._next_arrival,
        )
        self._next_arrival += 1
        self.requests[state.request_id] = state
        self.waiting.append(state)

    def stop(self, request_id: str) -> None:
        """Finish a request early; its KV is released as soon as nothing is using it."""
        state = self.requests.get(request_id)
        if state is None:
            return
        if state.num_in_flight or state.status in _MOVING:
            state.is_stopped = True
            return
        self._finish(state)

    def schedule(self) -> StepPlan:
        """Plan the next step over requests not already in flight."""
        plan = self._plan()
        budget = self.config.max_num_batched_tokens
        max_rows = self._max_rows()
        budget = self._schedule_running(plan, budget, max_rows)
        self._schedule_restores(plan)
        if not self.swapped:
            self._schedule_waiting(plan, budget, max_rows)
        return self._commit(plan)

    def plans(self) -> Iterator[tuple[Phase, StepPlan]]:
        """The plans to carry out now, each with the phase it was planned in: while requests remain
        and another step may be in flight, up to the first plan that runs nothing and switches
        nothing. Carry each out before taking the next."""
        while self.requests and len(self._in_flight) < self.max_in_flight_steps:
            phase = self.phase
            plan = self.schedule()
            yield phase, plan
            if not plan.rows and plan.switch_to is None:
                return

    def is_stuck(self, plan: StepPlan) -> bool:
        """Nothing runs, nothing moves, and `plan` (the latest) could schedule nothing: the device
        pool cannot hold the requests left."""
        return plan.is_empty and not self.num_in_flight_steps and not self.has_kv_moves

    def complete(self, step_id: int, sampled: list[int], logprobs: list[TokenLogprobs | None] = (),
                 prompt_logprobs: list[PromptLogprobs] = ()) -> list[TokenUpdate]:
        """Take a finished step's sampled tokens (and the log-probabilities its rows asked for);
        return what each request gained."""
        rows = self._in_flight.pop(step_id, None)
        if rows is None:
            return []  # a step of requests already failed
        self.pool.cache(self._writing.pop(step_id, ()))
        tokens = iter(sampled)
        token_logprobs = iter(logprobs or [None] * len(sampled))
        scored = {chunk.request_id: chunk for chunk in prompt_logprobs}
        updates: list[TokenUpdate] = []
        for row in rows:
            state = self.requests[row.request_id]
            state.num_in_flight -= 1
            token = entry = None
            if row.sampling is not None:
                token, entry = next(tokens), next(token_logprobs)
                state.num_awaited -= 1
            if state.is_stopped:
                if not state.num_in_flight:
                    self._finish(state)
                continue
            update = None
            if token is not None:
                update = self._append(state, token)
                update.logprobs = None if entry is None else [entry]
                if state.status is not RequestStatus.FINISHED and not state.is_stopped:
                    self._on_sampled(state)
            if row.request_id in scored:
                update = update or TokenUpdate(row.request_id, [])
                update.prompt_logprobs = scored[row.request_id]
            if update is not None:
                updates.append(update)
        return updates

    def on_saved(self, request_id: str) -> None:
        """Every worker copied the request's KV to its host slot: its device blocks are free."""
        state = self.requests.get(request_id)
        self.host.cache_saved(request_id)  # the blocks it named may be shared from now on
        if state is None or state.status is not RequestStatus.EVICTING:
            self.host.release(request_id)
            return
        self._evicting_blocks -= len(state.block_ids)
        self.pool.free(state.block_ids)
        state.block_ids = []
        self._release(state)
        if state.is_stopped:
            self.host.release(request_id)  # the copy has landed; nothing will release it later
            self._finish(state)
            return
        state.status = RequestStatus.SWAPPED
        self.swapped.append(state)

    def on_loaded(self, request_id: str) -> None:
        """Every worker copied the request's KV onto its device: it can run again."""
        self._cache_loaded(request_id)
        self.host.release(request_id)
        state = self.requests.get(request_id)
        if state is None or state.status is not RequestStatus.RESTORING:
            return
        if state.is_stopped:
            self._finish(state)
            return
        self._num_restoring -= 1
        self._resume(state)

    def take_all(self) -> list[RequestState]:
        """Every request still wanted, stripped of its KV to start over elsewhere (its replica was
        lost): the tokens it generated stay and are recomputed, like an eviction without room."""
        states = []
        for state in sorted(self.requests.values(), key=lambda s: s.arrival):
            if state.is_stopped:
                continue  # finished for the user already
            state.block_ids = []
            state.num_blocks_sent = 0  # the replica's next workers start with no tables
            state.num_named = 0
            state.num_computed_tokens = 0
            state.num_in_flight = 0
            state.num_awaited = 0
            state.status = RequestStatus.WAITING
            state.kv_phase = Phase.MIXED
            states.append(state)
        self.requests.clear()
        self._in_flight.clear()
        self._writing.clear()
        self._loading.clear()
        self._moves.clear()
        self._released.clear()
        self._num_restoring = 0
        return states

    def adopt(self, states: list[RequestState]) -> None:
        """Queue requests taken from a lost replica's core, ahead of new ones and in their order."""
        for state in reversed(states):
            self.requests[state.request_id] = state
            self.waiting.appendleft(state)
        if states:
            self._next_arrival = max(self._next_arrival, max(s.arrival for s in states) + 1)

    @property
    def next_step_id(self) -> int:
        return self._next_step_id

    def fail_all(self) -> list[str]:
        """Drop every request (the engine cannot go on); return their ids."""
        request_ids = list(self.requests)
        for state in list(self.requests.values()):
            self._finish(state)
        self._in_flight.clear()
        self._moves.clear()
        return request_ids

    # ------------------------------------------------------------ hooks for the seesaw core

    def _on_sampled(self, state: RequestState) -> None:
        """A request that goes on got a token (static mode: it simply keeps running)."""

    def _resume(self, state: RequestState) -> None:
        state.status = RequestStatus.RUNNING
        bisect.insort(self.running, state, key=lambda s: s.arrival)

    def _take_out(self, state: RequestState) -> None:
        """Take an eviction's victim out of the list that holds it."""
        self.running.remove(state)

    # ------------------------------------------------------------ steps

    def _plan(self) -> StepPlan:
        plan = StepPlan(self._next_step_id, [], self._moves)
        self._moves = []
        return plan

    def _max_rows(self) -> int:
        # With several micro-batches in flight, each step takes its share of the requests.
        return -(-max(1, len(self.running) + len(self.waiting)) // self._pipeline_depth)

    def _commit(self, plan: StepPlan) -> StepPlan:
        if plan.rows:
            self.counters["steps"] += 1
            self._next_step_id += 1
            self._in_flight[plan.step_id] = plan.rows
            plan.released, self._released = self._released, []
            if self._naming:
                self._writing[plan.step_id], self._naming = self._naming, []
        return plan

    def _release(self, state: RequestState) -> None:
        """The request's device blocks are gone: the workers may drop their table of them."""
        if state.num_blocks_sent:
            self._released.append(state.request_id)
            state.num_blocks_sent = 0

    def _next_tokens(self, state: RequestState, overlaps: bool) -> int:
        """How many new tokens the request's next row may take now (0: it cannot run now);
        `overlaps` is `_overlaps`, read once per plan."""
        if state.is_stopped:
            return 0
        num_tokens = state.num_tokens
        if not state.num_in_flight:
            return num_tokens - state.num_computed_tokens
        if state.num_in_flight > 1 or not overlaps:
            return 0
        if num_tokens > state.num_computed_tokens:
            return num_tokens - state.num_computed_tokens  # its prompt's next chunk, behind the one in flight
        # One token past the one the step just before samples (workers fill it in), unless that
        # token may be its last.
        may_grow = (len(state.output_token_ids) + state.num_awaited < state.max_tokens
                    and num_tokens + state.num_awaited < self.max_model_len)
        follows = state.last_step_id == self._next_step_id - 1
        # A constrained request's next row waits for its token: its grammar's mask follows from it.
        may_follow = self._may_follow(state) and not state.sampling.is_constrained
        return 1 if may_grow and follows and may_follow else 0

    def _may_follow(self, state: RequestState) -> bool:
        """Whether the request may decode right behind its row in flight (static mode: always)."""
        return True

    def _schedule_running(self, plan: StepPlan, budget: int, max_rows: int) -> int:
        overlaps = self._overlaps
        busy = 2 if overlaps else 1  # rows in flight that rule a request out for this step
        # In arrival order, those that may take a row (with several steps in flight, most may not);
        # an eviction below takes some of them out of `running`.
        ready = [state for state in self.running if state.num_in_flight < busy]
        if overlaps and self._constrained_in_flight():
            # Constrained requests decode in the same steps: one out of step with those in flight
            # waits for them rather than splitting the batch in two halves taking turns.
            ready = [state for state in ready if not state.sampling.is_constrained]
        rows, pool = plan.rows, self.pool
        for state in ready:
            if budget <= 0 or len(rows) >= max_rows:
                break
            if state.status is not RequestStatus.RUNNING:
                continue  # evicted to make room for a row before it
            num_new = min(self._next_tokens(state, overlaps), budget)
            if not num_new:
                continue
            needed = self._blocks_needed(state, num_new)
            if num_new > 1 and needed > pool.num_free:
                # A prompt chunk takes what the free blocks hold (at least one block's worth)
                # rather than evicting others to be whole.
                num_new = self._chunk_that_fits(state, num_new)
                needed = self._blocks_needed(state, num_new)
            if needed > 0:
                while pool.num_free + self._evicting_blocks < needed:
                    victim = self._pick_victim()
                    if victim is None:
                        break
                    self._evict(victim, plan)
                    if victim is state:
                        break
                if state.status is not RequestStatus.RUNNING or not pool.can_allocate(needed):
                    continue  # waits for an eviction to land, or was evicted itself
                state.block_ids.extend(pool.allocate(needed))
            rows.append(self._row(state, num_new))
            budget -= num_new
        return budget

    def _constrained_in_flight(self) -> bool:
        """Whether a step in flight has a row of a constrained request (which waits for its token)."""
        return any(row.sampling is not None and self.requests[row.request_id].sampling.is_constrained
                   for rows in self._in_flight.values() for row in rows if row.request_id in self.requests)

    def _blocks_needed(self, state: RequestState, num_new: int) -> int:
        """Blocks a row of `num_new` more tokens needs beyond those the request holds."""
        return blocks_for(state.num_computed_tokens + num_new, self.block_size) - len(state.block_ids)

    def _chunk_that_fits(self, state: RequestState, num_new: int) -> int:
        """The part of a `num_new`-token chunk that its blocks and the free ones hold, or, with no
        room at all, what one more block holds (a request's blocks hold its computed tokens, so
        that is at least one token)."""
        room = (len(state.block_ids) + max(1, self.pool.num_free)) * self.block_size - state.num_computed_tokens
        return min(num_new, room)

    def _schedule_restores(self, plan: StepPlan, limit: int | None = None) -> None:
        """Load swapped requests back (at most `limit` of them) into free blocks above the
        watermark, laid out for the decode phase in seesaw mode."""
        phase = Phase.MIXED if self.phase is Phase.MIXED else Phase.DECODE
        while self.swapped and self.has_room_for_active and (limit is None or limit > 0):
            state = self.swapped[0]
            cached, is_being_written = self._loaded_prefix(state, phase)
            if is_being_written:
                return  # it comes back once the load bringing its prefix lands, and shares it
            needed = blocks_for(state.num_computed_tokens + 1, self.block_size) - len(cached)
            is_alone = not self.running and not any(
                s.status is RequestStatus.RESTORING for s in self.requests.values()
            )
            if self.pool.num_free - needed - self.pool.num_idle(cached) < (0 if is_alone else self.watermark_blocks):
                return
            self.swapped.popleft()
            self.pool.hold(cached)
            self.counters["load_shared_blocks"] += len(cached)
            state.block_ids = cached + self.pool.allocate(needed)
            state.status = RequestStatus.RESTORING
            self._num_restoring += 1
            state.kv_phase = phase
            self._name_loaded(state, len(cached), phase)
            slot = self.host.get(state.request_id)
            shared = len(cached)  # the blocks found on the device are not loaded again
            plan.moves.append(ToDevice(state.request_id, phase, slot.host_block_ids[shared:], state.block_ids[shared:],
                                       slot.shared_holders[shared:]))
            self.counters["restores"] += 1
            if self.phase is not phase:
                self.counters["prefetches"] += 1
            if limit is not None:
                limit -= 1

    def _schedule_waiting(self, plan: StepPlan, budget: int, max_rows: int) -> None:
        while self.waiting and budget > 0 and self.has_room_for_active and len(plan.rows) < max_rows:
            state = self.waiting[0]
            cached, is_being_written = self._cached_prefix(state)
            if is_being_written:
                return  # it starts once the step computing its next blocks lands, and shares them
            num_cached = len(cached) * self.block_size
            num_new = min(state.num_tokens - num_cached, budget)
            needed = blocks_for(num_cached + num_new, self.block_size) - len(cached)
            needed += self.pool.num_idle(cached)
            if self.pool.num_free - needed < self.watermark_blocks and self.running:
                return
            if not self.pool.can_allocate(needed):
                return
            self.waiting.popleft()
            self._take_cached(state, cached)
            state.block_ids += self.pool.allocate(blocks_for(num_cached + num_new, self.block_size) - len(cached))
            state.status = RequestStatus.RUNNING
            state.kv_phase = self.phase
            bisect.insort(self.running, state, key=lambda s: s.arrival)
            plan.rows.append(self._row(state, num_new))
            budget -= num_new

    def _row(self, state: RequestState, num_new: int) -> StepRow:
        start, num_tokens = state.num_computed_tokens, state.num_tokens
        awaits_token = start >= num_tokens  # its first token is the one the step in flight samples
        if awaits_token:
            token_ids = []
            self.counters["rows_ahead"] += 1
        else:
            token_ids = state.token_ids(start, start + num_new)
        state.num_computed_tokens = start + num_new
        state.num_in_flight += 1
        state.last_step_id = self._next_step_id
        if self._names_blocks(state):
            self._name_blocks(state, min(start + num_new, num_tokens) // self.block_size)
        first_new_block, state.num_blocks_sent = state.num_blocks_sent, len(state.block_ids)
        if first_new_block == 0:
            state.has_counts = False  # the workers start its table over, and its token counts
        sampling = None
        if start + num_new == num_tokens + state.num_awaited:  # reaches the end
            sampling = state.sampling.for_row(len(state.output_token_ids) + state.num_awaited, state.stop.token_ids)
            state.num_awaited += 1
            if sampling.adjustments is not None and sampling.adjustments.counts_tokens and not state.has_counts:
                sampling.adjustments.history_prompt = state.prompt_token_ids
                sampling.adjustments.history_output = list(state.output_token_ids)
                state.has_counts = True
        row = StepRow(state.request_id, token_ids, start, state.block_ids[first_new_block:], first_new_block,
                      sampling, awaits_token)
        num_prompt = len(state.prompt_token_ids)
        if state.sampling.prompt_logprobs is not None and not state.output_token_ids and start < num_prompt:
            row.score_prompt = state.sampling.prompt_logprobs  # a first prefill's chunk (a recompute's again)
            row.next_prompt_token = state.prompt_token_ids[start + num_new] if start + num_new < num_prompt else None
        return row

    # ------------------------------------------------------------ the prefix cache

    def _caches_prefixes(self) -> bool:
        """Whether requests share the blocks of their common prefixes now (static mode: with prefix
        caching on)."""
        return self.config.prefix_caching

    def _names_blocks(self, state: RequestState) -> bool:
        """Whether the blocks the request fills are named for others to share: those laid out in
        the current layout, while prefixes are cached."""
        return state.kv_phase is self.phase and self._caches_prefixes()

    def _cached_prefix(self, state: RequestState) -> tuple[list[int], bool]:
        """For a request that holds no KV: the cached blocks holding its first tokens (never its
        last one, whose logits it needs), and whether the block after them is being written now."""
        if state.num_computed_tokens or not self._caches_prefixes() or state.sampling.prompt_logprobs is not None:
            return [], False  # a prompt whose log-probabilities are reported is computed whole
        return self.pool.match(self._chain(state, 0, (state.num_tokens - 1) // self.block_size), self.phase)

    def _loaded_prefix(self, state: RequestState, layout: Phase) -> tuple[list[int], bool]:
        """For a request coming back from the host buffer into blocks laid out for `layout`: the
        cached blocks of that layout holding its first tokens (at most those before the block its
        next token goes to), and whether the block after them is being loaded or written now."""
        if not self.config.prefix_caching or state.num_computed_tokens <= self.block_size:
            return [], False
        return self.pool.match(self._chain(state, 0, state.num_computed_tokens // self.block_size), layout)

    def _name_loaded(self, state: RequestState, first: int, layout: Phase) -> None:
        """Name the full blocks a load being planned fills (from block `first` on); each may be
        shared once the load lands. The blocks a request's rows fill later are named as usual."""
        num_full = state.num_computed_tokens // self.block_size
        state.num_named = num_full
        if not self.config.prefix_caching or first >= num_full:
            return
        named = self._name_range(state, first, num_full, layout)
        if named:
            self._loading[state.request_id] = named

    def _cache_loaded(self, request_id: str) -> None:
        """A load landed: the blocks it filled and named may be shared."""
        self.pool.cache(self._loading.pop(request_id, ()))

    def _chain(self, state: RequestState, first: int, end: int) -> Iterator[tuple[int, BlockTokens]]:
        """The keys and tokens of the request's full blocks `first` to `end` - 1, made as they are
        read (a lookup stops at its first miss)."""
        keys, size = state.block_keys, self.block_size
        for index in range(len(keys), first):  # keys before `first` that were never needed
            keys.append(chain_key(keys[-1] if keys else ROOT_KEY, tuple(state.token_ids(index * size, (index + 1) * size))))
        for index in range(first, end):
            tokens = tuple(state.token_ids(index * size, (index + 1) * size))
            if index == len(keys):
                keys.append(chain_key(keys[-1] if keys else ROOT_KEY, tokens))
            yield keys[index], tokens

    def _host_shared(self, state: RequestState, num_tokens: int) -> tuple[list[int], bool]:
        """Host blocks that other requests' saves filled with this request's first tokens, of its
        first `num_tokens` (its slot shares them; never its last block, which it writes itself),
        and whether a save in flight is writing the block after them."""
        if not self.config.prefix_caching or num_tokens <= self.block_size:
            return [], False
        return self.host.match(self._chain(state, 0, (num_tokens - 1) // self.block_size))

    def _host_can_store(self, state: RequestState, num_tokens: int) -> bool:
        return self.host.can_store(num_tokens, self._host_shared(state, num_tokens)[0])

    def _host_store(self, state: RequestState, num_tokens: int) -> None:
        """Reserve the request's host slot for its first `num_tokens` tokens' KV, sharing what it can."""
        shared, _ = self._host_shared(state, num_tokens)
        self.host.store(state.request_id, num_tokens, shared)
        self.counters["host_shared_blocks"] += len(shared)
        if self.config.prefix_caching:  # a prompt's slot is named now: others wait for its save, not copy it
            self.host.name_saving(state.request_id, list(self._chain(state, 0, num_tokens // self.block_size)))

    def _take_cached(self, state: RequestState, cached: list[int]) -> None:
        """The request starts with the cached blocks of its prefix: their KV needs no computing."""
        self.pool.hold(cached)
        state.block_ids = list(cached)
        state.num_named = len(cached)
        state.num_computed_tokens = len(cached) * self.block_size
        if state.last_step_id is None:  # its first start, not a recompute
            self.counters["cached_tokens"] += state.num_computed_tokens

    def _name_blocks(self, state: RequestState, num_full: int) -> None:
        """Name the request's blocks that the row being planned fills, up to its first `num_full`
        blocks; each may be shared once the step lands."""
        if num_full <= state.num_named:
            return
        self._naming += self._name_range(state, state.num_named, num_full, state.kv_phase)
        state.num_named = num_full

    def _name_range(self, state: RequestState, first: int, end: int, layout: Phase) -> list[int]:
        """Name the request's blocks `first` to `end` - 1, laid out for `layout`, by their keys;
        return those named (a key that already names another block leaves its block unnamed)."""
        named = []
        for index, (key, tokens) in enumerate(self._chain(state, first, end), first):
            parent = state.block_keys[index - 1] if index else ROOT_KEY
            if self.pool.name(state.block_ids[index], key, parent, tokens, layout):
                named.append(state.block_ids[index])
        return named

    def _pick_victim(self) -> RequestState | None:
        """The latest arrival with no row in flight (rows of the plan being made count as in flight)."""
        for state in reversed(self.running):
            if not state.num_in_flight:
                return state
        return None

    def _evict(self, state: RequestState, plan: StepPlan) -> None:
        """Make room on the device: the request's KV goes to the host buffer, or, if it has no
        room, the request starts over later (its tokens so far are kept and recomputed)."""
        self._take_out(state)
        self.counters["evictions"] += 1
        if self._host_can_store(state, state.num_computed_tokens):
            self._host_store(state, state.num_computed_tokens)
            plan.moves.append(self._to_host(state))
            return
        self.counters["recomputes"] += 1
        self.pool.free(state.block_ids)
        state.block_ids = []
        state.num_named = 0
        self._release(state)
        state.num_computed_tokens = 0
        state.status = RequestStatus.WAITING
        self.waiting.appendleft(state)

    def _to_host(self, state: RequestState) -> ToHost:
        """Start copying a request's KV into its host slot (but the blocks it shares there, which
        hold it already); its device blocks stay held until it lands."""
        slot = self.host.get(state.request_id)
        state.status = RequestStatus.EVICTING
        self._evicting_blocks += len(state.block_ids)
        shared = slot.num_shared
        blocks = state.block_ids[shared : len(slot.host_block_ids)]
        return ToHost(state.request_id, state.kv_phase, blocks, slot.host_block_ids[shared:])

    # ------------------------------------------------------------ results

    def _append(self, state: RequestState, token: int) -> TokenUpdate:
        state.output_token_ids.append(token)
        reason = state.stop.after_token(token, len(state.output_token_ids), state.num_tokens)
        if reason is not None:
            if state.num_in_flight:
                state.is_stopped = True  # a row planned before this token was known is still in flight
            else:
                self._finish(state)
        return TokenUpdate(state.request_id, [token], reason)

    def _finish(self, state: RequestState) -> None:
        if state.status in _HOLDS_BLOCKS:
            self.pool.free(state.block_ids)
        if state.status is RequestStatus.EVICTING:
            self._evicting_blocks -= len(state.block_ids)
        elif state.status is RequestStatus.RESTORING:
            self._num_restoring -= 1
        state.block_ids = []
        self._release(state)
        if state.status is RequestStatus.RUNNING:
            self.running.remove(state)
        elif state.status is RequestStatus.WAITING:
            self.waiting.remove(state)
        elif state.status is RequestStatus.SWAPPED:
            self.swapped.remove(state)
        self._forget(state)
        if state.status not in _MOVING:
            self.host.release(state.request_id)  # a copy in flight releases it when it lands
        state.status = RequestStatus.FINISHED
        self.requests.pop(state.request_id, None)

    def _forget(self, state: RequestState) -> None:
        """Drop the request from lists only a subclass keeps."""
