"""The project's own pretrained model loads in transformers and in zotune, with matching logits."""

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from zotune.config import DEFAULT_MODEL
from zotune.layers.batch import pack
from zotune.model.loading import load_model


def test_shipped_model_matches_transformers():
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    hf = AutoModelForMaskedLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    ours = load_model(DEFAULT_MODEL)
    texts = ["a gorgeous , witty film . It was <mask> .", "It was <mask> .",
             "the plot is thin and the jokes fall flat , and by the end the whole thing feels long . It was <mask> ."]
    sequences = [tokenizer.encode(t) for t in texts]
    with torch.inference_mode():
        got = ours(pack(sequences, tokenizer.mask_token_id, 2))                 # [B, V]
        for row, ids in zip(got, sequences):
            logits = hf(input_ids=torch.tensor([ids])).logits[0, ids.index(tokenizer.mask_token_id)]
            torch.testing.assert_close(row, logits, rtol=1e-5, atol=1e-4)
