"""models/zotune-roberta-small loads with transformers on CPU and is what its card says (issue 19)."""

import json
from pathlib import Path

import pytest
import torch

import pretrain_mlm as P

MODEL = Path(__file__).resolve().parents[2] / "models" / "zotune-roberta-small"


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    return AutoModelForMaskedLM.from_pretrained(MODEL, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(MODEL)


def test_files_and_size():
    config = json.loads((MODEL / "config.json").read_text())
    assert config["architectures"] == ["RobertaForMaskedLM"] and config["vocab_size"] == P.VOCAB
    assert config["tie_word_embeddings"] and config["dtype"] == "float16"
    shards = sorted(MODEL.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (MODEL / "model.safetensors.index.json").exists()
    assert sum(s.stat().st_size for s in MODEL.iterdir()) <= P.MAX_CHECKPOINT_BYTES  # the whole directory
    for name in ("tokenizer.json", "tokenizer_config.json", "README.md", "pretrain_metrics.json"):
        assert (MODEL / name).exists()


def test_loads_on_cpu_with_tied_decoder_and_roberta_tokenizer(loaded):
    model, tok = loaded
    assert model.lm_head.decoder.weight.data_ptr() == model.roberta.embeddings.word_embeddings.weight.data_ptr()
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2, 50264)
    assert tok.encode(" great", add_special_tokens=False) == [P.GREAT]
    assert tok.encode(" terrible", add_special_tokens=False) == [P.TERRIBLE]


def test_card_matches_zero_shot_rescored_on_cpu(loaded):
    """Re-score the selection and test sets on CPU: the card's reloaded-on-CPU figures (to one
    sentence, in case another BLAS rounds a near-tie the other way)."""
    model, tok = loaded
    got = P.zero_shot(model, tok, P.eval_sets(small=False), torch.device("cpu"))
    recorded = json.loads((MODEL / "pretrain_metrics.json").read_text())["zero_shot_reloaded_cpu"]
    for name, scores in recorded.items():
        for key in ("acc", "acc_dev_threshold", "great_share"):
            assert got[name][key] == pytest.approx(scores[key], abs=1.01 / scores["n"]), (name, key)
        assert got[name]["auc"] == pytest.approx(scores["auc"], abs=1e-3)
    assert recorded[P.TEST]["auc"] > 0.85  # the model has read real English: the signal is there
    card = (MODEL / "README.md").read_text()
    for needle in ("## Corpus", "IMDB", "Final MLM loss", "H100", "## Zero-shot SST-2", "## How the size was chosen",
                   "## MeZO / fine-tuning results", f"{100 * recorded[P.TEST]['acc']:.1f}"):
        assert needle in card, needle
