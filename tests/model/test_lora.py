"""LoRA's term, alone and in a MeZO pair, against the formula in float64."""

import torch

from zotune.model.roberta import LoRA


def _lora(rank=4, features=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lora = LoRA(features, features, rank, alpha=8.0, generator=generator)
    with torch.no_grad():
        lora.B.normal_(generator=generator)  # B starts at zero; any other value makes the term visible
    return lora, generator


def _term(x, A, B, scaling):
    return (x.double() @ A.double().t() @ B.double().t()) * scaling


def test_add_to_is_y_plus_the_scaled_low_rank_term():
    lora, generator = _lora()
    x, y = torch.randn(10, 24, generator=generator), torch.randn(10, 24, generator=generator)
    expected = y.double() + _term(x, lora.A, lora.B, lora.scaling)
    torch.testing.assert_close(lora.add_to(y, x).double(), expected, rtol=1e-5, atol=1e-5)


def test_each_half_of_a_pair_takes_its_own_weights():
    lora, generator = _lora()
    plus = {"A": torch.randn_like(lora.A), "B": torch.randn_like(lora.B)}
    lora.pair = {name: torch.stack([plus[name], getattr(lora, name).detach()]) for name in plus}
    x, y = torch.randn(12, 24, generator=generator), torch.randn(12, 24, generator=generator)
    got = lora.add_to(y, x, paired=True).double()
    torch.testing.assert_close(got[:6], y[:6].double() + _term(x[:6], plus["A"], plus["B"], lora.scaling),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[6:], y[6:].double() + _term(x[6:], lora.A, lora.B, lora.scaling),
                               rtol=1e-5, atol=1e-5)
    # each half is the unpaired term with that half's tensors, bit for bit
    assert torch.equal(got[6:].float(), lora.add_to(y[6:], x[6:]))
