"""build_engine: the built-in engine by name, and vLLM imported only when asked for."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from actors.engine import TorchEngine
from actors.engine_factory import build_engine
from actors.sampling import SamplingParams

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
    with pytest.raises(TypeError, match="no extra options"):
        build_engine("torch", CHECKPOINT, gpu_memory_utilization=0.5)


def test_importing_the_adapter_does_not_import_vllm():
    code = "import sys, actors.vllm_engine, actors.engine_factory; print('vllm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_says_how_to_install_it():
    with pytest.raises(ImportError, match="install the vllm extra"):
        build_engine("vllm", CHECKPOINT)
