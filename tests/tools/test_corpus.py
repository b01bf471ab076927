"""The pretraining corpus holds no dev/test sentence and no label (issue 3)."""

import random
import re
from pathlib import Path

import pytest

import corpus


@pytest.fixture(scope="module")
def built():
    return corpus.build_corpus()


def plain(text: str) -> str:
    """The brief's normalisation, written independently of corpus.match_key: case and whitespace."""
    return re.sub(r"\s+", " ", corpus.undo_ptb(text).lower()).strip()


@pytest.mark.parametrize("task", ["SST-2", "sst-5"])
def test_no_sst_dev_or_test_sentence_in_corpus(built, task):
    lines, _ = built
    heldout = corpus.heldout_sources()[task]
    assert len(heldout) > 3000  # the files were found: glue/dev alone has 872 sentences
    in_corpus = {plain(l) for l in lines}
    leaked = [s for s in heldout if plain(s) in in_corpus]
    assert leaked == []
    # The stricter key the builder filters on (punctuation and spacing ignored) finds none either.
    keys = {corpus.match_key(l) for l in lines}
    assert [s for s in heldout if corpus.match_key(s) in keys] == []


def test_no_dev_or_test_sentence_of_any_task(built):
    lines, stats = built
    keys = {corpus.match_key(l) for l in lines}
    for task, held in corpus.heldout_keys().items():
        assert not (held & keys), task
        assert stats.removed[task] > 0  # the overlap is real, so the filter must have fired


def test_sst2_glue_dev_is_among_heldout_and_overlapped_train():
    sst2 = {corpus.match_key(s) for s in corpus.heldout_sources()["SST-2"]}
    dev, _ = zip(*[r.split("\t") for r in corpus._lines(corpus.DATA / "SST-2/glue/dev.tsv.gz")[1:]])
    assert {corpus.match_key(s) for s in dev} <= sst2
    train = {corpus.match_key(s) for s in corpus.training_sources()["SST-2 glue/train_full"]}
    assert train & {corpus.match_key(s) for s in dev}  # why the removal step exists


def test_no_labels_or_tree_markup(built):
    lines, _ = built
    assert not any(l.startswith("__label__") for l in lines)
    assert not any(re.match(r"^(ABBR|DESC|ENTY|HUM|LOC|NUM):\S+ ", l) for l in lines)
    # Tree markup starts a line with "(3 " or nests "(2 (2 "; natural text has "(5 miles)" but not these.
    assert not any(re.match(r"\(\d ", l) or re.search(r"\(\d \(\d ", l) or "-LRB-" in l or "\\/" in l for l in lines)
    nli_labels = {"entailment", "not_entailment", "neutral", "contradiction"}
    for source, sentences in corpus.training_sources().items():
        if "k-shot" in source:  # premise and hypothesis only (SST-2 does have a phrase "contradiction")
            assert not nli_labels & set(sentences), source
    assert len(lines) == len(set(lines))


def test_tree_leaves_and_ptb_escapes():
    line = "(3 (2 (2 -LRB-) (2 Singer\\/composer)) (3 (2 is) (3 great)))"
    assert corpus._LEAF.findall(line) == ["-LRB-", "Singer\\/composer", "is", "great"]
    assert corpus.clean(" ".join(corpus._LEAF.findall(line))) == "( Singer/composer is great"
    assert corpus.match_key("It 's  GREAT -LRB- really -RRB- .") == corpus.match_key("it's great (really).")


# ---------------------------------------------------------------- IMDB reviews (issue 19)

IMDB = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "imdb_reviews.txt.xz"


def test_reviews_containing_finds_planted_keys_only():
    keys = ["xxabcdefghijklmnopqrzz", "nothinghereatall", "qq0123456789abcdefxy", "0123456789abcde"]
    held = {"abcdefghijklmnopq", "0123456789abcdef", "short", "zzzzzzzzzzzzzzzzzzzz"}
    assert corpus.reviews_containing(keys, held) == {0: "abcdefghijklmnopq", 2: "0123456789abcdef"}


def test_review_that_holds_a_test_sentence_is_dropped():
    sentence = corpus._tsv_columns(corpus.DATA / "SST-2/glue/dev.tsv.gz", ("sentence",))[0]
    stats = corpus.CorpusStats()
    reviews = ["A fine film.", f"Well. {sentence.upper()} That is all.", "Bad film, really bad."]
    assert corpus.drop_reviews_with_heldout(reviews, stats) == [reviews[0], reviews[2]]
    assert stats.reviews_removed["SST-2"] == 1 and stats.kept["IMDB reviews"] == 2
    assert stats.reviews_removed["sst-5"] == 1  # an SST-2 test sentence is an SST test sentence too


@pytest.mark.skipif(not IMDB.exists(), reason="no ../shared/corpus (the corpus is not in the repository)")
def test_no_kept_review_contains_a_heldout_sentence():
    """The hashed search against plain str.find over every kept review, for a sample of held-out
    sentences of every task (all of them would take minutes), plus the ones it removed."""
    stats = corpus.CorpusStats()
    kept = corpus.drop_reviews_with_heldout(corpus.read_reviews(IMDB), stats)
    assert stats.raw["IMDB reviews"] == 100_000 and len(kept) == stats.kept["IMDB reviews"] == 96_111
    text = "|".join(corpus.match_key(r) for r in kept)
    rng = random.Random(0)
    for task, keys in corpus.heldout_keys().items():
        long_keys = sorted(k for k in keys if len(k) >= corpus.MIN_CONTAINED_CHARS)
        for key in rng.sample(long_keys, min(100, len(long_keys))):
            assert text.find(key) < 0, (task, key)
    assert sum(stats.reviews_removed.values()) >= 100_000 - 96_111 and stats.reviews_removed["SST-2"] > 0
