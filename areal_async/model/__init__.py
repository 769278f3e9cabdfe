"""The one model definition (Qwen2/Llama family) used for training and generation."""

from areal_async.model.checkpoint import load_config, load_pretrained, save_pretrained, save_weights_pretrained
from areal_async.model.decoder import CausalLM, DecodeCache, DecoderConfig
from areal_async.model.logprobs import packed_sequence_logprobs, sequence_logprobs, token_logprobs
from areal_async.model.paged_cache import PagedKVCache
from areal_async.model.tokenizer import load_tokenizer

__all__ = [
    "CausalLM",
    "DecoderConfig",
    "DecodeCache",
    "load_config",
    "load_pretrained",
    "load_tokenizer",
    "packed_sequence_logprobs",
    "PagedKVCache",
    "save_pretrained",
    "save_weights_pretrained",
    "sequence_logprobs",
    "token_logprobs",
]
