"""MeZO's large-model data protocol: 1,000 train, 500 dev and 1,000 test examples per task and seed.

How the reference samples (princeton-nlp/MeZO `large_models/tasks.py` `Dataset.sample_subset`
and `run.py` `main`, as `mezo.sh` calls them with --train_set_seed SEED --num_train 1000
--num_dev 500 --num_eval 1000):

  train+dev  `np.random.seed(SEED); np.random.permutation(len(train)).tolist()[:1000 + 500]`
             over the task's original training split, in file order; the LAST 500 of these are
             dev, the rest train. CB and COPA have fewer than 1,500 training examples and use
             dev 100 (mezo.sh), so CB gives 150 train / 100 dev and COPA 300 / 100.
  test       the same call with the same seed over the original validation split (SuperGLUE's
             test labels are hidden), first min(1000, len) of the permutation.

The originals are read as Hugging Face `datasets` presents them to the reference (file order,
MultiRC flattened to one example per answer, WSC with the `wsc.fixed` span repair, BoolQ's
passage without the SuperGLUE "Title -- " prefix as in the `boolq` dataset, SQuAD v1.1 one
example per question). A stored record is `{"idx": position in that order, <template fields>,
"label": label as a string}` (SQuAD: "answers" instead of "label"), one compact JSON line each.
`tools/sample_superglue.py` writes them; data/SOURCES.md records the originals and checksums.
"""

import csv
import io
import json
import lzma
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zotune.tasks.data import read_text

NUM_TRAIN, NUM_DEV, NUM_TEST = 1000, 500, 1000
SPLITS = ("train", "dev", "test")


def mezo_subset(n: int, seed: int, num: int) -> list[int]:
    """The indices `sample_subset` picks: an explicit RandomState gives the same stream as its
    `temp_seed(seed)` (global `np.random.seed`) followed by `np.random.permutation(n)`."""
    return np.random.RandomState(seed).permutation(n).tolist()[:num]


def mezo_splits(train: list, valid: list, seed: int, num_dev: int = NUM_DEV) -> dict[str, list]:
    """train / dev / test as the reference draws them from the original train and validation splits."""
    picked = [train[i] for i in mezo_subset(len(train), seed, NUM_TRAIN + num_dev)]
    test = [valid[i] for i in mezo_subset(len(valid), seed, NUM_TEST)]
    return {"train": picked[:-num_dev], "dev": picked[-num_dev:], "test": test}


# ---- readers: original file text -> records in the reference's order --------------------------

def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def _label(value) -> str:
    # JSON true/false -> "true"/"false", 0/1 -> "0"/"1", strings unchanged: the task table's keys.
    return json.dumps(value) if not isinstance(value, str) else value


def _keep(fields: tuple[str, ...]) -> Callable[[str], list[dict]]:
    def read(text: str) -> list[dict]:
        return [{"idx": i, **{f: row[f] for f in fields}, "label": _label(row["label"])}
                for i, row in enumerate(_jsonl(text))]
    return read


def read_glue_sst2(text: str) -> list[dict]:
    """GLUE SST-2 train.tsv / dev.tsv (header `sentence<TAB>label`), as HF `glue/sst2` reads them."""
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    header, body = rows[0], [r for r in rows[1:] if r]
    at = {name: header.index(name) for name in ("sentence", "label")}
    return [{"idx": i, "sentence": r[at["sentence"]], "label": r[at["label"]]} for i, r in enumerate(body)]


def read_multirc(text: str) -> list[dict]:
    """One record per answer option, passage by passage, question by question (HF `super_glue/multirc`)."""
    records = []
    for row in _jsonl(text):
        passage = row["passage"]
        for question in passage["questions"]:
            for answer in question["answers"]:
                records.append({"idx": len(records), "paragraph": passage["text"], "question": question["question"],
                                "answer": answer["text"], "label": _label(answer["label"])})
    return records


def fix_wsc_span(text: str, span: str, word_index: int) -> str:
    """HF `wsc.fixed`: a span that is not a substring of the text gets the case of the text's
    word at its index, loses trailing periods and has newlines made spaces; two spans with
    words in between cannot be repaired and stay as they are."""
    if span in text or span in ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin"):
        return span
    first = text.split()[word_index]
    span = (span[0].lower() if first[0].islower() else span[0].upper()) + span[1:]
    return span.rstrip(".").replace("\n", " ")


def read_wsc(text: str) -> list[dict]:
    records = []
    for i, row in enumerate(_jsonl(text)):
        target = row["target"]
        records.append({"idx": i, "text": row["text"],
                        "span1_text": fix_wsc_span(row["text"], target["span1_text"], target["span1_index"]),
                        "span2_text": fix_wsc_span(row["text"], target["span2_text"], target["span2_index"]),
                        "label": _label(row["label"])})
    return records


def read_boolq(text: str) -> list[dict]:
    """SuperGLUE BoolQ, or Google's original `boolq` files (`answer` and `title` fields): the
    reference loads the latter, whose passage has no "Title -- " prefix, so SuperGLUE's is cut."""
    records = []
    for i, row in enumerate(_jsonl(text)):
        passage, label = (row["passage"], row["answer"]) if "answer" in row else (
            row["passage"].split(" -- ", 1)[-1], row["label"])
        records.append({"idx": i, "passage": passage, "question": row["question"], "label": _label(label)})
    return records


def read_squad(text: str) -> list[dict]:
    """SQuAD v1.1 json: one record per question, articles and paragraphs in file order (HF `squad`)."""
    records = []
    for article in json.loads(text)["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                records.append({"idx": len(records), "title": article["title"], "context": paragraph["context"],
                                "question": qa["question"], "answers": [a["text"] for a in qa["answers"]]})
    return records


@dataclass(frozen=True)
class Original:
    """Where a task's originals live and how they become records."""
    folder: str                        # under data/mezo-large/, and the original's folder name
    train: str                         # original training split, relative to the originals' root
    valid: str                         # original validation split
    read: Callable[[str], list[dict]]
    num_dev: int = NUM_DEV


ORIGINALS: dict[str, Original] = {
    # SST-2's originals ship in this repository: data/SST-2/glue/ (see SOURCES.md).
    "sst2": Original("SST-2", "SST-2/glue/train_full.tsv", "SST-2/glue/dev.tsv", read_glue_sst2),
    "rte": Original("RTE", "RTE/train.jsonl", "RTE/val.jsonl", _keep(("premise", "hypothesis"))),
    "cb": Original("CB", "CB/train.jsonl", "CB/val.jsonl", _keep(("premise", "hypothesis")), num_dev=100),
    "copa": Original("COPA", "COPA/train.jsonl", "COPA/val.jsonl",
                     _keep(("premise", "choice1", "choice2", "question")), num_dev=100),
    "boolq": Original("BoolQ", "BoolQ/train.jsonl", "BoolQ/val.jsonl", read_boolq),
    "wic": Original("WiC", "WiC/train.jsonl", "WiC/val.jsonl", _keep(("word", "sentence1", "sentence2"))),
    "wsc": Original("WSC", "WSC/train.jsonl", "WSC/val.jsonl", read_wsc),
    "multirc": Original("MultiRC", "MultiRC/train.jsonl", "MultiRC/val.jsonl", read_multirc),
    "squad": Original("SQuAD", "SQuAD/train-v1.1.json", "SQuAD/dev-v1.1.json", read_squad),
}


def sample_task(name: str, root: Path | str, seed: int) -> dict[str, str]:
    """The text of train/dev/test.jsonl for task `name`, from the originals under `root`."""
    original = ORIGINALS[name]
    hint = f"give the folder that holds the {original.folder} originals (data/SOURCES.md lists them)"
    train = original.read(read_text(Path(root) / original.train, hint)[1])
    valid = original.read(read_text(Path(root) / original.valid, hint)[1])
    splits = mezo_splits(train, valid, seed, original.num_dev)
    return {split: "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows)
            for split, rows in splits.items()}


def sample_path(data_dir: Path | str, name: str, seed: int, split: str) -> Path:
    return Path(data_dir) / "mezo-large" / ORIGINALS[name].folder / str(seed) / f"{split}.jsonl.xz"


def write_xz(path: Path, text: str) -> None:
    # Fixed preset and check, so the same text gives the same bytes with the same liblzma;
    # SOURCES.md records the sha256 of the text itself, which does not depend on the compressor.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME, check=lzma.CHECK_CRC64))
