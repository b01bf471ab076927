"""The dev-fitted threshold: zero-shot 'calibrated on dev' beside the raw argmax."""

import pytest
import torch

from zotune.errors import UserError
from zotune.evaluate import accuracy, dev_threshold_accuracy, fit_threshold
from zotune.tasks.data import Example


def examples(labels):
    return [Example(("s",), label) for label in labels]


def test_threshold_undoes_a_label_word_bias():
    # Every example prefers label 1 by 2.0, but the difference still orders them: a shift fixes it.
    gold = [0, 0, 1, 1, 0, 1]
    margin = torch.tensor([0.5, 1.0, 2.5, 3.0, 1.5, 2.0])           # logit1 - logit0
    logits = torch.stack([torch.zeros(6), margin], 1)                # [N, 2]
    assert accuracy(logits, examples(gold)) == 0.5
    assert dev_threshold_accuracy(logits, examples(gold), logits, examples(gold)) == 1.0
    test = torch.stack([torch.zeros(2), torch.tensor([1.2, 2.2])], 1)
    assert dev_threshold_accuracy(logits, examples(gold), test, examples([0, 1])) == 1.0


def test_fit_threshold_takes_the_first_best_midpoint():
    assert fit_threshold(torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([0, 0, 1, 1])) == 1.5
    assert fit_threshold(torch.tensor([5.0, 6.0]), torch.tensor([1, 1])) == 4.0   # below the lowest: all label 1


def test_threshold_needs_two_classes():
    with pytest.raises(UserError, match="two-class"):
        dev_threshold_accuracy(torch.zeros(3, 3), examples([0, 1, 2]), torch.zeros(3, 3), examples([0, 1, 2]))
