"""LM-BFF prompt templates: sentences -> token ids with one <mask>, and label words -> token ids.

A template is a list of parts separated by `*`, with the meanings of LM-BFF's
`tokenize_multipart_input` (princeton-nlp/LM-BFF `src/dataset.py`, copied into MeZO):

    cls, bos          <s>   (RoBERTa id 0)
    sep, sep+, eos    </s>  (id 2); in LM-BFF `sep+` also starts a new BERT segment, which RoBERTa lacks
    mask              <mask> (id 50264), exactly once
    sent_i            sentence i
    +sent_i           ' ' + sentence i: byte-level BPE folds the space into the first word's token
    sent-_i           sentence i without its last character (MNLI drops the premise's period before '?')
    sentl_i, sentu_i  sentence i with its first character lower- / upper-cased
                      (the flags combine as in LM-BFF's `+sentl_1`, `sentl-_0`, `+sentu-_0`)
    anything else     literal text, `_` standing for a space

so SST-2's `*cls**sent_0*_It_was*mask*.*sep+*` reads "<s>{sentence} It was<mask>.</s>".
Each part is encoded on its own, as LM-BFF does, so BPE merges never cross a part boundary.
"""

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass

from zotune.errors import UserError

_SPECIAL = {"cls": "cls_token_id", "bos": "bos_token_id", "sep": "sep_token_id", "sep+": "sep_token_id",
            "eos": "eos_token_id", "mask": "mask_token_id"}
_SLOT = re.compile(r"(\+?)sent([lu]?)(-?)_(\d+)")
_SLOT_LIKE = re.compile(r"\+?sent[^_]*_\d+")  # looks like a sentence part, so a typo must not become literal text
_DEMO = re.compile(r"labelx?_\d+")           # LM-BFF's demonstration parts


@dataclass(frozen=True)
class _Slot:
    """A sentence part of the template: which sentence and how to transform it before encoding."""
    index: int
    space: bool      # '+': prepend a space
    case: str        # 'l' / 'u': lower / upper-case the first character, '' leaves it
    drop_last: bool  # '-': drop the last character

    def text(self, sentence: str) -> str:
        if self.case:
            first = sentence[:1].lower() if self.case == "l" else sentence[:1].upper()
            sentence = first + sentence[1:]
        if self.drop_last:
            sentence = sentence[:-1]
        return " " + sentence if self.space else sentence


def encode_text(tokenizer, text: str) -> list[int]:
    # split_special_tokens: a sentence that contains the string "<mask>" or "</s>" is text, not a
    # second mask (the fast tokenizer would otherwise match added tokens inside the text).
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def parse_template(template: str) -> list[str | _Slot]:
    """Split a template into special-token names, literal texts and sentence slots; checks the syntax."""
    parts: list[str | _Slot] = []
    for part in template.split("*"):
        if (m := _SLOT.fullmatch(part)):
            plus, case, minus, index = m.groups()
            parts.append(_Slot(int(index), plus == "+", case, minus == "-"))
        elif _SLOT_LIKE.fullmatch(part):
            raise UserError(f"template {template!r}: unknown sentence part *{part}*; use sent_i with the "
                            "optional flags + (space), l/u (case), - (drop last char), as in *+sentl-_1*")
        elif _DEMO.fullmatch(part):
            raise UserError(f"template {template!r}: demonstration parts like *{part}* are not supported")
        elif part in _SPECIAL:
            parts.append(part)
        elif part:
            parts.append(part.replace("_", " "))
    masks = sum(p == "mask" for p in parts)
    if masks != 1:
        raise UserError(f"template {template!r} has {masks} *mask* parts; it needs exactly one")
    if not any(isinstance(p, _Slot) for p in parts):
        raise UserError(f"template {template!r} has no sentence part; add *sent_0* (or *+sent_0*, ...)")
    return parts


def parse_label_words(text: str, labels: Sequence[str]) -> dict[str, str]:
    """Label words from the command line, for a task whose file labels are `labels` (in class order).

    Either a comma-separated list in class order ("terrible,great") or a mapping from label to
    word, in JSON or in the Python syntax of MeZO's run_fewshot.sh ("{0:'terrible',1:'great'}");
    a mapping's order sets the class indices.
    """
    if text.lstrip().startswith("{"):
        try:
            mapping = ast.literal_eval(text)
        except (ValueError, SyntaxError) as e:
            raise UserError(f"label words {text!r} are not a valid mapping ({e}); "
                            "write e.g. '{\"0\": \"terrible\", \"1\": \"great\"}'") from None
        if not isinstance(mapping, dict) or not all(isinstance(w, str) for w in mapping.values()):
            raise UserError(f"label words {text!r} must map each label to a word string")
        words = {str(label): word.strip() for label, word in mapping.items()}
        if len(words) != len(mapping) or set(words) != set(labels):
            raise UserError(f"label words {text!r} must give one word for each label: {', '.join(labels)}")
    else:
        given = [w.strip() for w in text.split(",")]
        if len(given) != len(labels):
            raise UserError(f"label words {text!r} give {len(given)} words for {len(labels)} labels "
                            f"({', '.join(labels)}); give one per label, in that order")
        words = dict(zip(labels, given))
    return words


class PromptTemplate:
    """A template bound to a tokenizer: encodes examples and holds the label-word token ids.

    Build it once per run; `encode` is called per example.
    """

    def __init__(self, tokenizer, template: str, label_words: dict[str, str], max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

        # Fixed parts become token ids now; slots stay _Slot and are filled per example.
        vocab = tokenizer.get_vocab()
        self._parts: list[list[int] | _Slot] = []
        for part in parse_template(template):
            if isinstance(part, _Slot):
                self._parts.append(part)
            elif part in _SPECIAL:
                token_id = getattr(tokenizer, _SPECIAL[part], None)
                if token_id is None:
                    raise UserError(f"the tokenizer has no {_SPECIAL[part].removesuffix('_id')} for *{part}*; load it "
                                    "with AutoTokenizer.from_pretrained(<model dir>) so its special tokens are set")
                self._parts.append([token_id])
            else:
                ids = encode_text(tokenizer, part)
                # LM-BFF looks a single character up as a bare token because sentencepiece tokenizers
                # (T5, XLM-R) encode "." as "▁" + "."; byte-level BPE already gives the one token.
                if len(part) == 1 and len(ids) > 1 and part in vocab:
                    ids = [vocab[part]]
                self._parts.append(ids)
        self.mask_id: int = tokenizer.mask_token_id  # set: the template's *mask* part was checked above
        self.num_sentences = 1 + max(p.index for p in self._parts if isinstance(p, _Slot))
        fixed = sum(len(p) for p in self._parts if not isinstance(p, _Slot))
        if fixed >= max_length:
            raise UserError(f"template {template!r} alone is {fixed} tokens, which leaves no room for the "
                            f"sentences within max_length {max_length}; raise max_length or shorten the template")

        # LM-BFF / MeZO score the word as it follows a space (' great' = 'Ġgreat', one token in
        # RoBERTa's vocabulary), even where the mask comes right after <s> as in TREC's template.
        self.label_word_ids: list[int] = []
        for label, word in label_words.items():
            ids = encode_text(tokenizer, " " + word) if word.strip() else []
            if len(ids) != 1:
                raise UserError(f"label word {word!r} (label {label!r}) is {len(ids)} tokens "
                                f"{tokenizer.convert_ids_to_tokens(ids)}; a label word must be a single token")
            self.label_word_ids.append(ids[0])

    def encode(self, sentences: tuple[str, ...]) -> list[int]:
        """Token ids of one example: <s> ... <mask> ... </s>, at most max_length long."""
        if len(sentences) < self.num_sentences:
            raise UserError(f"the template uses {self.num_sentences} sentences but an example has {len(sentences)}")
        pieces = [encode_text(self.tokenizer, p.text(sentences[p.index])) if isinstance(p, _Slot) else p
                  for p in self._parts]
        # Too long: cut tokens from the end of the sentences only, one at a time from the longest
        # (ties: the later one), like Hugging Face's 'longest_first', so the template and the mask survive.
        # __init__ checked the template alone fits, so the sentences always hold enough tokens to cut.
        slots = [i for i, p in enumerate(self._parts) if isinstance(p, _Slot)]
        lengths = {i: len(pieces[i]) for i in slots}
        for _ in range(sum(map(len, pieces)) - self.max_length):
            lengths[max(reversed(slots), key=lengths.__getitem__)] -= 1
        return [t for i, piece in enumerate(pieces) for t in (piece[:lengths[i]] if i in lengths else piece)]
