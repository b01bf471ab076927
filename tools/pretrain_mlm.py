"""Pretrain zotune's default model: a small RoBERTa masked LM, from scratch (issue 3).

transformers' `RobertaForMaskedLM` is used for pretraining only; zotune's own engine is for MeZO.
Recipe: the real RoBERTa BPE tokenizer (vocab 50265), RoBERTa's dynamic masking (15 % of
non-special tokens; of those 80 % <mask>, 10 % a random token, 10 % unchanged; redrawn every
step), AdamW (betas 0.9/0.98, eps 1e-6, as RoBERTa), linear warmup then linear or cosine
decay, bf16 autocast on GPU, decoder tied to the word embeddings. The corpus is
tools/corpus.py's: training-split text only, one sentence per example (the downstream prompt
wraps one sentence, so the model never sees long packed blocks).

At the end it scores zero-shot SST-2 with the LM-BFF prompt `<s> {sentence} It was <mask> . </s>`,
' great' (372) vs ' terrible' (6587), on k-shot 16-42/dev.tsv (32), 512-42/dev.tsv (1024;
the model-selection set: held out of the corpus, unlike the test set it is fair to pick on)
and glue/dev.tsv (the 872-sentence SST-2 test set of LM-BFF/MeZO).

    python tools/pretrain_mlm.py --out models/zotune-roberta-small      # GPU, < 10 min on an H100
    python tools/pretrain_mlm.py --smoke --out /tmp/smoke               # CPU, seconds
    python tools/pretrain_mlm.py --sweep h256l2,h192l8 --out /tmp/sweep # presets in parallel, one table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus as corpus_mod  # noqa: E402  (tools/ is not a package)

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "tokenizers" / "roberta"
DATA = REPO / "data"

BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 50264
VOCAB = 50265
GREAT, TERRIBLE = 372, 6587  # ' great', ' terrible' (tokenizers/roberta, see data/SOURCES.md)
MAX_CHECKPOINT_BYTES = 30_000_000  # issue 3: "a checkpoint of at most 30 MB"


@dataclass
class PretrainConfig:
    # Architecture. The 50265 x hidden word embedding dominates the size budget: at hidden 256
    # it alone is 12.9M params = 25.7 MB in float16, leaving ~2M params for the encoder. The
    # defaults are the shipped model's (preset h256l2): the sweep in models/zotune-roberta-small/
    # README.md found every size at chance zero-shot, and this one is best on 512-42/dev and the
    # cheapest to run (2 layers) on zotune's CPU default path.
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    ffn: int = 1024
    dropout: float = 0.1
    max_len: int = 128           # tokens per example incl. <s> </s>; longer lines are cut
    # Optimisation (RoBERTa's AdamW betas/eps; lr and batch for a model this small).
    steps: int = 10_000
    batch_size: int = 256        # sentences per step
    lr: float = 1e-3
    warmup_steps: int = 1_000
    schedule: str = "linear"     # "linear" or "cosine" decay after warmup, to 0
    weight_decay: float = 0.01
    clip: float = 1.0
    mask_prob: float = 0.15
    seed: int = 0
    # Each step, a line is encoded with a leading space with this probability. Without it a
    # line's first word is the space-less BPE token ("great", not " great" = 372), so the
    # label words would lose the many phrases that start with them (SST-2 phrases often do).
    prefix_space_prob: float = 0.5
    eval_every: int = 2_500      # zero-shot dev accuracy during training (log only; the last step is kept)
    max_lines: int = 0           # 0 = whole corpus; the smoke mode uses a slice

    def n_params(self) -> int:
        """Parameters saved in the checkpoint (tied decoder counted once)."""
        h, f = self.hidden, self.ffn
        emb = VOCAB * h + 514 * h + h + 2 * h          # words, positions, token type, LayerNorm
        layer = 4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
        head = h * h + h + 2 * h + VOCAB               # dense, LayerNorm, output bias
        return emb + self.layers * layer + head


PRESETS: dict[str, dict] = {
    # name: overrides of PretrainConfig. fp16 size = 2 bytes x n_params().
    "h256l2": dict(hidden=256, layers=2, heads=4, ffn=1024),
    "h256l3f512": dict(hidden=256, layers=3, heads=4, ffn=512),
    "h224l4": dict(hidden=224, layers=4, heads=4, ffn=896),
    "h192l8": dict(hidden=192, layers=8, heads=3, ffn=768),  # 8 layers: 1.5x slower than h256l2 per step
    "h192l10": dict(hidden=192, layers=10, heads=3, ffn=768),
    "h128l8": dict(hidden=128, layers=8, heads=2, ffn=512),
    "smoke": dict(hidden=32, layers=1, heads=2, ffn=64, steps=30, batch_size=16, warmup_steps=5,
                  eval_every=0, max_lines=2_000),
}


# ---------------------------------------------------------------- data

def load_tokenizer():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=512)
    assert tok.mask_token_id == MASK and tok.pad_token_id == PAD and len(tok) == VOCAB
    return tok


def encode_corpus(lines: list[str], tok, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Lines -> ids [2, N, max_len] (padded with <pad>) and lengths [N]; each row is <s> line </s>.

    Variant 0 is the line as is, variant 1 the line with a leading space (see prefix_space_prob).
    lengths is the longer of the two, so a batch cut to it fits either.
    """
    ids = np.full((2, len(lines), max_len), PAD, dtype=np.int64)
    lengths = np.zeros(len(lines), dtype=np.int64)
    for v, texts in enumerate((lines, [" " + l for l in lines])):
        enc = tok(texts, add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"]
        for i, e in enumerate(enc):
            ids[v, i, : len(e)] = e
            lengths[i] = max(lengths[i], len(e))
    return ids, lengths


def epoch_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One shuffled epoch of row indices, batched so that rows of similar length go together.

    Shuffle, cut into pools of 50 batches, sort each pool by length, batch, shuffle the batches:
    random batches with little padding (sentence lengths here run from 3 to 128 tokens).
    """
    order = rng.permutation(len(lengths))
    pool = 50 * batch_size
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def mask_tokens(ids: torch.Tensor, prob: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """RoBERTa's masking: pick `prob` of the non-special tokens; 80 % -> <mask>, 10 % -> random, 10 % kept.

    ids: [B, L]. Returns (inputs [B, L], labels [B, L] with -100 where nothing is predicted).
    Random tokens are drawn from the ordinary vocabulary (ids 4..50263), as fairseq zeroes
    the weights of special symbols.
    """
    special = (ids == BOS) | (ids == PAD) | (ids == EOS)
    u = torch.rand(ids.shape, device=ids.device, generator=gen)
    picked = (u < prob) & ~special
    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    v = torch.rand(ids.shape, device=ids.device, generator=gen)
    random_ids = torch.randint(4, MASK, ids.shape, device=ids.device, generator=gen)
    inputs = torch.where(picked & (v < 0.8), torch.full_like(ids, MASK), ids)
    inputs = torch.where(picked & (v >= 0.8) & (v < 0.9), random_ids, inputs)
    return inputs, labels


# ---------------------------------------------------------------- zero-shot prompt scorer

def read_sst2(path: Path) -> tuple[list[str], list[int]]:
    rows = [r.split("\t") for r in corpus_mod._lines(path)[1:]]
    return [r[0].strip() for r in rows], [int(r[1]) for r in rows]


def prompt_ids(sentence: str, tok) -> list[int]:
    """LM-BFF SST-2 template `*cls**sent_0*_It_was*mask*.*sep+*` -> ids."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    return [BOS] + enc(sentence)[:120] + enc(" It was") + [MASK] + enc(".") + [EOS]


@torch.no_grad()
def zero_shot(model, tok, sentences: list[str], labels: list[int], device, batch: int = 256) -> dict:
    """Accuracy of argmax(' terrible', ' great') at <mask>, the share predicted ' great', and the
    AUC of logit(' great') - logit(' terrible') against the label (signal that a bias can hide)."""
    was_training = model.training
    model.eval()
    diffs = []
    for s in range(0, len(sentences), batch):
        rows = [prompt_ids(x, tok) for x in sentences[s : s + batch]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        ids = ids.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids, attention_mask=ids != PAD).logits  # [B, L, V]
        at_mask = logits[ids == MASK].float()                                  # [B, V]
        diffs.append((at_mask[:, GREAT] - at_mask[:, TERRIBLE]).cpu())
    model.train(was_training)
    diff = torch.cat(diffs)
    pred = (diff > 0).long()
    gold = torch.tensor(labels)
    pos, neg = diff[gold == 1], diff[gold == 0]
    auc = ((pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean()).item()
    return {"acc": (pred == gold).float().mean().item(), "great_share": pred.float().mean().item(),
            "auc": auc, "n": len(labels)}


def eval_sets(small: bool) -> dict[str, tuple[list[str], list[int]]]:
    sets = {
        "16-42/dev": read_sst2(DATA / "SST-2/k-shot-1k-test/16-42/dev.tsv.gz"),
        "512-42/dev": read_sst2(DATA / "SST-2/k-shot-1k-test/512-42/dev.tsv.gz"),
        "glue/dev (test)": read_sst2(DATA / "SST-2/glue/dev.tsv.gz"),
    }
    if small:  # smoke runs: 64 sentences a set
        sets = {k: (s[:64], l[:64]) for k, (s, l) in sets.items()}
    return sets


# ---------------------------------------------------------------- training

def build_model(cfg: PretrainConfig):
    from transformers import RobertaConfig, RobertaForMaskedLM
    config = RobertaConfig(
        vocab_size=VOCAB, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.ffn,
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=True,
    )
    model = RobertaForMaskedLM(config)
    assert model.lm_head.decoder.weight is model.roberta.embeddings.word_embeddings.weight
    n = sum(p.numel() for p in model.parameters())  # parameters() lists the tied tensor once
    assert n == cfg.n_params(), (n, cfg.n_params())
    return model


def lr_factor(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 1.0 - t if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))


def train(cfg: PretrainConfig, device: torch.device, log=print) -> tuple[object, dict]:
    t0 = time.time()
    torch.manual_seed(cfg.seed)  # weight init only; masking and batching use their own generators
    tok = load_tokenizer()
    lines, stats = corpus_mod.build_corpus()
    if cfg.max_lines:
        lines = lines[: cfg.max_lines]
    ids_np, lengths = encode_corpus(lines, tok, cfg.max_len)
    n_tokens = int((ids_np[0] != PAD).sum())
    log(stats.table())
    log(f"corpus: {len(lines)} sentences, {n_tokens} tokens incl. <s></s> "
        f"(mean {lengths.mean():.1f}, max {lengths.max()}); prep {time.time() - t0:.1f}s")

    model = build_model(cfg).to(device)
    ids_all = torch.from_numpy(ids_np).to(device)  # [2, N, max_len], on the device once
    decay = [p for p in model.parameters() if p.ndim >= 2]     # matrices and embeddings
    no_decay = [p for p in model.parameters() if p.ndim < 2]   # biases and LayerNorm gains
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda",
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    sets = eval_sets(small=cfg.max_lines > 0)
    log(f"model: {cfg.n_params() / 1e6:.2f}M params, fp16 {2 * cfg.n_params() / 1e6:.1f} MB; "
        f"{cfg.steps} steps x {cfg.batch_size} sentences = {cfg.steps * cfg.batch_size / len(lines):.1f} epochs")

    batches: list[np.ndarray] = []
    loss_sum = torch.zeros((), device=device)
    history, last_losses = [], []
    model.train()
    t_train = time.time()
    for step in range(cfg.steps):
        if not batches:
            batches = epoch_batches(lengths, cfg.batch_size, rng)
        rows = batches.pop()
        width = int(lengths[rows].max())                     # known on the host: no sync
        variant = torch.from_numpy((rng.random(len(rows)) < cfg.prefix_space_prob).astype(np.int64))
        rows_d = torch.from_numpy(rows).to(device, non_blocking=True)
        ids = ids_all[variant.to(device, non_blocking=True), rows_d, :width]  # [B, L]
        inputs, labels = mask_tokens(ids, cfg.mask_prob, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = model.roberta(input_ids=inputs, attention_mask=ids != PAD).last_hidden_state  # [B, L, H]
            picked = labels != -100
            # The 50265-way projection runs on the ~15 % picked positions only; over every position
            # it would cost more than the whole encoder. (The boolean index syncs with the host
            # once a step, as M is data-dependent: cheap next to the step at these sizes.)
            logits = model.lm_head(hidden[picked])            # [M, V]
        loss = F.cross_entropy(logits.float(), labels[picked])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += loss.detach()

        done = step + 1
        if done % 500 == 0 or done == cfg.steps:
            n = 500 if done % 500 == 0 else done % 500
            mean = loss_sum.item() / n
            loss_sum.zero_()
            last_losses.append(mean)
            log(f"step {done:6d}  loss {mean:.4f}  lr {sched.get_last_lr()[0]:.2e}  {time.time() - t_train:6.1f}s")
        if cfg.eval_every and (done % cfg.eval_every == 0) and done != cfg.steps:
            accs = {k: zero_shot(model, tok, s, l, device)["acc"] for k, (s, l) in sets.items()}
            history.append({"step": done, **accs})
            log(f"  zero-shot @ {done}: " + "  ".join(f"{k} {v:.3f}" for k, v in accs.items()))

    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t_train
    results = {k: zero_shot(model, tok, s, l, device) for k, (s, l) in sets.items()}
    history.append({"step": cfg.steps, **{k: v["acc"] for k, v in results.items()}})
    metrics = {
        "config": dataclasses.asdict(cfg),
        "n_params": cfg.n_params(),
        "corpus": {"sentences": len(lines), "tokens": n_tokens, "stats": dataclasses.asdict(stats)},
        "final_mlm_loss": last_losses[-1],   # mean over the last 500 training steps (masked tokens)
        "zero_shot": results,
        "history": history,
        "train_s": train_s,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
    }
    return model, metrics


# ---------------------------------------------------------------- saving

def save(model, metrics: dict, out: Path, shard: str, t_start: float) -> None:
    """HF format: config, float16 safetensors shards, tokenizer files, model card."""
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", dtype=torch.float16)
    # The 50265 x H embedding is one tensor; transformers never splits a tensor, so at H >= 146
    # its shard is bigger than `shard` (it warns); the rest shard as asked.
    model.save_pretrained(out, max_shard_size=shard)
    load_tokenizer().save_pretrained(out)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert size <= MAX_CHECKPOINT_BYTES, f"checkpoint {size} B > {MAX_CHECKPOINT_BYTES} B"
    metrics["checkpoint_bytes"] = size
    metrics["wall_s"] = time.time() - t_start  # everything up to here; the card is written last
    (out / "README.md").write_text(model_card(metrics), encoding="utf-8")
    (out / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")


def model_card(m: dict) -> str:
    c, st, zs = m["config"], m["corpus"]["stats"], m["zero_shot"]
    src = "\n".join(f"| {s} | {st['raw'][s]} | {st['kept'].get(s, 0)} |" for s in st["raw"])
    removed = ", ".join(f"{t} {n}" for t, n in st["removed"].items())
    zrows = "\n".join(f"| {k} | {v['n']} | {100 * v['acc']:.1f} | {100 * v['great_share']:.1f} |" for k, v in zs.items())
    hist = "\n".join(
        f"| {h['step']} | " + " | ".join(f"{100 * h[k]:.1f}" for k in zs) + " |" for h in m["history"]
    )
    return f"""---
license: mit
language: en
library_name: transformers
pipeline_tag: fill-mask
---
# zotune-roberta-small

zotune's default model: a small RoBERTa-architecture masked LM pretrained from scratch by
`tools/pretrain_mlm.py` (issue 3), because no pretrained masked LM can be downloaded where zotune
is developed. It is a stand-in for roberta-large, made to show MeZO learning on a tiny budget; do
not expect roberta-large numbers from it.

## Architecture and size

`RobertaForMaskedLM`: hidden {c['hidden']}, {c['layers']} layers, {c['heads']} heads, FFN {c['ffn']},
max positions 514 (trained on examples of up to {c['max_len']} tokens, so positions past that are
untrained), decoder tied to the word embeddings, the real RoBERTa BPE tokenizer (vocab 50265,
`<s>`=0 `<pad>`=1 `</s>`=2 `<mask>`=50264). {m['n_params'] / 1e6:.2f}M parameters, of which
{50265 * c['hidden'] / 1e6:.2f}M are the word embedding; weights stored as float16 safetensors,
{m['checkpoint_bytes'] / 1e6:.1f} MB. (The word embedding is a single tensor, so its shard is larger
than the 14 MB shard size asked for.)

## Corpus

Unlabeled training-split text only, built by `tools/corpus.py`, one sentence per example:
{m['corpus']['sentences']} sentences, {m['corpus']['tokens']} tokens (with `<s>`/`</s>`).

| source | sentences read | kept (new, not dev/test) |
|---|---|---|
{src}

Exact duplicates dropped: {st['duplicates']}. **Decontamination:** every line whose key
(lowercased, PTB escapes undone, only a-z0-9 kept) equals that of a dev or test sentence of any
task was removed: {removed} (total {sum(st['removed'].values())}). Held-out text covers SST-2
glue/dev (the 872-sentence test set), glue/test and all k-shot dev/test files; sst-5 original
dev/test, the SST dev/test trees and all k-shot dev/test files; TREC test and k-shot dev/test;
MNLI/SNLI/RTE k-shot dev/test. The k-shot dev files are drawn from the same train pools, which is
why so many SST, sst-5, TREC and RTE train sentences go: the union of the five 512-shot dev
splits covers most of those small train sets. `tests/tools/test_corpus.py` checks that no SST-2
or sst-5 dev/test sentence is in the corpus.

## Pretraining

RoBERTa's recipe at small scale: dynamic masking redrawn every step (15 % of non-special tokens;
80 % `<mask>`, 10 % random, 10 % unchanged), AdamW (lr {c['lr']}, betas 0.9/0.98, eps 1e-6,
weight decay {c['weight_decay']} on matrices), {c['warmup_steps']} warmup steps then {c['schedule']}
decay to 0, gradient clipping {c['clip']}, dropout {c['dropout']}, bf16 autocast.
{c['steps']} steps x {c['batch_size']} sentences
({c['steps'] * c['batch_size'] / m['corpus']['sentences']:.0f} epochs). Final MLM loss (mean over the
last 500 steps, masked tokens): **{m['final_mlm_loss']:.3f}**.

Device: {m['device']} (torch {m['torch']}). Wall time {m['wall_s']:.0f} s for the whole script
(corpus, tokenisation, training {m['train_s']:.0f} s, evaluation, saving).{(chr(10) * 2 + m['note']) if m.get('note') else ''}

## Zero-shot SST-2

Prompt `<s> {{sentence}} It was <mask> . </s>` (LM-BFF's SST-2 template), prediction =
argmax of the logits of ' great' (372) and ' terrible' (6587) at `<mask>`, no calibration.
512-42/dev was the model-selection set when the size and recipe were chosen; glue/dev is the test
set and was not used to choose.

| eval set | sentences | accuracy % | predicted ' great' % |
|---|---|---|---|
{zrows}

During training (accuracy %):

| step | {' | '.join(zs)} |
|---|{'---|' * len(zs)}
{hist}

{selection_section(m)}## MeZO / fine-tuning results

Pending: SST-2 test accuracy, mean (std) over data seeds 13, 21, 42, 87, 100, for zero-shot, MeZO
(full), MeZO (LoRA) and Adam fine-tuning at k=16 and k=512 will be added here.

## Reproduce

    python tools/pretrain_mlm.py --out models/zotune-roberta-small
"""


def selection_section(m: dict) -> str:
    """The sweep that chose the size, if the metrics carry one (added when the card is written)."""
    if not m.get("selection"):
        return ""
    num = lambda x, fmt: "–" if x is None or math.isnan(x) else format(x, fmt)  # noqa: E731
    rows = "\n".join(
        f"| {r['run']} | {r['sweep']} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['prefix_space_prob']} | "
        f"{num(r['loss'], '.3f')} | {num(100 * r['dev_acc'], '.1f')} | {num(r['dev_auc'], '.3f')} | "
        f"{num(100 * r['test_acc'], '.1f')} | {num(r['test_auc'], '.3f')} | {num(100 * r['great_share'], '.1f')} |"
        for r in m["selection"]
    )
    return f"""## How the size was chosen

Sweep on {m['device']}, six runs at a time sharing the one GPU, batch 256 sentences, lr 1e-3,
linear decay, dropout 0.1 unless named. dev = 512-42/dev (1024 sentences, held out of the corpus;
the selection set), test = glue/dev (872). AUC is that of logit(' great') - logit(' terrible')
against the label: it shows signal that a bias towards one word hides. "prefix space" is
`prefix_space_prob`, the share of lines encoded with a leading space (sweep 1 had none).

| run | sweep | params | steps | prefix space | MLM loss | dev acc % | dev AUC | test acc % | test AUC | test ' great' % |
|---|---|---|---|---|---|---|---|---|---|---|
{rows}

{m.get('selection_note', '')}

"""


# ---------------------------------------------------------------- sweep

def run_dir(name: str) -> str:
    return name.replace(":", "_").replace("=", "-")


def sweep(names: list[str], out: Path, extra: list[str], deadline_s: float) -> None:
    """Run presets as parallel processes on one GPU; print a table.

    Each run saves its model under out/<name>/; out/best.txt names the best on 512-42/dev (the
    model-selection set), out/sweep.json holds every run's metrics. Runs still going after
    deadline_s are killed (their logs, with the timings, stay in out/sweep.log). A preset may
    carry overrides after ':', e.g. "h224l4:seed=1:dropout=0.2".
    """
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name in names:
        preset, *overrides = name.split(":")
        sets = [a for kv in overrides for a in ("--set", kv)]
        cmd = [sys.executable, __file__, "--preset", preset, "--out", str(out / run_dir(name)), *extra, *sets,
               "--metrics", str(out / f"{name}.json")]
        procs[name] = subprocess.Popen(cmd, stdout=open(out / f"{name}.log", "w"), stderr=subprocess.STDOUT)
    t_end = time.time() + deadline_s
    for name, p in procs.items():
        try:
            p.wait(timeout=max(1.0, t_end - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    with open(out / "sweep.log", "w") as f:
        for name in names:
            f.write(f"===== {name}\n" + (out / f"{name}.log").read_text())
            (out / f"{name}.log").unlink()
    print(f"{'run':26s} {'params':>7s} {'MB':>5s} {'steps':>6s} {'loss':>6s} {'16-42dev':>8s} "
          f"{'512-42dev':>9s} {'auc':>5s} {'glue/dev':>8s} {'auc':>5s} {'great%':>6s} {'wall_s':>6s}")
    done = {}
    for name in names:
        path = out / f"{name}.json"
        if not path.exists():
            print(f"{name:26s} FAILED or killed at the deadline (see sweep.log)")
            continue
        m = done[name] = json.loads(path.read_text())
        path.unlink()
        z = m["zero_shot"]
        d, t = z["512-42/dev"], z["glue/dev (test)"]
        print(f"{name:26s} {m['n_params'] / 1e6:6.2f}M {2 * m['n_params'] / 1e6:5.1f} {m['config']['steps']:6d} "
              f"{m['final_mlm_loss']:6.3f} {z['16-42/dev']['acc']:8.3f} {d['acc']:9.3f} {d['auc']:5.3f} "
              f"{t['acc']:8.3f} {t['auc']:5.3f} {100 * t['great_share']:6.1f} {m['wall_s']:6.0f}")
        print("   history (512-42/dev / glue/dev acc): "
              + "  ".join(f"{h['step']}:{h['512-42/dev']:.3f}/{h['glue/dev (test)']:.3f}" for h in m["history"]))
    (out / "sweep.json").write_text(json.dumps(done, indent=1))
    if done:
        best = max(done, key=lambda n: done[n]["zero_shot"]["512-42/dev"]["acc"])
        (out / "best.txt").write_text(run_dir(best) + "\n")
        print(f"best on 512-42/dev: {best}")
    print(f"device: {', '.join({m['device'] for m in done.values()}) or '?'}")


def main() -> None:
    t_start = time.time()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "models" / "zotune-roberta-small")
    ap.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)}")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps, CPU: checks the script end to end")
    ap.add_argument("--sweep", default=None, help="comma-separated presets to run in parallel (GPU)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a PretrainConfig field")
    ap.add_argument("--deadline", type=float, default=540.0, help="sweep: kill runs still going after this many seconds")
    ap.add_argument("--shard-size", default="14MB")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--metrics", type=Path, default=None, help="also write the metrics JSON here")
    args = ap.parse_args()

    if args.sweep:
        extra = [a for kv in args.set for a in ("--set", kv)]
        sweep(args.sweep.split(","), args.out, extra, args.deadline)
        return

    preset = "smoke" if args.smoke else args.preset
    cfg = PretrainConfig(**PRESETS.get(preset, {})) if preset else PretrainConfig()
    for kv in args.set:
        key, value = kv.split("=", 1)
        field_type = type(getattr(cfg, key))
        setattr(cfg, key, field_type(value))
    if 2 * cfg.n_params() > MAX_CHECKPOINT_BYTES:
        sys.exit(f"config {cfg} gives {2 * cfg.n_params() / 1e6:.1f} MB in float16, over 30 MB; make it smaller")

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"config: {dataclasses.asdict(cfg)}; device: {device}", flush=True)
    model, metrics = train(cfg, device, log=lambda s: print(s, flush=True))
    if not args.no_save:
        save(model, metrics, args.out, "1MB" if args.smoke else args.shard_size, t_start)
        print(f"saved {args.out} ({metrics['checkpoint_bytes'] / 1e6:.1f} MB of safetensors)")
    metrics.setdefault("wall_s", time.time() - t_start)
    if args.metrics:
        args.metrics.write_text(json.dumps(metrics, indent=1))
    for k, v in metrics["zero_shot"].items():
        print(f"zero-shot {k:16s} acc {v['acc']:.3f}  great {v['great_share']:.3f}  (n={v['n']})")
    print(f"final MLM loss {metrics['final_mlm_loss']:.4f}; device {metrics['device']}; "
          f"train {metrics['train_s']:.0f}s; wall {metrics['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
