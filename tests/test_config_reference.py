"""The configuration reference: `areal-async config --list` prints every key of TrainConfig with its default, and
docs/configuration.md is what the typed configs generate."""

import dataclasses
from pathlib import Path

from areal_async.config import SFTConfig, TrainConfig
from areal_async.config_reference import config_keys, reference_page
from areal_async.run.cli import main

ROOT = Path(__file__).resolve().parents[1]


def leaf_keys(schema, prefix=""):
    """Every leaf key of a config class, found by walking its fields (independently of config_keys)."""
    keys = []
    for field in dataclasses.fields(schema):
        value = getattr(schema(), field.name)
        if dataclasses.is_dataclass(value):
            keys += leaf_keys(type(value), f"{prefix}{field.name}.")
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


def test_config_list_prints_every_key_with_its_default(capsys):
    assert main(["config", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == leaf_keys(TrainConfig)
    by_name = {line.split(":")[0]: line for line in lines}
    assert by_name["total_steps"].startswith("total_steps: int = 60")
    assert by_name["rollout.max_staleness"].startswith("rollout.max_staleness: int | null = 0  # 0 = synchronous")
    assert by_name["rollout.workflow"].startswith(
        "rollout.workflow: str = areal_async.agents.workflows:SingleTurnMath  # the agent workflow by import path")
    assert by_name["rollout.agent.tools"].startswith("rollout.agent.tools: list[calculator | python] = []")
    assert main(["config", "--list", "--sft"]) == 0
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()] == leaf_keys(SFTConfig)


def test_the_reference_page_is_current():
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == reference_page() + "\n", ("docs/configuration.md is out of date: run "
                                             "python -m areal_async.config_reference docs/configuration.md")
    assert all(f"| `{key.name}` |" in page for key in config_keys(TrainConfig) + config_keys(SFTConfig))
