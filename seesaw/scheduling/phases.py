"""The seesaw phase machine for one replica (pure): prefill in one layout, decode in another.

Prefill while the host buffer can take the next waiting prompt: each prompt is prefilled (in
chunks under the token budget) into device blocks and its KV copied to a host slot reserved for
it on admission, freeing the blocks. Once no more prompts can start, host-resident requests load
into free device blocks in the decode layout's shape while the last prefill steps run. Then
decode: host-resident requests are loaded into free device blocks above a watermark and decoded
together. Back to prefill once the host buffer has drained below its low-water mark and enough
prompts wait (they would fill a share of the host buffer, the oldest has waited long enough, or
decode has nothing left); requests still decoding then stay on the device, paused, until the next
decode phase, unless a prompt needs their blocks: then their KV goes to the host buffer too (the
latest first) and comes back with the rest. Switches happen as rarely as that allows.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from seesaw.config import SchedulerConfig
from seesaw.kv.block_pool import blocks_for
from seesaw.kv.host_slots import HostSlots
from seesaw.scheduling.decisions import Phase, StepPlan
from seesaw.scheduling.request import NewRequest, RequestState, RequestStatus
from seesaw.scheduling.static import StaticScheduler


class PhaseScheduler(StaticScheduler):
    """A replica's requests, device blocks and host slots under the seesaw phase machine."""

    def __init__(
        self,
        config: SchedulerConfig,
        num_device_blocks: int,
        block_size: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
        micro_batches: dict[Phase, int],
        host: HostSlots,
        first_step_id: int = 0,
        clock: Callable[[], float] | None = None,
    ):
        super().__init__(config, num_device_blocks, block_size, max_model_len, eos_token_ids, host=host,
                         first_step_id=first_step_id)
        self.micro_batches = micro_batches  # steps in flight in each phase: its layout's pipeline depth
        self.phase = Phase.PREFILL
        self._pipeline_depth = micro_batches[self.phase]  # follows the phase: _switch sets both
        self._clock = clock or (lambda: 0.0)  # seconds; only the waits of prompts are measured with it
        self.paused: list[RequestState] = []  # decoding requests kept on the device during prefill
        # Requests loaded for decode while the replica still prefills: their host copies are kept
        # (and count as the host buffer's) until decode starts, so the load makes no room for prompts.
        self.loaded_early: set[str] = set()
        self.counters["transitions"] = 0
        self.counters["paused_to_host"] = 0  # of the evictions, paused requests moved out for a prompt
        self.counters["prefetches"] = 0  # of the restores, those started before decode

    def add(self, request: NewRequest) -> None:
        super().add(request)
        self.requests[request.request_id].arrival_s = self._clock()

    def capacity_error(self, num_prompt_tokens: int, max_tokens: int) -> str | None:
        """Why a request of this size can never fit the device pool or the host buffer, or None."""
        error = super().capacity_error(num_prompt_tokens, max_tokens)
        if error is not None:
            return error
        longest, needed = self.longest(num_prompt_tokens, max_tokens)
        if needed > self.host.num_blocks:
            return (
                f"the request may grow to {longest} tokens ({needed} KV blocks); the host KV buffer "
                f"holds {self.host.num_blocks} blocks per replica (raise --host-buffer-gb)"
            )
        return None

    # ------------------------------------------------------------ the phase machine

    def schedule(self) -> StepPlan:
        plan = self._plan()
        if self.phase is Phase.PREFILL:
            if not self._has_prefill_work():
                self._prefetch(plan)  # before the switch: the copies start while the last steps run
                if self._has_decode_work() and self._may_leave_prefill():
                    self._switch(Phase.DECODE, plan)
                return self._commit(plan)
        elif self._should_prefill():
            self._switch(Phase.PREFILL, plan)
            return self._commit(plan)
        budget = self.config.max_num_batched_tokens
        if self.phase is Phase.DECODE:
            self._resume_paused()
        max_rows = self._max_rows()
        budget = self._schedule_running(plan, budget, max_rows)
        if self.phase is Phase.PREFILL:
            self._schedule_prefills(plan, budget, max_rows)
            self._prefetch(plan)
        elif not self._is_holding_loads():
            self._schedule_restores(plan)
        return self._commit(plan)

    def _has_prefill_work(self) -> bool:
        """A prompt still has chunks to schedule (now or once its chunk in flight lands), or the
        next waiting one can start (now, or once the prompts already prefilled, or paused requests,
        leave the device)."""
        if any(state.num_pending_tokens for state in self.running):
            return True
        if not self.waiting:
            return False
        state = self.waiting[0]
        if not self._host_can_store(state, state.num_tokens):
            return False
        # Blocks of prompts being prefilled or copied out free up by themselves, and so do those of
        # paused requests the host buffer can take beside the prompt.
        freeing = self._evicting_blocks + sum(len(s.block_ids) for s in self.running)
        leaving = self._paused_the_host_can_take(blocks_for(state.num_tokens, self.block_size))
        freeing += sum(len(s.block_ids) for s in leaving)
        return self.pool.num_free + freeing >= blocks_for(state.num_tokens, self.block_size)

    def _may_leave_prefill(self) -> bool:
        """With the host buffer full, leave at once (each worker starts re-sharding as soon as its
        own part of the last steps is done); with nothing waiting, only once the last prefill steps
        have landed, since the rest of a batch is usually still arriving."""
        return bool(self.waiting) or not self.num_in_flight_steps

    def _has_decode_work(self) -> bool:
        return bool(self.paused or self.swapped or self.has_kv_moves or self.running)

    def _should_prefill(self) -> bool:
        """Back to prefill: enough prompts wait, the host buffer is low, and the device has room
        for a step's worth of them (or for the next one, once nothing else will free blocks)."""
        if not self.waiting or self.host.used_fraction > self.config.host_low_water:
            return False
        if not self._can_start_prefill(self.waiting[0]) or not self._is_prefill_due():
            return False
        return not self.num_active or self.pool.num_free >= self._prefill_room_wanted()

    def _is_prefill_due(self) -> bool:
        """Whether the prompts waiting are worth a prefill phase and the two re-shards around it:
        decode has nothing left, the oldest has waited `prefill_max_wait_s`, or together they would
        fill `prefill_min_fill` of the host buffer."""
        config = self.config
        if not self._has_decode_work():
            return True
        if self._clock() - self.waiting[0].arrival_s >= config.prefill_max_wait_s:
            return True
        wanted = config.prefill_min_fill * self.host.num_blocks
        num_blocks = 0
        for state in self.waiting:  # stops as soon as the share is reached
            num_blocks += blocks_for(state.num_tokens, self.block_size)
            if num_blocks >= wanted:
                return True
        return False

    def _prefill_room_wanted(self, num_steps: int = 1) -> int:
        """Device blocks for the waiting prompts that `num_steps` steps' token budget and the host
        buffer's free space could take (at least the first; never more than the whole pool)."""
        num_tokens = num_blocks = 0
        budget = num_steps * self.config.max_num_batched_tokens
        for state in self.waiting:
            needed = blocks_for(state.num_tokens, self.block_size)
            if num_blocks and (num_tokens + state.num_tokens > budget
                               or num_blocks + needed > self.host.num_free_blocks):
                break
            num_tokens += state.num_tokens
            num_blocks += needed
        return min(num_blocks, self.pool.num_blocks)

    def _is_holding_loads(self) -> bool:
        """Whether to stop loading host requests so the device frees room for the next prompt
        (only when a prefill phase is due and the host buffer could take that prompt: otherwise
        loading is what drains it)."""
        if not self.waiting or self.host.used_fraction > self.config.host_low_water:
            return False
        return self._host_can_store(self.waiting[0], self.waiting[0].num_tokens) and self._is_prefill_due()

    def _can_start_prefill(self, state: RequestState, cached: list[int] | None = None) -> bool:
        """Whether the prompt can be admitted now, starting with the `cached` blocks of its prefix.
        No watermark: during prefill nothing on the device grows (paused requests wait, prompts
        hold all their blocks from the start)."""
        cached = cached or []
        needed = blocks_for(state.num_tokens, self.block_size) - len(cached) + self.pool.num_idle(cached)
        return self._host_can_store(state, state.num_tokens) and self.pool.can_allocate(needed)

    def _switch(self, phase: Phase, plan: StepPlan) -> None:
        """Change phase now; steps already planned run first on every worker (each starts its
        transition as soon as its own part of them is done)."""
        plan.switch_to = phase
        self.counters["transitions"] += 1
        self.phase = phase
        # Blocks named in the layout being left are no longer shared (the prefill layout's are
        # named by prompts, the decode layout's by loads, prefetched ones too, which stay).
        self.pool.forget_names(Phase.DECODE if phase is Phase.PREFILL else Phase.PREFILL)
        self._pipeline_depth = self.micro_batches[phase]
        if phase is Phase.PREFILL:
            # Decoding requests pause; a prompt whose last chunk is still in flight stays running
            # and leaves the device when that chunk lands.
            decoding = [state for state in self.running if state.kv_phase is not Phase.PREFILL]
            for state in decoding:
                state.status = RequestStatus.PAUSED
            self.paused.extend(decoding)
            self.running = [state for state in self.running if state.kv_phase is Phase.PREFILL]
        else:
            for request_id in self.loaded_early:  # on the device now, in the decode layout
                self.host.release(request_id)
            self.loaded_early.clear()
            self._resume_paused()

    def _prefetch(self, plan: StepPlan) -> None:
        """Once no more prompts can start this phase, load host-resident requests into the free
        device blocks in the decode layout's shape, so decode starts with a full batch: the copies
        run beside the last prefill steps and the re-shard, not after them. At most `max_num_seqs`
        requests wait for decode on the device."""
        if not self.config.prefetch or not self.swapped:
            return
        if self.waiting and self._host_can_store(self.waiting[0], self.waiting[0].num_tokens):
            return  # prompts can still start: their blocks come first
        room = self.config.max_num_seqs - len(self.paused) - self._num_restoring
        self._schedule_restores(plan, limit=room)

    def _resume_paused(self) -> None:
        """Decode: paused requests run again, the oldest first, as far as `max_num_seqs` allows;
        the rest stay paused on the device until rows free up (or are evicted for room)."""
        num_resumed = 0
        while num_resumed < len(self.paused) and self.has_room_for_active:
            super()._resume(self.paused[num_resumed])
            num_resumed += 1
        del self.paused[:num_resumed]

    # ------------------------------------------------------------ prefill

    def _schedule_prefills(self, plan: StepPlan, budget: int, max_rows: int) -> None:
        """Admit waiting prompts: a host slot is reserved and every block of the prompt taken now,
        so a prefill never has to evict anything. While blocks on their way to the host buffer are
        what a full step of prompts still lacks, a step of only the prompts that fit now waits for
        them (in a pipeline, a small step stays small through every stage)."""
        if self.waiting and not plan.rows and self._is_room_coming():
            self._move_paused_out(self.waiting[0], plan)
            return
        while self.waiting and budget > 0 and len(plan.rows) < max_rows and self.has_room_for_active:
            state = self.waiting[0]
            cached, is_being_written = self._cached_prefix(state)
            if is_being_written or self._host_shared(state, state.num_tokens)[1]:
                return  # it starts once the step or save writing its next blocks lands, and shares them
            if not self._can_start_prefill(state, cached):
                self._move_paused_out(state, plan)
                return
            self.waiting.popleft()
            self._host_store(state, state.num_tokens)
            self._take_cached(state, cached)
            state.block_ids += self.pool.allocate(blocks_for(state.num_tokens, self.block_size) - len(cached))
            state.status = RequestStatus.RUNNING
            state.kv_phase = Phase.PREFILL
            bisect.insort(self.running, state, key=lambda s: s.arrival)
            num_new = min(state.num_pending_tokens, budget)
            plan.rows.append(self._row(state, num_new))
            budget -= num_new

    def _is_room_coming(self) -> bool:
        """Whether a step's worth of the waiting prompts lacks device room now but will have it
        once the copies in flight to the host buffer land."""
        wanted = self._prefill_room_wanted()
        return self.pool.num_free < wanted <= self.pool.num_free + self._evicting_blocks

    def _paused_the_host_can_take(self, reserved_blocks: int) -> Iterator[RequestState]:
        """Paused requests, the latest first, whose KV the host buffer can take while keeping
        `reserved_blocks` free for prompts (with a row in flight too: they can move once it
        lands); one loaded early still has its host copy."""
        room = self.host.num_free_blocks - reserved_blocks
        for state in reversed(self.paused):
            if state.request_id not in self.loaded_early:  # one loaded early still has its host copy
                room -= blocks_for(state.num_computed_tokens, self.block_size)
            if room < 0:
                return
            yield state

    def _move_paused_out(self, prompt: RequestState, plan: StepPlan) -> None:
        """The device cannot take the next prompt: copy paused requests to the host buffer until the
        blocks on their way out would hold the prompts of a full pipeline (a step's budget for each
        of its stages). They come back in the next decode phase like the prompts prefilled now, so
        the prefill pipeline is not left to one prompt at a time."""
        if not self._host_can_store(prompt, prompt.num_tokens):
            return  # the host buffer is full: the replica is about to decode
        needed = max(blocks_for(prompt.num_tokens, self.block_size), self._prefill_room_wanted(self._pipeline_depth))
        for state in list(self._paused_the_host_can_take(needed)):
            if self.pool.num_free + self._evicting_blocks >= needed:
                return
            if state.num_in_flight:
                continue
            self.paused.remove(state)
            self.counters["evictions"] += 1
            self.counters["paused_to_host"] += 1
            if state.request_id in self.loaded_early:  # its host copy is still there: no copy back
                self.loaded_early.discard(state.request_id)
                self._drop_device_copy(state)
                continue
            self._host_store(state, state.num_computed_tokens)
            plan.moves.append(self._to_host(state))

    def _drop_device_copy(self, state: RequestState) -> None:
        self.pool.free(state.block_ids)
        state.block_ids = []
        self._release(state)
        state.status = RequestStatus.SWAPPED
        self.swapped.appendleft(state)

    def _max_rows(self) -> int:
        """In decode, each micro-batch takes its share of the requests decoding (prompts waiting
        for the next prefill phase take no row now, so they must not unbalance the pipeline)."""
        if self.phase is Phase.DECODE:
            return -(-max(1, len(self.running)) // self._pipeline_depth)
        return super()._max_rows()

    def _caches_prefixes(self) -> bool:
        """Only prompts prefilled in the prefill layout find and name computed blocks (loads into
        the decode layout share theirs on their own)."""
        return self.config.prefix_caching and self.phase is Phase.PREFILL

    def _may_follow(self, state: RequestState) -> bool:
        """Only decoding requests run ahead of their token: a prompt just prefilled leaves for the host."""
        return self.phase is Phase.DECODE and state.kv_phase is Phase.DECODE

    def _on_sampled(self, state: RequestState) -> None:
        if state.kv_phase is Phase.PREFILL:  # prefilled: its KV goes to the slot reserved for it
            self.running.remove(state)
            self._moves.append(self._to_host(state))

    def _resume(self, state: RequestState) -> None:
        if self.phase is Phase.DECODE:
            super()._resume(state)
        else:
            state.status = RequestStatus.PAUSED
            self.paused.append(state)

    def on_loaded(self, request_id: str) -> None:
        """As the static core does, except that a request loaded while the replica prefills keeps
        its host copy until decode starts."""
        state = self.requests.get(request_id)
        if (self.phase is Phase.PREFILL and state is not None and state.status is RequestStatus.RESTORING
                and not state.is_stopped):
            self._cache_loaded(request_id)
            self.loaded_early.add(request_id)
            self._num_restoring -= 1
            self._resume(state)
            return
        super().on_loaded(request_id)

    def take_all(self) -> list[RequestState]:
        self.loaded_early.clear()
        self.paused.clear()
        return super().take_all()

    def _forget(self, state: RequestState) -> None:
        if state.status is RequestStatus.PAUSED:
            self.paused.remove(state)
        self.loaded_early.discard(state.request_id)

    def _pick_victim(self) -> RequestState | None:
        """In decode, requests left paused by the row cap give way first: they would only wait."""
        if self.phase is Phase.DECODE:
            for state in reversed(self.paused):
                if not state.num_in_flight:
                    return state
        return super()._pick_victim()

    def _take_out(self, state: RequestState) -> None:
        if state.status is RequestStatus.PAUSED:
            self.paused.remove(state)
        else:
            super()._take_out(state)
