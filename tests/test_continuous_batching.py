"""The engine's continuous batching over the paged KV cache: slot refill, per-request limits and stops, weight
swaps with requests waiting and in flight, slot compaction, block sizes, preemption when the pool runs dry,
prompt blocks shared within a group, and the graph bookkeeping (with a stand-in for CUDA graphs), all against
the model's own full forward pass."""

import copy

import pytest
import torch

from actors.engine import TorchEngine
from areal_async.model.paged_cache import kv_block_bytes
from areal_async.types import SamplingParams
from conftest import behaviour_logprob_gap

@pytest.fixture(params=[0, 1], ids=["synchronous", "lookahead"])
def lookahead(request) -> int:
    """Runs of decode steps queued ahead of the host's reads: 0 is the CPU default, 1 the CUDA default."""
    return request.param


PROMPTS = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11], [12, 13, 14, 15, 16, 17, 18], [19, 20], [21, 22, 23, 24]]


def greedy_reference(model, prompt, count, stop_ids=()):
    """Greedy continuation from the model's full forward pass, recomputed from scratch at every token."""
    ids, out = list(prompt), []
    for _ in range(count):
        with torch.no_grad():
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(token)
        ids.append(token)
        if token in stop_ids:
            break
    return out


def test_more_requests_than_slots_match_greedy_reference(tiny_model, lookahead):
    limits = [3, 9, 1, 6, 4, 8, 2]
    engine = TorchEngine(tiny_model, pad_token_id=0, lookahead=lookahead, max_slots=3, sync_every=3, kv_block_size=4)
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=0.0), max_new_tokens=limits)
    for prompt, limit, output in zip(PROMPTS, limits, outputs):
        assert output.tokens == greedy_reference(tiny_model, prompt, limit)
        assert len(output.logprobs) == len(output.versions) == limit
        assert output.finish_reason == "length" and output.versions == [0] * limit
    assert engine.stats["decode_steps"] < sum(limit - 1 for limit in limits)  # sequences ran side by side
    # the same engine, a larger second call (the slot buffers grow) still matches
    longer = engine.generate([p * 3 for p in PROMPTS[:5]], SamplingParams(max_new_tokens=12, temperature=0.0))
    for prompt, output in zip(PROMPTS[:5], longer):
        assert output.tokens == greedy_reference(tiny_model, prompt * 3, 12)


def test_slot_is_refilled_as_soon_as_a_sequence_ends(tiny_model, lookahead):
    limits = [2, 12, 2, 2, 2]
    engine = TorchEngine(tiny_model, pad_token_id=0, lookahead=lookahead, max_slots=2, sync_every=1)
    outputs = engine.generate(PROMPTS[:5], SamplingParams(temperature=0.0), max_new_tokens=limits)
    # the long request needs 11 decode steps; the four short ones take turns in the other slot meanwhile
    assert engine.stats["decode_steps"] == 11
    for prompt, limit, output in zip(PROMPTS, limits, outputs):
        assert output.tokens == greedy_reference(tiny_model, prompt, limit)


def test_stop_token_frees_the_slot_for_a_waiting_request(tiny_model, lookahead):
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    free_run = TorchEngine(tiny_model, pad_token_id=0, lookahead=lookahead).generate(PROMPTS, greedy)
    stop = free_run[0].tokens[2]
    engine = TorchEngine(tiny_model, pad_token_id=0, lookahead=lookahead, max_slots=2, sync_every=2)
    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=(stop,)))
    for prompt, output in zip(PROMPTS, outputs):
        assert output.tokens == greedy_reference(tiny_model, prompt, 10, stop_ids=(stop,))
        assert output.finish_reason == ("stop" if output.tokens[-1] == stop else "length")
    assert outputs[0].finish_reason == "stop" and len(outputs[0].tokens) <= 3


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 7)])
def test_sampled_logprobs_equal_recomputation_with_refills(tiny_model, lookahead, temperature, top_p, top_k):
    engine = TorchEngine(copy.deepcopy(tiny_model), pad_token_id=0, lookahead=lookahead, max_slots=3, sync_every=2,
                         kv_block_size=8)
    params = SamplingParams(max_new_tokens=9, temperature=temperature, top_p=top_p, top_k=top_k, seed=5,
                            stop_token_ids=(3, 4))
    outputs = engine.generate(PROMPTS, params, max_new_tokens=[9, 3, 7, 9, 5, 9, 2])
    assert behaviour_logprob_gap(tiny_model, PROMPTS, outputs, temperature) < 1e-5


def test_a_request_draws_the_same_tokens_whatever_its_slot_and_company(tiny_model, lookahead):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=11)
    wide = TorchEngine(tiny_model, pad_token_id=0, lookahead=lookahead, max_slots=8, sync_every=5)
    narrow = TorchEngine(tiny_model, pad_token_id=0, lookahead=lookahead, max_slots=2, sync_every=1)
    wide, narrow = wide.generate(PROMPTS, params), narrow.generate(PROMPTS, params)
    assert [g.tokens for g in wide] == [g.tokens for g in narrow]
    other_seed = TorchEngine(tiny_model, pad_token_id=0, lookahead=lookahead).generate(
        PROMPTS, SamplingParams(max_new_tokens=10, seed=12))
    assert [g.tokens for g in wide] != [g.tokens for g in other_seed]
    # identical prompts (a GRPO group) still get different samples
    group = TorchEngine(tiny_model, pad_token_id=0, lookahead=lookahead).generate([PROMPTS[0]] * 4, params)
    assert len({tuple(g.tokens) for g in group}) > 1


def test_weight_swap_with_requests_waiting_and_in_flight(tiny_model, lookahead):
    torch.manual_seed(1)
    new_state = {name: p.detach() + 0.05 * torch.randn_like(p) for name, p in tiny_model.named_parameters()}
    updated = copy.deepcopy(tiny_model)
    updated.load_state_dict(new_state, strict=False)
    engine = TorchEngine(copy.deepcopy(tiny_model), pad_token_id=0, lookahead=lookahead, max_slots=2, sync_every=2)
    calls = []

    def swap_at_seventh_boundary() -> bool:
        calls.append(None)
        if len(calls) == 7:
            engine.load_weights(new_state, version=1)
            return True
        return False

    limits = [4, 8, 3, 5, 6, 2, 7]
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=0.0), weight_update=swap_at_seventh_boundary,
                              max_new_tokens=limits)
    assert engine.stats["recomputes"] == 1
    versions = [v for o in outputs for v in o.versions]
    assert 0 in versions and 1 in versions
    for prompt, output in zip(PROMPTS, outputs):
        assert output.versions == sorted(output.versions)  # a request never goes back to older weights
        ids = list(prompt)
        for token, logprob, version in zip(output.tokens, output.logprobs, output.versions):
            scorer = tiny_model if version == 0 else updated
            with torch.no_grad():
                full = scorer(torch.tensor([ids]))[0, -1]
            assert token == int(full.argmax())
            assert logprob == pytest.approx(float(torch.log_softmax(full, -1)[token]), abs=1e-5)
            ids.append(token)


def test_compaction_moves_the_tail_to_a_smaller_bucket(tiny_model, lookahead):
    limits = [2, 2, 2, 14]
    engine = TorchEngine(tiny_model, pad_token_id=0, lookahead=lookahead, max_slots=4, sync_every=1, kv_block_size=4)
    outputs = engine.generate(PROMPTS[:4], SamplingParams(temperature=0.0), max_new_tokens=limits)
    assert engine.stats["slot_moves"] == 1  # the long request leaves slot 3 for slot 0 (bucket 4 -> 1)
    for prompt, limit, output in zip(PROMPTS, limits, outputs):
        assert output.tokens == greedy_reference(tiny_model, prompt, limit)


class StandInGraphs:
    """CudaGraphs' contract on CPU: `capture(key, step)` runs the step once and records it under `key`, a
    graph's `replay` runs the recorded step again (with the arguments it was captured with), and `clear`
    drops every graph (the engine's buffers are about to be reallocated)."""

    def __init__(self) -> None:
        self.warm_runs = self.replays = self.clears = 0
        self.captured = []
        self._graphs = {}

    def keys(self):
        return list(self._graphs)

    def get(self, key):
        return self._graphs.get(key)

    def clear(self) -> None:
        self.clears += 1
        self._graphs.clear()

    def capture(self, key, step) -> None:
        self.warm_runs += 1
        step()
        self.captured.append(step)
        graphs = self

        class Graph:
            def replay(self) -> None:
                graphs.replays += 1
                step()

        self._graphs[key] = Graph()


def test_graph_bookkeeping_captures_each_shape_once(tiny_model, lookahead):
    params = SamplingParams(max_new_tokens=10, temperature=0.9, seed=3, stop_token_ids=(5,))
    limits = [10, 4, 10, 2, 9, 10, 6]
    eager = TorchEngine(tiny_model, pad_token_id=0, lookahead=lookahead, max_slots=3, sync_every=3, kv_block_size=4)
    expected = eager.generate(PROMPTS, params, max_new_tokens=limits)
    graphed = TorchEngine(tiny_model, pad_token_id=0, lookahead=lookahead, max_slots=3, sync_every=3, kv_block_size=4)
    graphed.graphs = StandInGraphs()
    outputs = graphed.generate(PROMPTS, params, max_new_tokens=limits)
    assert [(g.tokens, g.logprobs) for g in outputs] == [(g.tokens, g.logprobs) for g in expected]
    stand_in = graphed.graphs
    assert stand_in.warm_runs == len(stand_in.captured) == graphed.stats["graph_captures"] > 1
    assert stand_in.warm_runs + stand_in.replays == graphed.stats["decode_steps"]
    # a second call with the same shapes replays only
    again = graphed.generate(PROMPTS, params, max_new_tokens=limits)
    assert [g.tokens for g in again] == [g.tokens for g in expected]
    assert graphed.stats["graph_captures"] == 0
    # a longer call reallocates the buffers: every graph is dropped and captured again on the new ones
    longer = SamplingParams(max_new_tokens=20, temperature=0.9, seed=3, stop_token_ids=(5,))
    longer_limits = [20, 4, 10, 2, 9, 10, 6]
    reference = eager.generate(PROMPTS, longer, max_new_tokens=longer_limits)
    assert [g.tokens for g in graphed.generate(PROMPTS, longer, max_new_tokens=longer_limits)] == [
        g.tokens for g in reference]
    assert stand_in.clears == 2 and graphed.stats["graph_captures"] > 0  # the first allocation, then this one


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_forwards_match_eager(tiny_model, backend):
    """compile_decode and compile_prefill trace the model's own forward (graph breaks at each layer's paged
    attention and at the prefill's cache layout); with the tracing-only backends the results are the eager
    ones, through a pool small enough to preempt (resumed prompts prefilled again) and a weight swap (the
    recompute's forwards read cached positions)."""
    params = SamplingParams(max_new_tokens=14, temperature=0.8, seed=4)
    limits = [14, 9, 12, 14, 7, 13, 14, 10, 11]

    def run(**options):
        engine = TorchEngine(copy.deepcopy(tiny_model), pad_token_id=0, max_slots=6, sync_every=2, kv_block_size=2,
                             kv_memory_gib=13 * kv_block_bytes(tiny_model.config, 2, torch.float32) / 2**30,
                             **options)
        boundaries = []

        def swap_at_fifth_boundary() -> bool:
            boundaries.append(None)
            if len(boundaries) == 5:
                engine.load_weights(dict(engine.model.named_parameters()), version=1)
                return True
            return False

        outputs = engine.generate(GROUPS, params, max_new_tokens=limits, weight_update=swap_at_fifth_boundary)
        return outputs, engine.stats

    expected, eager_stats = run()
    torch._dynamo.reset()
    outputs, stats = run(compile_decode=True, compile_prefill=True, compile_backend=backend)
    assert eager_stats["preemptions"] > 0 and eager_stats["recomputes"] == 1
    assert stats["preemptions"] == eager_stats["preemptions"] and stats["recomputes"] == 1
    assert [g.tokens for g in outputs] == [g.tokens for g in expected]
    for got, want in zip(outputs, expected):  # aot_eager's decompositions may reorder fp32 sums
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)
    if backend == "eager":
        assert [g.logprobs for g in outputs] == [g.logprobs for g in expected]


def test_compile_prefill_alone_traces_the_prefill_forward(tiny_model):
    """With the decode step eager, every graph dynamo captures comes from the prefill forward."""
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    expected = TorchEngine(tiny_model, pad_token_id=0, max_slots=3, kv_block_size=4).generate(PROMPTS, params)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    engine = TorchEngine(tiny_model, pad_token_id=0, max_slots=3, kv_block_size=4, compile_prefill=True,
                         compile_backend="eager")
    assert [g.tokens for g in engine.generate(PROMPTS, params)] == [g.tokens for g in expected]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


def test_block_sizes_and_fused_projections_agree(tiny_model, lookahead):
    """Blocks of 1, 3 and 16 positions lay the same sequences out differently (16 holds every prompt in one
    block), and fused q/k/v and gate/up projections compute the same products: the same tokens and logprobs."""
    params = SamplingParams(max_new_tokens=9, temperature=0.9, top_p=0.95, seed=11)
    limits = [9, 4, 9, 2, 7, 9, 5]
    runs = []
    for block, fuse in ((1, False), (3, True), (16, False)):
        engine = TorchEngine(copy.deepcopy(tiny_model), pad_token_id=0, lookahead=lookahead, max_slots=3,
                             sync_every=2, kv_block_size=block, fuse_projections=fuse)
        runs.append(engine.generate(PROMPTS, params, max_new_tokens=limits))
    for run in runs[1:]:
        assert [g.tokens for g in run] == [g.tokens for g in runs[0]]
        for got, want in zip(run, runs[0]):
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)


GROUPS = [[1, 2, 3, 4, 5, 6]] * 4 + [[7, 8, 9]] * 3 + [[10, 11, 12, 13, 14, 15, 16, 17, 18]] * 2


def test_a_dry_pool_preempts_the_youngest_and_they_resume_with_the_same_samples(tiny_model, lookahead):
    """A pool of 12 blocks of 2 for 6 slots: sequences are preempted and come back (prompt + tokens so far,
    prefilled again); every request draws the same tokens as in a roomy pool, and its behaviour logprobs equal
    the learner's recomputation."""
    params = SamplingParams(max_new_tokens=14, temperature=1.0, seed=21)
    limits = [14, 9, 12, 14, 7, 13, 14, 10, 11]
    roomy = TorchEngine(tiny_model, pad_token_id=0, lookahead=lookahead, max_slots=6, kv_block_size=2)
    expected = roomy.generate(GROUPS, params, max_new_tokens=limits)
    assert roomy.stats["preemptions"] == 0
    block = roomy.block_bytes
    tight = TorchEngine(tiny_model, pad_token_id=0, lookahead=lookahead, max_slots=6, sync_every=2, kv_block_size=2,
                        kv_memory_gib=13 * block / 2**30)
    outputs = tight.generate(GROUPS, params, max_new_tokens=limits)
    assert tight.stats["preemptions"] > 0 and tight.stats["pool_blocks"] == 12
    assert [g.tokens for g in outputs] == [g.tokens for g in expected]
    assert all(len(g.tokens) == len(g.logprobs) == len(g.versions) == n for g, n in zip(outputs, limits))
    assert behaviour_logprob_gap(tiny_model, GROUPS, outputs, 1.0) < 1e-5


def test_samples_on_shared_prompt_blocks_equal_unshared_ones(tiny_model, lookahead):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5)
    runs = {}
    for share in (True, False):
        engine = TorchEngine(tiny_model, pad_token_id=0, lookahead=lookahead, max_slots=9, kv_block_size=2,
                             share_prompts=share)
        runs[share] = (engine.generate(GROUPS, params), engine.stats)
    (shared, shared_stats), (alone, alone_stats) = runs[True], runs[False]
    # 4 samples of 6 tokens: 3 shared blocks (3 x 3 references saved); 3 of 3: 1 block (x 2); 2 of 9: 4 (x 1)
    assert shared_stats["shared_prompt_blocks"] == 9 + 2 + 4 and alone_stats["shared_prompt_blocks"] == 0
    assert (shared_stats["prefill_rows"], alone_stats["prefill_rows"]) == (3, 9)  # one prefill per prompt
    assert [g.tokens for g in shared] == [g.tokens for g in alone]
    for got, want in zip(shared, alone):
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)


def test_a_weight_swap_recomputes_a_shared_prompt_once_per_group(tiny_model, lookahead):
    """Greedy decoding with a weight swap in flight: every token is the argmax of the weights of its stamped
    version, and the recompute prefills a shared prompt once for its group."""
    torch.manual_seed(3)
    new_state = {name: p.detach() + 0.05 * torch.randn_like(p) for name, p in tiny_model.named_parameters()}
    updated = copy.deepcopy(tiny_model)
    updated.load_state_dict(new_state, strict=False)
    recomputed = {}
    for share in (True, False):
        engine = TorchEngine(copy.deepcopy(tiny_model), pad_token_id=0, lookahead=lookahead, max_slots=9,
                             kv_block_size=2, share_prompts=share)
        calls = iter(range(1000))

        def swap(engine=engine, calls=calls) -> bool:
            if next(calls) == 3:
                engine.load_weights(new_state, version=1)
                return True
            return False

        outputs = engine.generate(GROUPS, SamplingParams(max_new_tokens=6, temperature=0.0), weight_update=swap)
        recomputed[share] = engine.stats["recomputed_tokens"]
        assert engine.stats["recomputes"] == 1
        for prompt, output in zip(GROUPS, outputs):
            assert output.versions == sorted(output.versions) and 1 in output.versions
            ids = list(prompt)
            for token, version in zip(output.tokens, output.versions):
                scorer = tiny_model if version == 0 else updated
                with torch.no_grad():
                    assert token == int(scorer(torch.tensor([ids]))[0, -1].argmax())
                ids.append(token)
    # the shared full blocks: 3 blocks of 2 for the group of 4, 1 for the group of 3, 4 for the pair
    assert recomputed[False] - recomputed[True] == 2 * (3 * 3 + 1 * 2 + 4 * 1)


def test_samples_of_a_shared_prompt_preempted_resume_with_the_same_samples(tiny_model, lookahead):
    """A pool of 8 blocks of 2 for a sequence growing to 16 tokens beside two samples of an 8-token prompt (its 4
    blocks shared): the pool runs dry, the youngest (the samples) are preempted and resume with the same samples.
    Which victims free the shared blocks is pinned down by tests/test_scheduler.py."""
    prompts = [[1, 2], list(range(3, 11)), list(range(3, 11))]
    params = SamplingParams(temperature=1.0, seed=8)
    limits = [14, 8, 8]
    expected = TorchEngine(tiny_model, pad_token_id=0, max_slots=3, kv_block_size=2).generate(
        prompts, params, max_new_tokens=limits)
    probe = TorchEngine(tiny_model, pad_token_id=0, kv_block_size=2)
    tight = TorchEngine(tiny_model, pad_token_id=0, lookahead=lookahead, max_slots=3, sync_every=2, kv_block_size=2,
                        kv_memory_gib=9 * probe.block_bytes / 2**30)
    outputs = tight.generate(prompts, params, max_new_tokens=limits)
    assert tight.stats["preemptions"] >= 2 and tight.stats["shared_prompt_blocks"] == 4
    assert [g.tokens for g in outputs] == [g.tokens for g in expected]
