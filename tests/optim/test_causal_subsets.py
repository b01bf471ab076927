"""Trainable subsets of a causal LM select exactly their tensors, LoRA starts at the base
model, and a prefix is what MeZO's large_models/prefix.py makes of it: the past_key_values of
random tokens, attended to by every token of every sequence."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny_causal import VOCAB, save_tiny_causal
from zotune.errors import UserError
from zotune.layers.batch import pack
from zotune.model.loading import load_model
from zotune.optim.subsets import SubsetOptions, select_trainable

SEQUENCES = [[5, 9, 13, 40, 2], [7, 8], [60, 61, 62, 63, 64, 65, 66]]


def _model(tmp_path, kind="opt", **extra):
    if not (tmp_path / kind).exists():
        save_tiny_causal(tmp_path / kind, kind, **extra)
    return load_model(tmp_path / kind)


def _logits(model):
    batch = pack(SEQUENCES, None, model.config.position_offset)
    with torch.inference_mode():
        return model.logits(batch, torch.arange(batch.num_tokens))


def test_full_selects_everything(tmp_path):
    model = _model(tmp_path)
    assert [n for n, _ in select_trainable(model, "full")] == [n for n, _ in model.named_parameters()]


def test_bias_of_opt_selects_biases_in_the_given_layers_and_the_head(tmp_path):
    names = [n for n, _ in select_trainable(_model(tmp_path), "bias", SubsetOptions(layers=(1,)))]
    assert names and all(n.endswith("bias") for n in names)
    assert not any(n.startswith("layers.0.") for n in names)
    assert {"layers.1.attention.qkv.bias", "layers.1.attention.out.bias", "layers.1.ffn_in.bias",
            "layers.1.attention_norm.bias", "head.norm.bias"} <= set(names)


def test_bias_of_llama_is_refused_and_of_qwen2_is_its_qkv(tmp_path):
    with pytest.raises(UserError, match="has no bias terms"):
        select_trainable(_model(tmp_path, "llama"), "bias")
    names = [n for n, _ in select_trainable(_model(tmp_path, "qwen2", num_key_value_heads=2), "bias")]
    assert names == ["layers.0.attention.qkv.bias", "layers.1.attention.qkv.bias"]


@pytest.mark.parametrize("tie", [True, False])
def test_top_k_selects_the_upper_layers_and_the_head(tmp_path, tie):
    model = _model(tmp_path, "llama", tie=tie)
    names = [n for n, _ in select_trainable(model, "top:1")]
    assert all(n.startswith(("layers.1.", "head.")) for n in names) and "head.norm.weight" in names
    assert ("head.decoder" in names) == (not tie)  # a tied decoder is the input embedding: frozen
    with pytest.raises(UserError, match="top:3 needs"):
        select_trainable(_model(tmp_path, "llama"), "top:3")


def test_lora_wraps_q_and_the_narrower_v_and_starts_at_the_base_model(tmp_path):
    model = _model(tmp_path, "llama", num_key_value_heads=2)  # q: 4 heads x 8, v: 2 heads x 8
    before = _logits(model)
    trainable = dict(select_trainable(model, "lora", SubsetOptions(lora_rank=4, lora_alpha=8, seed=3)))
    assert trainable["layers.0.attention.lora_q.B"].shape == (32, 4)
    assert trainable["layers.0.attention.lora_v.B"].shape == (16, 4)
    assert {n.rsplit(".", 2)[-2] for n in trainable} == {"lora_q", "lora_v"}
    assert torch.equal(_logits(model), before)  # B = 0
    again = dict(select_trainable(_model(tmp_path, "llama"), "lora", SubsetOptions(lora_rank=4, lora_alpha=8, seed=3)))
    assert all(torch.equal(trainable[n], again[n]) for n in trainable)


def _hf_with_prefix(hf, tokens, sequences) -> torch.Tensor:
    """transformers' logits of each sequence after the past_key_values of `tokens`, the sequence
    numbered from 0 (MeZO's prefix hook extends the attention mask, not the positions)."""
    with torch.inference_mode():
        cache = hf(input_ids=torch.tensor([tokens]), use_cache=True).cache
        out = []
        for seq in sequences:
            out.append(hf(input_ids=torch.tensor([seq]), cache=copy.deepcopy(cache),
                          position_ids=torch.arange(len(seq))[None],
                          attention_mask=torch.ones(1, len(tokens) + len(seq), dtype=torch.long)).logits[0])
    return torch.cat(out), cache


@pytest.mark.parametrize("kind,extra", [("opt", {}), ("llama", {"num_key_value_heads": 2}),
                                        ("qwen2", {"num_key_value_heads": 4})], ids=["opt", "llama-gqa", "qwen2"])
def test_prefix_is_the_past_key_values_of_random_tokens(tmp_path, one_thread, kind, extra):
    model = _model(tmp_path, kind, **extra)
    trainable = dict(select_trainable(model, "prefix", SubsetOptions(num_prefix=3, seed=7)))
    assert set(trainable) == {f"layers.{i}.attention.prefix_{kv}" for i in range(2) for kv in "kv"}
    tokens = torch.randint(0, VOCAB, (3,), generator=torch.Generator().manual_seed(7)).tolist()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / kind, dtype=torch.float32).eval()
    want, cache = _hf_with_prefix(hf, tokens, SEQUENCES)
    for i in range(2):  # the cache's [1, G, P, D] keys and values, as [P, G*D] rows
        for kv, hf_rows in (("k", cache.layers[i].keys), ("v", cache.layers[i].values)):
            torch.testing.assert_close(trainable[f"layers.{i}.attention.prefix_{kv}"].detach(),
                                       hf_rows[0].transpose(0, 1).flatten(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    again = dict(select_trainable(_model(tmp_path, kind), "prefix", SubsetOptions(num_prefix=3, seed=7)))
    assert all(torch.equal(trainable[n], again[n]) for n in trainable)
