"""Build the unlabeled pretraining corpus for zotune's small RoBERTa MLM (issue 3).

Only training-split text of the shipped tasks goes in, and no labels:

  SST-2   glue/train_full.tsv             sentences (GLUE train: phrases of the SST train trees)
  SST     trees/train.txt                 leaf words of each PTB tree, PTB escapes undone
  sst-5   original/sst_train.txt          text after the __label__N column
  TREC    original/TREC.train             questions after the COARSE:fine label
  MNLI, SNLI, RTE  k-shot-1k-test/*/train.tsv   premise and hypothesis, every k and seed

Then every line whose match key equals the key of a dev or test sentence of ANY task is
removed. SST-2 train phrases can equal SST-2 dev sentences, and the k-shot dev files are
drawn from the same train pools as other seeds' train files, so this step is needed, not
decorative. The match key (`match_key`) lowercases, undoes PTB escapes and keeps only
[a-z0-9]: stricter than "same after case/whitespace", so tokenisation differences such as
"wo n't" / "won't" or "\\/" / "/" cannot hide a duplicate.

    python tools/corpus.py --out corpus.txt     # writes one line per sentence, prints counts
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"

# PTB escapes in the SST trees (sst_train.txt and GLUE SST-2 already use plain brackets).
PTB_ESCAPES = {
    "-LRB-": "(", "-RRB-": ")", "-LSB-": "[", "-RSB-": "]", "-LCB-": "{", "-RCB-": "}",
    "\\/": "/", "\\*": "*",
}
NLI_TASKS = ("MNLI", "SNLI", "RTE")
_LEAF = re.compile(r"\((?:\d+) ([^()\s]+)\)")  # "(2 word)": a leaf of an SST PTB tree
_SPACES = re.compile(r"\s+")
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")


def undo_ptb(text: str) -> str:
    for escaped, plain in PTB_ESCAPES.items():
        text = text.replace(escaped, plain)
    return text


def clean(text: str) -> str:
    """One corpus line: PTB escapes undone, whitespace collapsed."""
    return _SPACES.sub(" ", undo_ptb(text)).strip()


def match_key(text: str) -> str:
    """Key for decontamination: lowercase, no PTB escapes, only ASCII letters and digits."""
    return _NOT_ALNUM.sub("", undo_ptb(text).lower())


def _lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def _tsv_columns(path: Path, columns: tuple[str, ...]) -> list[str]:
    """Values of the named columns of a GLUE-style TSV (split on tabs: the text has quotes)."""
    header, *rows = _lines(path)
    names = header.split("\t")
    idx = [names.index(c) for c in columns]
    out = []
    for row in rows:
        cells = row.split("\t")
        out.extend(cells[i] for i in idx if i < len(cells))
    return out


def _csv_text(path: Path) -> list[str]:
    """Text column of an LM-BFF k-shot CSV (label,text; no header)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [row[1] for row in csv.reader(io.StringIO(f.read())) if len(row) >= 2]


def _kshot_files(task: str, pattern: str) -> list[Path]:
    """Matching files under every k-shot seed folder; symlinked copies of one test file kept once."""
    files = sorted((DATA / task / "k-shot-1k-test").glob(f"*/{pattern}"))
    seen, out = set(), []
    for f in files:
        real = f.resolve()
        if real not in seen:
            seen.add(real)
            out.append(f)
    return out


def tree_sentences(path: Path) -> list[str]:
    """Sentences of an SST PTB-tree file: its leaf words in order, escapes undone."""
    return [" ".join(_LEAF.findall(line)) for line in _lines(path) if line.strip()]


# ---------------------------------------------------------------- training text (the corpus)

def training_sources() -> dict[str, list[str]]:
    """Source name -> raw training-split sentences (not yet cleaned, deduplicated or filtered)."""
    nli = {}
    for task in NLI_TASKS:
        nli[f"{task} k-shot train"] = [
            s for f in _kshot_files(task, "train.tsv.gz") for s in _tsv_columns(f, ("sentence1", "sentence2"))
        ]
    return {
        "SST-2 glue/train_full": _tsv_columns(DATA / "SST-2/glue/train_full.tsv.gz", ("sentence",)),
        "SST trees/train": tree_sentences(DATA / "SST/trees/train.txt.gz"),
        "sst-5 original/sst_train": [l.split("\t", 1)[1] for l in _lines(DATA / "sst-5/original/sst_train.txt.gz")],
        "TREC original/TREC.train": [l.split(" ", 1)[1] for l in _lines(DATA / "trec/original/TREC.train.gz")],
        **nli,
    }


# ---------------------------------------------------------------- held-out text (never in the corpus)

def heldout_sources() -> dict[str, list[str]]:
    """Task -> every dev or test sentence it has (k-shot dev/test files and original dev/test)."""
    sst2 = _tsv_columns(DATA / "SST-2/glue/dev.tsv.gz", ("sentence",))
    sst2 += _tsv_columns(DATA / "SST-2/glue/test.tsv.gz", ("sentence",))  # GLUE's unlabelled test
    for f in _kshot_files("SST-2", "dev.tsv.gz") + _kshot_files("SST-2", "test.tsv.gz"):
        sst2 += _tsv_columns(f, ("sentence",))

    sst5 = [l.split("\t", 1)[1] for n in ("dev", "test") for l in _lines(DATA / f"sst-5/original/sst_{n}.txt.gz")]
    sst5 += [s for n in ("dev", "test") for s in tree_sentences(DATA / f"SST/trees/{n}.txt.gz")]
    for f in _kshot_files("sst-5", "dev.csv.gz") + _kshot_files("sst-5", "test.csv.gz"):
        sst5 += _csv_text(f)

    trec = [l.split(" ", 1)[1] for l in _lines(DATA / "trec/original/TREC.test.gz")]
    for f in _kshot_files("trec", "dev.csv.gz") + _kshot_files("trec", "test.csv.gz"):
        trec += _csv_text(f)

    out = {"SST-2": sst2, "sst-5": sst5, "TREC": trec}
    for task in NLI_TASKS:
        files = [f for p in ("dev*.tsv.gz", "test*.tsv.gz") for f in _kshot_files(task, p)]
        out[task] = [s for f in files for s in _tsv_columns(f, ("sentence1", "sentence2"))]
    return out


# ---------------------------------------------------------------- build

@dataclass
class CorpusStats:
    raw: dict[str, int] = field(default_factory=dict)       # source -> sentences read
    kept: dict[str, int] = field(default_factory=dict)      # source -> new lines it contributed
    duplicates: int = 0                                      # exact repeats dropped (after clean)
    removed: dict[str, int] = field(default_factory=dict)   # task -> lines removed as its dev/test text
    lines: int = 0

    def table(self) -> str:
        rows = [f"{'source':32s} {'read':>7s} {'kept':>7s}"]
        rows += [f"{s:32s} {self.raw[s]:7d} {self.kept.get(s, 0):7d}" for s in self.raw]
        rows.append(f"exact duplicates dropped: {self.duplicates}")
        rows.append("removed as dev/test text: " + ", ".join(f"{t} {n}" for t, n in self.removed.items())
                    + f" (total {sum(self.removed.values())})")
        rows.append(f"corpus lines: {self.lines}")
        return "\n".join(rows)


def heldout_keys() -> dict[str, set[str]]:
    return {task: {match_key(s) for s in sents} - {""} for task, sents in heldout_sources().items()}


def build_corpus() -> tuple[list[str], CorpusStats]:
    """The corpus lines (cleaned, deduplicated, decontaminated, in source order) and their counts."""
    stats = CorpusStats()
    held = heldout_keys()
    seen: set[str] = set()
    lines: list[str] = []
    for source, sentences in training_sources().items():
        stats.raw[source] = len(sentences)
        for s in sentences:
            s = clean(s)
            if not s:
                continue
            if s in seen:
                stats.duplicates += 1
                continue
            seen.add(s)
            key = match_key(s)
            task = next((t for t, keys in held.items() if key in keys), None)
            if task is not None:
                stats.removed[task] = stats.removed.get(task, 0) + 1
                continue
            lines.append(s)
            stats.kept[source] = stats.kept.get(source, 0) + 1
    stats.removed = {t: stats.removed.get(t, 0) for t in held}
    stats.lines = len(lines)
    return lines, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the corpus here, one sentence per line")
    args = ap.parse_args()
    lines, stats = build_corpus()
    print(stats.table())
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
