"""Run configuration: every field declared once (the CLI's flags are generated from them, see
cli.py), and the named recipes a run starts from.

Recipes (--recipe; `demo` unless another is named, whatever else is given):
  demo        a short MeZO run on 2 CPU cores with the project's own model, SST-2 k=16, seed 42,
              training the top layer and the MLM head (the trunk cache serves the five layers
              below): what `zotune train` with no arguments runs. lr from {1e-4, 2e-4, 3e-4,
              5e-4} at 100 steps on this split's dev set (all four tie at 90.6 %; the smallest
              was taken; benchmarks/RESULTS.md, session 11)
  mezo-paper  the MeZO paper's recipe for RoBERTa-large (princeton-nlp/MeZO
              medium_models/mezo.sh: batch 64, lr 1e-6, eps 1e-3, 100,000 steps, dev every
              10,000, constant schedule, no weight decay, every parameter)
  ft-paper    the backprop baseline, LM-BFF's fine-tuning recipe (AdamW, lr 1e-5, batch 8,
              1,000 steps, linear decay), the "FT" column of the MeZO paper
Precedence: field defaults < recipe < --config JSON < flags.
"""

import json
import math
import types
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from zotune.errors import UserError
from zotune.shipped import DEFAULT_MODEL_NAME, SHIPPED_MODELS

DEFAULT_MODEL = SHIPPED_MODELS[DEFAULT_MODEL_NAME]

RECIPES = {
    "demo": dict(optimizer="mezo", task="sst2", k=16, seed=42, trainable="top:1", steps=100, lr=1e-4, eps=1e-3,
                 batch_size=32, eval_steps=10, device="cpu"),  # the schedule: its optimizer's (below)
    "mezo-paper": dict(optimizer="mezo", trainable="full", lr=1e-6, eps=1e-3, batch_size=64, steps=100_000,
                       eval_steps=10_000, schedule="constant", weight_decay=0.0),
    "ft-paper": dict(optimizer="adam", trainable="full", lr=1e-5, batch_size=8, steps=1_000, eval_steps=100,
                     schedule="linear", weight_decay=0.0),
}
DEFAULT_RECIPE = "demo"
# What neither the recipe nor the flags set comes from the optimizer's paper recipe: so `--optimizer
# adam` over the demo decays its lr linearly, as the reference's fine-tuning does.
_PER_OPTIMIZER = ("lr", "batch_size", "steps", "eval_steps", "schedule")
OPTIMIZER_DEFAULTS = {"mezo": {k: RECIPES["mezo-paper"][k] for k in _PER_OPTIMIZER},
                      "adam": {k: RECIPES["ft-paper"][k] for k in _PER_OPTIMIZER}}


def option(default, help: str, choices: tuple | None = None, flag: str | None = None):
    """A config field with its --help text (and choices, or a flag name other than --<name>)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


@dataclass
class TrainConfig:
    recipe: str | None = option(None, "the named recipe the values started from (printed, not used)",
                                tuple(RECIPES))
    model: str = option(DEFAULT_MODEL_NAME, f"checkpoint directory, Hub id, or {DEFAULT_MODEL_NAME} (this "
                                            f"repository's models/{DEFAULT_MODEL_NAME})")
    tokenizer: str | None = option(None, "tokenizer directory (default: the model's)")
    task: str = option("sst2", "sst2, sst5, trec, mnli, snli or rte; a causal LM (OPT, Llama) also cb, copa, "
                               "wic, wsc, multirc, boolq")
    k: int = option(16, "examples per label in the k-shot split (16 or 512 shipped); a causal LM's SuperGLUE "
                        "task reads MeZO's 1000/500/1000 sample of --seed instead")
    seed: int = option(42, "data split seed (LM-BFF's 13, 21, 42, 87, 100) and run seed")
    data_dir: str | None = option(None, "folder holding <TASK>/k-shot-1k-test/<k>-<seed>/ (default: data/, "
                                        "or $ZOTUNE_DATA_DIR)")
    output_dir: str | None = option(None, "run directory (default: runs/<task>-k<k>-<seed>-<optimizer>-<trainable>)")
    optimizer: str = option("mezo", "MeZO (forward only) or Adam (backprop baseline)", ("mezo", "adam"))
    trainable: str = option("full", "full, bias, lora, lora+head (the MeZO paper's LoRA), prefix or top:K")
    layers: tuple[int, ...] | None = option(None, "comma-separated layers for bias/lora/prefix, e.g. 20,21,22,23")
    lora_rank: int = option(8, "LoRA rank")
    lora_alpha: float = option(16.0, "LoRA alpha")
    num_prefix: int = option(5, "prefix tokens per layer")
    steps: int | None = option(None, "optimizer steps")
    lr: float | None = option(None, "learning rate")
    eps: float = option(1e-3, "MeZO perturbation scale")
    batch_size: int | None = option(None, "examples per step")
    weight_decay: float = option(0.0, "weight decay (not on biases and LayerNorm weights)")
    decay_all: bool = option(False, "also decay biases and LayerNorm weights (MeZO excludes them)")
    max_grad_norm: float = option(1.0, "Adam: clip the gradients' total norm to this before each step, as "
                                       "the reference's HF Trainer does (0: off); MeZO ignores it")
    schedule: str | None = option(None, "learning-rate schedule", ("constant", "linear"))
    n_spsa: int = option(1, "perturbation directions per step, averaged")
    # Under torchrun: None = data parallel (the batch is split across ranks); d = each rank
    # measures d directions of its own on the whole batch (N ranks: N*d-direction SPSA).
    directions_per_rank: int | None = option(None, "under torchrun: each rank measures this many directions of "
                                                   "its own instead of splitting the batch")
    sync_check: int = option(100, "under torchrun: compare weight checksums every N steps")
    dist_timeout: float = option(120.0, "under torchrun: seconds a collective waits for a dead rank")
    eval_steps: int | None = option(None, "dev evaluation every N steps")
    select_steps: int | None = option(None, "best-dev selection among the evaluations at multiples of N steps (and "
                                            "the last) only, as MeZO's mezo.sh selects every 10,000 while dev is "
                                            "still logged every --eval-steps (default: every evaluation)")
    log_steps: int = option(10, "a metrics line every N steps")
    log_every: int = option(100, "fsync RUN/trajectory.jsonl every N steps")
    snapshot_every: int = option(1000, "snapshot the trainable tensors every N steps, for --resume")
    max_bad_steps: int = option(10, "end the run early after N NaN/Inf-loss steps in a row")
    max_loss_ratio: float = option(100.0, "end the run early, as diverged, when a metrics line's loss exceeds "
                                          "this multiple of the first one's (or of 1, if that is smaller)")
    eval_batch_size: int = option(64, "sequences per evaluation forward")
    template: str | None = option(None, "LM-BFF template, e.g. '*cls**sent_0*_It_was*mask*.*sep+*'")
    label_words: str | None = option(None, "'terrible,great' (in label order) or a JSON object label -> word")
    max_length: int | None = option(None, "truncate prompts to this many tokens")
    cache: bool = option(True, "reuse the frozen trunk's hidden states (results do not change)")
    cache_budget: str = option("1G", "memory for cached hidden states, e.g. 512M or 2G")
    cache_spill: bool = option(False, "on a GPU, evict cache entries to host memory")
    pair: bool = option(True, "run each direction's +eps and -eps passes as one batch where the subset allows")
    device: str = option("auto", "auto, cpu or cuda")
    precision: str = option("tf32", "GPU matmul precision; the weights stay float32",
                            ("tf32", "bf16", "float32"))
    cuda_graphs: bool = option(True, "on CUDA, replay captured forward passes")
    quiet: bool = option(False, "no progress bar")
    tensorboard: bool = option(False, "also log metrics for TensorBoard (RUN/tensorboard)")
    overwrite: bool = option(False, "replace an existing run directory")

    @classmethod
    def from_recipe(cls, name: str, values: dict) -> "TrainConfig":
        """The recipe `name` with `values` over it."""
        if not isinstance(name, str) or name not in RECIPES:
            raise UserError(f"unknown --recipe {name!r}; choose one of {', '.join(RECIPES)}")
        return cls.from_dict({**RECIPES[name], "recipe": name, **values})

    def selects(self, step: int) -> bool:
        """Whether the dev evaluation at `step` takes part in best-dev selection (--select-steps)."""
        return self.select_steps is None or step % self.select_steps == 0 or step == self.steps

    def changed_from_recipe(self) -> list[str]:
        """The recipe's fields this run departs from (flags or --config over it): the start line
        names them, so that `recipe demo` beside 100,000 steps reads as what it is."""
        return [name for name, value in RECIPES.get(self.recipe, {}).items() if getattr(self, name) != value]

    def __post_init__(self):
        for f in fields(self):  # a --config file can hold any JSON value: check each against its declaration
            setattr(self, f.name, _checked(f, getattr(self, f.name)))
        if self.optimizer not in OPTIMIZER_DEFAULTS:
            raise UserError(f"unknown --optimizer {self.optimizer!r}; use mezo or adam")
        for name, value in OPTIMIZER_DEFAULTS[self.optimizer].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        checks = [
            (self.steps >= 0, f"--steps {self.steps} is negative; give 0 or more"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size} must be at least 1"),
            (self.eval_batch_size >= 1, f"--eval-batch-size {self.eval_batch_size} must be at least 1"),
            (self.lr >= 0, f"--lr {self.lr} is negative; MeZO and Adam need lr >= 0"),
            (self.eps > 0, f"--eps {self.eps} must be positive (MeZO perturbs by eps * z)"),
            (self.weight_decay >= 0, f"--weight-decay {self.weight_decay} is negative"),
            (self.max_grad_norm >= 0, f"--max-grad-norm {self.max_grad_norm} is negative; give 0 (off) or more"),
            (self.n_spsa >= 1, f"--n-spsa {self.n_spsa} must be at least 1"),
            (self.directions_per_rank is None or self.directions_per_rank >= 1,
             f"--directions-per-rank {self.directions_per_rank} must be at least 1"),
            (self.sync_check >= 1, f"--sync-check {self.sync_check} must be at least 1"),
            (self.dist_timeout > 0, f"--dist-timeout {self.dist_timeout} must be positive"),
            (self.eval_steps >= 1, f"--eval-steps {self.eval_steps} must be at least 1"),
            (self.select_steps is None or (self.select_steps >= 1 and self.select_steps % self.eval_steps == 0),
             f"--select-steps {self.select_steps} must be a multiple of --eval-steps {self.eval_steps}"),
            (self.log_steps >= 1, f"--log-steps {self.log_steps} must be at least 1"),
            (self.log_every >= 1, f"--log-every {self.log_every} must be at least 1"),
            (self.snapshot_every >= 1, f"--snapshot-every {self.snapshot_every} must be at least 1"),
            (self.max_bad_steps >= 1, f"--max-bad-steps {self.max_bad_steps} must be at least 1"),
            (self.max_loss_ratio > 1, f"--max-loss-ratio {self.max_loss_ratio} must be more than 1"),
            (self.k >= 1, f"--k {self.k} must be at least 1"),
            (self.seed >= 0, f"--seed {self.seed} is negative; give 0 or more"),
            (self.lora_rank >= 1, f"--lora-rank {self.lora_rank} must be at least 1"),
            (self.lora_alpha > 0, f"--lora-alpha {self.lora_alpha} must be positive"),
            (self.num_prefix >= 1, f"--num-prefix {self.num_prefix} must be at least 1"),
            (self.max_length is None or self.max_length >= 1, f"--max-length {self.max_length} must be at least 1"),
            (self.layers is None or len(self.layers) > 0, "--layers is empty; name at least one layer"),
            (self.schedule in ("constant", "linear"), f"unknown --schedule {self.schedule!r}; use constant or linear"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        self._check_subset_options()
        self.cache_budget_bytes = parse_bytes(self.cache_budget)
        if self.output_dir is None:
            name = f"{self.task}-k{self.k}-{self.seed}-{self.optimizer}-{self.trainable.replace(':', '')}"
            self.output_dir = str(Path("runs") / name)

    def _check_subset_options(self):
        """An option of a subset other than the chosen one would be silently ignored: refuse it."""
        subset = self.trainable.split(":")[0]
        if self.layers is not None and subset in ("full", "top"):
            raise UserError(f"--layers applies to bias, lora and prefix, not --trainable {self.trainable}; drop it")
        for name, owner in (("lora_rank", "lora"), ("lora_alpha", "lora"), ("num_prefix", "prefix")):
            default = next(f.default for f in fields(self) if f.name == name)
            if getattr(self, name) != default and not subset.startswith(owner):
                raise UserError(f"--{name.replace('_', '-')} applies to --trainable {owner} only, not "
                                f"{self.trainable}; drop it")

    def to_dict(self) -> dict:
        values = asdict(self)
        values.pop("cache_budget_bytes", None)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)


def _checked(f, value):
    """`value` if it is what field `f` declares (an int may stand for a float, a whole float for
    an int, a list for the layers tuple); else a UserError naming the field. Floats must be finite."""
    kinds = f.type.__args__ if isinstance(f.type, types.UnionType) else (f.type,)
    name = "--" + f.name.replace("_", "-")
    if value is None and type(None) in kinds:
        return value
    if bool in kinds:
        if isinstance(value, bool):
            return value
        raise UserError(f"{name} must be true or false, not {value!r}")
    if int in kinds and not isinstance(value, bool) and isinstance(value, (int, float)):
        if isinstance(value, float) and not value.is_integer():
            raise UserError(f"{name} {value!r} must be a whole number")
        return int(value)
    if float in kinds and not isinstance(value, bool) and isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise UserError(f"{name} {value!r} must be a finite number")
        return float(value)
    if str in kinds and isinstance(value, str):
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        return value
    if f.name == "layers" and isinstance(value, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in value):
        return tuple(value)
    wanted = " or ".join("null" if k is type(None) else "a list of integers" if k is not str and f.name == "layers"
                         else {int: "an integer", float: "a number", str: "a string"}[k] for k in kinds)
    raise UserError(f"{name} must be {wanted}, not {json.dumps(value, default=repr)}")


def parse_bytes(text: str) -> int:
    """'512M', '2G', '1.5G' or a plain number of bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = str(text).strip().upper().removesuffix("B").removesuffix("I")
    try:
        if text and text[-1] in units:
            value = float(text[:-1]) * units[text[-1]]
        else:
            value = float(text)
    except ValueError:
        raise UserError(f"--cache-budget {text!r} is not a size; write e.g. 512M or 2G") from None
    if not math.isfinite(value):
        raise UserError(f"--cache-budget {text!r} is not a finite size; write e.g. 512M or 2G")
    if value < 0:
        raise UserError(f"--cache-budget {text!r} is negative")
    return int(value)


# Fields added after runs were already being written, with the value that reproduces a run
# written before each existed (its config.json and trajectory log lack the field).
ADDED_FIELDS = {"pair": False, "recipe": None, "max_grad_norm": 0.0, "select_steps": None}


def read_run_values(run_dir: str | Path) -> dict:
    """A run directory's config.json as written, with ADDED_FIELDS' values where an older run
    lacks them."""
    if not Path(run_dir).is_dir():
        raise UserError(f"cannot read run directory {run_dir}: it does not exist; "
                        "pass the --output-dir of a zotune train run")
    return {**ADDED_FIELDS, **read_json_object(Path(run_dir) / "config.json", "pass the --output-dir of a zotune train run")}


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig a run directory was started with (its config.json)."""
    return TrainConfig.from_dict(read_run_values(run_dir))


def read_json_object(path: str | Path, fix: str) -> dict:
    """A JSON file that must hold one object (a run's config.json, a --config file); anything
    else is a UserError ending with `fix`."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}; {fix}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} holds a JSON {type(values).__name__}, not an object of config fields; {fix}")
    return values
