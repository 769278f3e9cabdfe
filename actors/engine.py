"""The built-in generation engine: batched sampling with a static KV cache, on the shared model definition."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        """Samples a continuation of every prompt (a list of token ids) in one left-padded batch."""
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

        tokens, logprobs = [], []
        running = torch.ones(batch, dtype=torch.bool, device=self.device)
        step_ids, step_valid = ids, valid
        for _ in range(params.max_new_tokens):
            logits = self.model(step_ids, valid=step_valid, kv_cache=cache)[:, -1]
            lp = scaled_logprobs(logits, params.temperature)
            token = draw(lp, params, generator)
            tokens.append(torch.where(running, token, self.pad_token_id))
            logprobs.append(lp.gather(-1, token[:, None]).squeeze(-1))
            step_ids, step_valid = token[:, None], running[:, None].clone()
            running &= ~torch.isin(token, stop_ids)
            if not running.any():
                break

        tokens_t = torch.stack(tokens, dim=1).cpu()
        logprobs_t = torch.stack(logprobs, dim=1).cpu()
        stop_set = set(params.stop_token_ids)
        outputs = []
        for row in range(batch):
            row_tokens, row_logprobs = [], []
            finish_reason = "length"
            for t in range(tokens_t.shape[1]):
                row_tokens.append(int(tokens_t[row, t]))
                row_logprobs.append(float(logprobs_t[row, t]))
                if row_tokens[-1] in stop_set:
                    finish_reason = "stop"
                    break
            outputs.append(Generation(row_tokens, row_logprobs, [self.version] * len(row_tokens), finish_reason))
        return outputs
