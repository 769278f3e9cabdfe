"""End to end: the CLI composes configs, a short synchronous run writes its run folder, runs are deterministic."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from areal_async.run.cli import compose_config, main
from areal_async.config import SFTConfig, TrainConfig
from areal_async.config import ArithmeticConfig
from areal_async.data.synthetic import arithmetic_problems, evaluate_expression
from areal_async.model import load_pretrained
from areal_async.run.sft import BUNDLED_WARMSTART, RECIPE_FILE, run_sft
from areal_async.run.trainer import run_training
from conftest import assert_same_weights

SHORT_RUN = [
    "total_steps=3", "rollout.groups_per_step=4", "generation.group_size=4", "data.num_heldout=8",
    "eval.num_samples=2", "reward.num_workers=1", "ppo.lr=1e-3",
]


def _run(tmp_path, name, extra=()):
    config = compose_config("train", [*SHORT_RUN, f"output_dir={tmp_path}", f"run_name={name}", *extra])
    return run_training(config, show_progress=False), tmp_path / name


def test_short_run_writes_run_folder_and_is_deterministic(tmp_path):
    summary, run_dir = _run(tmp_path, "a")
    assert summary["version"] == 3
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    assert summary["ledger_balanced"] and summary["rollout_weights_identical"]
    assert summary["consumed"] == 12  # 3 steps x 4 trainable groups; zero-variance groups were replaced
    assert summary["in_flight"] == 0 and summary["queued"] == 0
    assert summary["produced"] == 12 + sum(summary["dropped"].values())
    assert (run_dir / "trajectories" / "shard-0").is_dir()
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["accuracy_after"] == summary["accuracy_after"] and on_disk["wall_seconds"] > 0
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2]
    assert [line["version"] for line in lines] == [1, 2, 3]
    for key in ("reward_mean", "accuracy", "response_length_mean", "tokens_per_s", "gather_s", "train_s",
                "staleness_max", "queue_depth", "weight_sync_seconds", "clip_fraction", "behaviour_weight_mean"):
        assert key in lines[0], key
    # the reward of every generated answer, beside the trained batch's (the filter dropped the zero-variance groups)
    assert all(-5.0 <= line["reward_mean_generated"] <= 5.0 for line in lines)
    assert sum(line["groups_dropped"] for line in lines) == sum(summary["dropped"].values()) > 0
    assert all(0.0 <= line["groups_dropped_fraction"] < 1.0 for line in lines)
    assert any(line["reward_mean_generated"] != line["reward_mean"] for line in lines)
    assert (run_dir / "config.yaml").is_file()
    final = load_pretrained(run_dir / "checkpoints" / "final")
    assert (run_dir / "checkpoints" / "final" / "tokenizer.json").is_file()
    start = load_pretrained(BUNDLED_WARMSTART)
    changed = any(not torch.equal(a, b) for a, b in zip(final.state_dict().values(), start.state_dict().values()))
    assert changed, "training left the weights untouched"

    _, again = _run(tmp_path, "b")
    losses = lambda d: [json.loads(line).get("loss") for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(again) == losses(run_dir)  # invariant 5: same seed, same config, CPU -> same losses


def test_benchmarks_are_evaluated_during_training(tmp_path):
    """eval.benchmarks every N steps: pass@1 in metrics.jsonl, every sample in the run folder."""
    from evaluation import write_synthetic_benchmark

    bench = tmp_path / "synthetic12.jsonl"
    write_synthetic_benchmark(bench, 12)
    summary, run_dir = _run(tmp_path, "evals", [f"eval.benchmarks=['synthetic={bench}']",
                                                "eval.benchmark_every_steps=2"])
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "eval/synthetic/pass@1" not in lines[0] and "eval/synthetic/pass@1" in lines[1]
    samples = [json.loads(line) for line in (run_dir / "eval/step2/samples/synthetic.jsonl").read_text().splitlines()]
    assert len(samples) == 12 * 2  # eval.num_samples=2
    assert lines[1]["eval/synthetic/pass@1"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples))


def test_unknown_key_is_an_error(capsys):
    assert main(["train", "ppo.learning_rate=1"]) == 2
    assert "ppo.learning_rate" in capsys.readouterr().err
    assert main(["train", "data.kind=csv"]) == 2
    assert "data.kind" in capsys.readouterr().err
    # hydra's + and ++ add keys: the typed config would drop them, so they are errors too (kl_coef is the key)
    for override in ("+ppo.kl_coeff=0.5", "++ppo.kl_coeff=0.5", "+seed_offset=3"):
        assert main(["train", override]) == 2
        err = capsys.readouterr().err
        assert "unknown key" in err and override.lstrip("+").split("=")[0] in err and "Traceback" not in err
    assert main(["sft", "+sft.epochs_extra=1"]) == 2
    assert "unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["train", "ppo.lr=abc"], "ppo.lr=abc"), (["train", "ppo.objective=nope"], "expected one of [decoupled, naive]"),
    (["train", "bogus.key=1"], "bogus.key"), (["train", "ppo.lr"], "ppo.lr"), (["sft", "--config", "nope"], "'nope'"),
    (["plan", "--config", "recipe_1.5B", "cluster=n99"], "available for cluster: n1, n16, n4"),
    (["simulate", "--config", "nope"], "'nope'"), (["ablate", "--grid", "nope"], "'ablation/nope'"),
])
def test_a_configuration_error_is_one_line_naming_the_input(argv, named, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err, err
    assert "full_key" not in err and "search path:" not in err and "Traceback" not in err


def test_config_yaml_matches_schema():
    config = compose_config("train", ["rollout.max_staleness=null"])
    assert isinstance(config, TrainConfig) and config.rollout.max_staleness is None


@pytest.mark.parametrize("override, named", [
    ("ppo.eps_clip=-0.5", "ppo.eps_clip"), ("ppo.behaviour_weight_cap=0", "ppo.behaviour_weight_cap"),
    ("generation.group_size=0", "generation.group_size"), ("rollout.groups_per_step=0", "rollout.groups_per_step"),
    ("ppo.micro_batch_tokens=0", "ppo.micro_batch_tokens"), ("ppo.minibatches_per_step=0", "ppo.minibatches_per_step"),
    ("rollout.max_staleness=-1", "rollout.max_staleness"), ("generation.top_p=0", "generation.top_p"),
])
def test_bad_numbers_stop_at_composition_with_one_line_naming_the_key(override, named, capsys):
    assert main(["train", override]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


SHIPPED_TRAIN_CONFIGS = ("train", "async_cpu", "gpu_demo", "recipe_1.5B", "recipe_7B_zero")


def test_a_run_whose_clip_cannot_act_is_warned_about():
    """Every shipped config updates 4 times a step; one update a step (decoupled, or naive when synchronous)
    leaves eps_clip nothing to clip, and the run says so at start."""
    from areal_async.run.trainer import inert_clip_warning

    for name in SHIPPED_TRAIN_CONFIGS:
        config = compose_config(name, [])
        assert config.ppo.minibatches_per_step == 4 and inert_clip_warning(config) is None, name
    assert "ppo.minibatches_per_step=1" in inert_clip_warning(compose_config("train", ["ppo.minibatches_per_step=1"]))
    naive = ["ppo.minibatches_per_step=1", "ppo.objective=naive"]
    assert "naive" in inert_clip_warning(compose_config("train", naive + ["rollout.max_staleness=0"]))
    assert inert_clip_warning(compose_config("train", naive + ["rollout.max_staleness=2"])) is None


@pytest.mark.parametrize("command, starts", [("train", ["async_cpu", "gpu_demo", "recipe_1.5B"]),
                                             ("sft", ["sft", "sft_gpu_demo"])])
def test_train_and_sft_help_show_their_configs_sections_and_how_to_list_keys(command, starts, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: areal-async {command} ") and f"areal-async {command} --cfg" in out
    assert all(name in out for name in starts) and ("section.key=value): model, engine" in out) == (command == "train")
    assert ("cluster=n1|n4|n16" in out) == (command == "train")


def test_learner_settings_are_typed_config():
    """The learner's kernels and modes are config (enums where the values are a fixed set), reachable from the
    command line, and a bad value names its key."""
    from areal_async.config import OneRankMode, PackedAttentionKernel

    config = compose_config("train", ["learner.packed_attention.kernel=flash", "learner.one_rank_mode=fsdp",
                                      "learner.keep_logits_gib=0", "learner.defer_reads=false"])
    assert config.learner.packed_attention.kernel is PackedAttentionKernel.flash
    assert config.learner.one_rank_mode is OneRankMode.fsdp
    assert config.learner.keep_logits_gib == 0 and config.learner.defer_reads is False
    assert main(["train", "learner.packed_attention.kernel=fast"]) == 2


def test_apply_overrides_parses_by_field_type_and_names_bad_keys():
    from areal_async.config import LearnerConfig, OneRankMode, PackedAttentionKernel, apply_overrides

    config = LearnerConfig()
    apply_overrides(config, ["packed_attention.kernel=cudnn", "packed_attention.cudnn_max_lengths=3",
                             "one_rank_mode=fsdp", "fused_clip=false", "keep_logits_gib=2.5"])
    assert config.packed_attention.kernel is PackedAttentionKernel.cudnn
    assert config.packed_attention.cudnn_max_lengths == 3 and config.one_rank_mode is OneRankMode.fsdp
    assert config.fused_clip is False and config.keep_logits_gib == 2.5
    for bad, message in (("packed_attention.kernal=flash", "unknown key 'packed_attention.kernal'"),
                         ("nope.kernel=flash", "unknown key 'nope.kernel'"),
                         ("one_rank_mode=many", "bad value for 'one_rank_mode'"),
                         ("fused_clip=maybe", "bad value for 'fused_clip'"), ("fused_clip", "expected key=value")):
        with pytest.raises(ValueError, match=message):
            apply_overrides(config, [bad])


def test_missing_model_path_names_the_folder(tmp_path):
    config = compose_config("train", [f"model.path={tmp_path / 'nowhere'}", f"output_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_training(config, show_progress=False)


def test_a_used_run_folder_is_refused_without_resume(tmp_path, capsys):
    _run(tmp_path, "once")
    metrics = (tmp_path / "once" / "metrics.jsonl").read_text()
    assert main(["train", *SHORT_RUN, f"output_dir={tmp_path}", "run_name=once", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "resume=true" in err and "Traceback" not in err
    assert (tmp_path / "once" / "metrics.jsonl").read_text() == metrics  # nothing appended


@pytest.mark.parametrize("case", ["missing file", "malformed line", "empty prompt", "no model", "model type"])
def test_input_errors_are_one_line_naming_the_input_and_leave_no_folder(tmp_path, capsys, case):
    data = tmp_path / "prompts.jsonl"
    model = tmp_path / "model"
    overrides = [f"data.kind=jsonl", f"data.path={data}"]
    if case == "malformed line":
        data.write_text('{"prompt": "1+1", "query_id": "a", "answer": "2"}\n{not json\n')
    elif case == "empty prompt":
        data.write_text('{"prompt": "", "query_id": "a", "answer": "2"}\n')
    elif case in ("no model", "model type"):
        overrides = [f"model.path={model}"]
        if case == "model type":
            model.mkdir()
            (model / "config.json").write_text('{"model_type": "gpt2"}')
    expected = {"missing file": str(data), "malformed line": f"{data}:2", "empty prompt": f"{data}:1",
                "no model": str(model), "model type": "unsupported model_type 'gpt2'"}[case]
    assert main(["train", *overrides, f"output_dir={tmp_path / 'out'}", "run_name=bad", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert expected in err[-1] and err[-1].startswith("areal-async train: ")
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "out" / "bad").exists()


def test_sft_is_reproducible(tmp_path):
    config = SFTConfig(steps=3, batch_size=8, output=str(tmp_path / "one"))
    first = load_pretrained(run_sft(config, show_progress=False))
    config.output = str(tmp_path / "two")
    second = load_pretrained(run_sft(config, show_progress=False))
    assert_same_weights(first, second)
    assert OmegaConf.load(tmp_path / "two" / RECIPE_FILE).steps == 3  # the recipe is written beside the weights


def test_sft_restores_the_determinism_setting(tmp_path):
    assert not torch.are_deterministic_algorithms_enabled()
    run_sft(SFTConfig(steps=1, batch_size=4, output=str(tmp_path / "one")), show_progress=False)
    assert not torch.are_deterministic_algorithms_enabled()  # other work in the process keeps its kernels


def test_synthetic_problems_are_correct_and_splits_disjoint():
    spec = ArithmeticConfig(min_operands=2, max_operands=3, max_operand=20, operators="+-*")
    train = arithmetic_problems(300, spec, seed=0, held_out=False)
    heldout = arithmetic_problems(100, spec, seed=0, held_out=True)
    assert not {r.prompt for r in train} & {r.prompt for r in heldout}
    assert len({r.prompt for r in train}) == 300
    assert evaluate_expression("2+3*4-5") == 9 and evaluate_expression("10-2*3*2") == -2
    for record in train[:50]:
        expression = record.prompt.removeprefix("Q: ").removesuffix("\nA: ")
        assert record.solutions == (f"\\boxed{{{evaluate_expression(expression)}}}",)
    with pytest.raises(ValueError, match="too small"):
        arithmetic_problems(100, ArithmeticConfig(max_operand=2, operators="+"), seed=0, held_out=False)


def test_a_generation_error_that_repeats_stops_the_run_at_once_with_its_traceback(tmp_path):
    from areal_async.run.trainer import GenerationFailed, Trainer

    config = compose_config("train", [*SHORT_RUN, f"output_dir={tmp_path}", "run_name=broken", "data.num_heldout=0"])
    trainer = Trainer(config)

    def broken_generate(*args, **kwargs):
        raise RuntimeError("it->second->use_count > 0 INTERNAL ASSERT FAILED")

    trainer.worker.engine.generate = broken_generate
    with pytest.raises(GenerationFailed, match="3 times in a row") as failure:
        trainer.run(show_progress=False)
    assert "INTERNAL ASSERT FAILED" in str(failure.value) and "Traceback" in str(failure.value)
    errors = [json.loads(line) for line in (tmp_path / "broken" / "generation_errors.jsonl").read_text().splitlines()]
    assert len(errors) == 3 and all("broken_generate" in error["traceback"] for error in errors)


def test_reward_failures_and_phase_timings_are_in_the_metrics(tmp_path):
    _, run_dir = _run(tmp_path, "phases", ["total_steps=1", "data.num_heldout=0"])
    (line,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert line["reward_failures"] == 0 and line["reward_failures_by_reason"] == {}
    phases = ("generation_s", "reward_s", "prepare_s", "update_s", "weight_sync_seconds", "other_s")
    assert all(line[name] >= 0 for name in phases)
    assert sum(line[name] for name in phases) == pytest.approx(line["step_s"])
    assert (run_dir / "training_curves.png").stat().st_size > 0


def test_answers_the_verifier_could_not_judge_are_left_out_of_the_loss_and_counted(tmp_path, monkeypatch):
    """Every third answer times out in the verifier: its reward is unknown (NaN), the step trains on the others
    (their group keeps them), and metrics.jsonl counts it apart from wrong answers."""
    from areal_async.reward import RewardVerifier, Verdict
    from learners.fsdp_learner import FSDPLearner

    judge = RewardVerifier.verify_batch
    monkeypatch.setattr(RewardVerifier, "verify_batch", lambda self, responses, golds: [
        Verdict(False, "timeout") if row % 3 == 0 else verdict
        for row, verdict in enumerate(judge(self, responses, golds))])
    trained = []
    train_step = FSDPLearner.train_step
    monkeypatch.setattr(FSDPLearner, "train_step", lambda self, trajectories, advantages: trained.append(
        [t.reward for t in trajectories]) or train_step(self, trajectories, advantages))
    _, run_dir = _run(tmp_path, "unjudged", ["total_steps=2", "data.num_heldout=0"])
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(line["reward_unscored"] > 0 and line["reward_failures_by_reason"]["timeout"] > 0 for line in lines)
    assert all(reward in (5.0, -5.0) for rewards in trained for reward in rewards)
    # 4 groups of 4 a step: the unscored ones are out, the rest of their groups trained
    assert [len(rewards) + line["reward_unscored"] for rewards, line in zip(trained, lines)] == [16, 16]


def test_the_bundled_warm_start_is_the_packaged_one():
    """Runs without model.path start from areal_async/assets (package data), never from a copy rebuilt elsewhere."""
    import areal_async

    assert BUNDLED_WARMSTART == Path(areal_async.__file__).resolve().parent / "assets" / "arith-warmstart"
    assert (BUNDLED_WARMSTART / "model.safetensors").is_file()
