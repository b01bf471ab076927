"""Scoring: turn a model and a prompt into label-word logits, predictions and accuracy.

Used by `zotune eval` (zero-shot or any checkpoint) and by training's dev/test evaluation.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from zotune.engine.runner import ModelRunner, resolve_device
from zotune.errors import UserError
from zotune.files import write_text_atomic
from zotune.model.loading import load_model, read_hf_config, resolve_model_dir
from zotune.tasks.data import Example
from zotune.tasks.tasks import TASKS, Task
from zotune.tasks.templates import PromptTemplate, parse_label_words


@dataclass
class Prompted:
    """A task bound to a tokenizer and a model runner."""
    task: Task
    prompt: PromptTemplate
    runner: ModelRunner


def load_tokenizer(model_dir: Path | None, tokenizer: str | None):
    from transformers import AutoTokenizer
    source = tokenizer or model_dir
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # missing files raise OSError, ValueError or TypeError depending on the version
        raise UserError(f"cannot load a tokenizer from {source} ({type(exc).__name__}); "
                        f"pass --tokenizer DIR (e.g. models/zotune-roberta-small)") from None


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown --task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def load_prompt(model: str, task_name: str, tokenizer: str | None = None, template: str | None = None,
                label_words: str | None = None, max_length: int | None = None) -> tuple[Task, PromptTemplate]:
    """The task and its prompt (template, label words, truncation) over the model's tokenizer."""
    task = get_task(task_name)
    model_dir = None if tokenizer else resolve_model_dir(model)
    if model_dir is not None:  # a broken checkpoint is named as such, not blamed on its tokenizer
        read_hf_config(model_dir)
    tok = load_tokenizer(model_dir, tokenizer)
    words = parse_label_words(label_words, list(task.label_words)) if label_words else task.label_words
    return task, PromptTemplate(tok, template or task.template, words, max_length or task.max_length)


def build(model: str, task_name: str, *, tokenizer: str | None = None, template: str | None = None,
          label_words: str | None = None, max_length: int | None = None, device: str = "auto",
          precision: str = "tf32", cuda_graphs: bool = True) -> Prompted:
    """A checkpoint as it is (nothing trains) behind a runner: what `eval` and `predict` score with."""
    task, prompt = load_prompt(model, task_name, tokenizer, template, label_words, max_length)
    where = resolve_device(device)
    runner = ModelRunner(load_model(resolve_model_dir(model)).to(where), prompt.label_word_ids, prompt.mask_id, where,
                         precision, cuda_graphs, prompt.tokenizer.pad_token_id)
    return Prompted(task, prompt, runner)


def encode(prompt: PromptTemplate, examples: list[Example]) -> list[list[int]]:
    return [prompt.encode(e.sentences) for e in examples]


@torch.inference_mode()
def predict(runner: ModelRunner, sequences: list[list[int]], batch_size: int) -> torch.Tensor:
    """Label-word logits [N, C] for N encoded examples, in order, batch_size sequences per pass."""
    chunks = [runner.logits(runner.pack(sequences[i:i + batch_size]))
              for i in range(0, len(sequences), batch_size)]
    return torch.cat(chunks).float().cpu()


def accuracy(logits: torch.Tensor, examples: list[Example]) -> float | None:
    labels = [e.label for e in examples]
    if not labels or any(label is None for label in labels):
        return None
    return int((logits.argmax(-1) == torch.tensor(labels)).sum()) / len(labels)


def write_predictions(path: Path, logits: torch.Tensor, examples: list[Example]) -> None:
    """One JSON line per example, in file order: label (null if unlabelled), pred, logits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(
        json.dumps({"label": example.label, "pred": int(max(range(len(row)), key=row.__getitem__)), "logits": row})
        + "\n" for example, row in zip(examples, logits.tolist())))


def fit_threshold(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The threshold t of best accuracy for predicting label 1 where score > t: the midpoints
    between neighbouring scores, and one below the lowest, are the candidates; the first best wins."""
    values = scores.sort().values
    cuts = torch.cat([values[:1] - 1, (values[1:] + values[:-1]) / 2])
    correct = ((scores[None, :] > cuts[:, None]).long() == labels[None, :]).sum(1)   # [cuts]
    return cuts[int(correct.argmax())].item()


def dev_threshold_accuracy(dev_logits: torch.Tensor, dev_examples: list[Example], logits: torch.Tensor,
                           examples: list[Example]) -> float:
    """Accuracy of a two-class prompt with its decision threshold on logit1 - logit0 fitted on a
    labelled dev set (fit_threshold): zero-shot "calibrated on dev", beside the raw argmax."""
    if dev_logits.shape[-1] != 2:
        raise UserError("a dev-fitted threshold needs a two-class task")
    threshold = fit_threshold(dev_logits[:, 1] - dev_logits[:, 0], torch.tensor([e.label for e in dev_examples]))
    predicted = (logits[:, 1] - logits[:, 0] > threshold).long()
    return int((predicted == torch.tensor([e.label for e in examples])).sum()) / len(examples)
