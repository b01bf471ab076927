"""MeZO's large-model sampling: the index maths, the readers' order, the tool, and the shipped files.

SST-2's originals ship in data/, so its samples are regenerated here and must match byte for
byte. The other tasks' originals and samples are not shipped: the protocol is checked on the
made-up originals of the made_up_data fixture, and the real samples against the sha256 that
data/SOURCES.md records only where ZOTUNE_ORIGINALS names a folder of the originals
(tools/sample_superglue.py --originals).
"""

import hashlib
import json
import lzma
import os
import re
from pathlib import Path

import numpy as np
import pytest

from zotune.tasks import mezo_sample as M
from zotune.tasks.data import default_data_dir

REPO_DATA = Path(__file__).resolve().parents[2] / "data"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stored_text(path: Path) -> str:
    return lzma.decompress(path.read_bytes()).decode("utf-8")


def test_subset_is_the_references_global_seed_permutation():
    state = np.random.get_state()
    try:  # the reference: with temp_seed(seed): np.random.permutation(n).tolist()[:num]
        np.random.seed(7)
        expected = np.random.permutation(250).tolist()[:1100]
    finally:
        np.random.set_state(state)
    assert M.mezo_subset(250, 7, 1100) == expected and len(expected) == 250


@pytest.mark.parametrize("n_train,n_valid,num_dev,sizes", [
    (67349, 872, 500, (1000, 500, 872)),
    (250, 56, 100, (150, 100, 56)),   # CB: all 250 drawn, the last 100 are dev
    (554, 104, 500, (54, 500, 104)),  # WSC under mezo.sh's defaults
])
def test_split_sizes(n_train, n_valid, num_dev, sizes):
    splits = M.mezo_splits(list(range(n_train)), list(range(n_valid)), 0, num_dev)
    assert tuple(len(splits[s]) for s in M.SPLITS) == sizes
    assert not set(splits["train"]) & set(splits["dev"])
    picked = M.mezo_subset(n_train, 0, 1000 + num_dev)
    assert splits["dev"] == picked[-num_dev:] and splits["train"] == picked[:-num_dev]


def test_sst2_samples_regenerate_from_the_shipped_glue_files():
    texts = M.sample_task("sst2", REPO_DATA, 0)
    for split in M.SPLITS:
        assert texts[split] == stored_text(M.sample_path(REPO_DATA, "sst2", 0, split))
    first = json.loads(texts["test"].split("\n")[0])
    assert set(first) == {"idx", "sentence", "label"} and first["label"] in ("0", "1")


def sources_rows() -> dict[str, list[tuple[str, str, str]]]:
    """SOURCES.md's sample rows, (path, rows, sha256 of the text), by the bytes column: a size
    for the shipped files, "not shipped" for the others."""
    text = (REPO_DATA / "SOURCES.md").read_text()
    rows = re.findall(r"^\| (data/mezo-large/\S+) \| (\d+) \| [^|]* \| (\d+|not shipped) \| ([0-9a-f]{64}) \|$",
                      text, re.M)
    out = {"shipped": [], "not shipped": []}
    for path, count, size, digest in rows:
        out["not shipped" if size == "not shipped" else "shipped"].append((path, count, digest))
    return out


def test_shipped_samples_match_sources_md():
    rows = sources_rows()
    listed = {path for path, _, _ in rows["shipped"]}
    on_disk = {str(p.relative_to(REPO_DATA.parent)) for p in (REPO_DATA / "mezo-large").rglob("*.jsonl.xz")}
    assert listed == on_disk and len(listed) == 3  # SST-2, drawn from files in data/
    assert {path.split("/")[2] for path in listed} == {"SST-2"}
    assert len(rows["not shipped"]) == 21 and not listed & {path for path, _, _ in rows["not shipped"]}
    for path, count, digest in rows["shipped"]:
        text = stored_text(REPO_DATA.parent / path)
        assert sha(text) == digest and text.count("\n") == int(count), path


@pytest.mark.skipif(not os.environ.get("ZOTUNE_ORIGINALS"), reason="set ZOTUNE_ORIGINALS to the originals' folder")
def test_samples_from_the_originals_have_the_recorded_sha256():
    """What a user who fetched the originals checks: the texts hash to SOURCES.md's rows."""
    root, checked = Path(os.environ["ZOTUNE_ORIGINALS"]), 0
    for path, count, digest in (row for rows in sources_rows().values() for row in rows):
        folder, split = path.split("/")[2], Path(path).name.split(".")[0]
        name = next(n for n, o in M.ORIGINALS.items() if o.folder == folder)
        if (root / M.ORIGINALS[name].train).exists():
            text = M.sample_task(name, root, 0)[split]
            assert sha(text) == digest and text.count("\n") == int(count), path
            checked += 1
    assert checked


def test_default_data_dir_has_the_shipped_samples():
    assert all(M.sample_path(default_data_dir(), "sst2", 0, split).exists()
               for split in M.SPLITS)


@pytest.mark.parametrize("name", ["rte", "cb", "copa", "wic", "wsc", "multirc", "boolq", "squad"])
def test_made_up_originals_follow_the_protocol(made_up_data, name):
    """The sampler on the made-up originals: deterministic (the same text again, and as the
    fixture wrote it), a new seed a new draw, and each split the protocol's indices of its file."""
    texts = M.sample_task(name, made_up_data.originals, 0)
    assert texts == M.sample_task(name, made_up_data.originals, 0)
    for split in M.SPLITS:
        assert texts[split] == stored_text(M.sample_path(made_up_data.data, name, 0, split)), split
    assert M.sample_task(name, made_up_data.originals, 1) != texts
    original = M.ORIGINALS[name]
    train = original.read((made_up_data.originals / original.train).read_text())
    valid = original.read((made_up_data.originals / original.valid).read_text())
    picked = M.mezo_subset(len(train), 0, M.NUM_TRAIN + original.num_dev)
    idx = {split: [json.loads(line)["idx"] for line in texts[split].splitlines()] for split in M.SPLITS}
    assert idx["train"] == picked[:-original.num_dev] and idx["dev"] == picked[-original.num_dev:]
    assert idx["test"] == M.mezo_subset(len(valid), 0, M.NUM_TEST) and len(idx["test"]) == len(valid)
    assert len(idx["train"]) > 0 and len(idx["dev"]) == original.num_dev
    first = json.loads(texts["train"].splitlines()[0])
    assert first == train[first["idx"]]  # the record as the reader gives it, nothing added


def test_multirc_is_flattened_passage_question_answer():
    passages = [{"idx": p, "passage": {"text": f"P{p}", "questions": [
        {"question": f"Q{p}{q}", "answers": [{"text": f"A{p}{q}{a}", "label": (p + q + a) % 2} for a in range(2)]}
        for q in range(2)]}} for p in range(2)]
    records = M.read_multirc("".join(json.dumps(p) + "\n" for p in passages))
    assert [r["answer"] for r in records] == ["A000", "A001", "A010", "A011", "A100", "A101", "A110", "A111"]
    assert records[5] == {"idx": 5, "paragraph": "P1", "question": "Q10", "answer": "A101", "label": "0"}


@pytest.mark.parametrize("text,span,index,fixed", [
    ("Tom told Sam lies. He lied.", "He", 4, "He"),                           # already a substring: kept
    ("the Dog barked at it.", "The dog.", 0, "the dog"),                       # case of the text's word, no '.'
    ("Kamenev and Zinoviev met.", "Kamenev and Zinoviev", 0, "Kamenev and Zinoviev"),
    ("They saw the big\nhouse there", "The big\nhouse.", 2, "the big house"),
])
def test_wsc_fixed_span_repair(text, span, index, fixed):
    assert M.fix_wsc_span(text, span, index) == fixed


def test_boolq_reads_both_formats():
    superglue = json.dumps({"question": "is it", "passage": "Title -- Text -- more", "idx": 0, "label": True})
    google = json.dumps({"question": "is it", "title": "Title", "answer": False, "passage": "Text"})
    assert M.read_boolq(superglue + "\n" + google + "\n") == [
        {"idx": 0, "passage": "Text -- more", "question": "is it", "label": "true"},
        {"idx": 1, "passage": "Text", "question": "is it", "label": "false"}]


def test_squad_one_record_per_question():
    squad = {"data": [{"title": "T_1", "paragraphs": [
        {"context": "C1", "qas": [{"question": "q1", "answers": [{"text": "a", "answer_start": 0}] * 2},
                                  {"question": "q2", "answers": [{"text": "b", "answer_start": 0}]}]},
        {"context": "C2", "qas": [{"question": "q3", "answers": [{"text": "c", "answer_start": 0}]}]}]}]}
    records = M.read_squad(json.dumps(squad))
    assert [(r["idx"], r["context"], r["question"], r["answers"]) for r in records] == [
        (0, "C1", "q1", ["a", "a"]), (1, "C1", "q2", ["b"]), (2, "C2", "q3", ["c"])]
    assert records[0]["title"] == "T_1"
