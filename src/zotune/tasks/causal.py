"""Candidate-scoring prompts for causal LMs, the MeZO large-model way.

An example becomes one prompt and one continuation per class (label order); a model scores a
class by the log-probabilities of its continuation's tokens after the prompt, and predicts the
best. The reference (princeton-nlp/MeZO `large_models/run.py` `one_step_pred`) scores every task
by the MEAN log-probability over the candidate's tokens ("length-normalized", the default
without SFC calibration), and its classification loss (`utils.py` `forward_wrap_with_option_len`)
is the cross entropy over those same means; `length_normalised` records that per task (with
one-token candidates, mean = sum). Tasks run with `--train_as_classification False` in
`mezo.sh` (COPA, SQuAD) train on the gold continuation's token NLL instead: `objective`.

Templates: SST-2, RTE, CB, BoolQ (the default v3), COPA, WiC, WSC, MultiRC and SQuAD follow
MeZO's `large_models/templates.py` (most come from PromptSource). The reference has no causal
template for the other four encoder tasks; the choices here:
  SST-5  SST-2's "<sentence> It was" with LM-BFF's five words (terrible, bad, okay, good, great).
  MNLI, SNLI  CB's three-way PromptSource prompt ("Suppose ... Can we infer that ...? Yes, No,
         or Maybe?") with Yes / No / Maybe: the same label words as the encoder rows.
  TREC   the question, then a question listing LM-BFF's six words, answered by one of them
         (Description, Entity, Expression, Human, Location, Number), in the style of RTE's.
Class order is the encoder row's for the six encoder tasks (so RTE is No, Yes where the
reference lists Yes, No); scores are order-free, and `load_split`'s labels stay valid.

A template is text with `{field|filter|...}` slots; the filters (`FILTERS`) are the small
string edits the reference's template classes make. As in the reference's `encode_prompt`, the
rendered prompt and prompt+continuation have leading whitespace and trailing spaces removed,
so a continuation carries its own leading space (" great") and BPE sees " great" as one word.

Tokenisation (`encode_candidates`): the prompt is tokenised alone, each prompt+continuation
whole, and the continuation's ids are what follows the prompt's ids in the whole; it is an
error (one line, naming the tokens) if the whole does not start with the prompt's ids, so
prompt_ids + candidate_ids[c] is always exactly tokenise(prompt + continuation). With
byte-level BPE (RoBERTa, GPT-2, OPT) that holds whenever the prompt does not end in a space
or in two whitespace characters: the pre-tokenizer starts a new word at a space before a
letter and after a single newline. `bos` is the model's: OPT prepends </s> (id 2), Llama <s>.
"""

import json
import lzma
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from zotune.errors import UserError
from zotune.tasks.data import default_data_dir, load_split
from zotune.tasks.mezo_sample import ORIGINALS, SPLITS, sample_path
from zotune.tasks.tasks import TASKS
from zotune.tasks.templates import encode_text


def _copa_choice(text: str) -> str:
    # templates.py CopaTemplate.capitalize ("correct"): lower-case the first word unless it is "I".
    first, *rest = text.split(" ")
    return " ".join([first if first == "I" else first.lower(), *rest])


def _question(text: str) -> str:
    # BoolQTemplateV3: end with "?" and start upper-case.
    text = text if text.endswith("?") else text + "?"
    return text[0].upper() + text[1:]


FILTERS = {
    "strip": str.strip,
    "lower": str.lower,
    "nodot": lambda s: s.rstrip()[:-1] if s.rstrip().endswith(".") else s.rstrip(),  # CopaTemplate.get_prompt
    "because_so": {"cause": "because", "effect": "so"}.__getitem__,                  # CopaTemplate's conjunctions
    "copa_choice": _copa_choice,
    "question": _question,
    "first": lambda answers: answers[0],  # SQuAD trains on the first gold answer
}
_SLOT = re.compile(r"\{(\w+)((?:\|\w+)*)\}")


@dataclass(frozen=True)
class CausalTask:
    name: str
    prompt: str                   # template of the prompt
    candidates: dict[str, str]    # label as written in the data -> continuation template; order = class index
    length_normalised: bool = True  # score = mean (True) or sum of the continuation's token log-probs
    objective: str = "candidates"   # "candidates": CE over the scores; "gold": NLL of the gold continuation
    kshot: str | None = None        # encoder task whose LM-BFF k-shot folders this task can read
    fields: tuple[str, ...] = ()    # the names its template gives the k-shot sentences, in order
    generation: bool = False        # the answer is generated and scored by F1 / EM (squad.py)


_NLI3 = 'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n'
_YES_NO = {"false": "No", "true": "Yes"}

CAUSAL_TASKS: dict[str, CausalTask] = {t.name: t for t in [
    CausalTask("sst2", "{sentence|strip} It was", {"0": " terrible", "1": " great"},
               kshot="sst2", fields=("sentence",)),
    CausalTask("sst5", "{sentence|strip} It was",
               {"0": " terrible", "1": " bad", "2": " okay", "3": " good", "4": " great"},
               kshot="sst5", fields=("sentence",)),
    CausalTask("trec", "{sentence|strip}\nWhat kind of answer does this question ask for? Description, Entity, "
               "Expression, Human, Location or Number?\n",
               {"0": "Description", "1": "Entity", "2": "Expression", "3": "Human", "4": "Location", "5": "Number"},
               kshot="trec", fields=("sentence",)),
    CausalTask("mnli", _NLI3, {"contradiction": "No", "entailment": "Yes", "neutral": "Maybe"},
               kshot="mnli", fields=("premise", "hypothesis")),
    CausalTask("snli", _NLI3, {"contradiction": "No", "entailment": "Yes", "neutral": "Maybe"},
               kshot="snli", fields=("premise", "hypothesis")),
    CausalTask("rte", '{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
               {"not_entailment": "No", "entailment": "Yes"}, kshot="rte", fields=("premise", "hypothesis")),
    CausalTask("cb", _NLI3, {"entailment": "Yes", "contradiction": "No", "neutral": "Maybe"}),
    CausalTask("boolq", "{passage} {question|question}\n", {"true": "Yes", "false": "No"}),
    CausalTask("copa", "{premise|nodot} {question|because_so}",
               {"0": " {choice1|copa_choice}", "1": " {choice2|copa_choice}"}, objective="gold"),
    CausalTask("wic", 'Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n'
               "{sentence1}\n{sentence2}\n", _YES_NO),
    CausalTask("wsc", '{text}\nIn the previous sentence, does the pronoun "{span2_text|lower}" refer to '
               "{span1_text}? Yes or No?\n", _YES_NO),
    CausalTask("multirc", '{paragraph}\nQuestion: {question}\nI found this answer "{answer}". Is that correct? '
               "Yes or No?\n", {"0": "No", "1": "Yes"}),
    CausalTask("squad", "Title: {title}\nContext: {context}\nQuestion: {question|strip}\nAnswer:",
               {"answer": " {answers|first}\n"}, objective="gold", generation=True),
]}


@dataclass(frozen=True)
class CandidateExample:
    prompt_ids: tuple[int, ...]               # bos (if any) + the prompt
    candidate_ids: tuple[tuple[int, ...], ...]  # per class, in label order: the continuation's ids
    label: int | None                         # gold class index; None for an unlabelled example
    answers: tuple[str, ...] = ()             # generation tasks: every gold answer, for F1 / EM


def render(template: str, record: dict) -> str:
    """Fill `{field|filter|...}` slots from `record`."""
    def fill(m: re.Match) -> str:
        name, filters = m.group(1), [f for f in m.group(2).split("|") if f]
        if name not in record:
            raise UserError(f"template slot {{{name}}} has no field {name!r} in the example ({', '.join(record)})")
        value = record[name]
        for f in filters:
            value = FILTERS[f](value)
        return value
    return _SLOT.sub(fill, template)


def prompt_texts(task: CausalTask, record: dict) -> tuple[str, list[str]]:
    """The prompt and each class's continuation as text, trimmed as the reference's encode_prompt does."""
    raw = render(task.prompt, record)
    prompt = raw.lstrip().rstrip(" ")
    continuations = []
    for template in task.candidates.values():
        whole = (raw + render(template, record)).lstrip().rstrip(" ")
        if not whole.startswith(prompt) or len(whole) == len(prompt):
            raise UserError(f"task {task.name}: continuation {template!r} is empty after trimming; "
                            "give it text after the prompt")
        continuations.append(whole[len(prompt):])
    return prompt, continuations


def encode_candidates(tokenizer, prompt: str, continuations: Sequence[str], bos: int | None,
                      max_length: int | None = None) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """prompt ids (bos first) and per continuation the ids that follow them in tokenise(prompt + continuation).

    `max_length` cuts the prompt from the left, after bos, until the longest continuation fits,
    as the reference left-truncates (the question and the answer sit at the end).
    """
    head = [] if bos is None else [bos]
    prompt_ids = encode_text(tokenizer, prompt)
    candidates = []
    for text in continuations:
        whole = encode_text(tokenizer, prompt + text)
        if whole[:len(prompt_ids)] != prompt_ids or len(whole) == len(prompt_ids):
            at = len(prompt_ids)
            tokens = tokenizer.convert_ids_to_tokens
            raise UserError(f"prompt {prompt[-30:]!r} + continuation {text!r} does not tokenise as the prompt's "
                            f"tokens then the continuation's (prompt ends {tokens(prompt_ids[-2:])}, whole has "
                            f"{tokens(whole[max(at - 2, 0):at + 1])}); end the prompt with a word or one newline "
                            "and start the continuation with its space")
        candidates.append(tuple(whole[len(prompt_ids):]))
    if max_length is not None:
        room = max_length - len(head) - max(map(len, candidates))
        if room < 1:
            raise UserError(f"max_length {max_length} leaves no room for the prompt; the longest continuation "
                            f"is {max(map(len, candidates))} tokens")
        prompt_ids = prompt_ids[-room:]
    return tuple(head + prompt_ids), tuple(candidates)


def to_example(task: CausalTask, record: dict, tokenizer, bos: int | None,
               max_length: int | None = None) -> CandidateExample:
    """One record (template fields + "label") as token ids."""
    prompt, continuations = prompt_texts(task, record)
    prompt_ids, candidate_ids = encode_candidates(tokenizer, prompt, continuations, bos, max_length)
    if task.generation:
        return CandidateExample(prompt_ids, candidate_ids, 0, tuple(record["answers"]))
    label = record.get("label")
    if label is not None and label not in task.candidates:
        raise UserError(f"label {label!r} is not a {task.name} label ({', '.join(task.candidates)})")
    return CandidateExample(prompt_ids, candidate_ids, None if label is None else list(task.candidates).index(label))


def read_records(task: CausalTask, split: str, data_dir: Path | str | None = None, k: int | None = None,
                 seed: int = 0) -> list[dict]:
    """A split's records: the LM-BFF folder <k>-<seed> of the encoder task when k is given, else
    the MeZO large-model sample of `seed` (data/mezo-large/<Task>/<seed>/, mezo_sample.py)."""
    data_dir = default_data_dir() if data_dir is None else data_dir
    if k is not None:
        if task.kshot is None:
            raise UserError(f"task {task.name} has no k-shot folders; leave k unset to read its MeZO sample")
        encoder = TASKS[task.kshot]
        keys = list(encoder.label_words)
        return [{**dict(zip(task.fields, e.sentences)), "label": None if e.label is None else keys[e.label]}
                for e in load_split(encoder, data_dir, k, seed, split)]
    if task.name not in ORIGINALS or split not in SPLITS:
        raise UserError(f"task {task.name} has no MeZO sample (split {split!r}); "
                        f"MeZO samples exist for {', '.join(ORIGINALS)} with splits {', '.join(SPLITS)}")
    path = sample_path(data_dir, task.name, seed, split)
    if not path.exists():
        raise UserError(f"no file {path}: no MeZO sample of {task.name} for seed {seed}; only SST-2's seed 0 "
                        "ships, the others are not shipped: get the originals (data/SOURCES.md says where) "
                        "and write it with python tools/sample_superglue.py --originals DIR "
                        f"--seed {seed} --out {data_dir}")
    return read_sample_file(path)


def read_sample_file(path: Path) -> list[dict]:
    """The records of one .jsonl.xz sample file."""
    try:
        text = lzma.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, lzma.LZMAError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    records = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not a JSON record ({e}); rewrite it with tools/sample_superglue.py") from None
        if not isinstance(records[-1], dict):
            raise UserError(f"{path}:{n}: a record must be a JSON object of the template's fields and 'label'")
    return records


def load_examples(task: str, split: str, tokenizer, *, bos: int | None, data_dir: Path | str | None = None,
                  k: int | None = None, seed: int = 0, max_length: int | None = None) -> list[CandidateExample]:
    """Every example of one split as prompt and candidate token ids (see read_records for k and seed)."""
    if task not in CAUSAL_TASKS:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(CAUSAL_TASKS)}")
    row = CAUSAL_TASKS[task]
    return [to_example(row, r, tokenizer, bos, max_length) for r in read_records(row, split, data_dir, k, seed)]
