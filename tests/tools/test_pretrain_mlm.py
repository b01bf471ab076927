"""tools/pretrain_mlm.py: masking recipe, size accounting, and an end-to-end CPU smoke run (what it
shares with pretrain_clm.py is tested in test_pretraining.py)."""

import json
import lzma
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import corpus
import pretrain_mlm as P

REPO = Path(__file__).resolve().parents[2]


def test_masking_follows_roberta_recipe():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, P.MASK, (2048, 128), generator=gen)
    ids[:, 0], ids[:, 60] = P.BOS, P.EOS
    inputs, picked, labels = P.mask_tokens(ids, 19, gen)
    assert picked.shape == labels.shape == (2048, 19)
    assert all(len(set(row.tolist())) == 19 for row in picked[:64])        # distinct positions a row
    assert not ((picked == 0) | (picked == 60)).any()                       # never <s> or </s>
    assert (labels == ids.gather(1, picked)).all()
    changed = torch.zeros_like(ids, dtype=torch.bool).scatter(1, picked, True)
    assert (inputs[~changed] == ids[~changed]).all()
    got = inputs.gather(1, picked)
    to_mask = (got == P.MASK).float().mean().item()
    kept = (got == labels).float().mean().item()
    assert abs(to_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01            # the rest (~10 %) are random tokens
    assert ((got >= 4) & (got < P.MASK) | (got == P.MASK)).all()


@pytest.mark.parametrize("preset", [p for p in P.PRESETS if p != "smoke"])
def test_presets_fit_45mb_and_count_matches_transformers(preset):
    cfg = P.PretrainConfig(**P.PRESETS[preset])
    assert 2 * cfg.n_params() <= P.MAX_CHECKPOINT_BYTES
    if preset == "h256l2":
        assert P.build_model(cfg) is not None  # build_model asserts n_params() == the real count


def test_default_config_is_the_shipped_models():
    c, cfg = json.loads((REPO / "models" / "zotune-roberta-small" / "config.json").read_text()), P.PretrainConfig()
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["intermediate_size"]) == (
        cfg.hidden, cfg.layers, cfg.heads, cfg.ffn)
    assert 2 * cfg.n_params() <= P.MAX_CHECKPOINT_BYTES


def test_prompt_ids_are_lm_bff_sst2_template():
    tok = P.load_tokenizer()
    ids = P.prompt_ids("it 's a charming journey .", tok)
    assert ids[0] == P.BOS and ids[-3:] == [P.MASK, 4, P.EOS] and ids[-5:-3] == [85, 21]  # " It", " was"
    assert tok.decode(ids) == "<s>it 's a charming journey . It was<mask>.</s>"


def test_smoke_run_end_to_end(tmp_path):
    """Task text plus a small IMDB-format file (one review holds an SST-2 test sentence), a card."""
    test_sentence = corpus._tsv_columns(corpus.DATA / "SST-2/glue/dev.tsv.gz", ("sentence",))[5]
    reviews = ["I liked it a lot, the acting was good.", "Meh. " + test_sentence.upper() + " Really.",
               "Not my kind of film, too long by half."] * 10
    imdb = tmp_path / "reviews.txt.xz"
    with lzma.open(imdb, "wt", encoding="utf-8") as f:
        f.write("\n".join(reviews) + "\n")
    out = tmp_path / "model"
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "tools" / "pretrain_mlm.py"), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    proc = run("--smoke", "--corpus", str(imdb), "--out", str(out))
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
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    stats = metrics["corpus"]["stats"]
    assert stats["raw"]["IMDB reviews"] == 30 and stats["kept"]["IMDB reviews"] == 20
    assert stats["reviews_removed"]["SST-2"] == 10
    assert metrics["corpus"]["documents"] == 2000 and metrics["device"] == "CPU"

    proc = run("--card", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    card = (out / "README.md").read_text()
    assert "## MeZO / fine-tuning results" in card and "Not measured yet" in card
    rescored = json.loads((out / "pretrain_metrics.json").read_text())["zero_shot_reloaded_cpu"]
    assert set(rescored) == {P.SELECTION, P.TEST} and rescored[P.TEST]["n"] == 872


def test_keep_best_saves_the_evaluation_best_on_the_selection_set(monkeypatch):
    """The mechanism test_pretrain_clm.py checks bit for bit, through the MLM's own train: with
    the selection score scripted to peak at the first evaluation, that step's weights and
    scores are what train returns; keep_best off returns the last step's."""
    import pretraining as T
    cfg_kw = dict(P.PRESETS["smoke"], steps=30, eval_every=10)
    scripted = iter([0.9, 0.2, 0.1])  # steps 10, 20, then the final evaluation at 30
    monkeypatch.setattr(T, "selection_score", lambda scores: next(scripted))
    kept, metrics = P.train(P.PretrainConfig(**cfg_kw, keep_best=True), torch.device("cpu"), log=lambda s: None)
    last, metrics_last = P.train(P.PretrainConfig(**cfg_kw), torch.device("cpu"), log=lambda s: None)
    first = metrics["history"][0]
    assert metrics["kept_step"] == 10 and first["step"] == 10
    assert metrics["zero_shot"] == {k: v for k, v in first.items() if k not in ("step", "loss")}
    final = metrics_last["history"][-1]
    assert metrics_last["kept_step"] == 30 and final["step"] == 30
    assert metrics_last["zero_shot"] == {k: v for k, v in final.items() if k not in ("step", "loss")}
    assert any(not torch.equal(a, b) for a, b in zip(kept.state_dict().values(), last.state_dict().values()))
