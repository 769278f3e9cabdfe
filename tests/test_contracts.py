"""Every implementation provides the contract the run is typed against (areal_async/contracts.py)."""

import copy

import pytest

from areal_async.config import PPOConfig
from areal_async.agents.workflows import MultiTurnRetry, SingleTurnMath, ToolIntegratedReasoning, WorkflowContext
from areal_async.contracts import Controller, Learner, ReplayQueue, Workflow
from areal_async.actor_system.controller import RolloutController
from areal_async.data.records import PromptRecord
from areal_async.actor_system.replay_queue import ShardedReplayQueue
from areal_async.run.ray_cluster import RayLearnerGroup
from areal_async.actor_system.runtime import ControllerService
from learners.fsdp_learner import FSDPLearner
from learners.ppo_learner import PPOLearner


def test_learners(tiny_model):
    for learner_class in (PPOLearner, FSDPLearner):
        assert isinstance(learner_class(copy.deepcopy(tiny_model), PPOConfig(), pad_token_id=0, temperature=1.0),
                          Learner), learner_class
    assert isinstance(RayLearnerGroup([]), Learner)


def test_controller_and_queue():
    records = [PromptRecord("q", "p", ("1",))]
    assert isinstance(ControllerService(RolloutController(records, lambda text: [1], 2, 2, 0, seed=0)), Controller)
    assert isinstance(ShardedReplayQueue(1, 4, 0), ReplayQueue)


def test_workflows():
    context = WorkflowContext(judge=None, correct_reward=5.0, incorrect_reward=-5.0)
    for workflow in (SingleTurnMath, ToolIntegratedReasoning, MultiTurnRetry):
        assert isinstance(workflow(context), Workflow), workflow


@pytest.mark.parametrize("protocol", [Learner, Controller, ReplayQueue, Workflow])
def test_a_part_without_the_contract_is_refused(protocol):
    assert not isinstance(object(), protocol)


def test_engines(tiny_model):
    """The built-in engine provides the contract; vLLM's adapter (vLLM itself need not be installed) takes the
    same generate arguments, so a rollout worker can drive either."""
    import inspect

    from actors.engine import TorchEngine
    from actors.vllm_engine import VLLMEngine
    from areal_async.contracts import GenerationEngine

    assert isinstance(TorchEngine(copy.deepcopy(tiny_model), pad_token_id=0), GenerationEngine)
    wanted = list(inspect.signature(GenerationEngine.generate).parameters)
    for engine_class in (TorchEngine, VLLMEngine):
        for method in ("generate", "load_weights"):
            assert list(inspect.signature(getattr(engine_class, method)).parameters) == \
                list(inspect.signature(getattr(GenerationEngine, method)).parameters), (engine_class, method)
    assert wanted == ["self", "prompts", "params", "weight_update", "max_new_tokens"]


def test_weight_transports():
    from areal_async.contracts import WeightTransport
    from areal_async.weight_sync import InProcessTransport, TorchDistributedTransport

    assert isinstance(InProcessTransport(), WeightTransport)
    for method in ("offer", "fetch", "acknowledge"):
        assert callable(getattr(TorchDistributedTransport, method))
    assert not isinstance(object(), WeightTransport)

