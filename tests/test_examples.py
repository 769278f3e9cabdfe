"""The launch scripts per node count: their overrides compose into a valid configuration (DRY_RUN=1 prints it
instead of training), with 2 learner ranks and 6 rollout workers per 8-GPU node."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("nodes", [1, 4, 16])
def test_launch_script_composes_the_recipe(nodes):
    cli = Path(sys.executable).parent / "areal-async"
    env = {**os.environ, "DRY_RUN": "1", "AREAL_ASYNC": str(cli)}
    result = subprocess.run(["bash", str(EXAMPLES / f"run_n{nodes}.sh"), "/ckpt/model", "/data/prompts.jsonl",
                             "/data/id2info.json", "16384", "ppo.lr=1e-6"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["cluster"]["num_learner_ranks"] == 2 * nodes
    assert config["cluster"]["num_rollout_workers"] == 6 * nodes
    assert config["rollout"]["groups_per_step"] == 1024 and config["generation"]["group_size"] == 8
    assert config["generation"]["max_new_tokens"] == 16384
    assert config["ppo"]["lr"] == 1e-6  # extra arguments are overrides
    assert config["data"]["kind"] == "areal_prompts" and config["model"]["path"] == "/ckpt/model"


def test_launch_script_without_arguments_prints_its_usage():
    result = subprocess.run(["bash", str(EXAMPLES / "run_n1.sh")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "MODEL_PATH" in result.stdout
