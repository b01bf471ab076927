"""SQuAD answer scoring: exact match and token F1 against every gold answer, the best one counting.

The normalisation is the official SQuAD v1.1 script's, which MeZO's `large_models/metrics.py`
uses: lower-case, drop ASCII punctuation, drop the articles a / an / the, collapse whitespace.
As there, a gold answer "CANNOTANSWER" or "no answer" (QuAC / SQuAD 2.0 style) is scored by
exact match only. The reference scores the decoded continuation, stripped, with generation
stopped at a newline (`run.py`: eos_token "\\n", max_new_tokens 50); decoding is the engine's.
"""

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NO_ANSWER = ("CANNOTANSWER", "no answer")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def _f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: Sequence[str]) -> float:
    """Token F1 of the prediction against the best-matching gold answer."""
    if answers[0] in _NO_ANSWER:
        return float(normalize_answer(answers[0]) == normalize_answer(prediction))
    return max(_f1(prediction, a) for a in answers)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean F1 and EM over examples, as fractions (0..1)."""
    n = len(predictions)
    return {"f1": sum(map(f1, predictions, answers)) / n, "em": sum(map(exact_match, predictions, answers)) / n}
