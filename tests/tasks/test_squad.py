"""SQuAD F1 / EM with the official normalisation, on hand-checked made-up cases."""

import pytest

from zotune.tasks.squad import exact_match, f1, normalize_answer, squad_scores


@pytest.mark.parametrize("text,normal", [
    ("The Red Foxes!", "red foxes"),
    ("  an  Apple, a day ", "apple day"),
    ("theatre", "theatre"),          # articles only as whole words
    ("Old-Mill's", "oldmills"),
])
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


@pytest.mark.parametrize("prediction,answers,em,f", [
    ("Red Foxes", ["Red Foxes", "The Foxes"], 1.0, 1.0),
    ("the Red Foxes.", ["Red Foxes"], 1.0, 1.0),
    ("Foxes", ["Red Foxes"], 0.0, 2 / 3),                         # P 1, R 1/2
    ("Red Foxes team", ["Red Foxes"], 0.0, 0.8),                  # P 2/3, R 1
    ("Blue Owls", ["Red Foxes", "Foxes"], 0.0, 0.0),
    ("Foxes", ["Red Foxes", "Foxes"], 1.0, 1.0),                  # the best gold answer counts
    ("a a b", ["a b b"], 0.0, 2 / 3),                             # articles dropped: 'b' against 'b b'
    ("the", ["an"], 1.0, 0.0),                                    # both empty: equal, but no token to share
    ("x y y", ["y y z"], 0.0, 2 / 3),                             # counts are clipped: 2 shared of 3 and 3
    ("nothing", ["CANNOTANSWER"], 0.0, 0.0),
    ("CANNOTANSWER", ["CANNOTANSWER"], 1.0, 1.0),
])
def test_exact_match_and_f1(prediction, answers, em, f):
    assert exact_match(prediction, answers) == em
    assert f1(prediction, answers) == pytest.approx(f)


def test_squad_scores_are_means():
    scores = squad_scores(["Red Foxes", "Foxes"], [["Red Foxes"], ["Red Foxes"]])
    assert scores == pytest.approx({"f1": (1 + 2 / 3) / 2, "em": 0.5})
