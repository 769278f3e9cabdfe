"""One place that builds a generation engine by name: "torch" (the built-in engine, default) or "vllm"."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from areal_async.config import EngineConfig, EngineKind

ENGINE_KINDS = tuple(kind.value for kind in EngineKind)


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    aliases = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    name = aliases.get(name, name)
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unsupported engine dtype {dtype!r}: use float32, bfloat16 or float16")
    return name


def _pad_token_id(model_path: str | os.PathLike) -> int:
    """The tokenizer's pad id (EOS when it has none, as load_tokenizer does); the config's when no tokenizer."""
    try:
        from areal_async.model import load_tokenizer

        return int(load_tokenizer(model_path).pad_token_id)
    except (OSError, ValueError, TypeError):
        with open(Path(model_path) / "config.json", encoding="utf-8") as f:
            config = json.load(f)
        for key in ("pad_token_id", "eos_token_id"):
            value = config.get(key)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
        return 0


def torch_engine_options(settings: EngineConfig) -> dict[str, Any]:
    """TorchEngine's keyword arguments for `settings`."""
    return {
        "max_slots": settings.max_slots, "kv_memory_gib": settings.kv_memory_gib,
        "kv_block_size": settings.kv_block_size, "sync_every": settings.sync_every,
        "prefill_tokens": settings.prefill_tokens, "share_prompts": settings.share_prompts,
        "cuda_graphs": settings.cuda_graphs, "compile_decode": settings.compile_decode,
        "compile_prefill": settings.compile_prefill,
        "decode_attention": settings.decode_attention.value, "decode_split_tokens": settings.decode_split_tokens,
        "fused_sampling": settings.fused_sampling, "fuse_projections": settings.fuse_projections,
        "elementwise_kernels": settings.elementwise_kernels,
    }


def build_engine(
    kind: str,
    model_path: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    *,
    pad_token_id: int | None = None,
    seed: int = 0,
    settings: EngineConfig | None = None,
    **engine_kwargs: Any,
):
    """An engine with the TorchEngine interface (`version`, `load_weights`, `generate`) for `model_path`.

    kind "torch": TorchEngine on `device` with `settings` (default EngineConfig()), the checkpoint loaded in
    `dtype`; `pad_token_id` defaults to the tokenizer's. kind "vllm": VLLMEngine (vLLM picks its own device;
    `device` is not used, `seed` seeds the vLLM engine, `engine_kwargs` go to VLLMEngine / `vllm.LLM`). vLLM is
    imported only for kind "vllm".
    """
    if kind == "torch":
        if engine_kwargs:
            raise TypeError(f"engine 'torch' takes its options as `settings` (EngineConfig), got {sorted(engine_kwargs)}")
        from actors.engine import TorchEngine
        from areal_async.model import load_pretrained

        model = load_pretrained(model_path, getattr(torch, _dtype_name(dtype)), device=device)
        pad = _pad_token_id(model_path) if pad_token_id is None else pad_token_id
        return TorchEngine(model, pad, device, **torch_engine_options(settings or EngineConfig()))
    if kind == "vllm":
        from actors.vllm_engine import VLLMEngine

        return VLLMEngine(str(model_path), dtype=_dtype_name(dtype), seed=seed, **engine_kwargs)
    raise ValueError(f"unknown engine {kind!r}: choose one of {', '.join(ENGINE_KINDS)}")


class EngineWeights:
    """The named tensors a weight receiver writes each version into, for either engine.

    The built-in engine's are its model's own parameters, updated in place; vLLM's live inside vLLM, so a
    host copy (loaded from the checkpoint in `dtype`) takes the receiver's writes and is loaded into vLLM
    by `applied`."""

    def __init__(self, engine, model_path: str | os.PathLike, dtype: str | torch.dtype = "float32") -> None:
        from actors.engine import TorchEngine

        self.engine = engine
        self.in_place = isinstance(engine, TorchEngine)
        if self.in_place:
            self.tensors = dict(engine.model.named_parameters())
        else:
            from areal_async.model import load_pretrained

            model = load_pretrained(model_path, getattr(torch, _dtype_name(dtype)))
            self.tensors = {name: param.detach() for name, param in model.named_parameters()}

    def applied(self, version: int) -> None:
        """The receiver has written `version` into `tensors`: the engine generates with it from now on."""
        if self.in_place:
            self.engine.version = version
        else:
            self.engine.load_weights(self.tensors, version)
