"""Trainable subsets select exactly their tensors, and additions start at the base model."""

import pytest
import torch

from zotune.layers.batch import pack
from zotune.errors import UserError
from zotune.model.loading import load_model
from zotune.optim.subsets import SubsetOptions, no_weight_decay, select_trainable

MASK = 5


def _logits(model):
    batch = pack([[0, 7, 8, MASK, 2], [0, MASK, 9, 2]], MASK, 2)
    with torch.inference_mode():
        return model(batch, torch.tensor([10, 11]))


def test_full_selects_everything(tiny_roberta_dir):
    model = load_model(tiny_roberta_dir)
    names = [n for n, _ in select_trainable(model, "full")]
    assert names == [n for n, _ in model.named_parameters()]


def test_bias_selects_biases_only_in_given_layers(tiny_roberta_dir):
    model = load_model(tiny_roberta_dir)
    names = [n for n, _ in select_trainable(model, "bias", SubsetOptions(layers=(1,)))]
    assert names and all(n.endswith("bias") for n in names)
    assert not any(n.startswith("layers.0.") for n in names)
    assert "layers.1.attention.qkv.bias" in names and "head.bias" in names
    assert "embeddings.norm.bias" not in names  # below the chosen layers
    assert "embeddings.norm.bias" in dict(select_trainable(load_model(tiny_roberta_dir), "bias"))


def test_top_k_selects_upper_layers_and_head(tiny_roberta_dir):
    model = load_model(tiny_roberta_dir)
    names = [n for n, _ in select_trainable(model, "top:1")]
    assert all(n.startswith(("layers.1.", "head.")) for n in names)
    assert "embeddings.word.weight" not in names  # the tied decoder stays frozen
    with pytest.raises(UserError, match="top:3 needs"):
        select_trainable(load_model(tiny_roberta_dir), "top:3")


def test_lora_starts_at_the_base_model(tiny_roberta_dir):
    model = load_model(tiny_roberta_dir)
    before = _logits(model)
    trainable = select_trainable(model, "lora", SubsetOptions(lora_rank=4, lora_alpha=8))
    assert {n.rsplit(".", 2)[-2] for n, _ in trainable} == {"lora_q", "lora_v"}
    assert sum(p.numel() for _, p in trainable) == 2 * 2 * (4 * 32 + 32 * 4)
    assert torch.equal(_logits(model), before)  # B = 0: LoRA adds exactly nothing at start
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)


def test_lora_head_trains_lora_and_the_head_with_a_decoder_of_its_own(tiny_roberta_dir):
    # The MeZO paper's LoRA: only the base model (roberta.*) is frozen, and its prompt model's
    # LM head has a decoder of its own, untied from the word embeddings.
    model = load_model(tiny_roberta_dir)
    before, embeddings = _logits(model), model.embeddings.word.weight.detach().clone()
    names = [n for n, _ in select_trainable(model, "lora+head", SubsetOptions(lora_rank=4, lora_alpha=8))]
    head = ["head.bias", "head.decoder", "head.dense.weight", "head.dense.bias", "head.norm.weight", "head.norm.bias"]
    assert [n for n in names if ".lora_" not in n] == head
    assert {n.rsplit(".", 2)[-2] for n in names if ".lora_" in n} == {"lora_q", "lora_v"}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in names)
    assert not model.config.tie_word_embeddings
    decoder = model.head.decoder
    assert torch.equal(decoder, embeddings) and decoder.data_ptr() != model.embeddings.word.weight.data_ptr()
    assert torch.equal(_logits(model), before)  # a copy of the tied decoder, and LoRA's B = 0
    with torch.no_grad():
        decoder.add_(1.0)  # the decoder trains alone: the input embeddings stay as they were
    assert torch.equal(model.embeddings.word.weight, embeddings)
    assert not torch.equal(_logits(model), before)
    # --layers restricts LoRA, never the head.
    upper = [n for n, _ in select_trainable(load_model(tiny_roberta_dir), "lora+head", SubsetOptions(layers=(1,)))]
    assert not any(n.startswith("layers.0.") for n in upper) and set(head) <= set(upper)


def test_lora_is_reproducible_from_the_seed(tiny_roberta_dir):
    a = dict(select_trainable(load_model(tiny_roberta_dir), "lora", SubsetOptions(seed=3)))
    b = dict(select_trainable(load_model(tiny_roberta_dir), "lora", SubsetOptions(seed=3)))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_prefix_rows_are_real_key_value_activations(tiny_roberta_dir):
    model = load_model(tiny_roberta_dir)
    trainable = dict(select_trainable(model, "prefix", SubsetOptions(num_prefix=3, seed=1)))
    assert set(trainable) == {f"layers.{i}.attention.prefix_{kv}" for i in range(2) for kv in "kv"}
    # Layer 0's prefix keys are the key projection of the embedded random tokens.
    tokens = torch.randint(0, model.config.vocab_size, (3,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        x = model.embeddings(pack([tokens], None, 2))
        k = model.layers[0].attention.qkv(x).chunk(3, dim=-1)[1]
    torch.testing.assert_close(trainable["layers.0.attention.prefix_k"].detach(), k)
    assert _logits(model).shape == (2, 2)  # the model runs with prefixes attached


def test_unknown_subset_and_bad_layers(tiny_roberta_dir):
    with pytest.raises(UserError, match="unknown --trainable"):
        select_trainable(load_model(tiny_roberta_dir), "everything")
    with pytest.raises(UserError, match="outside this model's layers"):
        select_trainable(load_model(tiny_roberta_dir), "lora", SubsetOptions(layers=(7,)))


def test_weight_decay_grouping():
    assert no_weight_decay("layers.0.attention.qkv.bias") and no_weight_decay("layers.0.ffn_norm.weight")
    assert no_weight_decay("embeddings.norm.weight") and no_weight_decay("head.bias")
    assert not no_weight_decay("layers.0.ffn_in.weight") and not no_weight_decay("layers.0.attention.lora_q.A")
