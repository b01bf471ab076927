"""A MeZO pair in one forward (PackedBatch.paired): the batch twice over, its first half reading
the trained tensors at θ + εz (FlatParameters.plus, through their pair views) and its second the
model's own, gives the logits of the two passes run one by one. On a CPU each half of a linear
with trained tensors runs the very call of its unpaired pass, so where every tensor above the
trunk trains (top:K, and bias, whose frozen weights run per half beside their trained biases)
the bits are the same. Under LoRA and prefix the frozen weights multiply both halves at once:
a matrix twice as tall, which BLAS may sum in another order, so they agree to float32 rounding."""

import pytest
import torch

from tests.conftest import save_tiny_roberta
from zotune.layers.batch import pack
from zotune.model.loading import load_model
from zotune.optim.flat import FlatParameters
from zotune.optim.subsets import SubsetOptions, attach_pair_weights, select_trainable

MASK = 5


@pytest.mark.parametrize("tie", [True, False])  # untied, the head's decoder trains with top:K
@pytest.mark.parametrize("spec,layers", [("top:1", None), ("top:2", None), ("bias", (1,)), ("lora", (1,)),
                                         ("prefix", (1,))])
def test_a_paired_forward_gives_both_passes(tmp_path, tie, spec, layers):
    save_tiny_roberta(tmp_path / "model", tie=tie)
    model = load_model(tmp_path / "model").eval()
    flat = FlatParameters(select_trainable(model, spec, SubsetOptions(layers=layers, seed=1)), lambda n, p: False)
    assert attach_pair_weights(model, flat)
    generator = torch.Generator().manual_seed(0)
    flat.plus.copy_(flat.buffer + 0.05 * torch.randn(flat.numel, generator=generator))
    sequences = [torch.randint(6, 60, (n,), generator=generator).tolist() for n in (9, 4, 13)]
    for seq in sequences:
        seq[len(seq) // 2] = MASK
    batch = pack(sequences, MASK, 2)
    labels = torch.tensor([7, 11, 42])
    with torch.no_grad():
        paired = model(batch.paired, labels)
        minus = model(batch, labels)
        with flat.reading_plus():
            plus = model(batch, labels)
    assert not torch.equal(plus, minus)  # the halves did read different tensors
    if spec in ("lora", "prefix"):
        torch.testing.assert_close(paired, torch.cat([plus, minus]), rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(paired[:3], plus) and torch.equal(paired[3:], minus)


def test_a_subset_that_trains_the_embeddings_cannot_pair(tmp_path):
    save_tiny_roberta(tmp_path / "model")
    model = load_model(tmp_path / "model")
    flat = FlatParameters(select_trainable(model, "bias"), lambda n, p: False)  # the embeddings' LayerNorm bias too
    assert not attach_pair_weights(model, flat)
    assert flat.plus is None and all(not m.pair for m in model.modules() if hasattr(m, "pair"))
