"""Our decoder against transformers' reference implementation, checkpoints and padding (decoding with a cache:
test_engine.py)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from areal_async.model import CausalLM, DecoderConfig, load_pretrained, save_pretrained, save_weights_pretrained
from conftest import assert_same_weights

SHAPE = dict(
    vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)


def _reference(kind: str, tied: bool):
    torch.manual_seed(0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=tied, rope_theta=10000.0))
    else:
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=tied, rope_theta=500000.0))
    with torch.no_grad():  # HF zero-inits biases; random ones make the check meaningful
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("kind,tied,shard", [("qwen2", False, False), ("qwen2", True, True), ("llama", False, True)])
def test_logits_match_transformers(tmp_path, kind, tied, shard):
    reference = _reference(kind, tied)
    reference.save_pretrained(tmp_path, max_shard_size="100KB" if shard else "5GB")
    assert (tmp_path / ("model.safetensors.index.json" if shard else "model.safetensors")).exists()
    ours = load_pretrained(tmp_path).eval()
    ids = torch.randint(0, SHAPE["vocab_size"], (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    assert got.shape == (3, 21, SHAPE["vocab_size"])
    assert (got - expected).abs().max().item() < 1e-4


def test_save_then_transformers_loads_same_logits(tmp_path):
    torch.manual_seed(3)
    ours = CausalLM(DecoderConfig(**SHAPE, tie_word_embeddings=True)).eval()
    save_pretrained(ours, tmp_path / "ckpt")
    reference = Qwen2ForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 9))
    with torch.no_grad():
        assert (ours(ids) - reference(ids).logits).abs().max().item() < 1e-4
    reloaded = load_pretrained(tmp_path / "ckpt")
    assert_same_weights(ours, reloaded)


@pytest.mark.parametrize("tied", [True, False])
def test_named_parameters_save_as_the_model_does(tmp_path, tied):
    """What a run exports from an engine's weights (its parameters, no module) equals the model's own export."""
    torch.manual_seed(4)
    ours = CausalLM(DecoderConfig(**SHAPE, tie_word_embeddings=tied)).eval()
    save_pretrained(ours, tmp_path / "model")
    save_weights_pretrained(dict(ours.named_parameters()), ours.config, tmp_path / "weights")
    a, b = load_pretrained(tmp_path / "model"), load_pretrained(tmp_path / "weights")
    assert (tmp_path / "model" / "config.json").read_text() == (tmp_path / "weights" / "config.json").read_text()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_left_padding_does_not_change_real_tokens():
    torch.manual_seed(5)
    model = CausalLM(DecoderConfig(**SHAPE)).eval()
    short = torch.randint(0, SHAPE["vocab_size"], (1, 6))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)
    valid = torch.cat([torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        alone = model(short)
        batched = model(padded, valid=valid)
    assert torch.isfinite(batched).all()
    assert (batched[:, 4:] - alone).abs().max().item() < 1e-5


def test_unsupported_model_type_is_a_clear_error():
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        DecoderConfig.from_hf_dict({"model_type": "gpt2"})


def test_fused_projections_compute_the_same_and_follow_in_place_updates():
    """fuse_projections: one matrix product for q/k/v and one for gate/up, over the same parameters (views of the
    fused tensors), so a weight update written in place reaches the fused forward; a conversion drops them."""
    torch.manual_seed(0)
    model = CausalLM(DecoderConfig(**SHAPE))
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 7))
    with torch.no_grad():
        expected = model(ids)
    names = [name for name, _ in model.named_parameters()]
    model.fuse_projections()
    assert [name for name, _ in model.named_parameters()] == names  # names and count unchanged
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.data_ptr() == attention.fused[0].data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)  # other GEMM blocking
        for param in model.parameters():  # the weight receiver's in-place writes
            param.mul_(1.5)
        updated = model(ids)
    unfused = CausalLM(DecoderConfig(**SHAPE))
    unfused.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(updated, unfused(ids), rtol=1e-5, atol=1e-5)
    model.double()  # new storage for every parameter: the fused tensors would be stale, so they go
    assert attention.fused is None and model.model.layers[0].mlp.fused is None
    with torch.no_grad():
        torch.testing.assert_close(model(ids).float(), updated, rtol=1e-5, atol=1e-5)
