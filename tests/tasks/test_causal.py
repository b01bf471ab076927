"""Causal-LM candidate prompts: rendering per task, boundary-exact tokenisation, loading, errors."""

import lzma

import pytest

from zotune.errors import UserError
from zotune.tasks import causal
from zotune.tasks.causal import (CAUSAL_TASKS, CandidateExample, encode_candidates, load_examples, prompt_texts,
                                 read_records, render)
from zotune.tasks.data import default_data_dir, load_split
from zotune.tasks.mezo_sample import ORIGINALS
from zotune.tasks.tasks import TASKS

OPT_BOS = 2  # OPT's tokenizer prepends </s>; RoBERTa's vocabulary has it at the same id

# (task, record, prompt, continuations in label order): one row per task, the reference's
# templates (MeZO large_models/templates.py) for sst2, rte, cb, boolq, copa, wic, wsc, multirc, squad.
RENDER = [
    ("sst2", {"sentence": " a great movie "}, "a great movie It was", [" terrible", " great"]),
    ("sst5", {"sentence": "fine ."}, "fine . It was", [" terrible", " bad", " okay", " good", " great"]),
    ("trec", {"sentence": "Who won ?"}, "Who won ?\nWhat kind of answer does this question ask for? Description, "
     "Entity, Expression, Human, Location or Number?\n",
     ["Description", "Entity", "Expression", "Human", "Location", "Number"]),
    ("mnli", {"premise": "A dog runs.", "hypothesis": "An animal moves."},
     'Suppose A dog runs. Can we infer that "An animal moves."? Yes, No, or Maybe?\n', ["No", "Yes", "Maybe"]),
    ("snli", {"premise": "A.", "hypothesis": "B."}, 'Suppose A. Can we infer that "B."? Yes, No, or Maybe?\n',
     ["No", "Yes", "Maybe"]),
    ("rte", {"premise": "It rained.", "hypothesis": "It was wet."},
     'It rained.\nDoes this mean that "It was wet." is true? Yes or No?\n', ["No", "Yes"]),
    ("cb", {"premise": "P.", "hypothesis": "h"}, 'Suppose P. Can we infer that "h"? Yes, No, or Maybe?\n',
     ["Yes", "No", "Maybe"]),
    ("boolq", {"passage": "Water is wet.", "question": "is water wet"}, "Water is wet. Is water wet?\n",
     ["Yes", "No"]),
    ("copa", {"premise": "The lamp went dark. ", "question": "cause",
              "choice1": "The bulb burned out.", "choice2": "I opened a window."},
     "The lamp went dark because", [" the bulb burned out.", " I opened a window."]),
    ("copa", {"premise": "The man fell", "question": "effect", "choice1": "He cried.", "choice2": "It hurt."},
     "The man fell so", [" he cried.", " it hurt."]),
    ("wic", {"word": "run", "sentence1": "Run fast.", "sentence2": "A run."},
     'Does the word "run" have the same meaning in these two sentences? Yes, No?\nRun fast.\nA run.\n', ["No", "Yes"]),
    ("wsc", {"text": "Tom lied to Sam. He was sorry.", "span1_text": "Tom", "span2_text": "He"},
     'Tom lied to Sam. He was sorry.\nIn the previous sentence, does the pronoun "he" refer to Tom? Yes or No?\n',
     ["No", "Yes"]),
    ("multirc", {"paragraph": "Sent.", "question": "Q?", "answer": "A"},
     'Sent.\nQuestion: Q?\nI found this answer "A". Is that correct? Yes or No?\n', ["No", "Yes"]),
    ("squad", {"title": "Old_Mill", "context": "C.", "question": " Who? ", "answers": ["Ann Ray", "x"]},
     "Title: Old_Mill\nContext: C.\nQuestion: Who?\nAnswer:", [" Ann Ray\n"]),
]


def test_every_task_has_a_render_case():
    assert {row[0] for row in RENDER} == set(CAUSAL_TASKS)


@pytest.mark.parametrize("name,record,prompt,continuations", RENDER)
def test_render(name, record, prompt, continuations):
    assert prompt_texts(CAUSAL_TASKS[name], record) == (prompt, continuations)


def test_task_flags():
    # The reference length-normalises every task's score; COPA and SQuAD train on the gold continuation.
    assert all(t.length_normalised for t in CAUSAL_TASKS.values())
    assert {n for n, t in CAUSAL_TASKS.items() if t.objective == "gold"} == {"copa", "squad"}
    assert {n for n, t in CAUSAL_TASKS.items() if t.generation} == {"squad"}
    for t in CAUSAL_TASKS.values():
        assert t.objective in ("candidates", "gold")
        if t.kshot:  # class order = the encoder row's, so load_split's labels index the candidates
            assert list(t.candidates) == list(TASKS[t.kshot].label_words)
            assert len(t.fields) == len(TASKS[t.kshot].text_columns)


def test_every_filter_in_the_table_exists():
    for t in CAUSAL_TASKS.values():
        for template in (t.prompt, *t.candidates.values()):
            for m in causal._SLOT.finditer(template):
                assert all(f in causal.FILTERS for f in m.group(2).split("|") if f), template


MADE_UP = "made-up"  # a MeZO sample drawn from the made_up_data fixture's originals


def sources():
    """(task, kwargs) for every data source: LM-BFF k-shot folders, the shipped MeZO sample
    (SST-2) and the made-up ones of the tasks whose samples are not shipped."""
    out = [(n, {"k": 16, "seed": 42}) for n, t in CAUSAL_TASKS.items() if t.kshot]
    return out + [("sst2", {})] + [
        (n, {"data_dir": MADE_UP}) for n in ("rte", "cb", "copa", "wic", "wsc", "multirc", "boolq")]


@pytest.mark.parametrize("name,kwargs", sources(), ids=lambda v: str(v))
def test_boundary_exact_on_first_examples(tokenizer, made_up_data, name, kwargs):
    task = CAUSAL_TASKS[name]
    kwargs = {**kwargs, "data_dir": made_up_data.data} if kwargs.get("data_dir") == MADE_UP else kwargs
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    for split in ("train", "dev", "test"):
        for record in read_records(task, split, **kwargs)[:4]:
            prompt, continuations = prompt_texts(task, record)
            example = causal.to_example(task, record, tokenizer, bos=OPT_BOS)
            assert example.prompt_ids[0] == OPT_BOS and list(example.prompt_ids[1:]) == enc(prompt)
            assert len(example.candidate_ids) == len(task.candidates)
            for text, ids in zip(continuations, example.candidate_ids):
                assert len(ids) > 0 and list(example.prompt_ids[1:] + ids) == enc(prompt + text)
            assert example.label == list(task.candidates).index(record["label"])


def test_load_examples_sizes_and_labels(tokenizer, made_up_data):
    from tests.made_up_data import VALID
    copa = load_examples("copa", "test", tokenizer, bos=None, data_dir=made_up_data.data)
    assert len(copa) == VALID and {e.label for e in copa} == {0, 1}  # the whole validation file
    assert all(isinstance(e, CandidateExample) and len(e.candidate_ids) == 2 for e in copa)
    rte = load_examples("rte", "test", tokenizer, bos=None, k=16, seed=42)  # the LM-BFF folder's labels
    assert [e.label for e in rte] == [e.label for e in load_split(TASKS["rte"], default_data_dir(), 16, 42, "test")]


def test_bos_is_a_parameter(tokenizer):
    record = {"sentence": "a great movie"}
    ids = {bos: causal.to_example(CAUSAL_TASKS["sst2"], {**record, "label": "1"}, tokenizer, bos)
           for bos in (None, 0, 2)}
    assert ids[None].prompt_ids == (102, 372, 1569, 85, 21)  # a ' great' ' movie' ' It' ' was'
    assert ids[0].prompt_ids == (0, *ids[None].prompt_ids) and ids[2].prompt_ids == (2, *ids[None].prompt_ids)
    assert ids[2].candidate_ids == ((6587,), (372,)) and ids[2].label == 1  # ' terrible', ' great'


def test_squad_example_carries_its_answers(tokenizer):
    record = {"title": "T", "context": "C.", "question": "Who?", "answers": ["Ann Lee", "Lee"]}
    example = causal.to_example(CAUSAL_TASKS["squad"], record, tokenizer, bos=OPT_BOS)
    assert example.label == 0 and example.answers == ("Ann Lee", "Lee")
    assert tokenizer.decode(example.candidate_ids[0]) == " Ann Lee\n"


def test_max_length_cuts_the_prompt_from_the_left(tokenizer):
    prompt, continuations = "one two three four five six seven", [" eight nine", " ten"]
    full_prompt, candidates = encode_candidates(tokenizer, prompt, continuations, bos=OPT_BOS)
    cut_prompt, cut_candidates = encode_candidates(tokenizer, prompt, continuations, bos=OPT_BOS, max_length=6)
    assert cut_candidates == candidates and len(cut_prompt) + 2 == 6
    assert cut_prompt == (OPT_BOS, *full_prompt[-3:])
    with pytest.raises(UserError, match="leaves no room"):
        encode_candidates(tokenizer, prompt, continuations, bos=OPT_BOS, max_length=3)


@pytest.mark.parametrize("prompt,continuation", [
    ("Is it?\n\n", "Yes"),     # two newlines: alone one 'ĊĊ' token, before a word two 'Ċ'
    ("It was ", "great"),      # a trailing space belongs to the next word in the whole string
])
def test_boundary_that_merges_is_an_error(tokenizer, prompt, continuation):
    with pytest.raises(UserError, match="does not tokenise as the prompt's tokens then the continuation's"):
        encode_candidates(tokenizer, prompt, [continuation], bos=None)


def test_bad_sample_files(tmp_path, tokenizer):
    path = tmp_path / "mezo-large" / "CB" / "0" / "test.jsonl.xz"
    path.parent.mkdir(parents=True)
    for content, message in [(b"not xz", "cannot read"),
                             (lzma.compress(b'{"premise": "a"}\n{oops\n'), ":2: not a JSON"),
                             (lzma.compress(b"[1, 2]\n"), ":1: a record must be a JSON object"),
                             (lzma.compress(b'{"premise": "a"}\n'), "no field 'hypothesis'")]:
        path.write_bytes(content)
        with pytest.raises(UserError, match=message):
            load_examples("cb", "test", tokenizer, bos=None, data_dir=tmp_path)


def test_errors(tokenizer):
    with pytest.raises(UserError, match="unknown task 'sst3'"):
        load_examples("sst3", "train", tokenizer, bos=None)
    with pytest.raises(UserError, match="cb has no k-shot folders"):
        load_examples("cb", "train", tokenizer, bos=None, k=16)
    with pytest.raises(UserError, match="no MeZO sample of boolq for seed 0") as refused:
        load_examples("boolq", "train", tokenizer, bos=None)
    # the default data folder lacks every sample but SST-2's: the line says where they come from
    message = str(refused.value)
    assert "\n" not in message and "not shipped" in message and "data/SOURCES.md" in message
    assert "tools/sample_superglue.py --originals DIR --seed 0" in message
    with pytest.raises(UserError, match="no MeZO sample of copa for seed 0.*not shipped"):
        load_examples("copa", "train", tokenizer, bos=None)
    with pytest.raises(UserError, match="trec has no MeZO sample"):
        load_examples("trec", "train", tokenizer, bos=None)
    with pytest.raises(UserError, match="no field 'premise'"):
        render("{premise}", {"sentence": "x"})
    with pytest.raises(UserError, match="label 'maybe' is not a rte label"):
        causal.to_example(CAUSAL_TASKS["rte"], {"premise": "a", "hypothesis": "b", "label": "maybe"}, tokenizer, None)
    assert set(ORIGINALS) <= set(CAUSAL_TASKS)
