"""The built-in generation engine: batched sampling with a static KV cache, on the shared model definition."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from actors.sampling import SamplingParams, draw, scaled_logprobs
from areal_async.model import CausalLM, KVCache


@dataclass
class Generation:
    """What the engine returns per request: output tokens with their behaviour logprobs and versions."""

    tokens: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str  # "stop" (a stop token, included in tokens) or "length"


class TorchEngine:
    """Generates with a CausalLM; `version` is stamped on every token it produces."""

    def __init__(self, model: CausalLM, pad_token_id: int, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.pad_token_id = pad_token_id
        self.device = torch.device(device)
        self.version = 0

    @torch.no_grad()
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Copies `state_dict` into the model in place (no reallocation) and adopts `version`."""
        params = dict(self.model.named_parameters())
        missing = set(params) - set(state_dict)
        if missing:
            raise KeyError(f"weight update for version {version} lacks {sorted(missing)[:5]}")
        for name, param in params.items():
            param.copy_(state_dict[name])
        self.version = version

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        weight_update: Callable[[], bool] | None = None,
    ) -> list[Generation]:
        """Samples a continuation of every prompt (a list of token ids) in one left-padded batch.

        `weight_update` is called at every token boundary; when it returns True it has swapped in new
        weights (and `version`), and the KV cache of every sequence in flight is recomputed with them
        before decoding continues. Each token records the version that sampled it.
        """
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        batch, longest = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        valid = torch.zeros((batch, longest), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
            valid[row, longest - len(prompt) :] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        dtype = next(self.model.parameters()).dtype
        cache = KVCache.allocate(self.model.config, batch, longest + params.max_new_tokens, dtype, self.device)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        stop_ids = torch.as_tensor(list(params.stop_token_ids), dtype=torch.long, device=self.device)

        history_ids, history_valid = [ids], [valid]  # every token fed so far, to rebuild the cache
        tokens, logprobs, versions = [], [], []
        running = torch.ones(batch, dtype=torch.bool, device=self.device)
        step_ids, step_valid = ids, valid  # tokens not yet in the cache
        for _ in range(params.max_new_tokens):
            if weight_update is not None and weight_update():
                cache.length = 0
                cache.valid.zero_()
                step_ids, step_valid = torch.cat(history_ids, dim=1), torch.cat(history_valid, dim=1)
            logits = self.model(step_ids, valid=step_valid, kv_cache=cache)[:, -1]
            lp = scaled_logprobs(logits, params.temperature)
            token = draw(lp, params, generator)
            tokens.append(torch.where(running, token, self.pad_token_id))
            logprobs.append(lp.gather(-1, token[:, None]).squeeze(-1))
            versions.append(self.version)
            step_ids, step_valid = token[:, None], running[:, None].clone()
            history_ids.append(step_ids)
            history_valid.append(step_valid)
            running &= ~torch.isin(token, stop_ids)
            if not running.any():
                break

        tokens_t = torch.stack(tokens, dim=1).cpu()
        logprobs_t = torch.stack(logprobs, dim=1).cpu()
        stop_set = set(params.stop_token_ids)
        outputs = []
        for row in range(batch):
            length, finish_reason = tokens_t.shape[1], "length"
            for t in range(tokens_t.shape[1]):
                if int(tokens_t[row, t]) in stop_set:
                    length, finish_reason = t + 1, "stop"
                    break
            outputs.append(
                Generation(
                    tokens_t[row, :length].tolist(), logprobs_t[row, :length].tolist(), versions[:length], finish_reason
                )
            )
        return outputs
