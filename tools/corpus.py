"""Build the unlabeled pretraining corpus for zotune's small RoBERTa MLM (issues 3 and 19).

Two kinds of text go in, and no labels. First, the training-split text of the shipped tasks:

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

Second, real English at scale: the 100,000 IMDB reviews of the Large Movie Review Dataset
(Maas et al., ACL 2011; see ../shared/corpus/SOURCES.md for the copy and its processing),
one review per line, read from the path given. A review is dropped if its match key CONTAINS
the key of any dev or test sentence of any task (`drop_reviews_with_heldout`), not only if it
equals one. Held-out keys under MIN_CONTAINED_CHARS characters are matched whole-line only:
keys such as "good" or "abadday" occur inside countless unrelated reviews.

    python tools/corpus.py --out corpus.txt                                # task sentences only
    python tools/corpus.py --imdb ../shared/corpus/imdb_reviews.txt.xz     # also count the reviews
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import lzma
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # zotune, installed or not
from zotune.tasks.data import kshot_root  # noqa: E402
from zotune.tasks.tasks import TASKS  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"

# PTB escapes in the SST trees (sst_train.txt and GLUE SST-2 already use plain brackets).
PTB_ESCAPES = {
    "-LRB-": "(", "-RRB-": ")", "-LSB-": "[", "-RSB-": "]", "-LCB-": "{", "-RCB-": "}",
    "\\/": "/", "\\*": "*",
}
NLI_TASKS = ("mnli", "snli", "rte")  # zotune.tasks names; sources are named by their data folders
_LEAF = re.compile(r"\((?:\d+) ([^()\s]+)\)")  # "(2 word)": a leaf of an SST PTB tree
_SPACES = re.compile(r"\s+")
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
MIN_CONTAINED_CHARS = 16  # held-out keys at least this long are searched for inside reviews


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
    """Matching files under every k-shot seed folder of a task (zotune.tasks name); symlinked
    copies of one test file kept once."""
    files = sorted(kshot_root(TASKS[task], DATA).glob(f"*/{pattern}"))
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
        nli[f"{TASKS[task].data_dir} k-shot train"] = [
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
    for f in _kshot_files("sst2", "dev.tsv.gz") + _kshot_files("sst2", "test.tsv.gz"):
        sst2 += _tsv_columns(f, ("sentence",))

    sst5 = [l.split("\t", 1)[1] for n in ("dev", "test") for l in _lines(DATA / f"sst-5/original/sst_{n}.txt.gz")]
    sst5 += [s for n in ("dev", "test") for s in tree_sentences(DATA / f"SST/trees/{n}.txt.gz")]
    for f in _kshot_files("sst5", "dev.csv.gz") + _kshot_files("sst5", "test.csv.gz"):
        sst5 += _csv_text(f)

    trec = [l.split(" ", 1)[1] for l in _lines(DATA / "trec/original/TREC.test.gz")]
    for f in _kshot_files("trec", "dev.csv.gz") + _kshot_files("trec", "test.csv.gz"):
        trec += _csv_text(f)

    out = {"SST-2": sst2, "sst-5": sst5, "TREC": trec}
    for task in NLI_TASKS:
        files = [f for p in ("dev*.tsv.gz", "test*.tsv.gz") for f in _kshot_files(task, p)]
        out[TASKS[task].data_dir] = [s for f in files for s in _tsv_columns(f, ("sentence1", "sentence2"))]
    return out


# ---------------------------------------------------------------- build

@dataclass
class CorpusStats:
    raw: dict[str, int] = field(default_factory=dict)       # source -> sentences read
    kept: dict[str, int] = field(default_factory=dict)      # source -> new lines it contributed
    duplicates: int = 0                                      # exact repeats dropped (after clean)
    removed: dict[str, int] = field(default_factory=dict)   # task -> lines removed as its dev/test text
    lines: int = 0
    reviews_removed: dict[str, int] = field(default_factory=dict)  # task -> IMDB reviews holding its text

    def table(self) -> str:
        rows = [f"{'source':32s} {'read':>7s} {'kept':>7s}"]
        rows += [f"{s:32s} {self.raw[s]:7d} {self.kept.get(s, 0):7d}" for s in self.raw]
        rows.append(f"exact duplicates dropped: {self.duplicates}")
        rows.append("removed as dev/test text: " + ", ".join(f"{t} {n}" for t, n in self.removed.items())
                    + f" (total {sum(self.removed.values())})")
        rows.append(f"corpus lines: {self.lines}")
        if self.reviews_removed:
            rows.append("IMDB reviews removed for containing dev/test text, by task: " + ", ".join(
                f"{t} {n}" for t, n in self.reviews_removed.items())
                + f" ({self.raw['IMDB reviews'] - self.kept['IMDB reviews']} reviews)")
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


# ---------------------------------------------------------------- IMDB reviews

def read_reviews(path: Path) -> list[str]:
    """One review per line of the (optionally xz-compressed) corpus file."""
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.strip()]


def _window_hashes(text: np.ndarray, width: int) -> np.ndarray:
    """A polynomial hash (mod 2**64) of every `width`-byte window of text: [len(text) - width + 1]."""
    n = len(text) - width + 1
    h = np.zeros(max(n, 0), dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrapping is the modulus
        for j in range(width):
            h = h * np.uint64(1099511628211) + text[j:j + n]
    return h


def reviews_containing(review_keys: list[str], held: set[str], width: int = MIN_CONTAINED_CHARS) -> dict[int, str]:
    """Index of each review whose key contains a held-out key of >= width characters -> that key.

    Every window of the joined review keys is hashed once; windows whose hash equals that of a
    held-out key's first `width` characters are candidates, checked by comparing the bytes, so a
    hash collision can only cost time, never a wrong answer.
    """
    joined = "|".join(review_keys).encode("ascii")  # keys hold [a-z0-9] only: '|' never matches
    starts = np.cumsum([0] + [len(k) + 1 for k in review_keys[:-1]])
    long_keys = [k for k in held if len(k) >= width]
    anchors: dict[int, list[str]] = {}
    anchor_hashes = _window_hashes(np.frombuffer("|".join(k[:width] for k in long_keys).encode("ascii"),
                                                 dtype=np.uint8).astype(np.uint64), width)
    for key, h in zip(long_keys, anchor_hashes[::width + 1]):
        anchors.setdefault(int(h), []).append(key)
    table = np.array(sorted(anchors), dtype=np.uint64)
    hashes = _window_hashes(np.frombuffer(joined, dtype=np.uint8).astype(np.uint64), width)
    slot = np.minimum(np.searchsorted(table, hashes), len(table) - 1)
    found: dict[int, str] = {}
    for pos in np.nonzero(table[slot] == hashes)[0]:
        for key in anchors[int(hashes[pos])]:
            if joined.startswith(key.encode("ascii"), pos):
                found.setdefault(int(np.searchsorted(starts, pos, side="right") - 1), key)
    return found


def drop_reviews_with_heldout(reviews: list[str], stats: CorpusStats) -> list[str]:
    """The reviews that contain no dev or test sentence of any task (counts go to stats)."""
    keys = [match_key(r) for r in reviews]
    held = heldout_keys()
    everything = set().union(*held.values())
    hits = reviews_containing(keys, everything)
    for i, k in enumerate(keys):  # short held-out keys: only a review that IS the sentence
        if i not in hits and k in everything:
            hits[i] = k
    stats.raw["IMDB reviews"] = len(reviews)
    stats.kept["IMDB reviews"] = len(reviews) - len(hits)
    # A review counts for every task that has the sentence it holds (SST-2's test sentences
    # are SST's too), so these add up to more than the reviews dropped.
    stats.reviews_removed = {t: sum(key in ks for key in hits.values()) for t, ks in held.items()}
    return [r for i, r in enumerate(reviews) if i not in hits]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the corpus here, one sentence per line")
    ap.add_argument("--imdb", type=Path, help="also read and decontaminate the IMDB reviews (not written)")
    args = ap.parse_args()
    lines, stats = build_corpus()
    if args.imdb:
        drop_reviews_with_heldout(read_reviews(args.imdb), stats)
    print(stats.table())
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
