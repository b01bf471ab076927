"""The k-shot sampler regenerates the shipped SST-2 splits from GLUE's full training set, byte for byte."""

import pytest

from zotune.errors import UserError
from zotune.tasks.data import default_data_dir, read_text
from zotune.tasks.kshot import sample_k_shot
from zotune.tasks.tasks import TASKS

TRAIN_FULL = default_data_dir() / "SST-2" / "glue" / "train_full.tsv"


@pytest.mark.parametrize("k", [16, 512])
@pytest.mark.parametrize("seed", [13, 21, 42, 87, 100])
def test_reproduces_lm_bff_splits(k, seed):
    train, dev = sample_k_shot(TASKS["sst2"], TRAIN_FULL, k, seed)
    folder = default_data_dir() / "SST-2" / "k-shot-1k-test" / f"{k}-{seed}"
    assert train == read_text(folder / "train.tsv", "")[1]
    assert dev == read_text(folder / "dev.tsv", "")[1]


def test_rejects_what_it_cannot_reproduce(tmp_path):
    with pytest.raises(UserError, match="tsv tasks only"):
        sample_k_shot(TASKS["sst5"], TRAIN_FULL, 16, 42)
    (tmp_path / "t.tsv").write_text("label\tsentence\n1\tgood\n")
    with pytest.raises(UserError, match="t.tsv:1: the last column must be 'label'"):
        sample_k_shot(TASKS["sst2"], tmp_path / "t.tsv", 16, 42)
    (tmp_path / "t.tsv").write_text("sentence\tlabel\ngood\t1\nbad\tneg\n")
    with pytest.raises(UserError, match="t.tsv:3: label 'neg' is not a sst2 label"):
        sample_k_shot(TASKS["sst2"], tmp_path / "t.tsv", 16, 42)
