"""The task table against the shipped data and the real tokenizer: each row encodes a real example."""

import pytest

from zotune.tasks.data import default_data_dir, load_split
from zotune.tasks.tasks import TASKS
from zotune.tasks.templates import PromptTemplate

BOS, EOS, MASK = 0, 2, 50264

# task -> the first 16-42 training example as the prompt reads it, decoded back to text.
# SST-2 sentences end with a space, which RoBERTa keeps as its own token (LM-BFF does the same);
# the NLI template drops the premise's last character and lower-cases the hypothesis' first.
FIRST_TRAIN = {
    "sst2": "<s>with outtakes in which most of the characters forget their lines and just utter ` uhhh , ' "
            "which is better than most of the writing in the movie  It was<mask>.</s>",
    "sst5": "<s>more of the same from taiwanese auteur tsai ming-liang , which is good news to anyone who 's "
            "fallen under the sweet , melancholy spell of this unique director 's previous films . It was<mask>.</s>",
    "trec": "<s><mask>: What city is served by Tempelhol Airport ?</s>",
    "mnli": "<s>That's all right?<mask>, that's fine.</s>",
}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_encodes_its_first_training_example(tokenizer, name):
    task = TASKS[name]
    template = PromptTemplate(tokenizer, task.template, task.label_words, task.max_length)
    example = load_split(task, default_data_dir(), 16, 42, "train")[0]
    ids = template.encode(example.sentences)
    assert ids[0] == BOS and ids[-1] == EOS and ids.count(MASK) == 1 and len(ids) <= task.max_length
    assert template.num_sentences == len(task.text_columns)
    assert len(template.label_word_ids) == len(task.label_words)
    if name in FIRST_TRAIN:
        assert tokenizer.decode(ids) == FIRST_TRAIN[name]


def test_label_word_ids(tokenizer):
    def ids(name):
        task = TASKS[name]
        return PromptTemplate(tokenizer, task.template, task.label_words, task.max_length).label_word_ids

    assert ids("sst2") == [6587, 372]                  # ' terrible', ' great'
    assert ids("sst5") == [6587, 1099, 8578, 205, 372]  # ' terrible', ' bad', ' okay', ' good', ' great'
    assert ids("mnli") == ids("snli") == [440, 3216, 5359]  # ' No', ' Yes', ' Maybe'
    assert ids("rte") == [440, 3216]


def test_sst2_exact_ids(tokenizer):
    task = TASKS["sst2"]
    template = PromptTemplate(tokenizer, task.template, task.label_words, task.max_length)
    # <s> a ' great' ' movie' ' It' ' was' <mask> . </s>
    assert template.encode(("a great movie",)) == [0, 102, 372, 1569, 85, 21, MASK, 4, 2]
