"""A MeZO pair in one forward (PackedBatch.paired) for causal LMs: the batch twice over, its first
half reading the trained tensors at θ + εz and its second the model's own, gives the scores of
the two passes run one by one (as tests/model/test_pair.py checks for the encoder: bit for bit
where every tensor above the trunk trains, to float32 rounding under LoRA and prefix)."""

import pytest
import torch

from tests.tiny_causal import save_tiny_causal
from zotune.layers.batch import pack
from zotune.model.loading import load_model
from zotune.optim.flat import FlatParameters
from zotune.optim.subsets import SubsetOptions, attach_pair_weights, select_trainable

# (kind, config extras, tied head)
MODELS = {"opt": ("opt", {}, True), "opt-project-untied": ("opt", {"word_embed_proj_dim": 16}, False),
          "opt-350m-post-norm": ("opt", {"word_embed_proj_dim": 16, "do_layer_norm_before": False}, True),
          "llama-gqa": ("llama", {"num_key_value_heads": 2}, False),
          "qwen2": ("qwen2", {"num_key_value_heads": 2}, True)}
SUBSETS = [("top:1", None), ("top:2", None), ("bias", (1,)), ("lora", (1,)), ("prefix", (1,)), ("prefix", None)]
# Llama has no biases (tests/optim/test_causal_subsets.py checks its error)
CASES = [(*MODELS[m], spec, layers) for m in MODELS for spec, layers in SUBSETS if (m, spec) != ("llama-gqa", "bias")]
IDS = [f"{m}-{spec}-{layers}" for m in MODELS for spec, layers in SUBSETS if (m, spec) != ("llama-gqa", "bias")]


@pytest.mark.parametrize("kind,extra,tie,spec,layers", CASES, ids=IDS)
def test_a_paired_forward_gives_both_passes(tmp_path, one_thread, kind, extra, tie, spec, layers):
    save_tiny_causal(tmp_path / "model", kind, tie=tie, **extra)
    model = load_model(tmp_path / "model")
    flat = FlatParameters(select_trainable(model, spec, SubsetOptions(layers=layers, seed=1)), lambda n, p: False)
    assert attach_pair_weights(model, flat)
    generator = torch.Generator().manual_seed(0)
    flat.plus.copy_(flat.buffer + 0.05 * torch.randn(flat.numel, generator=generator))
    sequences = [torch.randint(3, 90, (n,), generator=generator).tolist() for n in (9, 4, 13)]
    batch = pack(sequences, None, model.config.position_offset)
    rows = torch.tensor([2, 8, 9, 12, 20, 25])  # rows of every sequence, the last ones included
    targets = torch.tensor([5, 6, 7, 8, 9, 10])
    n = batch.num_tokens
    with torch.no_grad():
        paired = model(batch.paired, torch.cat([rows, rows + n]), torch.cat([targets, targets]))
        minus = model(batch, rows, targets)
        with flat.reading_plus():
            plus = model(batch, rows, targets)
    assert not torch.equal(plus, minus)  # the halves did read different tensors
    if spec in ("lora", "prefix"):
        torch.testing.assert_close(paired, torch.cat([plus, minus]), rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(paired[:6], plus) and torch.equal(paired[6:], minus)


def test_full_trains_the_embeddings_and_cannot_pair(tmp_path):
    save_tiny_causal(tmp_path / "model", "llama")
    model = load_model(tmp_path / "model")
    flat = FlatParameters(select_trainable(model, "full"), lambda n, p: False)
    assert not attach_pair_weights(model, flat)
