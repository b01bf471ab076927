"""Loaders: every shipped split, X.tsv vs X.tsv.gz, and one UserError per kind of bad file."""

import gzip
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zotune.errors import UserError
from zotune.tasks.data import Example, default_data_dir, load_file, load_split
from zotune.tasks.tasks import TASKS

REPO_DATA = Path(__file__).resolve().parents[2] / "data"

# task -> rows in train, dev, test of k=16 seed 42 (data/SOURCES.md), and the test set's class counts.
SPLITS = {
    "sst2": (32, 32, 872, [428, 444]),
    "sst5": (80, 80, 1000, [133, 276, 192, 219, 180]),
    "trec": (96, 96, 500, [138, 94, 9, 65, 81, 113]),
    "mnli": (48, 48, 1000, [349, 333, 318]),
    "snli": (48, 48, 1000, [341, 347, 312]),  # its rows hold 11, 14 or 15 fields: the label is the last
    "rte": (32, 32, 277, [131, 146]),
}


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_shipped_splits(name):
    task = TASKS[name]
    *sizes, test_counts = SPLITS[name]
    splits = {split: load_split(task, default_data_dir(), 16, 42, split) for split in ("train", "dev", "test")}
    assert [len(splits[s]) for s in ("train", "dev", "test")] == sizes
    for split in ("train", "dev"):  # balanced: k per class
        assert Counter(e.label for e in splits[split]) == {c: 16 for c in range(len(task.label_words))}
    assert Counter(e.label for e in splits["test"]) == dict(enumerate(test_counts))
    assert all(len(e.sentences) == len(task.text_columns) for e in splits["test"])


def test_first_examples():
    data = default_data_dir()
    trec = Example(("What city is served by Tempelhol Airport ?",), 4)
    assert load_split(TASKS["trec"], data, 16, 42, "train")[0] == trec
    assert load_split(TASKS["mnli"], data, 16, 42, "train")[0] == Example(("That's all right.", "That's fine."), 1)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("ZOTUNE_DATA_DIR", raising=False)
    assert default_data_dir() == REPO_DATA
    monkeypatch.setenv("ZOTUNE_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path


def test_unlabelled_files(tmp_path):
    glue_test = load_file(TASKS["sst2"], REPO_DATA / "SST-2" / "glue" / "test.tsv")  # header: index, sentence
    assert len(glue_test) == 1821 and all(e.label is None for e in glue_test)
    (tmp_path / "u.csv").write_text('a question ?\n"with, comma"\n')
    assert load_file(TASKS["trec"], tmp_path / "u.csv") == [Example(("a question ?",), None),
                                                             Example(("with, comma",), None)]


def test_plain_file_wins_over_gz(tmp_path):
    (tmp_path / "a.tsv.gz").write_bytes(gzip.compress(b"sentence\tlabel\nfrom gz\t1\n"))
    assert load_file(TASKS["sst2"], tmp_path / "a.tsv") == [Example(("from gz",), 1)]
    (tmp_path / "a.tsv").write_text("label\tsentence\r\n0\tplain, crlf\r\n\n")  # any column order; blank lines skipped
    assert load_file(TASKS["sst2"], tmp_path / "a.tsv") == [Example(("plain, crlf",), 0)]


def test_missing_split_names_the_flags(tmp_path):
    with pytest.raises(UserError, match=r"no file .*SST-2/k-shot-1k-test/16-7/train.tsv .*--data-dir .*--k \(16\) "
                                        r".*--seed \(7\)"):
        load_split(TASKS["sst2"], default_data_dir(), 16, 7, "train")
    with pytest.raises(UserError, match="unknown split 'val'"):
        load_split(TASKS["sst2"], default_data_dir(), 16, 42, "val")


SST2 = "sentence\tlabel\n"
NLI = "index\tsentence1\tsentence2\tlabel\n"
SNLI = "sentence1\tsentence2\tlabel1\tgold_label\n"
# (task, file name, content, line named in the error, what the error says)
BAD_FILES = [
    ("sst2", "a.tsv", SST2 + "good\t1\ttoo\tmany\n", 2, "4 fields, expected 2"),
    ("sst2", "a.tsv", SST2 + "good\t1\nno label\n", 3, "1 fields, expected 2"),
    ("sst2", "a.tsv", SST2 + "good\t1\n \t0\n", 3, "empty sentence"),
    ("sst2", "a.tsv", SST2 + "good\tpositive\n", 2, r"label 'positive' is not a sst2 label \(0, 1\)"),
    ("sst2", "a.tsv", "text\tlabel\ngood\t1\n", 1, "no column sentence in the header"),
    ("rte", "a.tsv", NLI + "0\tpremise\t\tentailment\n", 2, "empty sentence2"),
    ("rte", "a.tsv", NLI + "0\tpremise\thypothesis\tneutral\n", 2,
     r"label 'neutral' is not a rte label \(not_entailment, entailment\)"),
    ("snli", "a.tsv", SNLI + "p\th\tneutral\tneutral\tneutral\n" + "p\th\n", 3, "2 fields, expected 4"),
    ("snli", "a.tsv", SNLI + "p\th\tneutral\t-\n", 2, r"label '-' is not a snli label"),
    ("sst5", "a.csv", "3,fine\npos,nice\n", 2, r"label 'pos' is not a sst5 label \(0, 1, 2, 3, 4\)"),
    ("sst5", "a.csv", "3,fine\n7,nice\n", 2, "label '7' is not a sst5 label"),
    ("sst5", "a.csv", '3,fine\n2,""\n', 2, "empty sentence"),
    ("sst5", "a.csv", "3,fine\n2,one, two\n", 2, "3 fields, expected 2"),
    ("trec", "a.csv", "1,a,b\n", 1, "3 fields; a csv file has rows `label,sentence`"),
]


@pytest.mark.parametrize("name,file,content,line,message", BAD_FILES)
def test_bad_file(tmp_path, name, file, content, line, message):
    (tmp_path / file).write_text(content)
    with pytest.raises(UserError, match=f"{re.escape(str(tmp_path / file))}:{line}: {message}"):
        load_file(TASKS[name], tmp_path / file)


@pytest.mark.parametrize("content,message", [
    (b"", "has no examples"),
    (b"sentence\tlabel\n", "has no examples"),
    (b"sentence\tlabel\nbad \xff byte\t1\n", "cannot read .*utf-8"),
    (b"\x1f\x8bnot gzip at all", "cannot read"),
])
def test_unreadable_or_empty(tmp_path, content, message):
    path = tmp_path / ("a.tsv.gz" if content.startswith(b"\x1f\x8b") else "a.tsv")
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_file(TASKS["sst2"], path)


def test_a_folder_is_unreadable(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        load_file(TASKS["sst2"], tmp_path)


FIELD = st.one_of(st.sampled_from(["0", "1", "3", "entailment", "neutral", "label", "sentence", "sentence1",
                                   "sentence2", "gold_label", "", " ", '"', '""', "a,b", "\r", "x\ry"]),
                  st.text(max_size=12))
ROW = st.lists(FIELD, min_size=0, max_size=6)
HEADER = st.one_of(st.sampled_from([["sentence", "label"], ["label", "sentence"], ["sentence1", "sentence2", "label"],
                                    ["sentence1", "sentence2", "label1", "gold_label"], ["index", "sentence"]]), ROW)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(TASKS)), header=HEADER, rows=st.lists(ROW, max_size=6),
       sep=st.sampled_from(["\t", ","]), gz=st.booleans(), garbage=st.one_of(st.just(b""), st.binary(max_size=40)))
def test_fuzz_loader_raises_only_user_errors(tmp_path, name, header, rows, sep, gz, garbage):
    task = TASKS[name]
    data = "\n".join(sep.join(row) for row in [header, *rows]).encode() + garbage
    path, gz_path = tmp_path / f"f.{task.file_format}", tmp_path / f"f.{task.file_format}.gz"
    path.unlink(missing_ok=True)
    gz_path.unlink(missing_ok=True)
    if gz:
        gz_path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    try:
        examples = load_file(task, path)
    except UserError as e:
        assert str(path) in str(e) and "\n" not in str(e) and "\r" not in str(e)  # one line
        return
    for e in examples:
        assert len(e.sentences) == len(task.text_columns) and all(s.strip() for s in e.sentences)
        assert e.label is None or 0 <= e.label < len(task.label_words)
