"""A byte-level tokenizer in Hugging Face format for the project's own tiny models.

It is saved as `tokenizer.json` + `tokenizer_config.json`, so `transformers.AutoTokenizer.from_pretrained`
loads it exactly like a real checkpoint's tokenizer: one loading path serves both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"


def load_tokenizer(folder: str | os.PathLike):
    """The checkpoint folder's tokenizer (transformers.AutoTokenizer); pads with EOS when it has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_byte_tokenizer(folder: str | os.PathLike, vocab_size: int | None = None) -> Path:
    """Writes a 256-symbol byte-level tokenizer (no merges) plus pad/bos/eos (ids 256, 257, 258).

    vocab_size: pads the vocabulary to this size (a real model's, for random weights in its shape) with
    filler tokens of three byte symbols each, between the bytes and the special tokens (which then take the
    last three ids). Text never encodes to a filler (there are no merges); a filler decodes to its three
    bytes, so a sampled sequence decodes to about three bytes per token, as real tokens do."""
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(byte_symbols)}
    fillers = 0 if vocab_size is None else vocab_size - len(vocab) - 3
    if fillers < 0:
        raise ValueError(f"vocab_size must be at least {len(vocab) + 3}, got {vocab_size}")
    for index in range(fillers):
        high, rest = divmod(index, 256 * 256)
        vocab["".join(byte_symbols[digit] for digit in (high % 256, rest // 256, rest % 256))] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([PAD, BOS, EOS])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": PAD,
        "bos_token": BOS,
        "eos_token": EOS,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return folder
