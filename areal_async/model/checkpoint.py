"""Hugging Face checkpoint folders (`config.json` + safetensors, sharded or not) <-> CausalLM."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from areal_async.errors import InputError
from areal_async.model.decoder import CausalLM, DecoderConfig

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def load_config(path: str | os.PathLike) -> DecoderConfig:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no config.json in checkpoint folder {path}")
    with open(config_file, encoding="utf-8") as f:
        try:
            return DecoderConfig.from_hf_dict(json.load(f))
        except ValueError as error:  # malformed JSON, an unsupported model_type or rope type
            raise InputError(f"{config_file}: {error}") from None


def _weight_files(folder: Path) -> list[Path]:
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    if (folder / SHARD_INDEX).is_file():
        with open(folder / SHARD_INDEX, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [folder / shard for shard in shards]
    raise FileNotFoundError(f"{folder}: neither {SINGLE_FILE} nor {SHARD_INDEX} found")


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device="cpu") -> CausalLM:
    """Loads a checkpoint folder into our CausalLM (fp32 unless `dtype` is given)."""
    folder = Path(path)
    config = load_config(folder)
    with torch.device("meta"):
        model = CausalLM(config)
    state = {}
    for weight_file in _weight_files(folder):
        state.update(load_file(str(weight_file), device=str(device)))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise InputError(f"{folder}: checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    return model.to(dtype or torch.float32)


def save_pretrained(model: CausalLM, path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                    text_files: Mapping[str, str] | None = None) -> Path:
    """Writes config.json + model.safetensors (+ tokenizer files copied from `tokenizer_dir`, + `text_files`,
    name -> contents) atomically."""
    return save_weights_pretrained(model.state_dict(), model.config, path, tokenizer_dir, text_files)


def save_weights_pretrained(weights: Mapping[str, torch.Tensor], config: DecoderConfig, path: str | os.PathLike,
                            tokenizer_dir: str | os.PathLike | None = None,
                            text_files: Mapping[str, str] | None = None) -> Path:
    """`save_pretrained` of named weights (a model's state dict or its parameters) of a model of `config`."""
    folder = Path(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(staging / SINGLE_FILE), metadata={"format": "pt"})
    with open(staging / "config.json", "w", encoding="utf-8") as f:
        hf = config.to_hf_dict()
        hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
        json.dump(hf, f, indent=2)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, staging / name)
    for name, text in (text_files or {}).items():
        (staging / name).write_text(text, encoding="utf-8")
    for written in staging.iterdir():
        written.chmod(0o644)
    staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return folder
