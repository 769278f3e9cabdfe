"""The whole system on one CUDA device (skipped without one): several engines and repeated CUDA-graph captures
in one process, and `areal-async train device=cuda` evaluating then training, checkpointing and resuming."""

import copy
import json

import pytest
import torch

from actors.engine import TorchEngine
from areal_async.types import SamplingParams
from areal_async.run.cli import compose_config
from areal_async.model import CausalLM, DecoderConfig
from areal_async.run.trainer import run_training
from conftest import TINY, assert_same_weights

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [[1 + (7 * i + j) % 40 for j in range(3 + i % 5)] for i in range(12)]


def _generate(engine: TorchEngine, max_new_tokens: int):
    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=5))
    return [o.tokens for o in outputs], [o.logprobs for o in outputs]


def _engine(model: CausalLM, graphs: bool) -> TorchEngine:
    # eager decode kernels in both: graphs replay the same kernels, so their draws equal the eager engine's
    return TorchEngine(copy.deepcopy(model), pad_token_id=0, device="cuda", max_slots=16, kv_block_size=16,
                       cuda_graphs=graphs, compile_decode=False)


def test_several_engines_and_recaptures_in_one_process_equal_eager():
    torch.manual_seed(0)
    model = CausalLM(DecoderConfig(**{**TINY, "hidden_size": 64}))  # head_dim 16: the Triton decode kernel's least
    eager = _engine(model, graphs=False)
    expected = {n: _generate(eager, n) for n in (10, 40)}

    first = _engine(model, graphs=True)
    assert _generate(first, 10) == expected[10]  # an evaluation engine, as a run's first generation
    captured = first.stats["graph_captures"]
    second = _engine(model, graphs=True)  # the rollout's engine, capturing after the first one ran
    assert _generate(second, 10) == expected[10]
    assert _generate(first, 40) == expected[40]  # longer sequences: the cache regrows and recaptures
    assert captured > 0 and first.stats["graph_captures"] > 0  # the regrown buffers: the steps captured again
    first.graphs.clear()
    assert _generate(first, 40) == expected[40] and len(first.graphs) > 0
    del second
    assert _generate(first, 10) == expected[10]


# eager kernels: this checks the composition on a GPU (the compiled paths are the benchmarks' and their own tests')
RUN = ["device=cuda", "total_steps=4", "checkpoint_every=2", "rollout.groups_per_step=8", "generation.group_size=4",
       "data.num_heldout=16", "eval.num_samples=2", "reward.num_workers=2", "ppo.lr=1e-4", "engine.compile_decode=false",
       "ppo.compile_layers=false"]


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("overrides", [["rollout.max_staleness=0"],
                                       ["rollout.max_staleness=2", "model.dtype=bfloat16"]],
                         ids=["synchronous-fp32", "stale-bf16"])
def test_train_on_cuda_evaluates_trains_checkpoints_and_resumes(tmp_path, overrides):
    stage = [*RUN, *overrides, f"output_dir={tmp_path}", "run_name=gpu"]
    first = run_training(compose_config("train", stage), show_progress=False)
    assert first["accuracy_before"] is not None and first["accuracy_after"] is not None
    assert first["ledger_balanced"] and first["rollout_weights_identical"]
    assert first["generation_errors"] == 0 and not first["reward_failures"]
    plan = first["memory_plan_gib"]  # the phases took turns, and none allocated more than the plan gave it
    for line in _lines(tmp_path / "gpu"):
        peaks = {phase: line[f"peak_gib_{phase}"] for phase in plan["phases"]}
        assert all(0 < peaks[phase] <= planned + plan["reserve"] for phase, planned in plan["phases"].items()), (
            peaks, plan)
    resumed = run_training(compose_config("train", [*stage, "total_steps=6", "resume=true"]), show_progress=False)
    lines = _lines(tmp_path / "gpu")
    assert [line["version"] for line in lines] == list(range(1, 7))
    assert resumed["ledger_balanced"] and resumed["rollout_weights_identical"] and resumed["generation_errors"] == 0
    assert (tmp_path / "gpu" / "training_curves.png").is_file()


def test_sft_on_cuda_gives_one_warm_start_per_seed(tmp_path):
    from areal_async.config import SFTConfig
    from areal_async.model import load_pretrained
    from areal_async.run.sft import run_sft

    config = compose_config("sft_gpu_demo", ["steps=40", "batch_size=64", f"output={tmp_path / 'one'}"])
    first = load_pretrained(run_sft(config, show_progress=False))
    config.output = str(tmp_path / "two")
    second = load_pretrained(run_sft(config, show_progress=False))
    assert isinstance(config, SFTConfig) and config.deterministic
    assert_same_weights(first, second)
