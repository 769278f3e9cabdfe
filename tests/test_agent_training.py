"""The tool task in a run: its problems, warm-start chats written as a rollout writes them, the SFT on them, and
runs of the tool workflow inline and under Ray (2 rollout workers, max_staleness 0 and 2) with balanced ledgers
and the agents' metrics."""

import json
import random

import numpy as np
import pytest

from areal_async.agents.chat import Conversation, role_template
from areal_async.agents.tools import Calculator
from areal_async.config import PromptType, SFTConfig, SFTTask, TinyModelShape
from areal_async.data.synthetic_products import guessed_product, product_problems, tool_demonstration
from areal_async.model.tokenizer import build_byte_tokenizer, load_tokenizer
from areal_async.run.trainer import agent_rates


def test_the_splits_are_disjoint_and_the_answers_exact():
    train, heldout = product_problems(300, seed=0, held_out=False), product_problems(30, seed=1, held_out=True)
    assert not {r.prompt for r in train} & {r.prompt for r in heldout}
    for record in train[:20]:
        a, b = map(int, record.prompt.split("*"))
        assert 100 <= a < 1000 and 1000 <= b < 10000 and record.solutions == (str(a * b),)


def test_a_guess_keeps_some_leading_digits_and_the_length():
    rng = random.Random(0)
    guesses = [guessed_product(123, 4567, rng) for _ in range(50)]
    assert all(len(str(g)) == len(str(123 * 4567)) and str(g)[0] == "5" for g in guesses)
    assert sum(g != 123 * 4567 for g in guesses) >= 45


def test_a_demonstration_is_the_chat_a_rollout_writes(tmp_path):
    """The warm start's chats use the run's template and tool-call format: a calling demonstration is, token for
    token, what ToolIntegratedReasoning records when the model writes the same turns."""
    from tests.test_agents import ScriptedEngine, calculator_agent, group, worker_for
    from areal_async.agents.workflows import ToolIntegratedReasoning
    from areal_async.config import GenerationConfig

    tokenizer = load_tokenizer(build_byte_tokenizer(tmp_path))
    record = product_problems(1, seed=0, held_out=False)[0]
    chat = Conversation(role_template(PromptType.boxed, tokenizer.eos_token), tokenizer)
    tool_demonstration(record, chat, random.Random(0), tool_rate=1.0, tools=[Calculator.schema])
    worker = worker_for(tokenizer, ScriptedEngine(tokenizer, calculator_agent), ToolIntegratedReasoning,
                        tools=[Calculator()])
    problem = group(record.prompt, record.solutions[0], 1)
    problem.prompt_tokens = np.asarray(chat.tokens[:chat.prompt_length], dtype=np.int32)
    [trajectory] = worker.rollout([problem], GenerationConfig(max_new_tokens=200), seed=0)
    assert trajectory.reward == 5.0
    assert trajectory.prompt_tokens.tolist() == chat.tokens[:chat.prompt_length]
    assert trajectory.output_tokens.tolist() == chat.tokens[chat.prompt_length:]
    assert trajectory.loss_mask.tolist() == chat.mask


def test_the_warm_start_trains_on_the_model_turns(tmp_path):
    from areal_async.run.sft import run_sft

    config = SFTConfig(output=str(tmp_path / "ws"), task=SFTTask.tool_products, steps=3, batch_size=4,
                       warmup_steps=1, shape=TinyModelShape(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                            num_attention_heads=2, num_key_value_heads=1))
    folder = run_sft(config, show_progress=False)
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


def test_agent_rates_hand_computed():
    from collections import Counter

    counts = Counter(episodes=4, episodes_with_tool_calls=3, turns=7, malformed_tool_calls=2, model_tokens=90,
                     environment_tokens=10)
    assert agent_rates(counts) == {"tool_call_rate": 0.75, "turns_per_episode": 1.75,
                                   "malformed_tool_calls_per_episode": 0.5, "environment_token_fraction": 0.1}
    assert agent_rates(Counter()) == {}


TOOL_RUN = ["rollout.workflow=areal_async.agents.workflows:ToolIntegratedReasoning", "rollout.agent.tools=[calculator]",
            "rollout.agent.max_turns=2", "data.kind=synthetic_products", "total_steps=3", "rollout.groups_per_step=2",
            "rollout.groups_per_request=2", "generation.group_size=2", "generation.max_new_tokens=16",
            "data.num_heldout=4", "eval.num_samples=1", "checkpoint_every=0", "ppo.filter_zero_variance_groups=false"]


def test_a_tool_run_inline_reports_its_episodes(tmp_path):
    from areal_async.run.cli import compose_config
    from areal_async.run.trainer import run_training

    summary = run_training(compose_config("train", [*TOOL_RUN, f"output_dir={tmp_path}", "run_name=tools"]),
                           show_progress=False)
    assert summary["ledger_balanced"] and summary["version"] == 3
    records = [json.loads(line) for line in (tmp_path / "tools" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record["episodes"]["episodes"] == 4 and 1.0 <= record["turns_per_episode"] <= 2.0
        assert 0.0 <= record["environment_token_fraction"] < 1.0 and 0.0 <= record["tool_call_rate"] <= 1.0


@pytest.mark.parametrize("staleness", [0, 2])
def test_a_tool_run_under_ray_with_two_workers_balances_its_ledger(tmp_path, staleness):
    ray = pytest.importorskip("ray")
    from areal_async.run.cli import compose_config
    from areal_async.run.trainer import run_training

    config = compose_config("train", [
        *TOOL_RUN, "cluster.placement=ray", "cluster.num_rollout_workers=2", "cluster.cpus_per_rollout_worker=0.5",
        "cluster.cpus_per_learner_rank=0.5", f"rollout.max_staleness={staleness}", "reward.num_workers=1",
        f"output_dir={tmp_path}", f"run_name=ray{staleness}"])
    try:
        summary = run_training(config, show_progress=False)
    finally:
        ray.shutdown()
    assert summary["ledger_balanced"] and summary["in_flight"] == 0 and summary["version"] == 3
    records = [json.loads(line) for line in (tmp_path / f"ray{staleness}" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["staleness_max"] <= staleness for r in records)
    # the workers report episodes as they finish them, so a step counts those that arrived during it
    assert sum(r["episodes"].get("episodes", 0) for r in records) > 0
    assert all(r["turns_per_episode"] >= 1.0 for r in records if "turns_per_episode" in r)
