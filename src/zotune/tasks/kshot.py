"""LM-BFF's k-shot sampler (`tools/generate_k_shot_data.py`, also in MeZO's medium_models), reproduced exactly.

For a GLUE-style file, LM-BFF shuffles the data lines of the full training set (header excluded)
with numpy's legacy generator, `np.random.seed(seed); np.random.shuffle(lines)`, then walks them
in shuffled order: the first k lines of each label form train.tsv and the next k form dev.tsv,
labels in order of first appearance. Lines are copied byte for byte, so the result equals the
shipped k-shot-1k-test train/dev files (that mode differs from LM-BFF's k-shot mode only in how
it samples the test set, which is GLUE's dev set and is not made here). As in LM-BFF, a label with
fewer than 2k lines gives fewer.
"""

from pathlib import Path

import numpy as np

from zotune.errors import UserError
from zotune.tasks.data import read_text
from zotune.tasks.tasks import Task


def _label(line: str) -> str:
    # LM-BFF's get_label: `line.strip().split('\t')[-1]`, the last column for SST-2, MNLI, SNLI and RTE.
    return line.strip().split("\t")[-1]


def sample_k_shot(task: Task, train_full: Path | str, k: int, seed: int) -> tuple[str, str]:
    """The text of train.tsv and of dev.tsv (header included) for `k` examples per label and `seed`."""
    if task.file_format != "tsv":
        raise UserError(f"k-shot sampling is reproduced for the GLUE-style tsv tasks only, not {task.name}")
    path, text = read_text(Path(train_full), "give the task's full GLUE training file")
    header, *lines = [line + "\n" for line in text.removesuffix("\n").split("\n")]
    if _label(header) != task.label_column:
        raise UserError(f"{path}:1: the last column must be {task.label_column!r}, as in GLUE's {task.data_dir} files")
    for n, line in enumerate(lines, start=2):
        if _label(line) not in task.label_words:
            raise UserError(f"{path}:{n}: label {_label(line)!r} is not a {task.name} label "
                            f"({', '.join(task.label_words)})")

    # An explicit generator: the same stream as LM-BFF's global np.random.seed(seed) + np.random.shuffle.
    np.random.RandomState(seed).shuffle(lines)
    by_label: dict[str, list[str]] = {}
    for line in lines:
        by_label.setdefault(_label(line), []).append(line)
    train = header + "".join(line for group in by_label.values() for line in group[:k])
    dev = header + "".join(line for group in by_label.values() for line in group[k:2 * k])
    return train, dev
