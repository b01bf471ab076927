"""What the two pretraining tools share: tools/pretrain_mlm.py (zotune's default masked LM,
issues 3 and 19) and tools/pretrain_clm.py (a small causal LM, issue 22).

- the corpus: the shipped tasks' training text plus the IMDB reviews, decontaminated by
  tools/corpus.py, shuffled, tokenised with the repository's RoBERTa BPE, packed into blocks;
- the zero-shot SST-2 figures both print (accuracy, AUC, accuracy with a threshold fitted on
  the selection set), whatever scores the model gives;
- the training loop: a fresh permutation of the blocks each epoch, bf16 autocast on a GPU,
  gradient clipping, AdamW with warmup then linear or cosine decay, a step count fitted to a
  time budget, zero-shot evaluations at intervals, and a state that can be saved and resumed;
- saving in Hugging Face format and the parts of the model card about the corpus and curves.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "src"))  # zotune, installed or not
import corpus as corpus_mod  # noqa: E402  (tools/ is not a package)
from zotune.evaluate import fit_threshold  # noqa: E402
from zotune.tasks.data import kshot_folder  # noqa: E402
from zotune.tasks.tasks import TASKS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The repository's one copy of the RoBERTa BPE files (provenance in data/SOURCES.md): the
# shipped model's tokenizer.json. The tools read it before they write a model anywhere.
TOKENIZER_DIR = REPO / "models" / "zotune-roberta-small"
DATA = REPO / "data"

BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 50264
VOCAB = 50265
GREAT, TERRIBLE = 372, 6587  # ' great', ' terrible' (see data/SOURCES.md)
SELECTION, TEST = "512-42/dev", "glue/dev (test)"


# ---------------------------------------------------------------- corpus

def load_tokenizer():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=512)
    assert tok.mask_token_id == MASK and tok.pad_token_id == PAD and len(tok) == VOCAB
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)
    return tok


def load_documents(imdb: Path | None, max_docs: int, seed: int) -> tuple[list[str], corpus_mod.CorpusStats]:
    """Task sentences and (with a path) the decontaminated IMDB reviews, shuffled together."""
    docs, stats = corpus_mod.build_corpus()
    if imdb is not None:
        docs = docs + corpus_mod.drop_reviews_with_heldout(corpus_mod.read_reviews(imdb), stats)
    order = np.random.default_rng(seed).permutation(len(docs))
    docs = [docs[i] for i in order]
    return (docs[:max_docs] if max_docs else docs), stats


def token_stream(docs: list[str], tok, bos_each: bool) -> np.ndarray:
    """Every document's tokens then </s> (after <s> too, with bos_each), concatenated: [T] int32."""
    encoded = tok(docs, add_special_tokens=False)["input_ids"]
    lead = (BOS,) if bos_each else ()
    return np.fromiter((t for ids in encoded for t in (*lead, *ids, EOS)), dtype=np.int32)


def pack_blocks(docs: list[str], tok, block: int) -> np.ndarray:
    """RoBERTa's FULL-SENTENCES blocks: the stream of documents, each ended by </s>, cut into
    rows of block - 1 tokens, each led by <s>: [N, block] int32 (the ragged tail is dropped)."""
    stream = token_stream(docs, tok, bos_each=False)
    n = len(stream) // (block - 1)
    rows = stream[: n * (block - 1)].reshape(n, block - 1)
    return np.concatenate([np.full((n, 1), BOS, dtype=np.int32), rows], axis=1)


def pack_documents(docs: list[str], tok, block: int) -> np.ndarray:
    """Causal-LM blocks: `<s> doc </s> <s> doc </s> ...` cut into rows of `block` tokens:
    [N, block] int32 (the ragged tail is dropped). A document starts with <s> wherever it falls,
    as a prompt scored later does."""
    stream = token_stream(docs, tok, bos_each=True)
    n = len(stream) // block
    return stream[: n * block].reshape(n, block)


def corpus_info(docs: list[str], stats: corpus_mod.CorpusStats, imdb: Path | None, blocks: np.ndarray) -> dict:
    return {"documents": len(docs), "tokens": int(blocks.size), "blocks": len(blocks),
            "stats": dataclasses.asdict(stats), "imdb": str(imdb) if imdb else None}


# ---------------------------------------------------------------- zero-shot SST-2 figures

def read_sst2(path: Path) -> tuple[list[str], list[int]]:
    rows = [r.split("\t") for r in corpus_mod._lines(path)[1:]]
    return [r[0].strip() for r in rows], [int(r[1]) for r in rows]


def eval_sets(small: bool) -> dict[str, tuple[list[str], list[int]]]:
    sets = {
        SELECTION: read_sst2(kshot_folder(TASKS["sst2"], DATA, 512, 42) / "dev.tsv.gz"),
        TEST: read_sst2(DATA / "SST-2/glue/dev.tsv.gz"),
    }
    if small:  # smoke runs: 64 sentences a set
        sets = {k: (s[:: len(s) // 64][:64], l[:: len(l) // 64][:64]) for k, (s, l) in sets.items()}
    return sets


def auc(diff: torch.Tensor, gold: torch.Tensor) -> float:
    """Area under the ROC curve of diff as a score for label 1 (ties count a half)."""
    pos, neg = diff[gold == 1], diff[gold == 0]
    return ((pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean()).item()


def sst2_scores(diffs: dict[str, torch.Tensor], sets: dict[str, tuple[list[str], list[int]]]) -> dict:
    """Per set, from each sentence's score of ' great' minus that of ' terrible': the accuracy of
    its sign, the share predicted ' great', its AUC (signal that a bias can hide), and the accuracy
    with the threshold fitted on the selection set (SELECTION; never on the test set)."""
    golds = {k: torch.tensor(l) for k, (_, l) in sets.items()}
    threshold = fit_threshold(diffs[SELECTION], golds[SELECTION])
    return {k: {"acc": ((d > 0).long() == golds[k]).float().mean().item(),
                "great_share": (d > 0).float().mean().item(), "auc": auc(d, golds[k]),
                "acc_dev_threshold": ((d > threshold).long() == golds[k]).float().mean().item(),
                "n": len(d)} for k, d in diffs.items()}


def scores_line(scores: dict) -> str:
    return "  ".join(f"{k} acc {v['acc']:.3f} auc {v['auc']:.3f} cal {v['acc_dev_threshold']:.3f}"
                     for k, v in scores.items() if isinstance(v, dict))


# ---------------------------------------------------------------- optimisation

def lr_factor(step: int, cfg) -> float:
    """Linear warmup over cfg.warmup_steps, then cfg.schedule ("linear" or "cosine") decay to 0
    at cfg.steps. cfg.steps is read at every step: a time budget may fit it during the warmup."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return 1.0 - t if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))


def make_adamw(model, cfg, device: torch.device, betas: tuple[float, float], eps: float):
    """AdamW with weight decay on matrices and embeddings only, and its lr schedule."""
    decay = [p for p in model.parameters() if p.ndim >= 2]     # matrices and embeddings
    no_decay = [p for p in model.parameters() if p.ndim < 2]   # biases and norm gains
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=betas, eps=eps, fused=device.type == "cuda",
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the training loop

@dataclass
class LoopState:
    """Where a run is: enough, with the model, optimizer, schedule and generator, to resume it."""
    step: int = 0
    order: torch.Tensor | None = None   # this epoch's rows not drawn yet
    loss_sum: float = 0.0               # training loss summed since the last 500-step log
    history: list = field(default_factory=list)      # one entry per evaluation
    last_losses: list = field(default_factory=list)  # mean loss of each 500-step window
    fitted: bool = False                # the step count was fitted to the time budget
    stopped_early: int | None = None    # the step where the overrun guard stopped training
    train_s: float = 0.0                # training seconds, earlier processes included
    ms_per_step: float = 0.0            # as timed for the fit (evaluations excluded)
    processes: int = 0                  # how many processes trained this run (the caller counts)
    paused: bool = False                # stopped by the process's own deadline; resume to go on
    best_step: int | None = None        # with cfg.keep_best: the evaluation of the best selection score
    best_score: float | None = None
    best_weights: dict | None = None    # a CPU copy of that step's state_dict


@dataclass
class Loop:
    """What train_loop drives. loss(rows [B, L] int32) -> scalar loss, run under bf16 autocast on a
    GPU; evaluate(step) -> scores for the history (it logs them)."""
    model: torch.nn.Module
    blocks: torch.Tensor                # [N, L] int32, on the device
    loss: Callable[[torch.Tensor], torch.Tensor]
    evaluate: Callable[[int], dict]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    gen: torch.Generator                # batching (and the MLM's masking) draw from it only
    device: torch.device
    log: Callable[[str], None] = print


def fit_steps(cfg, step: int, per_step: float, end_time: float) -> None:
    """Fix cfg.steps so that training ends by end_time (never inside the warmup)."""
    cfg.steps = max(cfg.warmup_steps, step + int((end_time - time.time()) / per_step))


def train_loop(run: Loop, cfg, state: LoopState, end_time: float = 0.0, stop_at: float = 0.0,
               pause_after: int = 0) -> LoopState:
    """Train from state.step to cfg.steps; state is updated in place and returned.

    end_time (epoch seconds; 0 = none): while the step count is not yet fitted, time the steps
    from 20 steps after the start for cfg.calibration_s (never past the warmup), then fit it so
    that training ends by end_time; stop anyway cfg.overrun_s after end_time. stop_at (epoch
    seconds) or pause_after (steps of this call) pauses instead: state.paused, ready to resume.
    """
    device, log = run.device, run.log
    order = state.order if state.order is not None else torch.empty(0, dtype=torch.long, device=device)
    loss_sum = torch.tensor(state.loss_sum, device=device)
    start, t_calibrated = state.step, None
    run.model.train()
    t_train = time.time()
    while state.step < cfg.steps:
        if len(order) < cfg.batch_size:  # a fresh permutation each epoch; the tail rows wait for the next
            order = torch.randperm(len(run.blocks), device=device, generator=run.gen)
        rows, order = order[: cfg.batch_size], order[cfg.batch_size :]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = run.loss(run.blocks[rows])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip)
        run.opt.step()
        run.sched.step()
        run.opt.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        state.step += 1
        step = state.step

        if end_time and not state.fitted and step == start + 20:  # compilation and warm-up done: time from here
            sync(device)
            t_calibrated = time.time()
        elif end_time and t_calibrated and not state.fitted and (
                time.time() - t_calibrated >= cfg.calibration_s or step == cfg.warmup_steps - 1):
            sync(device)  # fitted inside the warmup, so `--set steps=N` later repeats the schedule
            per_step = (time.time() - t_calibrated) / (step - start - 20)
            fit_steps(cfg, step, per_step, end_time)
            state.fitted, state.ms_per_step = True, 1e3 * per_step
            log(f"calibrated: {1e3 * per_step:.1f} ms a step -> {cfg.steps} steps by the end time")
        if end_time and time.time() > end_time + cfg.overrun_s:
            log(f"stopped at step {step} of {cfg.steps}: {cfg.overrun_s:.0f} s past the end time")
            state.stopped_early = step
            cfg.steps = step
        if step % 500 == 0 or step == cfg.steps:
            n = 500 if step % 500 == 0 else step % 500
            mean = loss_sum.item() / n
            loss_sum.zero_()
            state.last_losses.append(mean)
            log(f"step {step:6d}  loss {mean:.4f}  lr {run.sched.get_last_lr()[0]:.2e}  "
                f"{state.train_s + time.time() - t_train:6.1f}s")
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            scores = run.evaluate(step)
            state.history.append({"step": step, "loss": state.last_losses[-1] if state.last_losses else None, **scores})
            if cfg.keep_best:
                offer_checkpoint(run, state, step, scores)
        if step < cfg.steps and ((stop_at and time.time() > stop_at) or (pause_after and step - start >= pause_after)):
            log(f"paused at step {step} of {cfg.steps}")
            state.paused = True
            break

    sync(device)
    state.train_s += time.time() - t_train
    state.order, state.loss_sum = order, loss_sum.item()
    return state


def selection_score(scores: dict) -> float:
    """What picks among pretrained models, and among one run's evaluations: accuracy on the
    selection set with the threshold fitted on it. The test set never picks."""
    return scores[SELECTION]["acc_dev_threshold"]


def offer_checkpoint(run: Loop, state: LoopState, step: int, scores: dict) -> None:
    """Keep a CPU copy of the weights if their selection score beats every earlier one (a tie
    keeps the earlier weights, trained on fewer steps)."""
    score = selection_score(scores)
    if state.best_score is None or score > state.best_score:
        state.best_step, state.best_score = step, score
        state.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}


def kept_weights(run: Loop, cfg, state: LoopState) -> tuple[int, dict]:
    """After the final evaluation (the last history entry): the step and scores of the weights
    the checkpoint will hold. With cfg.keep_best the best evaluated ones, put back into the
    model; else the last step's."""
    kept = state.history[-1]
    if cfg.keep_best:
        offer_checkpoint(run, state, kept["step"], kept)
        if state.best_step != kept["step"]:
            run.model.load_state_dict(state.best_weights)
        kept = next(h for h in state.history if h["step"] == state.best_step)
        run.log(f"kept the weights of step {kept['step']} (best on {SELECTION}, threshold fitted on it)")
    return kept["step"], {k: v for k, v in kept.items() if k not in ("step", "loss")}


# ---------------------------------------------------------------- checkpoints (resume in a later call)

def save_state(path: Path, run: Loop, state: LoopState, config: dict) -> None:
    """Everything a later process needs to continue exactly: written to a temporary file, then
    renamed, so a call killed while saving leaves the previous state whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"model": run.model.state_dict(), "opt": run.opt.state_dict(), "sched": run.sched.state_dict(),
            "gen": run.gen.get_state(), "config": config,
            "loop": {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}}
    blob["loop"]["order"] = state.order.cpu() if state.order is not None else None
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load_state(path: Path, run: Loop) -> LoopState:
    """Restore what save_state wrote into an already built run; returns its LoopState."""
    blob = torch.load(path, map_location=run.device, weights_only=False)
    run.model.load_state_dict(blob["model"])
    run.opt.load_state_dict(blob["opt"])
    run.sched.load_state_dict(blob["sched"])
    run.gen.set_state(blob["gen"].cpu())
    loop = blob["loop"]
    if loop["order"] is not None:
        loop["order"] = loop["order"].to(run.device)
    return LoopState(**{**loop, "paused": False})


def read_saved_config(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["config"]


# ---------------------------------------------------------------- saving, config, card

def save_hf(model, out: Path, dtype: torch.dtype, shard: str | None = None) -> int:
    """Hugging Face format (config, safetensors, tokenizer files) in `dtype`; returns the bytes
    of safetensors. transformers never splits a tensor, so the 50265 x H embedding's shard is
    bigger than `shard`."""
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", dtype=dtype)
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    load_tokenizer().save_pretrained(out)
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def apply_overrides(cfg, overrides: list[str]):
    """`FIELD=VALUE` strings onto a config dataclass, each value cast to its field's type."""
    for kv in overrides:
        key, value = kv.split("=", 1)
        if not hasattr(cfg, key):
            sys.exit(f"no config field {key!r}; fields: {', '.join(f.name for f in dataclasses.fields(cfg))}")
        field_type = type(getattr(cfg, key))
        setattr(cfg, key, value.lower() in ("1", "true") if field_type is bool else field_type(value))
    return cfg


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def history_table(m: dict, losses: dict[str, str]) -> str:
    """Markdown rows: step, the losses named in `losses` (column title -> history key), then
    acc / AUC / dev-threshold acc of each eval set."""
    sets = list(m["zero_shot"])
    head = "| step | " + "".join(f"{t} | " for t in losses) + " | ".join(
        f"{k} acc | AUC | acc, dev threshold" for k in sets) + " |"
    rule = "|---|" + "---|" * len(losses) + "---|---|---|" * len(sets)
    rows = [f"| {h['step']} | " + "".join(f"{h[k]:.3f} | " for k in losses.values()) + " | ".join(
        f"{pct(h[k]['acc'])} | {h[k]['auc']:.3f} | {pct(h[k]['acc_dev_threshold'])}" for k in sets) + " |"
        for h in m["history"] if all(h.get(k) is not None for k in losses.values())]
    return "\n".join([head, rule, *rows])


def corpus_section(stats: dict) -> str:
    """The model card's corpus table and decontamination notes (from CorpusStats as a dict)."""
    st = stats
    src = "\n".join(f"| {s} | {st['raw'][s]} | {st['kept'].get(s, 0)} |" for s in st["raw"])
    removed = ", ".join(f"{t} {n}" for t, n in st["removed"].items())
    reviews_removed = ", ".join(f"{t} {n}" for t, n in st.get("reviews_removed", {}).items())
    return f"""| source | read | kept |
|---|---|---|
{src}

- **IMDB reviews**: the 100,000 reviews of the Large Movie Review Dataset (Maas et al., ACL 2011;
  text only, no labels), from `../shared/corpus/imdb_reviews.txt.xz` (its SOURCES.md says where
  the copy comes from and how it was processed; it is not in this repository). A review is
  dropped if its match key (lowercased, PTB escapes undone, only a-z0-9 kept) *contains* the key of
  any dev or test sentence of the six tasks that is at least 16 characters long, or equals a
  shorter one: {st['raw']['IMDB reviews'] - st['kept']['IMDB reviews']} reviews (by task, a review counting
  for each task that has its sentence: {reviews_removed}).
- **Task training text**: one sentence per document; exact duplicates dropped
  ({st['duplicates']}), and every line whose key equals that of a dev or test sentence of any task
  removed: {removed}.
- `tests/tools/test_corpus.py` checks both filters, the containment one against a brute-force
  search."""
