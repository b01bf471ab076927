"""LM-BFF template syntax, label words and truncation, on the real RoBERTa tokenizer."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from zotune.errors import UserError
from zotune.tasks.tasks import TASKS
from zotune.tasks.templates import PromptTemplate, parse_label_words, parse_template

BOS, EOS, MASK = 0, 2, 50264
NLI = TASKS["mnli"].template
YES_NO = {"no": "No", "yes": "Yes"}


def decode(tokenizer, template, sentences, max_length=256):
    return tokenizer.decode(PromptTemplate(tokenizer, template, YES_NO, max_length).encode(sentences))


# (template, sentences, decoded prompt): one row per kind of part.
CASES = [
    ("*cls**sent_0*_It_was*mask*.*sep+*", ("Fun.",), "<s>Fun. It was<mask>.</s>"),
    ("*cls**mask*:*+sent_0**sep+*", ("Why?",), "<s><mask>: Why?</s>"),
    (NLI, ("A man sleeps.", "He is awake."), "<s>A man sleeps?<mask>, he is awake.</s>"),
    (NLI, ("No period", "x"), "<s>No perio?<mask>, x</s>"),  # sent-_ drops the last character, whatever it is
    ("*bos**sentl-_0**mask**+sentu_1**eos*", ("Hello!", "world"), "<s>hello<mask> World</s>"),
    ("*cls**sent_1**mask**sent_0**sep*", ("first", "second"), "<s>second<mask>first</s>"),
    ("*cls**sent_0**mask*_*sep*", ("x",), "<s>x<mask> </s>"),  # a lone `_` is a space token
]


@pytest.mark.parametrize("template,sentences,expected", CASES)
def test_template_parts(tokenizer, template, sentences, expected):
    assert decode(tokenizer, template, sentences) == expected


def test_mnli_transformations_as_ids(tokenizer):
    ids = PromptTemplate(tokenizer, NLI, YES_NO, 256).encode(("The cat sat.", "The mat is red."))
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    # premise without '.', '?' (116), mask, ',' (6), ' the mat is red.' with a lower-case 'the'
    assert ids == [BOS, *enc("The cat sat"), 116, MASK, 6, *enc(" the mat is red."), EOS]


def test_mask_text_in_a_sentence_is_not_a_mask(tokenizer):
    ids = PromptTemplate(tokenizer, NLI, YES_NO, 256).encode(("a <mask> b </s>.", "<s> c"))
    assert ids.count(MASK) == 1 and ids.count(EOS) == 1 and ids.count(BOS) == 1


@pytest.mark.parametrize("template,message", [
    ("*cls**sent_0**sep*", "has 0 *mask* parts"),
    ("*cls**mask**sent_0**mask**sep*", "has 2 *mask* parts"),
    ("*cls*It_was*mask*.*sep*", "no sentence part"),
    ("*cls**sentx_0**mask**sep*", "unknown sentence part *sentx_0*"),
    ("*cls**sent_0**label_0**mask**sep*", "demonstration parts"),
])
def test_bad_templates(template, message):
    with pytest.raises(UserError, match=message.replace("*", r"\*")):
        parse_template(template)


def test_template_longer_than_max_length(tokenizer):
    with pytest.raises(UserError, match="leaves no room"):
        PromptTemplate(tokenizer, "*cls**sent_0*_It_was_really_quite*mask*.*sep*", YES_NO, 8)


def test_too_few_sentences(tokenizer):
    with pytest.raises(UserError, match="uses 2 sentences"):
        PromptTemplate(tokenizer, NLI, YES_NO, 256).encode(("only one",))


def test_tokenizer_without_special_tokens(tokenizer):
    # The same BPE file loaded bare: no special tokens are named, so the template has no <s> to use.
    bare = PreTrainedTokenizerFast(tokenizer_file=f"{tokenizer.name_or_path}/tokenizer.json")
    with pytest.raises(UserError, match="no cls_token"):
        PromptTemplate(bare, NLI, YES_NO, 256)


def test_multi_token_label_word_shows_its_tokens(tokenizer):
    with pytest.raises(UserError, match=r"'zotune'.*\['Ġz', 'ot', 'une'\]"):
        PromptTemplate(tokenizer, NLI, {"no": "No", "yes": "zotune"}, 256)
    with pytest.raises(UserError, match="0 tokens"):
        PromptTemplate(tokenizer, NLI, {"no": "No", "yes": ""}, 256)


def test_truncation_cuts_the_sentence_end_and_keeps_the_template(tokenizer):
    task = TASKS["sst2"]
    ids = PromptTemplate(tokenizer, task.template, task.label_words, 128).encode(("word " * 500 + "END",))
    assert len(ids) == 128
    assert ids[:2] == [BOS, tokenizer.encode("word", add_special_tokens=False)[0]]
    assert ids[-5:] == [85, 21, MASK, 4, EOS]  # ' It was' <mask> . </s>


def test_truncation_is_longest_first(tokenizer):
    template = PromptTemplate(tokenizer, NLI, YES_NO, 64)  # outside the sentences: <s> ? <mask> , </s>
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    # A long premise is cut down; the short hypothesis is untouched.
    ids = template.encode(("x " * 200 + "end.", "a b c d e"))
    assert len(ids) == 64 and ids[-6:] == [*enc(" a b c d e"), EOS]
    # Two long sentences end up within one token of each other; on a tie the second gives first.
    ids = template.encode(("a " * 200 + ".", "b " * 200))
    premise, hypothesis = ids[1:ids.index(116)], ids[ids.index(6) + 1:-1]
    assert len(ids) == 64 and len(premise) + len(hypothesis) == 64 - 5
    assert len(premise) - len(hypothesis) == 1


@settings(max_examples=150, deadline=None)
@given(sentences=st.lists(st.text(max_size=400), min_size=2, max_size=2),
       max_length=st.integers(min_value=8, max_value=80),
       name=st.sampled_from(sorted(TASKS)))
def test_fuzz_encode_fits_with_one_mask(tokenizer, sentences, max_length, name):
    task = TASKS[name]
    ids = PromptTemplate(tokenizer, task.template, task.label_words, max_length).encode(tuple(sentences))
    assert len(ids) <= max_length and ids.count(MASK) == 1 and ids[0] == BOS and ids[-1] == EOS


@pytest.mark.parametrize("text,expected", [
    ("terrible,great", {"0": "terrible", "1": "great"}),
    (" terrible , great ", {"0": "terrible", "1": "great"}),
    ('{"1": "great", "0": "terrible"}', {"1": "great", "0": "terrible"}),  # a mapping's order sets the classes
    ("{0:'terrible',1:'great'}", {"0": "terrible", "1": "great"}),       # run_fewshot.sh's MAPPING syntax
])
def test_parse_label_words(text, expected):
    words = parse_label_words(text, ["0", "1"])
    assert words == expected and list(words) == list(expected)


@pytest.mark.parametrize("text,message", [
    ("terrible", "give 1 words for 2 labels"),
    ("{'0': 'terrible'}", "one word for each label"),
    ("{'0': 'terrible', '2': 'great'}", "one word for each label"),
    ("{'0': 1, '1': 'great'}", "map each label to a word"),
    ("{'0': 'terrible',", "not a valid mapping"),
])
def test_parse_label_words_errors(text, message):
    with pytest.raises(UserError, match=message):
        parse_label_words(text, ["0", "1"])
