"""models/zotune-roberta-small loads with transformers on CPU and is what its card says (issue 3)."""

import json
from pathlib import Path

import pytest
import torch

import pretrain_mlm as P

MODEL = Path(__file__).resolve().parents[2] / "models" / "zotune-roberta-small"
pytestmark = pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="no shipped model")


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    return AutoModelForMaskedLM.from_pretrained(MODEL).eval(), AutoTokenizer.from_pretrained(MODEL)


def test_files_and_size():
    config = json.loads((MODEL / "config.json").read_text())
    assert config["architectures"] == ["RobertaForMaskedLM"] and config["vocab_size"] == P.VOCAB
    assert config["tie_word_embeddings"] and config["dtype"] == "float16"
    shards = sorted(MODEL.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (MODEL / "model.safetensors.index.json").exists()
    assert sum(s.stat().st_size for s in shards) <= P.MAX_CHECKPOINT_BYTES
    for name in ("tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (MODEL / name).exists()


def test_loads_on_cpu_with_tied_decoder_and_roberta_tokenizer(loaded):
    model, tok = loaded
    assert model.lm_head.decoder.weight.data_ptr() == model.roberta.embeddings.word_embeddings.weight.data_ptr()
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2, 50264)
    assert tok.encode(" great", add_special_tokens=False) == [P.GREAT]
    assert tok.encode(" terrible", add_special_tokens=False) == [P.TERRIBLE]


def test_card_matches_zero_shot_on_k_shot_dev(loaded):
    """Re-score 16-42/dev (32 sentences) on CPU: the card's reloaded-on-CPU figure, exactly."""
    model, tok = loaded
    sents, labels = P.read_sst2(P.DATA / "SST-2/k-shot-1k-test/16-42/dev.tsv.gz")
    got = P.zero_shot(model.float(), tok, sents, labels, torch.device("cpu"))
    metrics = json.loads((MODEL / "pretrain_metrics.json").read_text())
    assert got["acc"] == pytest.approx(metrics["zero_shot_reloaded_cpu"]["16-42/dev"]["acc"])
    card = (MODEL / "README.md").read_text()
    for needle in ("## Corpus", "Decontamination", "Final MLM loss", "H100", "## Zero-shot SST-2",
                   "## MeZO / fine-tuning results", "Pending"):
        assert needle in card, needle
