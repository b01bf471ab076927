"""Loaders: the LM-BFF k-shot-1k-test folders and users' own files of a task's format.

Two formats, as LM-BFF ships them:
  tsv  GLUE files (SST-2, MNLI, SNLI, RTE): a header line, tab-separated fields, no quoting;
       columns are found by header name, so a user's file may order or omit the extra columns.
  csv  LM-BFF's files for sst-5 and trec: no header, `label,sentence` with CSV quoting; a file whose
       rows have one field holds sentences without labels.
Any file named X is read from X.gz when X itself is absent: the repo ships its data gzipped.
"""

import csv
import gzip
import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from zotune.errors import UserError
from zotune.tasks.tasks import Task

_CSV_COLUMNS = {2: ("label", "sentence"), 1: ("sentence",)}  # field count -> the header a csv file would have


@dataclass(frozen=True)
class Example:
    sentences: tuple[str, ...]  # one per template slot: (sentence,) or (premise, hypothesis)
    label: int | None           # class index into the task's label words; None for an unlabelled file


def default_data_dir() -> Path:
    """$ZOTUNE_DATA_DIR, else the repo's data/ folder (src/zotune/tasks/data.py -> parents[3])."""
    return Path(os.environ.get("ZOTUNE_DATA_DIR") or Path(__file__).resolve().parents[3] / "data")


def read_text(path: Path | str, hint: str) -> tuple[Path, str]:
    """The text of `path`, or of `path`.gz if `path` does not exist; returns the file actually read.

    `hint` ends the missing-file message: what the user should check.
    """
    path = Path(path)
    gz = path.with_name(path.name + ".gz")
    if not path.exists() and gz.exists():
        path = gz
    try:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        return path, data.decode("utf-8-sig")  # -sig: spreadsheet exports start with a byte-order mark
    except FileNotFoundError:
        raise UserError(f"no file {path} (nor {gz.name}); {hint}") from None
    # a folder, no permission, a broken or truncated gzip, not UTF-8
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _tsv_rows(text: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    # Split on "\n" only (not str.splitlines, which also breaks at \x85 or \u2028 inside a sentence).
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    rows = [(n, line.split("\t")) for n, line in enumerate(lines[1:], start=2) if line]
    return lines[0].split("\t"), rows


def _csv_rows(text: str, path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = [(reader.line_num, row) for row in reader if row]
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    if not rows:
        return [], []
    first_line, first = rows[0]
    if len(first) not in _CSV_COLUMNS:
        raise UserError(f"{path}:{first_line}: {len(first)} fields; a csv file has rows `label,sentence` "
                        "(or just `sentence`), with sentences that contain commas in double quotes")
    return list(_CSV_COLUMNS[len(first)]), rows


def _names(header: list[str]) -> str:
    return ", ".join(map(repr, header))  # repr: a stray \r or quote in a user's header stays visible


def load_file(task: Task, path: Path | str, hint: str = "check the path") -> list[Example]:
    """Every example of one file in `task`'s format; labels become class indices."""
    path, text = read_text(Path(path), hint)
    header, rows = _tsv_rows(text) if task.file_format == "tsv" else _csv_rows(text, path)
    if not rows:
        raise UserError(f"{path} has no examples")
    missing = [c for c in task.text_columns if c not in header]
    if missing:
        raise UserError(f"{path}:1: no column {', '.join(missing)} in the header ({_names(header)}); "
                        f"a {task.name} file needs a header line naming {', '.join(task.text_columns)}")
    text_at = [header.index(c) for c in task.text_columns]
    label_at = header.index(task.label_column) if task.label_column in header else None
    classes = {label: i for i, label in enumerate(task.label_words)}

    # A ragged row may hold fewer or more annotator columns than the header; it needs the
    # sentences and, after them, the label in its last field.
    ragged_min = max(text_at) + 1 + (label_at is not None)
    examples = []
    for line, row in rows:
        if (len(row) < ragged_min) if task.ragged else (len(row) != len(header)):
            raise UserError(f"{path}:{line}: {len(row)} fields, expected {len(header)} ({_names(header)})")
        sentences = tuple(row[i] for i in text_at)
        for name, sentence in zip(task.text_columns, sentences):
            if not sentence.strip():
                raise UserError(f"{path}:{line}: empty {name}")
        label = None
        if label_at is not None:
            value = (row[-1] if task.ragged else row[label_at]).strip()
            if value not in classes:
                raise UserError(f"{path}:{line}: label {value!r} is not a {task.name} label "
                                f"({', '.join(task.label_words)})")
            label = classes[value]
        examples.append(Example(sentences, label))
    return examples


def kshot_root(task: Task, data_dir: Path | str) -> Path:
    """<data_dir>/<Task>/k-shot-1k-test: LM-BFF's folder of a task's <k>-<seed>/ splits."""
    return Path(data_dir) / task.data_dir / "k-shot-1k-test"


def kshot_folder(task: Task, data_dir: Path | str, k: int, seed: int) -> Path:
    return kshot_root(task, data_dir) / f"{k}-{seed}"


def load_split(task: Task, data_dir: Path | str, k: int, seed: int, split: str) -> list[Example]:
    """One split (train, dev, test) of the LM-BFF folder <data_dir>/<Task>/k-shot-1k-test/<k>-<seed>/."""
    if split not in task.splits:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(task.splits)}")
    root, folder = kshot_root(task, data_dir), kshot_folder(task, data_dir, k, seed)
    hint = f"check --data-dir ({data_dir}), --k ({k}) and --seed ({seed})"
    if root.is_dir() and not folder.is_dir():  # name the k-seed folders that do exist
        have = sorted(p.name for p in root.iterdir() if p.is_dir())
        hint += f"; --k {k} --seed {seed} has no folder there; k-seed folders there: {', '.join(have) or 'none'}"
    return load_file(task, folder / f"{task.splits[split]}.{task.file_format}", hint=hint)
