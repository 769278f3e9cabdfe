"""The built-in generation engine: continuous batching over a paged KV cache, with CUDA-graph decode steps.

Requests wait in a queue and run in a fixed set of slots (`max_slots`), the rows of the decode batch. Their keys
and values live in a pool of fixed-size blocks (`PagedKVCache`) sized by the KV budget (`kv_memory_gib`): each
sequence holds the blocks its tokens fill, taken as it grows and given back when it ends, and the samples of one
prompt share its full blocks. A decode step advances every slot by one token (finished and idle slots are
masked) and is one CUDA graph replay on CUDA, keyed by the batch size (and the sampling settings), not the
lengths: block tables and lengths are buffers the graph reads. When sequences end (a stop token or their own
token limit) their slots are refilled from the queue; when the pool runs dry the youngest sequences are
preempted and come back later with their tokens so far (actors/scheduler.py decides; this module does the
device work).

Host and device meet only at snapshots: every `sync_every` decode steps the host queues a copy of the slots'
status and, on CUDA, reads the previous one while the next run of steps is already queued (so the device
never waits for the host's bookkeeping or its eager prefill launches). Finished slots are refilled once a
sixteenth of the slots (`refill_fraction`) are free or the queue is shorter than that; each refill is one
eager, right-padded prefill forward per chunk. Sampling runs on the device from per-request uniform streams.
A preemption is the one place the host waits for the device: it needs the tokens the sequence has so far.

The model is the project's `CausalLM`, run through its own `hidden_states` with the paged cache: there is no
second copy of the architecture. Weights must be updated in place (`load_weights`, the weight receiver): the
captured graphs keep reading the same parameter storage.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from actors.sampling import sample
from actors.scheduler import Admission, BlockPool, Schedule, padded_chunks
from areal_async.model.decode_batch import decode_batch_size, decode_batch_sizes
from areal_async.planning.memory_plan import pool_blocks
from areal_async.model import CausalLM
from areal_async.model.paged_cache import PagedKVCache, blocks_for, kv_block_bytes
from areal_async.types import Generation, SamplingParams

MAX_STOP_IDS = 8  # stop ids held in the static buffer (grows if a call brings more)
_SEED_MIX = 0x9E3779B97F4A7C15
DECODE_ATTENTION = ("auto", "triton", "gather")


class _Call:
    """One generate call: its schedule (actors/scheduler.py), and what the device returns on its way to the
    host."""

    def __init__(self, prompts, limits: list[int], params: SamplingParams, seed: int, schedule: Schedule) -> None:
        self.prompts, self.limits, self.params, self.seed = prompts, limits, params, seed
        self.schedule = schedule
        self.stop_set = set(params.stop_token_ids)
        self.results: list[Generation | None] = [None] * len(prompts)
        self.snapshots: list[tuple] = []  # slot status copies on their way to the host, oldest first
        self.fetches: list[tuple] = []  # finished rows on their way to the host


class _State:
    """Device buffers of every slot and the KV pool, allocated once and reused by every captured graph (static
    addresses). `width`: block-table columns, enough for the longest sequence."""

    def __init__(self, model: CausalLM, slots: int, width: int, max_new: int, num_blocks: int, block_size: int,
                 dtype, device, decode_kernel: str, split_tokens: int, rope_kernel: bool) -> None:
        self.slots, self.width, self.max_new, self.block_size = slots, width, max_new, block_size
        self.max_len = width * block_size
        self.cache = PagedKVCache(model.config, num_blocks, block_size, dtype, device, decode_kernel, split_tokens,
                                  rope_kernel)

        def rows(*tail: int, dtype=torch.long) -> torch.Tensor:
            # one spare row: a batch's view never spans a whole buffer, so compiled code sees one kind of view
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
        self.seq_tokens = rows(self.max_len)  # every token in the cache, to recompute it after a weight swap
        self.tables = rows(width, dtype=torch.int32)  # block tables (0: the null block)
        self.stop_ids = torch.full((MAX_STOP_IDS,), -1, dtype=torch.long, device=device)

    def per_slot(self) -> list[torch.Tensor]:
        return [self.last_token, self.lengths, self.active, self.generated, self.limit, self.uniform,
                self.out_tokens, self.out_logprobs, self.seq_tokens, self.tables]


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


def _rows(values: Sequence[Sequence[int]], width: int, fill: int = 0, dtype=torch.long) -> torch.Tensor:
    """`values` right-padded with `fill` to `width` columns, as a host tensor [len(values), width]."""
    out = torch.full((len(values), width), fill, dtype=dtype)
    for row, items in enumerate(values):
        out[row, : len(items)] = torch.as_tensor(list(items), dtype=dtype)
    return out


class TorchEngine:
    """Generates with a CausalLM; `version` is stamped on every token it produces.

    max_slots: sequences decoded at once, at most (requests beyond it, or beyond what the KV pool holds, wait).
    kv_memory_gib: the KV pool's size (None: enough blocks for every slot at the call's longest request).
    kv_block_size: positions per block. sync_every: decode steps between snapshots of the slots' status (a
    finished sequence is noticed sync_every to 2 x sync_every steps late on CUDA, at most sync_every on CPU).
    refill_fraction: free slots (as a fraction of the call's slots) that trigger a refill while requests wait.
    cuda_graphs: capture decode steps (default: on CUDA); one graph per (decode batch size, sampling settings),
    the sizes of areal_async/model/decode_batch.py up to the slot count. prefill_tokens: padded tokens per prefill
    forward. With no request waiting, sequences move from high slots to free low ones when that lets the steps
    run on a smaller batch (the tail of a call runs on a small batch; a move copies a row of buffers, not its KV).
    lookahead: runs of decode steps kept queued ahead of the host's reads (default 1 on CUDA, 0 elsewhere).
    compile_decode: run the decode step's forward through torch.compile (dynamic shapes, `compile_backend`;
    default off), which fuses the layers' elementwise work as the elementwise kernels do, at the price of compiling
    (the attention stays eager inside it: a graph break per layer). compile_prefill: run prefill and recompute
    forwards through torch.compile too (default off). decode_attention: "triton" (the paged split-KV kernel),
    "gather" (the reference: blocks gathered, then one softmax) or "auto" (triton on CUDA where the shapes suit
    it, else gather, whose steps are not captured). decode_split_tokens:
    positions one kernel program reads before the partial softmaxes are combined. fused_sampling: draw with one
    Triton kernel over the logits when no top-k/top-p truncation applies (default: on CUDA).
    fuse_projections: run q/k/v and gate/up as one matrix product each (`CausalLM.fuse_projections`; default:
    on CUDA). elementwise_kernels: the norms, residual adds, SiLU x up and a prefill's RoPE of the eager
    forwards as Triton kernels (`CausalLM.use_elementwise_kernels`; default: on CUDA). share_prompts:
    consecutive requests with the same prompt share its full KV blocks (one prefill).
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
        kv_block_size: int = 64,
        prefill_tokens: int = 16384,
        lookahead: int | None = None,
        compile_decode: bool = False,
        compile_backend: str = "inductor",
        compile_prefill: bool = False,
        decode_attention: str = "auto",
        decode_split_tokens: int = 1024,
        kv_memory_gib: float | None = None,
        fused_sampling: bool | None = None,
        fuse_projections: bool | None = None,
        elementwise_kernels: bool | None = None,
        share_prompts: bool = True,
    ) -> None:
        if decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"decode_attention must be one of {DECODE_ATTENTION}, got {decode_attention!r}")
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.model = model.to(device).eval()
        if cuda if fuse_projections is None else fuse_projections:
            self.model.fuse_projections()
        self.elementwise_kernels = cuda if elementwise_kernels is None else elementwise_kernels
        self.model.use_elementwise_kernels(self.elementwise_kernels)
        self.pad_token_id = pad_token_id
        self.version = 0
        self.max_slots, self.sync_every, self.block_size = max_slots, max(1, sync_every), kv_block_size
        self.prefill_tokens, self.refill_fraction = prefill_tokens, refill_fraction
        # the Triton kernel's tiles: kv_block_size and head_dim powers of two >= 16
        unfit = [f"{name} to be a power of two >= 16, got {value}" for name, value in
                 (("kv_block_size", kv_block_size), ("head_dim", model.config.head_dim)) if value < 16 or value & (value - 1)]
        if decode_attention == "auto":
            self.decode_kernel = "triton" if cuda and not unfit else "gather"
        else:
            self.decode_kernel = decode_attention
        self.split_tokens, self.share_prompts = decode_split_tokens, share_prompts
        if self.decode_kernel == "triton" and unfit:
            raise ValueError(f"the Triton decode kernel needs {unfit[0]}")
        # the gather reference reads lengths on the host: a CUDA graph cannot capture it
        capturable = self.decode_kernel == "triton" or not cuda
        if cuda_graphs and not capturable:
            raise ValueError("decode_attention='gather' cannot run in CUDA graphs on CUDA: set cuda_graphs=False "
                             "or decode_attention='triton'")
        use_graphs = cuda and capturable if cuda_graphs is None else cuda_graphs
        # runs of decode steps queued ahead of the host's reads (default: one on CUDA, none elsewhere)
        self.lookahead = (1 if cuda else 0) if lookahead is None else lookahead
        self.graphs = CudaGraphs(self.device) if use_graphs else None
        self.kv_memory_bytes = None if kv_memory_gib is None else int(kv_memory_gib * 2**30)
        self.fused_sampling = cuda if fused_sampling is None else fused_sampling
        self._sample_fused = None
        if self.fused_sampling:
            from actors.sampling_triton import fused_sample

            self._sample_fused = fused_sample
        self._logits_and_sample = self._decode_forward
        self.compile_decode = compile_decode
        if compile_decode:  # dynamic shapes: one compilation serves every batch size
            config = torch._dynamo.config  # a graph per sampling setting, and resumes after graph breaks
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(config, name):
                    setattr(config, name, max(64, getattr(config, name)))
            compiled = torch.compile(self._decode_forward, dynamic=True, backend=compile_backend)

            def logits_and_sample(*args):
                # no duck sizing: a slot count equal to another size must not become one symbol
                with _without_duck_shapes():
                    return compiled(*args)

            self._logits_and_sample = logits_and_sample
        self._prefill_forward = self.model.hidden_states
        if compile_prefill:
            compiled_prefill = torch.compile(self.model.hidden_states, dynamic=True, backend=compile_backend)

            def prefill_forward(ids: torch.Tensor, kv_cache: PagedKVCache) -> torch.Tensor:
                with _without_duck_shapes():  # rows and prompt length may be equal once and differ later
                    return compiled_prefill(ids, kv_cache=kv_cache)

            self._prefill_forward = prefill_forward
        self._state: _State | None = None
        self.stats: dict[str, float] = {}

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
        """Frees the slot buffers, the KV pool and the captured graphs (they are rebuilt by the next call)."""
        if self.graphs is not None:
            self.graphs.clear()
        self._state = None

    @torch.no_grad()
    def reserve(self, longest: int, max_new_tokens: int, params: SamplingParams | None = None) -> None:
        """Allocates the buffers and KV pool for calls of up to `longest` tokens per sequence and `max_new_tokens`
        new ones now, and with `params` captures the decode step of every batch size for those sampling
        settings, so that such calls neither reallocate nor capture a graph."""
        blocks = self.pool_blocks(self.max_slots, longest)
        state = self._ensure_state(self.max_slots, blocks_for(longest, self.block_size), max_new_tokens, blocks, 0)
        if self.graphs is None or params is None:
            return
        state.active.zero_()  # idle rows read and write no KV: a captured step changes nothing
        for batch in decode_batch_sizes(state.slots):
            key = (batch, params.temperature, params.top_k, params.top_p)
            if self.graphs.get(key) is None:
                self.graphs.capture(key, lambda batch=batch: self._decode_step(batch, params))

    @property
    def block_bytes(self) -> int:
        return kv_block_bytes(self.model.config, self.block_size, self._dtype)

    def pool_blocks(self, slots: int, longest: int) -> int:
        """Blocks of the KV pool (the null block included): what kv_memory_gib holds, or without a budget enough
        for `slots` sequences of `longest` tokens."""
        return pool_blocks(self.kv_memory_bytes, self.block_bytes, slots, longest, self.block_size)

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
        flight is recomputed with them before decoding continues (a prompt shared by several samples once).
        Each token records the version that sampled it.

        Randomness: request i draws its tokens from its own stream of uniforms, seeded by (params.seed, i),
        one number per token. With a seed its tokens therefore do not depend on the other requests, the slot
        it lands in, the batch composition, prompt sharing or preemption (up to floating-point differences
        between batch shapes, which only matter when a uniform falls within rounding of a token boundary).
        Without a seed the streams come from torch's global generator.
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
        longest = max(len(p) + limit for p, limit in zip(prompts, limits))
        slots = min(count, self.max_slots)
        blocks = self.pool_blocks(slots, longest)
        if blocks_for(longest, self.block_size) > blocks - 1:
            raise ValueError(
                f"the engine's KV memory budget (kv_memory_gib={self.kv_memory_bytes / 2**30:.3g}: {blocks - 1} "
                f"blocks of {self.block_size} tokens) holds no sequence of {longest} tokens, which needs "
                f"{blocks_for(longest, self.block_size) * self.block_bytes / 2**30:.3g} GiB")
        state = self._ensure_state(slots, blocks_for(longest, self.block_size), max(limits), blocks,
                                   len(params.stop_token_ids))
        state.active.zero_()
        state.stop_ids.fill_(-1)
        if params.stop_token_ids:
            state.stop_ids[: len(params.stop_token_ids)] = torch.as_tensor(params.stop_token_ids)
        pool = BlockPool(state.cache.num_blocks)
        schedule = Schedule([len(p) for p in prompts], limits, slots, self.block_size, pool,
                            prompt_keys=[tuple(p) for p in prompts] if self.share_prompts else None,
                            run_tokens=self.sync_every)
        self.stats = {"decode_steps": 0, "prefill_forwards": 0, "syncs": 0, "recomputes": 0, "slot_moves": 0,
                      "graph_captures": 0, "capture_s": 0.0, "slots": slots, "preemptions": 0,
                      "pool_blocks": pool.count - 1, "block_size": self.block_size, "in_flight_sum": 0,
                      "in_flight_max": 0, "shared_prompt_blocks": 0, "peak_blocks": 0, "prefill_rows": 0,
                      "recomputed_tokens": 0}
        call = _Call(prompts, limits, params, seed, schedule)
        # admit once this many slots are free (each prefill is a host-bound eager forward: refills are batched)
        refill_min = max(1, int(slots * self.refill_fraction))

        while schedule.running:
            if schedule.wants_refill(refill_min):
                if weight_update is not None and weight_update():
                    self._recompute(call)
                self._admit(call)
            run = schedule.steps_to_run(self.sync_every)
            if run:
                self._reserve_blocks(call, run)
                run = min(run, schedule.steps_to_run(self.sync_every))
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
        self.stats.update(preemptions=schedule.preemptions, shared_prompt_blocks=schedule.shared_blocks,
                          peak_blocks=pool.peak_in_use,
                          peak_kv_gib=pool.peak_in_use * self.block_bytes / 2**30,
                          in_flight_mean=self.stats["in_flight_sum"] / max(1, self.stats["decode_steps"]))
        return call.results  # type: ignore[return-value]

    # --- pieces of the loop ------------------------------------------------------------------------------

    def _ensure_state(self, slots: int, width: int, max_new: int, blocks: int, stops: int) -> _State:
        """The buffers for this call, kept from the last call when they are large enough (graphs survive)."""
        state = self._state
        if (state is None or state.slots < slots or state.width < width or state.max_new < max_new
                or state.cache.num_blocks < blocks or state.stop_ids.numel() < stops):
            if state is not None:  # grow to hold both calls' shapes (no reallocation ping-pong)
                slots, width = max(slots, state.slots), max(width, state.width)
                max_new = max(max_new, state.max_new)
                if self.kv_memory_bytes is None:
                    blocks = max(blocks, state.cache.num_blocks, self.pool_blocks(slots, width * self.block_size))
            self.release()
            state = None  # the old pool goes before the new one is allocated, not after
            state = _State(self.model, slots, width, max_new, blocks, self.block_size, self._dtype, self.device,
                           self.decode_kernel, self.split_tokens, self.elementwise_kernels)
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

    def _device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def _admit(self, call: _Call) -> None:
        """Prefills the admissions the schedule makes, in chunks of at most `prefill_tokens` padded tokens."""
        admissions = call.schedule.admit()
        lengths = [admission.prefill_len for admission in admissions]
        for start, end, longest in padded_chunks(lengths, self.prefill_tokens):
            self._prefill(call, admissions[start:end], longest)

    def _prefill(self, call: _Call, admissions: list[Admission], longest: int) -> None:
        """Runs the prompts of `admissions` (one row each, right-padded to `longest`) into their first member's
        blocks, copies the partial prompt block to the other members, and samples each member's next token."""
        state, schedule, prompts = self._state, call.schedule, call.prompts
        width = state.width
        tokens = []
        for admission in admissions:
            prior = schedule.resumed.get(admission.requests[0])
            tokens.append(list(prompts[admission.requests[0]]) + (prior.tokens if prior else []))
        ids = self._device(_rows(tokens, longest, self.pad_token_id))
        counts = self._device(torch.tensor([len(t) for t in tokens]))
        state.cache.bind_prefill(self._device(_rows([a.table(0) for a in admissions], width, dtype=torch.int32)),
                                 counts)
        hidden = self._prefill_forward(ids, kv_cache=state.cache)
        last = hidden[torch.arange(len(admissions), device=self.device), counts - 1]
        copies = [(a.own[0][0], own[0]) for a in admissions if a.own[0] for own in a.own[1:]]  # partial blocks
        if copies:
            state.cache.copy_blocks(*(self._device(torch.tensor(side)) for side in zip(*copies)))

        members = [(row, member) for row, admission in enumerate(admissions) for member in range(len(admission.requests))]
        requests = [admissions[row].requests[member] for row, member in members]
        slots = [admissions[row].slots[member] for row, member in members]
        before = [len(tokens[row]) - len(prompts[index]) for (row, _), index in zip(members, requests)]
        uniforms = torch.zeros(len(requests), state.max_new, dtype=torch.float32)
        for member, index in enumerate(requests):
            uniforms[member, : call.limits[index]] = _request_uniforms(call.seed, index, call.limits[index])
        uniforms = self._device(uniforms)
        before_t = self._device(torch.tensor(before))
        member_rows = self._device(torch.tensor([row for row, _ in members]))
        token, logprob = sample(self.model.lm_head(last)[member_rows], call.params,
                                uniforms.gather(1, before_t[:, None]).squeeze(1))
        rows = self._device(torch.tensor(slots))
        limits = self._device(torch.tensor([call.limits[index] for index in requests]))
        generated = before_t + 1
        state.lengths[rows] = counts[member_rows]
        state.last_token[rows] = token
        state.generated[rows] = generated
        state.limit[rows] = limits
        state.uniform[rows] = uniforms
        state.seq_tokens[rows, :longest] = ids[member_rows]
        state.tables[rows] = self._device(_rows([admissions[row].table(member) for row, member in members], width,
                                                dtype=torch.int32))
        if any(before):  # resumed requests: what they generated before their preemption
            prior = [schedule.resumed[index] for index, count in zip(requests, before) if count]
            prior_rows = self._device(torch.tensor([slot for slot, count in zip(slots, before) if count]))
            state.out_tokens[prior_rows, : max(before)] = self._device(_rows([p.tokens for p in prior], max(before)))
            state.out_logprobs[prior_rows, : max(before)] = self._device(
                _rows([p.logprobs for p in prior], max(before), dtype=torch.float32))
        state.out_tokens[rows, before_t] = token
        state.out_logprobs[rows, before_t] = logprob
        state.active[rows] = ~((token[:, None] == state.stop_ids).any(-1) | (generated >= limits))
        for admission in admissions:
            schedule.place(admission, self.version)
        self.stats["prefill_forwards"] += 1
        self.stats["prefill_rows"] += len(admissions)

    def _reserve_blocks(self, call: _Call, run: int) -> None:
        """Before `run` decode steps: preempts what the pool cannot carry, then gives every occupant the blocks
        its length can reach (their block-table entries written on the device, in stream order)."""
        schedule = call.schedule
        victims = schedule.victims(run)
        if victims:
            self._preempt(call, victims)
        added = schedule.grow(run)
        if added:
            slots, columns, blocks = (self._device(torch.tensor(part)) for part in zip(*added))
            self._state.tables[slots, columns] = blocks.to(torch.int32)

    def _preempt(self, call: _Call, slots: list[int]) -> None:
        """Takes `slots`' sequences out: waits for the device, reads what each generated so far, and hands it to
        the schedule, which puts the request back at the head of the queue (one that has in fact finished ends
        here instead)."""
        state, schedule = self._state, call.schedule
        rows = self._device(torch.tensor(slots))
        (active, generated, tokens, logprobs), event = self._to_host(
            state.active[rows], state.generated[rows], state.out_tokens[rows], state.out_logprobs[rows])
        if event is not None:
            event.synchronize()
        state.active[rows] = False
        for row, slot in enumerate(slots):
            count = int(generated[row])
            if bool(active[row]):
                schedule.preempt(slot, tokens[row, :count].tolist(), logprobs[row, :count].tolist())
            else:  # it finished in a step the host has not looked at yet
                self._record(call, schedule.end(slot), tokens[row, :count].tolist(), logprobs[row, :count].tolist())

    def _recompute(self, call: _Call) -> None:
        """After a weight swap: rebuilds the KV cache of every occupied slot from its tokens: first each prompt
        that several samples share (once), then each sequence's own positions."""
        schedule, state = call.schedule, self._state
        if not schedule.occupants:
            return
        occupants = sorted(schedule.occupants.items())
        block = self.block_size
        prefixes: dict[tuple[int, ...], int] = {}  # shared blocks -> a slot holding them
        for slot, request in occupants:
            if request.shared:
                prefixes.setdefault(tuple(request.blocks[: request.shared]), slot)
        starts_of = {slot: request.shared * block for slot, request in occupants}
        parts = [(slot, 0, len(shared) * block) for shared, slot in prefixes.items()]  # (slot, start, count)
        parts_own = [(slot, starts_of[slot], request.length_bound(schedule.steps) - starts_of[slot])
                     for slot, request in occupants]
        for fresh, rows in ((True, parts), (False, [p for p in parts_own if p[2] > 0])):
            for first, end, longest in padded_chunks([count for _, _, count in rows], self.prefill_tokens):
                chunk = rows[first:end]
                slots = self._device(torch.tensor([slot for slot, _, _ in chunk]))
                starts = torch.tensor([start for _, start, _ in chunk])
                counts = self._device(torch.tensor([count for _, _, count in chunk]))
                columns = (self._device(starts)[:, None] + torch.arange(longest, device=self.device)).clamp(
                    max=state.max_len - 1)
                ids = state.seq_tokens[slots].gather(1, columns)
                tables = state.tables[slots]
                if fresh or not starts.any():
                    state.cache.bind_prefill(tables, counts)
                else:
                    state.cache.bind_prefill(tables, counts, self._device(starts),
                                             key_len=max(s + c for _, s, c in chunk))
                # positions past a sequence's length get keys of stale tokens: never read before being overwritten
                self._prefill_forward(ids, kv_cache=state.cache)
                self.stats["recomputed_tokens"] += sum(count for _, _, count in chunk)
        self.stats["recomputes"] += 1

    def _decode(self, call: _Call) -> None:
        """One decode step over the batch size that holds every occupied slot."""
        schedule = call.schedule
        batch = decode_batch_size(max(schedule.occupants) + 1, self._state.slots)
        params = call.params
        self.stats["decode_steps"] += 1
        self.stats["in_flight_sum"] += len(schedule.occupants)
        self.stats["in_flight_max"] = max(self.stats["in_flight_max"], len(schedule.occupants))
        schedule.record_step(self.version)
        if self.graphs is None:
            self._decode_step(batch, params)
            return
        key = (batch, params.temperature, params.top_k, params.top_p)
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        started = time.perf_counter()
        self.graphs.capture(key, lambda: self._decode_step(batch, params))  # runs this step, for real
        self.stats["graph_captures"] += 1
        self.stats["capture_s"] += time.perf_counter() - started

    def _decode_step(self, batch: int, params: SamplingParams) -> None:
        """Slots 0 .. batch-1 advance by one token. Tensor operations on the persistent buffers only, with
        static shapes and no host synchronisation: this is what a CUDA graph captures."""
        state = self._state
        lengths, active, generated = state.lengths[:batch], state.active[:batch], state.generated[:batch]
        feed = state.last_token[:batch]
        state.cache.bind_decode(state.tables[:batch], lengths, active)
        column = generated.clamp(max=state.max_new - 1)[:, None]
        uniform = state.uniform[:batch].gather(1, column).squeeze(1)
        token, logprob = self._logits_and_sample(feed, state.cache, uniform, params)
        state.seq_tokens[:batch].scatter_(1, lengths[:, None].clamp(max=state.max_len - 1), feed[:, None])
        record = torch.where(active, generated, state.max_new)[:, None]  # finished slots write the spare column
        state.out_tokens[:batch].scatter_(1, record, token[:, None])
        state.out_logprobs[:batch].scatter_(1, record, logprob[:, None])
        advance = active.long()
        lengths.add_(advance)
        generated.add_(advance)
        stop = (token[:, None] == state.stop_ids).any(-1) | (generated >= state.limit[:batch])
        state.last_token[:batch].copy_(torch.where(active, token, feed))
        active.logical_and_(~stop)

    def _decode_forward(self, feed: torch.Tensor, cache: PagedKVCache, uniform: torch.Tensor,
                        params: SamplingParams):
        """The model's forward over one token per slot and the draw: (tokens, logprobs). What `compile_decode`
        compiles (the attention stays eager inside it)."""
        hidden = self.model.hidden_states(feed[:, None], kv_cache=cache)[:, 0]
        logits = self.model.lm_head(hidden)
        if self._sample_fused is not None and params.top_k <= 0 and params.top_p >= 1.0:
            return self._sample_fused(logits, params.temperature, uniform)
        return sample(logits, params, uniform)

    def _snapshot(self, call: _Call) -> tuple:
        """Queues a host copy of every occupied slot's status (-1 running, else its token count)."""
        state = self._state
        highest = max(call.schedule.occupants, default=0) + 1
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
            rows = self._device(torch.tensor([slot for slot, _, _ in done]))
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
            self._record(call, request, tokens[row, :count].tolist(), logprobs[row, :count].tolist())

    def _record(self, call: _Call, request, tokens: list[int], logprobs: list[float]) -> None:
        reason = "stop" if tokens[-1] in call.stop_set else "length"
        call.results[request.index] = Generation(tokens, logprobs, call.schedule.versions(request, len(tokens)),
                                                 reason)

    def _compact(self, call: _Call) -> None:
        """With no request waiting, moves sequences from high slots into free low ones whenever that lets
        decode steps run on a smaller batch (their block tables move with them; the KV stays put)."""
        schedule = call.schedule
        moves = schedule.compaction()
        if not moves:
            return
        state = self._state
        source = self._device(torch.tensor([s for s, _ in moves]))
        destination = self._device(torch.tensor([d for _, d in moves]))
        for buffer in state.per_slot():
            buffer[destination] = buffer[source]
        state.active[source] = False
        schedule.move(moves)
        self.stats["slot_moves"] += len(moves)
