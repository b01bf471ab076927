"""zotune's packed model equals transformers' padded model, case by case."""

import random

import pytest
import torch
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM, XLMRobertaConfig, XLMRobertaForMaskedLM

from tests.conftest import save_tiny_roberta
from zotune.layers.batch import pack
from zotune.model.loading import load_model

MASK_ID = 5

# (name, layers, heads, hidden, tied decoder, lengths of the sequences packed together, extra)
CASES = [
    ("one-layer-short", 1, 2, 16, True, [3, 7, 5], {}),
    ("two-layers-mixed", 2, 4, 32, True, [2, 17, 64, 9, 120], {}),
    ("untied-decoder", 2, 4, 32, False, [30, 4, 11], {}),
    ("many-heads", 3, 8, 64, True, [1, 50, 33, 128], {}),
    ("xlm-roberta", 2, 4, 32, True, [12, 40], {"xlmr": True}),
    ("bert", 2, 4, 32, True, [6, 25, 13], {"bert": True}),
]


def _sequences(lengths, vocab_size, rng):
    seqs = []
    for n in lengths:
        ids = [rng.randrange(6, vocab_size) for _ in range(n)]
        ids[rng.randrange(n)] = MASK_ID
        seqs.append(ids)
    return seqs


@pytest.mark.parametrize("name,layers,heads,hidden,tie,lengths,extra", CASES, ids=[c[0] for c in CASES])
def test_label_word_logits_match_transformers(tmp_path, name, layers, heads, hidden, tie, lengths, extra):
    kwargs = {}
    if extra.get("xlmr"):
        kwargs = dict(architecture_cls=XLMRobertaForMaskedLM, config_cls=XLMRobertaConfig)
    if extra.get("bert"):
        kwargs = dict(architecture_cls=BertForMaskedLM, config_cls=BertConfig)
    hf = save_tiny_roberta(tmp_path / name, layers=layers, heads=heads, hidden=hidden, tie=tie, **kwargs)
    hf = AutoModelForMaskedLM.from_pretrained(tmp_path / name).eval()  # reload: what a user gets
    ours = load_model(tmp_path / name)
    rng = random.Random(len(name))
    seqs = _sequences(lengths, hf.config.vocab_size, rng)
    label_word_ids = torch.tensor([7, 11, 13])

    offset = 0 if extra.get("bert") else hf.config.pad_token_id + 1
    batch = pack(seqs, MASK_ID, offset)
    with torch.inference_mode():
        got = ours(batch, label_word_ids)                             # [B, C]
        full = ours(batch)                                            # [B, V]
        pad = hf.config.pad_token_id
        width = max(lengths)
        input_ids = torch.full((len(seqs), width), pad)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, :len(s)] = torch.tensor(s)
            attention_mask[i, :len(s)] = 1
        logits = hf(input_ids=input_ids, attention_mask=attention_mask).logits
        rows = torch.tensor([s.index(MASK_ID) for s in seqs])
        want_full = logits[torch.arange(len(seqs)), rows]             # [B, V]
    want = want_full[:, label_word_ids]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(full, want_full, rtol=1e-5, atol=1e-5 * want_full.abs().max().item())
