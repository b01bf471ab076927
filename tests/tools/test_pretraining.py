"""tools/pretraining.py, what the masked-LM and causal-LM pretraining tools share: packing, the
zero-shot figures, the schedule, config overrides and the card's curve table."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pretraining as T

DOCS = ["A first review, long enough to run over one block.", "Short.", "A third one here."]


def test_pack_blocks_is_full_sentences():
    tok = T.load_tokenizer()
    blocks = T.pack_blocks(DOCS, tok, 8)
    assert blocks.dtype == np.int32 and blocks.shape[1] == 8 and (blocks[:, 0] == T.BOS).all()
    stream = [t for d in DOCS for t in (*tok.encode(d, add_special_tokens=False), T.EOS)]
    assert blocks[:, 1:].ravel().tolist() == stream[: blocks[:, 1:].size]  # in order, cut every 7, tail dropped
    assert len(stream) - blocks[:, 1:].size < 7


def test_pack_documents_is_bos_doc_eos_cut_into_blocks():
    tok = T.load_tokenizer()
    blocks = T.pack_documents(DOCS, tok, 8)
    stream = [t for d in DOCS for t in (T.BOS, *tok.encode(d, add_special_tokens=False), T.EOS)]
    assert blocks.dtype == np.int32 and blocks.shape == (len(stream) // 8, 8)
    assert blocks.ravel().tolist() == stream[: blocks.size] and blocks[0, 0] == T.BOS


def test_threshold_and_auc():
    diff, gold = torch.tensor([-2.0, -1.0, 0.5, 1.0, 3.0]), torch.tensor([0, 0, 0, 1, 1])
    t = T.fit_threshold(diff, gold)  # zotune.evaluate.fit_threshold, as the tools import it
    assert ((diff > t).long() == gold).all()                  # 0.5 < t < 1.0 separates them
    assert T.auc(diff, gold) == 1.0 and T.auc(-diff, gold) == 0.0
    assert T.auc(torch.zeros(4), torch.tensor([0, 1, 0, 1])) == 0.5


def test_sst2_scores_fit_the_threshold_on_the_selection_set_only():
    sets = {T.SELECTION: (["a"] * 4, [0, 0, 1, 1]), T.TEST: (["b"] * 4, [0, 1, 0, 1])}
    diffs = {T.SELECTION: torch.tensor([1.0, 2.0, 3.0, 4.0]), T.TEST: torch.tensor([1.0, 2.0, 3.0, 4.0])}
    s = T.sst2_scores(diffs, sets)
    assert s[T.SELECTION]["acc"] == 0.5 and s[T.SELECTION]["great_share"] == 1.0
    assert s[T.SELECTION]["acc_dev_threshold"] == 1.0 and s[T.TEST]["acc_dev_threshold"] == 0.5
    assert s[T.TEST]["n"] == 4 and s[T.TEST]["auc"] == 0.75


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_factor_warms_up_then_decays_to_zero(schedule):
    cfg = SimpleNamespace(warmup_steps=10, steps=110, schedule=schedule)
    f = [T.lr_factor(s, cfg) for s in range(111)]
    assert f[0] == 0.1 and f[9] == 1.0 and f[10] == 1.0 and f[110] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[60] == pytest.approx(0.5 if schedule == "linear" else 0.5 * (1 + math.cos(math.pi / 2)))


def test_apply_overrides_casts_to_the_field_type_and_rejects_unknown_fields():
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        lr: float = 1.0
        steps: int = 1
        compile: bool = False
        schedule: str = "linear"

    cfg = T.apply_overrides(Cfg(), ["lr=2e-3", "steps=7", "compile=true", "schedule=cosine"])
    assert (cfg.lr, cfg.steps, cfg.compile, cfg.schedule) == (2e-3, 7, True, "cosine")
    with pytest.raises(SystemExit, match="no config field 'lrr'"):
        T.apply_overrides(Cfg(), ["lrr=1"])


def test_history_table_has_one_column_per_loss():
    score = {"acc": 0.5, "auc": 0.6, "acc_dev_threshold": 0.7, "n": 4}
    m = {"zero_shot": {T.SELECTION: score},
         "history": [{"step": 10, "loss": None, T.SELECTION: score},
                     {"step": 20, "loss": 3.0, "dev_loss": 3.5, T.SELECTION: score}]}
    table = T.history_table(m, {"train loss": "loss", "dev loss": "dev_loss"}).splitlines()
    assert table[0] == f"| step | train loss | dev loss | {T.SELECTION} acc | AUC | acc, dev threshold |"
    assert table[1] == "|---|---|---|---|---|---|" and table[2:] == ["| 20 | 3.000 | 3.500 | 50.0 | 0.600 | 70.0 |"]
