"""The recipe scripts (examples/train_*.sh): with DRY_RUN=1 each resolves its recipe and cluster configs plus the
seed's four arguments and extra overrides into a valid configuration (printed, nothing trains); PLAN=1 prints the
plan and fails as the plan does. They run through `python -m areal_async.run.cli` (AREAL_ASYNC)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = f"{sys.executable} -m areal_async.run.cli"
SCRIPTS = [("train_1.5B_n1.sh", 1, "r1_distill_qwen_1_5b"), ("train_1.5B_n4_on_ray.sh", 4, "r1_distill_qwen_1_5b"),
           ("train_1.5B_n16_on_ray.sh", 16, "r1_distill_qwen_1_5b"), ("train_7B_zero_n16_on_ray.sh", 16, "qwen2_5_7b")]
ARGUMENTS = ["/ckpt/model", "/data/prompts.jsonl", "/data/id2info.json", "16384"]


def run_script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "examples" / name), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "AREAL_ASYNC": CLI, **env}, timeout=120)


@pytest.mark.parametrize("script, nodes, shape", SCRIPTS)
def test_recipe_script_dry_run_resolves(script, nodes, shape):
    result = run_script(script, *ARGUMENTS, "ppo.lr=1e-6", DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    cluster = config["cluster"]
    assert (cluster["placement"], cluster["nodes"], cluster["gpus_per_node"]) == ("ray", nodes, 8)
    assert (cluster["num_learner_ranks"], cluster["num_rollout_workers"]) == (2 * nodes, 6 * nodes)
    assert config["rollout"]["num_queue_shards"] == nodes and config["device"] == "cuda:1"
    # the seed's recipe
    assert config["rollout"]["groups_per_step"] == 1024 and config["generation"]["group_size"] == 8
    assert (config["reward"]["correct_reward"], config["reward"]["incorrect_reward"]) == (5.0, -5.0)
    # AReaL's scripts: KL 0.001 for the 1.5B, none for the 7B zero-RL run; advantages over the batch, 4 minibatches
    assert config["ppo"]["kl_coef"] == (0.0 if shape == "qwen2_5_7b" else 0.001)
    if shape != "qwen2_5_7b":
        assert config["ppo"]["kl_mode"] == "reward"  # a per-token KL reward (kl_ctl), not a loss term
    assert config["ppo"]["advantage_norm"] == "batch" and config["ppo"]["minibatches_per_step"] == 4
    # the four arguments, the run name and an extra override
    assert config["model"]["path"] == "/ckpt/model" and config["model"]["shape"] == shape
    assert (config["data"]["kind"], config["data"]["path"], config["data"]["id2info_path"]) == (
        "areal_prompts", "/data/prompts.jsonl", "/data/id2info.json")
    assert config["generation"]["max_new_tokens"] == 16384
    assert config["run_name"].endswith(f"-n{nodes}-16384")
    assert config["ppo"]["lr"] == 1e-6
    zero = shape == "qwen2_5_7b"  # zero-RL: Open-Reasoner-Zero's template for training, rewards and evaluation
    assert config["data"]["prompt_type"] == ("orz" if zero else None)
    assert config["reward"]["extract_mode"] == ("answer_tag" if zero else "auto")
    assert config["eval"]["prompt_type"] == ("orz" if zero else "r1_distilled")


def test_recipe_script_plan_only():
    fits = run_script("train_1.5B_n4_on_ray.sh", *ARGUMENTS[:3], "24000", PLAN="1")
    assert fits.returncode == 0, fits.stderr
    assert "node 3: GPUs 0-1: learner ranks 6-7; GPUs 2-7: rollout workers 18-23" in fits.stdout
    assert "each rollout worker decodes 256 sequences at once (7,024 tokens expected each, up to 25,024)" in fits.stdout
    unbounded = run_script("train_1.5B_n4_on_ray.sh", *ARGUMENTS[:3], "24000", "engine.kv_memory_gib=null", PLAN="1")
    assert unbounded.returncode == 1  # the script stops before training
    assert "the engine KV pool needs 171.06 GiB but 73.24 GiB is left for it" in unbounded.stdout


def test_recipe_script_without_arguments_prints_its_usage():
    result = run_script("train_1.5B_n1.sh")
    assert result.returncode == 2
    assert "usage: bash" in result.stdout and "train_1.5B_n1.sh MODEL_PATH DATA_JSONL ID2INFO_JSON" in result.stdout
