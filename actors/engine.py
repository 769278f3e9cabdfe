"""The built-in generation engine: continuous batching over a slot KV cache, with CUDA-graph decode steps.

Requests wait in a queue and run in a fixed set of slots (`max_slots`). A slot's sequence lives at positions
0 .. length-1 of its row of a preallocated `SlotKVCache`; a decode step advances every slot by one token
(finished and idle slots are masked) and is one CUDA graph replay on CUDA. When sequences end (a stop token
or their own token limit) their slots are refilled from the queue, so a long sequence never holds the
others back.

Host and device meet only at snapshots: every `sync_every` decode steps the host queues a copy of the slots'
status and, on CUDA, reads the previous one while the next run of steps is already queued (so the device
never waits for the host's bookkeeping or its eager prefill launches). Finished slots are refilled once a
sixteenth of the slots (`refill_fraction`) are free or the queue is shorter than that; each refill is one
eager, right-padded prefill forward. Sampling runs on the device from per-request uniform streams.

The model is the project's `CausalLM`, run through its own `hidden_states` with the slot cache: there is no
second copy of the architecture. Weights must be updated in place (`load_weights`, the weight receiver): the
captured graphs keep reading the same parameter storage.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from actors.sampling import sample
from actors.scheduler import Schedule, padded_chunks, slot_bucket
from areal_async.types import Generation, SamplingParams
from areal_async.memory_plan import engine_slots
from areal_async.model import CausalLM
from areal_async.model.slot_cache import SlotKVCache, slot_cache_bytes

MAX_STOP_IDS = 8  # stop ids held in the static buffer (grows if a call brings more)
_SEED_MIX = 0x9E3779B97F4A7C15


class _Call:
    """One generate call: its schedule (actors/scheduler.py), and what the device returns on its way to the
    host."""

    def __init__(self, prompts, limits: list[int], params: SamplingParams, seed: int, slots: int) -> None:
        self.prompts, self.limits, self.params, self.seed = prompts, limits, params, seed
        self.schedule = Schedule([len(p) for p in prompts], limits, slots)
        self.stop_set = set(params.stop_token_ids)
        self.results: list[Generation | None] = [None] * len(prompts)
        self.snapshots: list[tuple] = []  # slot status copies on their way to the host, oldest first
        self.fetches: list[tuple] = []  # finished rows on their way to the host


class _SlotState:
    """Device buffers of every slot, allocated once and reused by every captured graph (static addresses)."""

    def __init__(self, model: CausalLM, slots: int, max_len: int, max_new: int, dtype, device,
                 decode_attention: str = "sdpa") -> None:
        self.slots, self.max_len, self.max_new = slots, max_len, max_new
        self.cache = SlotKVCache(model.config, slots, max_len, dtype, device, decode_attention)

        def rows(*tail: int, dtype=torch.long) -> torch.Tensor:
            # one spare row: a bucket's view never spans a whole buffer, so compiled code sees one kind of view
            return torch.zeros((slots + 1, *tail), dtype=dtype, device=device)

        self.last_token = rows()  # the token the next step feeds
        self.lengths = rows()  # tokens in the cache = position of the fed token
        self.active = rows(dtype=torch.bool)
        self.generated = rows()  # tokens sampled so far
        self.limit = rows()
        self.uniform = rows(max_new, dtype=torch.float32)  # the request's random stream, one number per token
        # sampled tokens and logprobs; the last column takes the writes of finished slots
        self.out_tokens = rows(max_new + 1)
        self.out_logprobs = rows(max_new + 1, dtype=torch.float32)
        self.seq_tokens = rows(max_len)  # every token in the cache, to recompute it after a weight swap
        self.stop_ids = torch.full((MAX_STOP_IDS,), -1, dtype=torch.long, device=device)

    def per_slot(self) -> list[torch.Tensor]:
        return [self.last_token, self.lengths, self.active, self.generated, self.limit, self.uniform,
                self.out_tokens, self.out_logprobs, self.seq_tokens]


class CudaGraphs:
    """Captured decode steps by key, sharing one memory pool (they never run concurrently, and their results
    live in the engine's persistent buffers, so a replay never reads another graph's memory).

    A pool lives as long as a graph captured into it: once every graph of a pool is gone, the caching
    allocator refuses new captures into it (an internal assert), so `clear` starts a fresh pool along with
    the fresh graphs. Each instance has its own pools: several engines in one process never share one."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __len__(self) -> int:
        return len(self._graphs)

    def keys(self) -> list[tuple]:
        return list(self._graphs)

    def get(self, key: tuple) -> torch.cuda.CUDAGraph | None:
        return self._graphs.get(key)

    def clear(self) -> None:
        """Drops every graph (their buffers are about to be reallocated) and starts a new pool."""
        self._graphs.clear()
        self.pool = torch.cuda.graph_pool_handle()

    def warm(self, step: Callable[[], None]) -> None:
        """Runs `step` for real on a side stream (lazy initialisation before the capture)."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            step()
        current.wait_stream(self.stream)

    def capture(self, key: tuple, step: Callable[[], None]) -> None:
        """Runs `step` for real once (lazy initialisation), then records it as the graph of `key`, whose
        replay() runs it."""
        self.warm(step)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            step()
        self._graphs[key] = graph


def _request_uniforms(seed: int, index: int, count: int) -> torch.Tensor:
    """The uniform draws of request `index` (one per output token): its own stream, from (seed, index)."""
    stream_seed = (seed * _SEED_MIX + index * 0xBF58476D1CE4E5B9 + 1) % (2**63)
    generator = torch.Generator().manual_seed(stream_seed)
    return torch.rand(count, generator=generator, dtype=torch.float64).float()


def _without_duck_shapes():
    config = torch.fx.experimental._config
    return config.patch(use_duck_shape=False) if hasattr(config, "use_duck_shape") else contextlib.nullcontext()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class TorchEngine:
    """Generates with a CausalLM; `version` is stamped on every token it produces.

    max_slots: sequences decoded at once (requests beyond it wait for a free slot). sync_every: decode steps
    between snapshots of the slots' status (a finished sequence is noticed sync_every to 2 x sync_every steps
    late on CUDA, at most sync_every on CPU). refill_fraction: free slots (as a fraction of the call's slots)
    that trigger a refill while requests wait. cuda_graphs: capture decode steps (default: on CUDA); one
    graph per (slot bucket, KV length bucket, sampling settings), slot buckets being powers of two up to the
    slot count and KV buckets multiples of `kv_bucket` positions. prefill_tokens: padded tokens per prefill
    forward. With no request waiting, sequences move from high slots to free low ones when that lets the
    steps run on a smaller slot bucket (the tail of a call runs on a small batch). lookahead: runs of decode
    steps kept queued ahead of the host's reads (default 1 on CUDA, 0 elsewhere). compile_decode: run the decode
    step's forward and draw through torch.compile (dynamic shapes, `compile_backend`; default: on CUDA), which
    fuses the layers' elementwise work (norms, RoPE, SiLU, residuals, the attention's mask and softmax, the
    draw's passes over the vocabulary). Compiled kernels round intermediates differently from the eager
    forward (bf16-level differences). decode_attention: the slot cache's decode attention, "sdpa" (default: SDPA
    per layer, eager, a graph break per layer) or "matmul" (batched matmuls over the cache inside the compiled
    graph, the cache written once per step; 3% slower on an H100); see `slot_cache`.
    """

    def __init__(
        self,
        model: CausalLM,
        pad_token_id: int,
        device: str | torch.device = "cpu",
        max_slots: int = 256,
        sync_every: int = 8,
        refill_fraction: float = 1 / 16,
        cuda_graphs: bool | None = None,
        kv_bucket: int = 64,
        prefill_tokens: int = 16384,
        lookahead: int | None = None,
        compile_decode: bool | None = None,
        compile_backend: str = "inductor",
        decode_attention: str = "sdpa",
        kv_memory_gib: float | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.pad_token_id = pad_token_id
        self.device = torch.device(device)
        self.version = 0
        self.max_slots, self.sync_every, self.kv_bucket = max_slots, max(1, sync_every), kv_bucket
        self.prefill_tokens, self.refill_fraction = prefill_tokens, refill_fraction
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        # runs of decode steps queued ahead of the host's reads (default: one on CUDA, none elsewhere)
        self.lookahead = (1 if self.device.type == "cuda" else 0) if lookahead is None else lookahead
        self.graphs = CudaGraphs(self.device) if use_graphs else None
        self.kv_memory_bytes = None if kv_memory_gib is None else int(kv_memory_gib * 2**30)
        self.decode_attention = decode_attention
        self._logits_and_sample = self._decode_forward
        if compile_decode is None:
            compile_decode = self.device.type == "cuda"
        self.compile_decode = compile_decode
        if compile_decode:  # dynamic shapes: one compilation serves every slot and KV bucket
            config = torch._dynamo.config  # a graph per sampling setting, and resumes after graph breaks
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(config, name):
                    setattr(config, name, max(64, getattr(config, name)))
            compiled = torch.compile(self._decode_forward, dynamic=True, backend=compile_backend)

            def logits_and_sample(*args):
                # no duck sizing: a slot count equal to a KV length (256 and 256) must not become one symbol
                with _without_duck_shapes():
                    return compiled(*args)

            self._logits_and_sample = logits_and_sample
        self._state: _SlotState | None = None
        self.stats: dict[str, int] = {}

    @torch.no_grad()
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Copies `state_dict` into the model in place (no reallocation) and adopts `version`."""
        params = dict(self.model.named_parameters())
        missing = set(params) - set(state_dict)
        if missing:
            raise KeyError(f"weight update for version {version} lacks {sorted(missing)[:5]}")
        for name, param in params.items():
            param.copy_(state_dict[name])
        self.version = version

    def release(self) -> None:
        """Frees the slot buffers and captured graphs (they are rebuilt by the next call)."""
        if self.graphs is not None:
            self.graphs.clear()
        self._state = None

    def slots_within_budget(self, max_len: int) -> int:
        """The most slots whose KV cache of `max_len` positions (rounded up to a bucket) fits `kv_memory_gib`
        (max_slots without a budget)."""
        return engine_slots(self.model.config, self.max_slots, self.kv_memory_bytes, max_len, self._dtype,
                            self.kv_bucket)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # --- generation --------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        weight_update: Callable[[], bool] | None = None,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        """Samples a continuation of every prompt (a list of token ids); returns them in prompt order.

        `max_new_tokens` optionally gives each request its own token limit (default params.max_new_tokens).
        `weight_update` is called at every token boundary (before each prefill and each decode step); when it
        returns True it has swapped in new weights (and `version`), and the KV cache of every sequence in
        flight is recomputed with them before decoding continues. Each token records the version that
        sampled it.

        Randomness: request i draws its tokens from its own stream of uniforms, seeded by (params.seed, i),
        one number per token. With a seed its tokens therefore do not depend on the other requests, the slot
        it lands in, or the batch composition (up to floating-point differences between batch shapes, which
        only matter when a uniform falls within rounding of a token boundary). Without a seed the streams
        come from torch's global generator.
        """
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        count = len(prompts)
        limits = [params.max_new_tokens] * count if max_new_tokens is None else [int(m) for m in max_new_tokens]
        if len(limits) != count or min(limits) < 1:
            raise ValueError("max_new_tokens needs one limit >= 1 per prompt")
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        max_len = max(len(p) + limit for p, limit in zip(prompts, limits))
        slots = min(count, self.slots_within_budget(max_len))
        if slots < 1:
            needed = slot_cache_bytes(self.model.config, 1, _round_up(max_len, self.kv_bucket), self._dtype)
            raise ValueError(f"the engine's KV memory budget (kv_memory_gib={self.kv_memory_bytes / 2**30:.3g}) "
                             f"holds no sequence of {max_len} tokens, which needs {needed / 2**30:.3g} GiB")
        state = self._ensure_state(slots, max_len, max(limits), len(params.stop_token_ids))
        state.active.zero_()
        state.stop_ids.fill_(-1)
        if params.stop_token_ids:
            state.stop_ids[: len(params.stop_token_ids)] = torch.as_tensor(params.stop_token_ids)
        self.stats = {"decode_steps": 0, "prefill_forwards": 0, "syncs": 0, "recomputes": 0, "slot_moves": 0,
                      "graph_captures": 0, "capture_s": 0.0, "slots": slots}
        call = _Call(prompts, limits, params, seed, slots)
        # admit once this many slots are free (each prefill is a host-bound eager forward: refills are batched)
        refill_min = max(1, int(slots * self.refill_fraction))

        schedule = call.schedule
        while schedule.running:
            if schedule.wants_refill(refill_min):
                if weight_update is not None and weight_update():
                    self._recompute(call)
                self._admit(call)
            run = schedule.steps_to_run(self.sync_every)
            for _ in range(run):
                if weight_update is not None and weight_update():
                    self._recompute(call)
                self._decode(call)
            call.snapshots.append(self._snapshot(call))
            while call.snapshots and (len(call.snapshots) > self.lookahead or run == 0):
                self._harvest(call, call.snapshots.pop(0))
            self._compact(call)
        for finished in call.fetches:
            self._finish(call, finished)
        return call.results  # type: ignore[return-value]

    # --- pieces of the loop ------------------------------------------------------------------------------

    def _ensure_state(self, slots: int, max_len: int, max_new: int, stops: int) -> _SlotState:
        state = self._state
        max_len = _round_up(max_len, self.kv_bucket)
        if (state is None or state.slots < slots or state.max_len < max_len or state.max_new < max_new
                or state.stop_ids.numel() < stops):
            if state is not None:  # grow to hold both calls' shapes when the budget allows (no reallocation ping-pong)
                grown_len = max(max_len, state.max_len)
                if max(slots, state.slots) <= self.slots_within_budget(grown_len):
                    slots, max_len = max(slots, state.slots), grown_len
                max_new = max(max_new, state.max_new)
            self.release()
            state = _SlotState(self.model, slots, max_len, max_new, self._dtype, self.device, self.decode_attention)
            if stops > state.stop_ids.numel():
                state.stop_ids = torch.full((stops,), -1, dtype=torch.long, device=self.device)
            self._state = state
        return state

    def _to_host(self, *tensors: torch.Tensor):
        """Copies of `tensors` on the host, asynchronously on CUDA: (copies, event to wait for, or None)."""
        if self.device.type != "cuda":
            return [t.clone() for t in tensors], None
        copies = []
        for tensor in tensors:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            copies.append(host.copy_(tensor, non_blocking=True))
        event = torch.cuda.Event()
        event.record()
        return copies, event

    def _admit(self, call: _Call) -> None:
        """Moves waiting requests into the lowest free slots and prefills them, in chunks of at most
        `prefill_tokens` padded tokens."""
        admitted, targets = call.schedule.admit()
        lengths = [len(call.prompts[index]) for index in admitted]
        for start, end, longest in padded_chunks(lengths, self.prefill_tokens):
            self._prefill(call, admitted[start:end], targets[start:end], longest)

    def _prefill(self, call: _Call, requests: list[int], slots: list[int], longest: int) -> None:
        """Runs the prompts of `requests` into `slots` (right-padded to `longest`) and samples each one's first
        token."""
        state, device, prompts, limits = self._state, self.device, call.prompts, call.limits
        ids = torch.full((len(requests), longest), self.pad_token_id, dtype=torch.long)
        uniforms = torch.zeros(len(requests), state.max_new, dtype=torch.float32)
        for row, index in enumerate(requests):
            ids[row, : len(prompts[index])] = torch.as_tensor(list(prompts[index]), dtype=torch.long)
            uniforms[row, : limits[index]] = _request_uniforms(call.seed, index, limits[index])
        lengths = torch.tensor([len(prompts[i]) for i in requests]).to(device, non_blocking=True)
        request_limits = torch.tensor([limits[i] for i in requests]).to(device, non_blocking=True)
        rows = torch.tensor(slots).to(device, non_blocking=True)
        ids, uniforms = ids.to(device, non_blocking=True), uniforms.to(device, non_blocking=True)

        state.cache.bind_prefill(rows)
        hidden = self.model.hidden_states(ids, kv_cache=state.cache)
        last = hidden[torch.arange(len(requests), device=device), lengths - 1]
        token, logprob = sample(self.model.lm_head(last), call.params, uniforms[:, 0])
        state.lengths[rows] = lengths
        state.last_token[rows] = token
        state.generated[rows] = 1
        state.limit[rows] = request_limits
        state.uniform[rows] = uniforms
        state.out_tokens[rows, 0] = token
        state.out_logprobs[rows, 0] = logprob
        state.seq_tokens[rows, :longest] = ids
        state.active[rows] = ~((token[:, None] == state.stop_ids).any(-1) | (request_limits <= 1))
        call.schedule.place(requests, slots, self.version)
        self.stats["prefill_forwards"] += 1

    def _recompute(self, call: _Call) -> None:
        """After a weight swap: rebuilds the KV cache of every occupied slot from its tokens."""
        schedule = call.schedule
        if not schedule.occupants:
            return
        state, slots = self._state, sorted(schedule.occupants)
        bounds = [schedule.occupants[slot].length_bound(schedule.steps) for slot in slots]
        for start, end, longest in padded_chunks(bounds, self.prefill_tokens):
            rows = torch.tensor(slots[start:end]).to(self.device, non_blocking=True)
            state.cache.bind_prefill(rows)
            # positions past a slot's length get keys of stale tokens: never read before being overwritten
            self.model.hidden_states(state.seq_tokens[rows, :longest], kv_cache=state.cache)
        self.stats["recomputes"] += 1

    def _decode(self, call: _Call) -> None:
        """One decode step over the slot bucket holding every occupied slot."""
        schedule = call.schedule
        batch = slot_bucket(max(schedule.occupants), self._state.slots)
        kv_len = min(_round_up(schedule.longest_bound() + 1, self.kv_bucket), self._state.max_len)
        params = call.params
        self.stats["decode_steps"] += 1
        schedule.record_step(self.version)
        if self.graphs is None:
            self._decode_step(batch, kv_len, params)
            return
        key = (batch, kv_len, params.temperature, params.top_k, params.top_p)
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        started = time.perf_counter()
        self.graphs.capture(key, lambda: self._decode_step(batch, kv_len, params))  # runs this step, for real
        self.stats["graph_captures"] += 1
        self.stats["capture_s"] += time.perf_counter() - started

    def _decode_step(self, batch: int, kv_len: int, params: SamplingParams) -> None:
        """Slots 0 .. batch-1 advance by one token. Tensor operations on the persistent buffers only, with
        static shapes and no host synchronisation: this is what a CUDA graph captures."""
        state = self._state
        lengths, active, generated = state.lengths[:batch], state.active[:batch], state.generated[:batch]
        feed = state.last_token[:batch]
        state.cache.bind_decode(lengths, kv_len)
        column = generated.clamp(max=state.max_new - 1)[:, None]
        uniform = state.uniform[:batch].gather(1, column).squeeze(1)
        token, logprob = self._logits_and_sample(feed, state.cache, uniform, params)
        state.seq_tokens[:batch].scatter_(1, lengths[:, None], feed[:, None])
        record = torch.where(active, generated, state.max_new)[:, None]  # finished slots write the spare column
        state.out_tokens[:batch].scatter_(1, record, token[:, None])
        state.out_logprobs[:batch].scatter_(1, record, logprob[:, None])
        advance = active.long()
        lengths.add_(advance)
        generated.add_(advance)
        stop = (token[:, None] == state.stop_ids).any(-1) | (generated >= state.limit[:batch])
        state.last_token[:batch].copy_(torch.where(active, token, feed))
        active.logical_and_(~stop)

    def _decode_forward(self, feed: torch.Tensor, cache: SlotKVCache, uniform: torch.Tensor, params: SamplingParams):
        """The model's forward over one token per slot and the draw: (tokens, logprobs). What `compile_decode`
        compiles (the cache's writes stay eager inside it: `advance` with matmul attention, every layer's
        attention with sdpa)."""
        hidden = self.model.hidden_states(feed[:, None], kv_cache=cache)[:, 0]
        return sample(self.model.lm_head(hidden), params, uniform)

    def _snapshot(self, call: _Call) -> tuple:
        """Queues a host copy of every occupied slot's status (-1 running, else its token count)."""
        state = self._state
        highest = max(call.schedule.occupants) + 1
        status = torch.where(state.active[:highest], -1, state.generated[:highest])
        (host,), event = self._to_host(status)
        return call.schedule.snapshot(), host, event

    def _harvest(self, call: _Call, snapshot: tuple) -> None:
        """Waits for a snapshot and frees the slots it shows finished (requests placed in a slot after the
        snapshot was queued are not judged by it); their tokens come to the host asynchronously."""
        epoch, status, event = snapshot
        if event is not None:
            event.synchronize()
        self.stats["syncs"] += 1
        done = call.schedule.finished(epoch, status.tolist())
        if done:
            state = self._state
            rows = torch.tensor([slot for slot, _, _ in done]).to(self.device, non_blocking=True)
            copies, fetched = self._to_host(state.out_tokens[rows], state.out_logprobs[rows])
            call.fetches.append((copies, fetched, [(request, tokens) for _, request, tokens in done]))
        waiting = []
        for fetch in call.fetches:
            if fetch[1] is None or fetch[1].query():
                self._finish(call, fetch)
            else:
                waiting.append(fetch)
        call.fetches = waiting

    def _finish(self, call: _Call, fetch: tuple) -> None:
        (tokens, logprobs), event, finished = fetch
        if event is not None:
            event.synchronize()
        for row, (request, count) in enumerate(finished):
            out = tokens[row, :count].tolist()
            reason = "stop" if out[-1] in call.stop_set else "length"
            call.results[request.index] = Generation(out, logprobs[row, :count].tolist(),
                                                     call.schedule.versions(request, count), reason)

    def _compact(self, call: _Call) -> None:
        """With no request waiting, moves sequences from high slots into free low ones whenever that lets
        decode steps run on a smaller slot bucket."""
        schedule = call.schedule
        moves = schedule.compaction()
        if not moves:
            return
        state = self._state
        source = torch.tensor([s for s, _ in moves]).to(self.device, non_blocking=True)
        destination = torch.tensor([d for _, d in moves]).to(self.device, non_blocking=True)
        for buffer in state.per_slot():
            buffer[destination] = buffer[source]
        state.active[source] = False
        for src, dst in moves:
            state.cache.move(src, dst, schedule.occupants[src].length_bound(schedule.steps))
        schedule.move(moves)
        self.stats["slot_moves"] += len(moves)
