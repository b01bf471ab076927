"""Scoring: turn a model and a prompt into label-word logits, predictions and accuracy.

Used by `zotune eval` (zero-shot or any checkpoint) and by training's dev/test evaluation.
A masked LM scores a task through its LM-BFF prompt (PromptTemplate, label words); a causal LM
through the task's candidates (CausalPrompt, tasks/causal.py, engine/candidates.py), whose
scores take the place of the label-word logits everywhere (predict, accuracy). A generation
task (SQuAD) is scored on the answers a causal LM generates greedily (engine/generate.py) by
F1 and exact match (tasks/squad.py): `metric_names` says which metrics a task has, the first
being the one dev selection uses, and `metric_sums` is where every split is scored.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from zotune.engine.candidates import CausalRunner
from zotune.engine.generate import greedy
from zotune.engine.runner import ModelRunner, resolve_device
from zotune.errors import UserError
from zotune.files import write_text_atomic
from zotune.model.loading import is_causal_checkpoint, load_model, read_hf_config, resolve_model_dir
from zotune.tasks.causal import CAUSAL_TASKS, CandidateExample, CausalTask, load_examples, to_example
from zotune.tasks.data import Example, load_split
from zotune.tasks.squad import exact_match, f1
from zotune.tasks.tasks import TASKS, Task
from zotune.tasks.templates import PromptTemplate, parse_label_words


def text_sentences(text: str, wanted: int, task_name: str) -> tuple[str, ...]:
    """A `zotune predict --text` as its task's `wanted` sentences, tab-separated, none empty."""
    parts = tuple(text.split("\t"))
    if len(parts) != wanted or not all(p.strip() for p in parts):
        raise UserError(f"--text {text!r}: task {task_name} takes {wanted} "
                        f"{'sentences per --text, separated by a tab' if wanted > 1 else 'sentence per --text'}"
                        ", none empty")
    return parts


@dataclass(frozen=True)
class CausalPrompt:
    """A causal task bound to a tokenizer: what its examples are encoded with (tasks/causal.py)."""
    task: CausalTask
    tokenizer: object
    bos: int | None           # the token the tokenizer starts a text with (OPT's </s>, Llama's <s>), if any
    max_length: int | None

    def examples(self, split: str, data_dir: Path | None, k: int, seed: int) -> list[CandidateExample]:
        """A split of the task: the encoder task's k-shot folder <k>-<seed> where the task has one
        (the six encoder tasks), else MeZO's 1,000/500/1,000 sample of `seed` (the SuperGLUE tasks)."""
        return load_examples(self.task.name, split, self.tokenizer, bos=self.bos, data_dir=data_dir,
                             k=k if self.task.kshot else None, seed=seed, max_length=self.max_length)

    def example_from_text(self, text: str) -> CandidateExample:
        """One unlabelled example given as text (`zotune predict --text`): the task's sentences
        tab-separated where it has k-shot fields, else a JSON object of its template's fields."""
        if self.task.fields:
            record = dict(zip(self.task.fields, text_sentences(text, len(self.task.fields), self.task.name)))
        else:
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                raise UserError(f"--text {text[:40]!r}: task {self.task.name} takes a JSON object of its template's "
                                f"fields per --text, e.g. as a line of its data/mezo-large sample")
        if self.task.generation:  # the answer is what predict generates: an empty one only completes the template
            example = to_example(self.task, {**record, "answers": [""]}, self.tokenizer, self.bos, self.max_length)
            return CandidateExample(example.prompt_ids, (), None)
        return to_example(self.task, {**record, "label": None}, self.tokenizer, self.bos, self.max_length)

    def candidate_texts(self, example: CandidateExample) -> list[str]:
        """The example's continuations as text, in label order: the names predict prints."""
        return [self.tokenizer.decode(list(ids)).strip() for ids in example.candidate_ids]


@dataclass
class Prompted:
    """A task bound to a tokenizer and a model runner."""
    task: Task | CausalTask
    prompt: PromptTemplate | CausalPrompt
    runner: ModelRunner | CausalRunner


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


def leading_token(tokenizer) -> int | None:
    """The token the tokenizer puts before every text, if any: the bos of a causal LM's prompt."""
    whole, bare = (tokenizer("a", add_special_tokens=flag)["input_ids"] for flag in (True, False))
    return whole[0] if whole[:1] != bare[:1] else None


def load_causal_prompt(model: str, task_name: str, tokenizer: str | None = None, template: str | None = None,
                       label_words: str | None = None, max_length: int | None = None) -> tuple[CausalTask, CausalPrompt]:
    """The causal task row and its tokenizer: what a causal LM scores a task with."""
    if template is not None or label_words is not None:
        raise UserError("--template and --label-words are masked-LM prompts; a causal LM scores the task's "
                        "candidates (zotune.tasks.causal); drop them")
    if task_name not in CAUSAL_TASKS:
        raise UserError(f"unknown --task {task_name!r} for a causal LM; choose one of {', '.join(CAUSAL_TASKS)}")
    task = CAUSAL_TASKS[task_name]
    model_dir = None if tokenizer else resolve_model_dir(model)
    tok = load_tokenizer(model_dir, tokenizer)
    return task, CausalPrompt(task, tok, leading_token(tok), max_length)


def causal_runner(model, task: CausalTask, device, precision: str = "tf32", cuda_graphs: bool = True) -> CausalRunner:
    """The runner of a causal LM on `task`: the task's scores and objective, prompts shared."""
    return CausalRunner(model, device, precision, length_normalised=task.length_normalised, objective=task.objective,
                        cuda_graphs=cuda_graphs)


def build(model: str, task_name: str, *, tokenizer: str | None = None, template: str | None = None,
          label_words: str | None = None, max_length: int | None = None, device: str = "auto",
          precision: str = "tf32", cuda_graphs: bool = True) -> Prompted:
    """A checkpoint as it is (nothing trains) behind a runner: what `eval` and `predict` score with,
    on CUDA through CUDA graphs unless `cuda_graphs` is off."""
    if is_causal_checkpoint(resolve_model_dir(model)):
        task, prompt = load_causal_prompt(model, task_name, tokenizer, template, label_words, max_length)
        where = resolve_device(device)
        return Prompted(task, prompt, causal_runner(load_model(resolve_model_dir(model)).to(where), task, where,
                                                    precision, cuda_graphs))
    task, prompt = load_prompt(model, task_name, tokenizer, template, label_words, max_length)
    where = resolve_device(device)
    runner = ModelRunner(load_model(resolve_model_dir(model)).to(where), prompt.label_word_ids, prompt.mask_id, where,
                         precision, cuda_graphs, prompt.tokenizer.pad_token_id)
    return Prompted(task, prompt, runner)


def encode(prompt: PromptTemplate, examples: list[Example]) -> list[list[int]]:
    return [prompt.encode(e.sentences) for e in examples]


def split_inputs(task: Task | CausalTask, prompt: PromptTemplate | CausalPrompt, data_dir: Path, k: int, seed: int,
                 split: str) -> tuple[list, list]:
    """A split's examples and what a runner packs of them (predict's input): a masked LM's
    encoded prompts, or a causal LM's candidate examples themselves."""
    if isinstance(prompt, CausalPrompt):
        examples = prompt.examples(split, data_dir, k, seed)
        return examples, examples
    examples = load_split(task, data_dir, k, seed, split)
    return examples, encode(prompt, examples)


@torch.inference_mode()
def predict(runner: ModelRunner, sequences: list[list[int]], batch_size: int) -> torch.Tensor:
    """Label-word logits [N, C] for N encoded examples, in order, batch_size sequences per pass;
    a CausalRunner takes the candidate examples themselves and gives their scores."""
    chunks = [runner.logits(runner.pack(sequences[i:i + batch_size]))
              for i in range(0, len(sequences), batch_size)]
    return torch.cat(chunks).float().cpu()


def accuracy(logits: torch.Tensor, examples: list[Example]) -> float | None:
    labels = [e.label for e in examples]
    if not labels or any(label is None for label in labels):
        return None
    return int((logits.argmax(-1) == torch.tensor(labels)).sum()) / len(labels)


@torch.inference_mode()
def predict_candidates(runner: CausalRunner, examples: list[CandidateExample], batch_size: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each candidate's summed log-probability given its prompt and its token count, [N, C] each
    (label order), batch_size examples per pass."""
    chunks = [runner.candidate_logprobs(runner.pack(examples[i:i + batch_size]))
              for i in range(0, len(examples), batch_size)]
    return torch.cat([s for s, _ in chunks]).cpu(), torch.cat([n for _, n in chunks]).cpu()


MAX_NEW_TOKENS = 50  # the reference's max_new_tokens (MeZO large_models/run.py)


def stop_tokens(tokenizer) -> frozenset[int]:
    """What ends a generated answer, as the reference's eos_token_id list: the last token of
    "\\n" alone (its eos_token) and the tokenizer's eos."""
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    return frozenset([newline] + ([] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]))


def generation_prompt(example: CandidateExample, prompt: CausalPrompt, max_new_tokens: int) -> tuple[int, ...]:
    """The example's prompt ids cut from the left, after bos, so that `max_new_tokens` more fit
    in max_length (the reference's encode_prompt truncates a generation prompt so)."""
    if prompt.max_length is None:
        return example.prompt_ids
    head = 0 if prompt.bos is None else 1
    room = prompt.max_length - max_new_tokens - head
    if room < 1:
        raise UserError(f"max_length {prompt.max_length} leaves no room for a prompt and {max_new_tokens} "
                        "generated tokens; raise --max-length")
    return example.prompt_ids[:head] + example.prompt_ids[head:][-room:]


def generation_results(runner: CausalRunner, prompt: CausalPrompt, examples: list[CandidateExample],
                       batch_size: int, max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """Per example, in order: its gold `answers`, the greedy `prediction` (decoded without
    special tokens and stripped, as the reference scores it), and its `f1` and `em`."""
    results = []
    for example, text in zip(examples, generate_answers(runner, prompt, examples, batch_size, max_new_tokens)):
        answers = list(example.answers)
        results.append({"answers": answers, "prediction": text, "f1": f1(text, answers),
                        "em": exact_match(text, answers)})
    return results


def generate_answers(runner: CausalRunner, prompt: CausalPrompt, examples: list[CandidateExample],
                     batch_size: int, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Per example, in order: the greedy answer to its prompt, decoded without special tokens
    and stripped (as the reference scores it)."""
    stop = stop_tokens(prompt.tokenizer)
    prompts = [generation_prompt(e, prompt, max_new_tokens) for e in examples]
    generated = [ids for i in range(0, len(prompts), batch_size)
                 for ids in greedy(runner, prompts[i:i + batch_size], max_new_tokens, stop)]
    return [prompt.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated]


def generation_sums(results: list[dict]) -> dict[str, float]:
    return {"f1": sum(r["f1"] for r in results), "em": sum(r["em"] for r in results)}


def metric_names(prompt: PromptTemplate | CausalPrompt) -> tuple[str, ...]:
    """The metrics a task is scored by, the one dev selection uses first."""
    return ("f1", "em") if isinstance(prompt, CausalPrompt) and prompt.task.generation else ("accuracy",)


def metric_sums(runner: ModelRunner | CausalRunner, prompt: PromptTemplate | CausalPrompt, examples: list,
                inputs: list, batch_size: int) -> dict[str, float]:
    """Each metric of `metric_names` summed over labelled examples (their mean is the split's
    score; a data-parallel rank's sums add up with the others'): correct predictions, or the
    generated answers' F1 and EM. `inputs` is what the runner packs (split_inputs)."""
    if not examples:
        return dict.fromkeys(metric_names(prompt), 0.0)
    if metric_names(prompt)[0] == "f1":
        return generation_sums(generation_results(runner, prompt, examples, batch_size))
    labels = torch.tensor([e.label for e in examples])
    return {"accuracy": float((predict(runner, inputs, batch_size).argmax(-1) == labels).sum())}


def write_generations(path: Path, results: list[dict]) -> None:
    """generation_results as one JSON line per example, in file order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in results))


def write_predictions(path: Path, logits: torch.Tensor, examples: list[Example], extra: dict | None = None) -> None:
    """One JSON line per example, in file order: label (null if unlabelled), pred (the argmax of
    `logits`), and each `extra` name's row; by default the logits themselves. A causal LM's
    `extra` is its candidate_logprobs (summed, label order) and candidate_tokens."""
    extra = {"logits": logits} if extra is None else extra
    columns = {name: values.tolist() for name, values in extra.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(
        json.dumps({"label": example.label, "pred": int(max(range(len(row)), key=row.__getitem__)),
                    **{name: values[i] for name, values in columns.items()}}) + "\n"
        for i, (example, row) in enumerate(zip(examples, logits.tolist()))))


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
