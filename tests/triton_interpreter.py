"""Runs the engine's Triton kernels under Triton's interpreter, in a process of its own: TRITON_INTERPRET must be
set before triton is first imported, and in the test session torch may have imported it already.

    python tests/triton_interpreter.py CASES OUT

CASES is a torch.save'd list of (kernel, arguments) pairs, kernel "decode" (paged_decode_attention's positional
arguments, the cache tensors written in place), "draw" (fused_sample's, and the vocabulary chunk), "rms_norm",
"silu_mul" or "rope" (elementwise_triton's functions), or "generate" (a TorchEngine with the elementwise kernels
on: the model's config and weights, the prompts, SamplingParams' fields); OUT gets a list of the outputs, with the
decode cases' written caches."""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

_patch = interpreter._patch_lang_tensor


def _patch_with_scalar_bounds(tensor, scope) -> None:
    """Triton 3.6's interpreter turns a loaded scalar into a loop bound with int() on a one-element array, which
    NumPy 2.4 refuses; .item() is what it means."""
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))


interpreter._patch_lang_tensor = _patch_with_scalar_bounds


def generate(config: dict, weights: dict, prompts: list[list[int]], params: dict) -> list[tuple]:
    from actors.engine import TorchEngine
    from areal_async.model import CausalLM, DecoderConfig
    from areal_async.types import SamplingParams

    model = CausalLM(DecoderConfig(**config))
    model.load_state_dict(weights)
    engine = TorchEngine(model, pad_token_id=0, max_slots=4, kv_block_size=16, elementwise_kernels=True)
    return [(g.tokens, g.logprobs) for g in engine.generate(prompts, SamplingParams(**params))]


def main(cases_path: str, out_path: str) -> None:
    import actors.sampling_triton as sampling_triton
    from areal_async.model import elementwise_triton
    from areal_async.model.paged_decode_triton import paged_decode_attention

    outputs = []
    for kernel, args in torch.load(cases_path):
        if kernel == "decode":
            out = paged_decode_attention(*args)
            outputs.append((out, args[5], args[6]))  # the output and the written key and value caches
        elif kernel == "draw":
            *draw_args, chunk = args
            sampling_triton.CHUNK = chunk
            outputs.append(sampling_triton.fused_sample(*draw_args))
        elif kernel == "generate":
            outputs.append(generate(*args))
        else:
            outputs.append(getattr(elementwise_triton, kernel)(*args))
    torch.save(outputs, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
