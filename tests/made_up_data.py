"""Made-up originals in the published formats of SuperGLUE (RTE, CB, COPA, WiC, WSC, MultiRC,
BoolQ) and SQuAD v1.1, sampled by the real sampler into a data folder: the MeZO samples the
tests read.

Only SST-2's sample ships (data/SOURCES.md); these files stand in for the others. Every
text is written here from a few word lists. The training splits are just large enough that
MeZO's protocol leaves training examples after its dev draw (CB and COPA draw 100 dev, the
others 500; mezo_sample.py), the validation splits small (the test split is all of them).
"""

import json
from dataclasses import dataclass
from pathlib import Path

from zotune.tasks.mezo_sample import SPLITS, sample_path, sample_task, write_xz

NAMES = ["Ann", "Bo", "Cy", "Dee", "Eli", "Flo", "Gus"]
THINGS = ["kettle", "lamp", "bicycle", "garden", "letter", "window", "drum", "boat", "oven", "scarf", "clock"]
STATES = ["broken", "new", "red", "quiet", "open", "heavy", "clean", "late", "warm"]
TASKS = ("rte", "cb", "copa", "wic", "wsc", "multirc", "boolq", "squad")
TRAIN, VALID = 520, 10       # 500 dev + 20 train; CB and COPA: 100 dev + 20 train
BOOLQ_VALID = 8


def _pick(words: list[str], i: int) -> str:
    return words[i % len(words)]


def rte(i: int) -> dict:
    name, thing = _pick(NAMES, i), _pick(THINGS, i // 2)
    return {"premise": f"{name} repaired the {thing} on day {i}.", "hypothesis": f"The {thing} works.",
            "label": ("entailment", "not_entailment")[i % 2], "idx": i}


def cb(i: int) -> dict:
    name, thing, state = _pick(NAMES, i), _pick(THINGS, i // 2), _pick(STATES, i // 3)
    return {"premise": f"{name} told us that the {thing} was {state}.", "hypothesis": f"the {thing} was {state}",
            "label": ("entailment", "contradiction", "neutral")[i % 3], "idx": i}


def copa(i: int) -> dict:
    thing = _pick(THINGS, i)
    choices = [f"Someone dropped the {thing}.", f"The {thing} was {_pick(STATES, i)}."]
    return {"premise": f"The {thing} made a noise.", "choice1": choices[i % 2], "choice2": choices[1 - i % 2],
            "question": ("cause", "effect")[i // 2 % 2], "label": i % 2, "idx": i}


def wic(i: int) -> dict:
    word = _pick(THINGS, i)
    return {"word": word, "sentence1": f"{_pick(NAMES, i)} saw a {word}.",
            "sentence2": f"The {word} near {_pick(NAMES, i + 1)} was {_pick(STATES, i)}.",
            "idx": i, "label": i % 2 == 0, "start1": 0, "start2": 0, "end1": 1, "end2": 1, "version": 1.1}


def wsc(i: int) -> dict:
    name, thing = _pick(NAMES, i), _pick(THINGS, i)
    text = f"{name} gave the {thing} to {_pick(NAMES, i + 2)} because he liked it."
    # every third span ends with a period and starts upper-case, as a few real ones do: wsc.fixed repairs it
    span1 = f"The {thing}." if i % 3 == 0 else name
    return {"text": text, "target": {"span1_text": span1, "span1_index": 2 if i % 3 == 0 else 0,
                                     "span2_text": "he", "span2_index": 7}, "idx": i, "label": i % 2 == 1}


def multirc(p: int, questions: int, answers: int) -> dict:
    thing = _pick(THINGS, p)
    return {"idx": p, "version": 1.1, "passage": {
        "text": f"{_pick(NAMES, p)} kept the {thing} at home. It was {_pick(STATES, p)}.",
        "questions": [{"question": f"Where was the {thing} kept ({q})?", "idx": q, "answers": [
            {"text": f"at place {a}", "idx": a, "label": (p + q + a) % 2} for a in range(answers)]}
            for q in range(questions)]}}


def boolq(i: int) -> dict:
    return {"question": f"is it {i}", "passage": f"Title {i} -- Passage {i}.", "idx": i, "label": i % 3 == 0}


def squad(articles: int, paragraphs: int, questions: int) -> dict:
    data = []
    for a in range(articles):
        rows = []
        for p in range(paragraphs):
            name, thing = _pick(NAMES, a + p), _pick(THINGS, a * paragraphs + p)
            context = f"{name} found a {thing} in {1900 + a * 7 + p}. The {thing} was {_pick(STATES, p)}."
            qas = [{"id": f"{a}-{p}-{q}", "question": f"Who found the {thing} ({q})? ",
                    "answers": [{"answer_start": 0, "text": name}] * (1 + q % 2)} for q in range(questions)]
            rows.append({"context": context, "qas": qas})
        data.append({"title": f"Article_{a}", "paragraphs": rows})
    return {"data": data, "version": "1.1"}


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_originals(root: Path) -> None:
    """Every task's train and validation file under `root`, in the layout mezo_sample.ORIGINALS reads."""
    files = {
        "RTE": (_jsonl([rte(i) for i in range(TRAIN)]), _jsonl([rte(i) for i in range(VALID)])),
        "CB": (_jsonl([cb(i) for i in range(120)]), _jsonl([cb(i) for i in range(VALID)])),
        "COPA": (_jsonl([copa(i) for i in range(120)]), _jsonl([copa(i + 1) for i in range(VALID)])),
        "WiC": (_jsonl([wic(i) for i in range(TRAIN)]), _jsonl([wic(i) for i in range(VALID)])),
        "WSC": (_jsonl([wsc(i) for i in range(TRAIN)]), _jsonl([wsc(i) for i in range(VALID)])),
        "MultiRC": (_jsonl([multirc(p, 3, 4) for p in range(44)]), _jsonl([multirc(p, 2, 4) for p in range(1)])),
        "BoolQ": (_jsonl([boolq(i) for i in range(TRAIN)]), _jsonl([boolq(i) for i in range(BOOLQ_VALID)])),
        "SQuAD": (json.dumps(squad(17, 3, 10)), json.dumps(squad(2, 2, 3))),
    }
    for folder, (train, valid) in files.items():
        names = ("train-v1.1.json", "dev-v1.1.json") if folder == "SQuAD" else ("train.jsonl", "val.jsonl")
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, text in zip(names, (train, valid)):
            (root / folder / name).write_text(text)


@dataclass(frozen=True)
class MadeUpData:
    originals: Path   # the made-up originals
    data: Path        # a data folder with their seed-0 samples, as `tools/sample_superglue.py --out` writes


def write_made_up_data(root: Path, seed: int = 0) -> MadeUpData:
    made_up = MadeUpData(root / "originals", root / "data")
    write_originals(made_up.originals)
    for name in TASKS:  # what tools/sample_superglue.py does per task
        texts = sample_task(name, made_up.originals, seed)
        for split in SPLITS:
            write_xz(sample_path(made_up.data, name, seed, split), texts[split])
    return made_up
