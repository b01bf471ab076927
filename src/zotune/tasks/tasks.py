"""The task table: one row per task, with the prompt and label words MeZO used.

Templates and label words are copied from MeZO's `medium_models/run_fewshot.sh` (which took
them from LM-BFF); the template syntax is explained in `templates.py`. Adding a task means
adding a row here, not changing a loader.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Task:
    name: str
    data_dir: str                   # folder under the data dir, e.g. "SST-2" as LM-BFF names it
    file_format: str                # "tsv": GLUE file with a header line; "csv": LM-BFF's headerless `label,sentence`
    text_columns: tuple[str, ...]   # header names of sentence 0, 1, ... (csv files read as if headed `label,sentence`)
    label_column: str               # header name of the label; a file without it is unlabelled
    template: str                   # LM-BFF template
    label_words: dict[str, str]     # label as written in the file -> word; its order defines class indices 0..C-1
    max_length: int                 # tokens, including <s>, </s> and the template
    # GLUE's SNLI rows hold 1 to 5 annotator labels before gold_label, so a row can be longer or
    # shorter than the header; like LM-BFF (`line[-1]`) the label is then read from the last field.
    ragged: bool = False
    # split -> file name without extension; MNLI's dev and test are the matched-genre halves.
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "dev": "dev", "test": "test"})


_SENTIMENT = "*cls**sent_0*_It_was*mask*.*sep+*"
_NLI = "*cls**sent-_0*?*mask*,*+sentl_1**sep+*"

TASKS: dict[str, Task] = {
    "sst2": Task("sst2", "SST-2", "tsv", ("sentence",), "label", _SENTIMENT,
                 {"0": "terrible", "1": "great"}, 128),
    "sst5": Task("sst5", "sst-5", "csv", ("sentence",), "label", _SENTIMENT,
                 {"0": "terrible", "1": "bad", "2": "okay", "3": "good", "4": "great"}, 128),
    # SOURCES.md: the k-shot csv labels 0-5 are DESC, ENTY, ABBR, HUM, LOC, NUM, so MeZO's word
    # for 2 (abbreviation questions) is "Expression".
    "trec": Task("trec", "trec", "csv", ("sentence",), "label", "*cls**mask*:*+sent_0**sep+*",
                 {"0": "Description", "1": "Entity", "2": "Expression", "3": "Human", "4": "Location",
                  "5": "Number"}, 128),
    "mnli": Task("mnli", "MNLI", "tsv", ("sentence1", "sentence2"), "gold_label", _NLI,
                 {"contradiction": "No", "entailment": "Yes", "neutral": "Maybe"}, 256,
                 splits={"train": "train", "dev": "dev_matched", "test": "test_matched"}),
    "snli": Task("snli", "SNLI", "tsv", ("sentence1", "sentence2"), "gold_label", _NLI,
                 {"contradiction": "No", "entailment": "Yes", "neutral": "Maybe"}, 256, ragged=True),
    "rte": Task("rte", "RTE", "tsv", ("sentence1", "sentence2"), "label", _NLI,
                {"not_entailment": "No", "entailment": "Yes"}, 256),
}
