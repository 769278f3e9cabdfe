"""Supervised warm start for the synthetic task: the reproducible starting point of the default RL run."""

from __future__ import annotations

import contextlib
import math
import os
import random
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm
from transformers import AutoTokenizer

from areal_async.agents.chat import Conversation, role_template
from areal_async.agents.tools import Calculator
from areal_async.config import PromptType, SFTConfig, SFTTask
from areal_async.data.synthetic import arithmetic_problems, noisy_demonstration
from areal_async.data.synthetic_code import code_demonstration, code_table_problems
from areal_async.data.synthetic_products import product_problems, tool_demonstration
from areal_async.model import CausalLM, DecoderConfig, save_pretrained, sequence_logprobs
from areal_async.model.tokenizer import build_byte_tokenizer
from areal_async.packing import pad_prompt_output_batch

BUNDLED_WARMSTART = Path(__file__).resolve().parents[1] / "assets" / "arith-warmstart"  # package data of areal_async
RECIPE_FILE = "sft_config.yaml"  # the SFTConfig a warm start was trained with, beside its weights


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@contextlib.contextmanager
def deterministic_kernels(enabled: bool):
    """Within the block, torch picks deterministic kernels (a warning names any op that has none); the previous
    setting comes back after. On CUDA, atomics in attention's and the embedding's backward otherwise make two
    runs of one seed differ."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's reproducible workspace
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def run_sft(config: SFTConfig, show_progress: bool = True) -> Path:
    """Trains a tiny model from scratch on noisy demonstrations and writes an HF checkpoint folder."""
    with deterministic_kernels(config.deterministic):
        return _train_and_save(config, show_progress)


def _train_and_save(config: SFTConfig, show_progress: bool) -> Path:
    output = Path(config.output) if config.output else BUNDLED_WARMSTART
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        build_byte_tokenizer(tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        shape = config.shape
        model = CausalLM(
            DecoderConfig(
                vocab_size=len(tokenizer),
                hidden_size=shape.hidden_size,
                intermediate_size=shape.intermediate_size,
                num_hidden_layers=shape.num_hidden_layers,
                num_attention_heads=shape.num_attention_heads,
                num_key_value_heads=shape.num_key_value_heads,
                max_position_embeddings=256,
                tie_word_embeddings=True,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        model.to(config.device)
        if config.task is SFTTask.tool_products:
            problems = product_problems(10000, seed=config.seed, held_out=False)
            template = role_template(PromptType.boxed, tokenizer.eos_token)
        elif config.task is SFTTask.code_table:
            problems = code_table_problems(10000, seed=config.seed, held_out=False)
            demonstrate = lambda record: code_demonstration(record, rng, config.error_rate)  # noqa: E731
        else:
            problems = arithmetic_problems(10000, config.arithmetic, seed=config.seed, held_out=False)
            demonstrate = lambda record: noisy_demonstration(record, rng, config.error_rate,  # noqa: E731
                                                             config.worked_steps)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01, betas=(0.9, 0.98))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, config.warmup_steps, config.steps)
        )
        progress = tqdm(range(config.steps), desc="sft", disable=not show_progress)
        for _ in progress:
            batch = rng.sample(problems, config.batch_size)
            if config.task is SFTTask.tool_products:  # chats as a rollout writes them; only model turns trained
                chats = [Conversation(template, tokenizer) for _ in batch]
                for record, chat in zip(batch, chats):
                    tool_demonstration(record, chat, rng, config.tool_rate, [Calculator.schema])
                prompts = [chat.tokens[:chat.prompt_length] for chat in chats]
                responses = [chat.tokens[chat.prompt_length:] for chat in chats]
                masks = [chat.mask for chat in chats]
            else:
                prompts = [tokenizer.encode(r.prompt) for r in batch]
                responses = [tokenizer.encode(demonstrate(r)) + [tokenizer.eos_token_id] for r in batch]
                masks = [[1] * len(response) for response in responses]
            padded = pad_prompt_output_batch(prompts, responses, tokenizer.pad_token_id,
                                             per_token={"trained": masks}).to(config.device)
            trained = padded.output_mask & (padded.values["trained"] > 0)
            logprobs = sequence_logprobs(model, padded.input_ids, padded.valid)
            loss = -(logprobs * trained).sum() / trained.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")
        print(f"sft: {config.steps} steps of {config.batch_size} demonstrations, last loss {loss.item():.3f}")
        return save_pretrained(model.cpu(), output, tokenizer_dir=tokenizer_dir,
                               text_files={RECIPE_FILE: OmegaConf.to_yaml(OmegaConf.structured(config))})
