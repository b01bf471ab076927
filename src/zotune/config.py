"""Run configuration. Defaults are the MeZO paper's recipe for RoBERTa-large
(princeton-nlp/MeZO medium_models/mezo.sh: k=16, batch 64, lr 1e-6, eps 1e-3,
100,000 steps, dev evaluation every 10,000 steps, constant schedule, no weight decay),
so a run with no overrides reproduces the paper's setting.
"""

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from zotune.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO_ROOT / "models" / "zotune-roberta-small"

# The backprop baseline follows LM-BFF's fine-tuning recipe (AdamW, lr 1e-5, batch 8,
# 1,000 steps, linear decay), the "FT" column of the MeZO paper. Fields left at None
# take the optimizer's default.
OPTIMIZER_DEFAULTS = {
    "mezo": dict(lr=1e-6, batch_size=64, steps=100_000, eval_steps=10_000, schedule="constant"),
    "adam": dict(lr=1e-5, batch_size=8, steps=1_000, eval_steps=100, schedule="linear"),
}


@dataclass
class TrainConfig:
    model: str = str(DEFAULT_MODEL)
    tokenizer: str | None = None        # default: the model directory's tokenizer
    task: str = "sst2"
    k: int = 16
    seed: int = 42                      # data split seed (LM-BFF's k-seed folder) and run seed
    data_dir: str | None = None         # default: the repo's data/ (env ZOTUNE_DATA_DIR overrides)
    output_dir: str | None = None       # default: runs/<task>-k<k>-<seed>-<optimizer>-<trainable>
    optimizer: str = "mezo"             # mezo | adam
    trainable: str = "full"             # full | bias | lora | prefix | top:K
    layers: tuple[int, ...] | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    num_prefix: int = 5
    steps: int | None = None
    lr: float | None = None
    eps: float = 1e-3
    batch_size: int | None = None
    weight_decay: float = 0.0
    decay_all: bool = False             # also decay biases and LayerNorm weights (MeZO excludes them)
    schedule: str | None = None         # constant | linear
    n_spsa: int = 1                     # directions per step, averaged
    # Under torchrun: None = data parallel (the batch is split across ranks); d = each rank
    # measures d directions of its own on the whole batch (N ranks: N*d-direction SPSA).
    directions_per_rank: int | None = None
    sync_check: int = 100               # compare a weight checksum across ranks every N steps
    dist_timeout: float = 120.0         # seconds a collective waits for a dead rank before failing
    eval_steps: int | None = None
    log_steps: int = 10
    log_every: int = 100                # fsync RUN/trajectory.jsonl at least this often (steps)
    snapshot_every: int = 1000          # atomic RUN/snapshot.safetensors of the trainable tensors, for --resume
    max_bad_steps: int = 10             # abort after this many NaN/Inf-loss steps in a row
    eval_batch_size: int = 64
    template: str | None = None         # LM-BFF syntax, e.g. *cls**sent_0*_It_was*mask*.*sep+*
    label_words: str | None = None      # "terrible,great" or a JSON mapping label -> word
    max_length: int | None = None
    cache: bool = True                  # reuse the frozen trunk's hidden states where the subset allows
    cache_budget: str = "1G"            # bytes of hidden states the cache may hold (K, M, G suffixes)
    cache_spill: bool = False           # on a GPU, evict to host memory instead of dropping
    pair: bool = True                   # run each direction's ± passes as one batch where the subset allows
                                        # it (all but those training the embeddings, such as full)
    device: str = "auto"
    precision: str = "tf32"             # on CUDA: tf32 matmuls on float32 weights, or bf16 autocast
    cuda_graphs: bool = True            # on CUDA: replay captured forward passes (no launch overhead)
    quiet: bool = False
    tensorboard: bool = False           # also log the metrics for TensorBoard under RUN/tensorboard
    overwrite: bool = False

    def __post_init__(self):
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
            (self.n_spsa >= 1, f"--n-spsa {self.n_spsa} must be at least 1"),
            (self.directions_per_rank is None or self.directions_per_rank >= 1,
             f"--directions-per-rank {self.directions_per_rank} must be at least 1"),
            (self.sync_check >= 1, f"--sync-check {self.sync_check} must be at least 1"),
            (self.dist_timeout > 0, f"--dist-timeout {self.dist_timeout} must be positive"),
            (self.eval_steps >= 1, f"--eval-steps {self.eval_steps} must be at least 1"),
            (self.log_steps >= 1, f"--log-steps {self.log_steps} must be at least 1"),
            (self.log_every >= 1, f"--log-every {self.log_every} must be at least 1"),
            (self.snapshot_every >= 1, f"--snapshot-every {self.snapshot_every} must be at least 1"),
            (self.max_bad_steps >= 1, f"--max-bad-steps {self.max_bad_steps} must be at least 1"),
            (self.k >= 1, f"--k {self.k} must be at least 1"),
            (self.schedule in ("constant", "linear"), f"unknown --schedule {self.schedule!r}; use constant or linear"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        self.cache_budget_bytes = parse_bytes(self.cache_budget)
        if self.output_dir is None:
            name = f"{self.task}-k{self.k}-{self.seed}-{self.optimizer}-{self.trainable.replace(':', '')}"
            self.output_dir = str(Path("runs") / name)

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
        if values.get("layers") is not None:
            values = {**values, "layers": tuple(values["layers"])}
        return cls(**values)


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
    if value < 0:
        raise UserError(f"--cache-budget {text!r} is negative")
    return int(value)


# Fields added after runs were already being written, with the value that reproduces a run
# written before each existed (its config.json and trajectory log lack the field).
ADDED_FIELDS = {"pair": False}


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig a run directory was started with (its config.json)."""
    path = Path(run_dir) / "config.json"
    if not Path(run_dir).is_dir():
        raise UserError(f"cannot read run directory {run_dir}: it does not exist; "
                        "pass the --output-dir of a zotune train run")
    try:
        return TrainConfig.from_dict({**ADDED_FIELDS, **json.loads(path.read_text())})
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}; pass the --output-dir of a zotune train run") from None
