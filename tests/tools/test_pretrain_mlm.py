"""tools/pretrain_mlm.py: masking recipe, size accounting, and an end-to-end CPU smoke run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain_mlm as P

REPO = Path(__file__).resolve().parents[2]


def test_masking_follows_roberta_recipe():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, P.MASK, (512, 128), generator=gen)
    ids[:, 0], ids[:, 100], ids[:, 101:] = P.BOS, P.EOS, P.PAD
    inputs, labels = P.mask_tokens(ids, 0.15, gen)
    picked = labels != -100
    special = (ids == P.BOS) | (ids == P.EOS) | (ids == P.PAD)
    assert not (picked & special).any() and (inputs[special] == ids[special]).all()
    assert (labels[picked] == ids[picked]).all() and (inputs[~picked] == ids[~picked]).all()
    n = picked.sum().item()
    assert abs(n / (~special).sum().item() - 0.15) < 0.005
    to_mask = (inputs[picked] == P.MASK).sum().item() / n
    kept = (inputs[picked] == ids[picked]).sum().item() / n
    assert abs(to_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01  # the rest (~10 %) are random tokens
    assert ((inputs >= 4) & (inputs < P.MASK) | special | (inputs == P.MASK)).all()


@pytest.mark.parametrize("preset", [p for p in P.PRESETS if p != "smoke"])
def test_presets_fit_30mb_and_count_matches_transformers(preset):
    cfg = P.PretrainConfig(**P.PRESETS[preset])
    assert 2 * cfg.n_params() <= P.MAX_CHECKPOINT_BYTES
    if preset == "h256l2":
        assert P.build_model(cfg) is not None  # build_model asserts n_params() == the real count


def test_default_config_is_the_shipped_models():
    shipped = REPO / "models" / "zotune-roberta-small" / "config.json"
    if not shipped.exists():
        pytest.skip("no shipped model")
    c, cfg = json.loads(shipped.read_text()), P.PretrainConfig()
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["intermediate_size"]) == (
        cfg.hidden, cfg.layers, cfg.heads, cfg.ffn)


def test_prompt_ids_are_lm_bff_sst2_template():
    tok = P.load_tokenizer()
    ids = P.prompt_ids("it 's a charming journey .", tok)
    assert ids[0] == P.BOS and ids[-3:] == [P.MASK, 4, P.EOS] and ids[-5:-3] == [85, 21]  # " It", " was"
    assert tok.decode(ids) == "<s>it 's a charming journey . It was<mask>.</s>"


def test_smoke_run_end_to_end(tmp_path):
    out = tmp_path / "model"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "pretrain_mlm.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "zero-shot glue/dev (test)" in proc.stdout
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    model = AutoModelForMaskedLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["RobertaForMaskedLM"]
    assert len(list(out.glob("model-*.safetensors"))) >= 2  # the smoke run shards at 1MB
    assert tok.mask_token_id == P.MASK and tok("hi").input_ids[0] == P.BOS
    ids = torch.tensor([P.prompt_ids("a fine film .", tok)])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], P.VOCAB)
    card = (out / "README.md").read_text()
    assert "## MeZO / fine-tuning results" in card and "Pending" in card
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert metrics["corpus"]["sentences"] == 2000 and metrics["device"] == "CPU"
