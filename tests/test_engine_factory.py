"""build_engine: the built-in engine by name, and vLLM imported only when asked for."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from actors.engine import TorchEngine
from actors.engine_factory import build_engine
from areal_async.types import SamplingParams

CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "areal_async", "assets", "arith-warmstart")
HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def test_torch_engine_by_name():
    engine = build_engine("torch", CHECKPOINT, "float32", "cpu")
    assert isinstance(engine, TorchEngine)
    assert engine.pad_token_id == 256  # the byte tokenizer's pad
    assert next(engine.model.parameters()).dtype == torch.float32
    out = engine.generate([[16, 17, 10, 18, 19, 28]], SamplingParams(max_new_tokens=3, temperature=0.0))
    assert len(out[0].tokens) == 3 and out[0].versions == [0, 0, 0]
    assert next(build_engine("torch", CHECKPOINT, torch.bfloat16).model.parameters()).dtype == torch.bfloat16


def test_unknown_kind_and_options_are_refused():
    with pytest.raises(ValueError, match="unknown engine 'sglang'"):
        build_engine("sglang", CHECKPOINT)
    with pytest.raises(ValueError, match="unsupported engine dtype"):
        build_engine("torch", CHECKPOINT, "int8")
    with pytest.raises(TypeError, match="as `settings`"):
        build_engine("torch", CHECKPOINT, gpu_memory_utilization=0.5)


def test_importing_the_adapter_does_not_import_vllm():
    code = "import sys, actors.vllm_engine, actors.engine_factory; print('vllm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_says_how_to_install_it():
    with pytest.raises(ImportError, match="install the vllm extra"):
        build_engine("vllm", CHECKPOINT)


def test_engine_weights_are_the_built_in_engines_own_parameters():
    from actors.engine_factory import EngineWeights

    engine = build_engine("torch", CHECKPOINT)
    weights = EngineWeights(engine, CHECKPOINT)
    params = dict(engine.model.named_parameters())
    assert weights.tensors.keys() == params.keys()
    assert all(weights.tensors[name] is params[name] for name in params)  # a receiver writes in place
    weights.applied(7)
    assert engine.version == 7


def test_engine_weights_load_a_host_copy_into_other_engines():
    from actors.engine_factory import EngineWeights

    class Recorder:  # an engine whose weights live elsewhere, as vLLM's do
        def load_weights(self, state, version):
            self.loaded = ({name: tensor.clone() for name, tensor in state.items()}, version)

    engine = Recorder()
    weights = EngineWeights(engine, CHECKPOINT)
    reference = dict(build_engine("torch", CHECKPOINT).model.named_parameters())
    assert all(torch.equal(weights.tensors[name], reference[name]) for name in reference)
    with torch.no_grad():
        weights.tensors["model.norm.weight"].add_(1.0)  # what a receiver's delta does
    weights.applied(3)
    loaded, version = engine.loaded
    assert version == 3 and torch.equal(loaded["model.norm.weight"], reference["model.norm.weight"] + 1.0)
