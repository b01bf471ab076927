"""The trajectory log: a MeZO run as base weights plus a few bytes per step (issue 7).

A MeZO trajectory is fully determined by the base model and, per step, the direction seeds,
the projected gradients g_j and the learning rate: z is regenerated from the seed
(`optim/rng.py`), and the update is `optim/mezo.py`'s sweeps. So `RUN/trajectory.jsonl`
holds everything needed to rebuild the fine-tuned tensors without data or forward passes
(`replay`), and to continue a killed run (`train --resume`, with `RUN/snapshot.safetensors`
to skip most of the replay).

Format (JSON lines, append-only, version 1):
  line 1  {"format": "zotune-trajectory", "version": 1, "config": TrainConfig.to_dict(),
           "model_sha256": ..., "layout": [[name, shape, decay], ...], "numel": N, "n_decay": D,
           "initial_sha256": sha256 of the initial trainable tensors (float32 bytes in layout order)}
  then    {"step": s, "seeds": [...], "grads": ["3c23d70a", ...], "lr": 0.01, "loss": "3f317218",
           "skipped": false}   one per optimizer step, s = 1, 2, ... (the update count after it)
grads and loss are float32 bit patterns in hex, so they round-trip exactly (a decimal float
would need care); lr is the Python float the step used (JSON floats round-trip exactly).
A last line without its newline is a write cut short by a kill and is ignored; any other
damaged line is an error (read_log checks every field of every record).
"""

import functools
import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from zotune.config import ADDED_FIELDS, TrainConfig, read_run_config
from zotune.errors import UserError
from zotune.files import save_tensors_atomic, write_text_atomic
from zotune.model.loading import resolve_model_dir, weight_files
from zotune.optim.flat import FlatParameters
from zotune.optim.mezo import direction_seed, replay_step

FORMAT, VERSION = "zotune-trajectory", 1
LOG_NAME, SNAPSHOT_NAME = "trajectory.jsonl", "snapshot.safetensors"


def model_sha256(model: str) -> str:
    """sha256 over the checkpoint's weight files (names and bytes), read in 1 MiB blocks; read
    once in a process while the files keep their size and modification time (a resumed run
    checks --model's, then pins the run's header, on the same files)."""
    files = [(f.name, str(f.resolve()), f.stat()) for f in weight_files(resolve_model_dir(model))]
    return _files_sha256(tuple((name, path, st.st_size, st.st_mtime_ns) for name, path, st in files))


@functools.lru_cache(maxsize=16)
def _files_sha256(files: tuple[tuple[str, str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, path, _, _ in files:
        digest.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def make_header(config: dict, model_hash: str, flat: FlatParameters) -> dict:
    """`flat` must hold the initial trainable tensors: their sha256 is pinned too (LoRA's A and
    the prefix are computed, and a replay must start from the very same bits)."""
    decay = [offset < flat.n_decay for offset in flat.offsets]
    layout = [[name, list(shape), d] for name, shape, d in zip(flat.names, flat.shapes, decay)]
    return {"format": FORMAT, "version": VERSION, "config": config, "model_sha256": model_hash,
            "layout": layout, "numel": flat.numel, "n_decay": flat.n_decay,
            "initial_sha256": hashlib.sha256(flat.buffer.detach().cpu().numpy().tobytes()).hexdigest()}


def check_initial(header: dict, expected: dict, run_dir: Path):
    """The initial trainable tensors built now must be the logged run's, bit for bit (logs
    written before this field existed are not checked)."""
    logged = header.get("initial_sha256")
    if logged is not None and logged != expected["initial_sha256"]:
        raise UserError(f"the initial trainable tensors built here differ from those {run_dir} started from "
                        f"(sha256 {expected['initial_sha256'][:12]} != logged {logged[:12]}); this zotune or torch "
                        f"builds the subset differently, use the version that wrote the run")


def to_hex(values: torch.Tensor) -> list[str]:
    bits = values.detach().to("cpu", torch.float32).reshape(-1).numpy().view(np.uint32)
    return [f"{int(b):08x}" for b in bits]


def from_hex(words: list[str]) -> torch.Tensor:
    return torch.from_numpy(np.array([int(w, 16) for w in words], dtype=np.uint32).view(np.float32))


class TrajectoryWriter:
    """Appends step records. Steps hand in device tensors; they are copied to the host in one
    transfer at `write()` (called at the training loop's log points), so a step never syncs."""

    def __init__(self, path: Path | None, header: dict | None = None):
        """path None: keep the bad-step bookkeeping but write nothing (ranks other than 0)."""
        if header is not None and path is not None:  # a fresh log
            path.write_text(json.dumps(header) + "\n")
        self.file = open(path if path is not None else os.devnull, "a")
        self.pending = []  # (step, seeds, lr, grads [n] on the device, loss 0-dim on the device)
        self.bad_streak = self.worst_streak = 0
        self.bad_total = 0

    def add(self, step: int, seeds: list[int], lr: float, grads: torch.Tensor, loss: torch.Tensor):
        self.pending.append((step, seeds, lr, grads, loss))

    def count(self, record: dict):
        """Bad-step bookkeeping, also used to recount a resumed run's records."""
        self.bad_streak = self.bad_streak + 1 if record["skipped"] else 0
        self.worst_streak = max(self.worst_streak, self.bad_streak)  # a streak between log points counts too
        self.bad_total += record["skipped"]

    def write(self):
        """Write the pending records and hand them to the OS (a SIGKILL then loses nothing)."""
        if not self.pending:
            return
        values = torch.cat([t.reshape(-1).float() for _, _, _, g, loss in self.pending
                            for t in (g, loss)]).cpu()  # one launch, one transfer
        words, finite = to_hex(values), torch.isfinite(values).tolist()  # at once: a write holds log_steps steps
        at = 0
        for step, seeds, lr, _, _ in self.pending:
            n = len(seeds)
            record = {"step": step, "seeds": seeds, "grads": words[at:at + n], "lr": lr, "loss": words[at + n],
                      "skipped": not all(finite[at:at + n])}
            at += n + 1
            self.count(record)
            self.file.write(json.dumps(record) + "\n")
        self.pending = []
        self.file.flush()

    def sync(self):
        """write() and fsync: the records survive a power loss too."""
        self.write()
        if self.file.name != os.devnull:
            os.fsync(self.file.fileno())

    def close(self):
        try:
            self.sync()
        finally:
            self.file.close()


def read_header(run_dir: Path) -> dict:
    """The log's header line, checked as read_log checks it (a UserError if it is not whole)."""
    path = Path(run_dir) / LOG_NAME
    try:
        with open(path) as log:
            first = log.readline()
    except OSError:
        raise UserError(f"{run_dir} has no readable {LOG_NAME}; give the directory of a MeZO run") from None
    return _checked_header(path, first.removesuffix("\n") if first.endswith("\n") else None)


def _checked_header(path: Path, line: str | None) -> dict:
    try:
        header = json.loads(line)
    except (TypeError, json.JSONDecodeError):
        raise UserError(f"{path} has no readable header; the run cannot be resumed or replayed") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise UserError(f"{path} is not a {FORMAT} version {VERSION} log; replay it with the zotune that wrote it")
    if not (isinstance(header.get("config"), dict) and isinstance(header.get("model_sha256"), str)
            and isinstance(header.get("layout"), list) and isinstance(header["config"].get("seed"), int)):
        raise UserError(f"{path} line 1 is not a complete header; the run cannot be resumed or replayed")
    return header


def read_log(run_dir: Path) -> tuple[dict, list[dict]]:
    """(header, complete step records 1..r). A torn last line is dropped."""
    path = Path(run_dir) / LOG_NAME
    if not path.is_file():
        raise UserError(f"{run_dir} has no {LOG_NAME}; give the directory of a MeZO run started by this version")
    complete = path.read_text().split("\n")[:-1]  # the text after the last newline is empty or a torn write
    header = _checked_header(path, complete[0] if complete else None)
    records = []
    for number, line in enumerate(complete[1:], start=2):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        problem = _record_problem(record, len(records) + 1, header["config"]["seed"], records[0] if records else None)
        if problem:
            raise UserError(f"{path} line {number} is corrupted ({problem}); the log cannot be trusted past step "
                            f"{len(records)}: restore it, or cut it to its first {len(records) + 1} lines to "
                            f"resume from step {len(records)}")
        records.append(record)
    return header, records


_HEX_WORD = re.compile(r"[0-9a-f]{8}")


def _record_problem(record, step: int, run_seed: int, first: dict | None) -> str | None:
    """What is wrong with a step record, or None: every field of every record is checked, the
    seeds against the run's (a pure function of seed, step and direction)."""
    if not isinstance(record, dict) or set(record) != {"step", "seeds", "grads", "lr", "loss", "skipped"}:
        return "not a step record"
    if record["step"] != step or isinstance(record["step"], bool):
        return f"holds step {record['step']!r}, expected {step}"
    seeds, grads = record["seeds"], record["grads"]
    if not isinstance(seeds, list) or not seeds or (first is not None and len(seeds) != len(first["seeds"])):
        return "bad seeds"
    if seeds != [direction_seed(run_seed, step - 1, j) for j in range(len(seeds))]:
        return "seeds are not this run's"
    if not isinstance(grads, list) or len(grads) != len(seeds) or not all(
            isinstance(w, str) and _HEX_WORD.fullmatch(w) for w in [*grads, record["loss"]]):
        return "bad grads or loss"
    lr = record["lr"]
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
        return "bad lr"
    if not isinstance(record["skipped"], bool):
        return "bad skipped"
    return None


def rewrite_log(run_dir: Path, header: dict, records: list[dict]):
    """Replace the log by header + records, atomically (temp file + rename)."""
    write_text_atomic(Path(run_dir) / LOG_NAME, "".join(json.dumps(r) + "\n" for r in [header, *records]), fsync=True)


def check_header(header: dict, expected: dict, run_dir: Path):
    """A resume must continue the same run: same config (where the run and its base checkpoint
    live aside), same base weights, same trainable layout. Each difference is a one-line
    UserError."""
    skip = {"output_dir", "overwrite", "quiet", "recipe", "model"}  # the model's identity: its sha256, below
    logged = {k: v for k, v in {**ADDED_FIELDS, **header["config"]}.items() if k not in skip}
    now = {k: v for k, v in expected["config"].items() if k not in skip}
    if logged != now:
        changed = sorted(k for k in logged.keys() | now.keys() if logged.get(k) != now.get(k))
        raise UserError(f"{run_dir}/config.json differs from the trajectory log in {', '.join(changed)}; "
                        f"restore the run's config or start a new run")
    if header["model_sha256"] != expected["model_sha256"]:
        raise _not_the_runs_model(expected["config"]["model"], expected["model_sha256"], header["model_sha256"])
    if header["layout"] != expected["layout"]:
        raise UserError(f"the trainable tensors differ from the logged layout in {run_dir}; "
                        f"this zotune selects a different subset, use the version that wrote the run")
    check_initial(header, expected, run_dir)


def write_snapshot(run_dir: Path, flat: FlatParameters, step: int):
    """The trainable tensors after `step`, written atomically (temp file + rename)."""
    save_tensors_atomic(Path(run_dir) / SNAPSHOT_NAME, flat.state_dict(), metadata={"step": str(step)})


def read_snapshot(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]] | None:
    path = Path(run_dir) / SNAPSHOT_NAME
    if not path.is_file():
        return None
    try:
        with safe_open(path, "pt") as f:
            return int((f.metadata() or {})["step"]), {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # truncated or corrupted files raise several types
        raise UserError(f"cannot read {path} ({type(exc).__name__}); the snapshot is damaged: delete it and resume "
                        f"again (the trajectory log alone rebuilds the run, more slowly)") from None


def replay(flat: FlatParameters, records: list[dict], eps: float, weight_decay: float):
    """Apply logged steps to `flat` (which must hold the weights before the first of them)."""
    for record in records:
        replay_step(flat, record["seeds"], from_hex(record["grads"]), eps, record["lr"], weight_decay)


def restore(flat: FlatParameters, run_dir: Path, records: list[dict], eps: float, weight_decay: float,
            rebuild: tuple[int, Path] | None = None):
    """Bring `flat` (holding the initial trainable tensors) to the state after the last record:
    load the latest snapshot not past the log, then replay the records after it. `rebuild`
    (step, path): also write the tensors after that step to path, on the way; for a run whose
    best-dev weights were left behind (its small files brought to another machine), the log
    rebuilds them as it does the rest."""
    stop = len(records) if rebuild is None else rebuild[0]
    start = 0
    snapshot = read_snapshot(run_dir)
    if snapshot is not None and snapshot[0] <= stop:  # a snapshot past the log (or the rebuild) is ignored
        start = snapshot[0]
        flat.load_({n: t.to(flat.buffer.device) for n, t in snapshot[1].items()})
    if rebuild is not None:
        replay(flat, records[start:stop], eps, weight_decay)
        save_tensors_atomic(rebuild[1], flat.state_dict())
        start = stop
    replay(flat, records[start:], eps, weight_decay)


def check_base_model(header: dict, model: str) -> str:
    """`model`'s sha256, which must be the one the run's log `header` pinned."""
    model_hash = model_sha256(model)
    if model_hash != header["model_sha256"]:
        raise _not_the_runs_model(model, model_hash, header["model_sha256"])
    return model_hash


def _not_the_runs_model(model: str, model_hash: str, logged_hash: str) -> UserError:
    return UserError(f"base model {model} is not the one the run started from (sha256 {model_hash[:12]} != "
                     f"logged {logged_hash[:12]}); give the original checkpoint's folder with --model")


def run_config_here(run_dir: str | Path, model: str | None = None) -> TrainConfig:
    """The run's config.json, its base checkpoint where it lies on this machine: `model` (--model,
    for a run moved from another machine; a MeZO run's log pins its weights by sha256, checked
    here, before anything reads the checkpoint's tokenizer or tensors), else the recorded one,
    which must be here."""
    cfg = read_run_config(run_dir)
    if model is not None:
        if (Path(run_dir) / LOG_NAME).is_file():
            check_base_model(read_header(run_dir), model)
        cfg.model = model
        return cfg
    try:
        resolve_model_dir(cfg.model)
    except UserError:
        raise UserError(f"{run_dir} was trained from {cfg.model}, which is not on this machine; give that "
                        f"checkpoint's folder with --model DIR") from None
    return cfg


def replay_run(run_dir: Path, output_dir: Path, model: str | None = None) -> dict:
    """`zotune replay`: the fine-tuned trainable tensors from the base model and the log alone
    (no data, no forward passes), on the CPU, written to output_dir/trainable.safetensors."""
    from zotune.session import flatten, load_trainable

    run_dir = Path(run_dir)
    header, records = read_log(run_dir)
    cfg = TrainConfig.from_dict({**header["config"], "model": model or header["config"]["model"]})
    model_hash = check_base_model(header, cfg.model)
    _, trainable = load_trainable(cfg)  # the run's subset: LoRA's A and the prefix come from cfg.seed
    flat = flatten(trainable, cfg.decay_all)
    expected = make_header(header["config"], model_hash, flat)
    if expected["layout"] != header["layout"]:
        raise UserError(f"the trainable tensors differ from the layout logged in {run_dir}; "
                        f"replay with the zotune version that wrote the run")
    check_initial(header, expected, run_dir)
    with torch.inference_mode():
        replay(flat, records, cfg.eps, cfg.weight_decay)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    out = save_tensors_atomic(output_dir / "trainable.safetensors", flat.state_dict(),
                              metadata={"step": str(len(records))})
    return {"written": str(out), "tensors": len(flat.names), "parameters": flat.numel, "steps": len(records),
            "skipped_steps": sum(r["skipped"] for r in records), "trainable": cfg.trainable,
            "base_model": cfg.model}
