"""Pretrain a small causal LM from scratch: the decoder that issue 22's demonstration fine-tunes.

No OPT or Llama weights can be downloaded where zotune is developed, so this trains one. transformers'
`LlamaForCausalLM` (RoPE, RMSNorm, SwiGLU, grouped-query attention; the default) or, with
`--arch opt`, `OPTForCausalLM` (learned positions, LayerNorm, ReLU), is used for pretraining only.

Recipe (ClmConfig; `python tools/pretrain_clm.py --help` shows the flags):
- Vocabulary: the repository's RoBERTa BPE (models/zotune-roberta-small/tokenizer.json, 50265
  tokens; <s>=0 is BOS, </s>=2 is EOS, <pad>=1), word embedding tied to the output layer.
- Corpus: the same as the masked LM's (tools/corpus.py through tools/pretraining.py): the shipped
  tasks' training text plus, with --corpus, the IMDB reviews, minus every review and line that
  holds a dev or test sentence of any task. `dev_docs` documents of the shuffled corpus are held
  out for the dev loss.
- Packing: `<s> doc </s> <s> doc </s> ...` cut into blocks of `block` tokens (no padding; every
  step has the same shapes); next-token cross entropy over every position.
- Default model (preset llama): hidden 256, 8 layers, 4 query and 2 key/value heads, SwiGLU 768;
  19.16M parameters, 12.87M of them the word embedding; 38 MB in float16.
- AdamW (betas 0.9/0.95, eps 1e-8, weight decay 0.1 on matrices and embeddings), lr 1.5e-3,
  500 warmup steps then cosine decay to 0, gradient clipping 1.0, no dropout; batch 64 x 512
  tokens (32,768 a step); bf16 autocast and `torch.compile` of the loss on a GPU.
- Time budget: `--minutes M` (training minutes, over all calls) or `--end-time T` (epoch seconds).
  The run times its steps for `calibration_s` inside the warmup, then fixes the step count so
  that training ends in time; the count is recorded, and `--set steps=N` repeats the schedule.
- Every `eval_every` steps it prints the dev loss and a zero-shot SST-2 probe scored with the
  transformers model itself: prompt `<s>{sentence} It was` (MeZO large_models' SST2Template),
  prediction = the larger summed log-probability of the candidates ' terrible' and ' great'; on
  512-42/dev (the selection set) and glue/dev (the 872-sentence test set): accuracy, AUC, and
  accuracy with a threshold fitted on 512-42/dev.
- Kept weights (`keep_best`, on by default): the evaluation (the final one included) with the
  best accuracy on 512-42/dev with its fitted threshold is what OUT holds, not necessarily the
  last step: a long run overfits this corpus (RESULTS.md, session 14). `--set keep_best=false`
  keeps the last.
- Checkpoints: `--deadline-s S` pauses training S seconds after the process started, writes
  OUT/checkpoint/ (model, optimizer, schedule, generator, data order and the packed corpus) and
  exits; `--resume --out OUT` continues exactly where it stopped, without re-reading the corpus.
- Output: OUT holds a Hugging Face checkpoint (config.json, model.safetensors in float16 or
  `--dtype float32`, tokenizer files) loadable by `AutoModelForCausalLM`, and pretrain_metrics.json;
  `--card OUT` rescores it on the CPU in float32 and writes OUT/README.md from the measured figures.

    python tools/pretrain_clm.py --smoke --out /tmp/clm                                  # CPU, seconds
    python tools/pretrain_clm.py --corpus ../shared/corpus/imdb_reviews.txt.xz --minutes 7.5 --out out/clm

On the device (`run`; one H100, 600 s a call). Here, once: `mkdir -p .corpus && cp
../shared/corpus/imdb_reviews.txt.xz .corpus/ && echo /.corpus/ >> .git/info/exclude`. The 34 MB
corpus and the tracked tree (53 MB, 36 MB of it the shipped model's safetensors) together are over
the 64 MiB a call carries: set models/zotune-roberta-small/*.safetensors aside (into an ignored
folder that is not carried) for the call and put them back after; this tool reads only that
folder's tokenizer files. One call, carry [".corpus"], timeout_s 600; training is fitted to end
530 s after the command starts (corpus preparation, ~40 s, and compilation come out of that), the
overrun guard stops it by 560 s, and evaluation, saving and packing take ~15 s:

    set -o pipefail; export PYTHONUNBUFFERED=1; python tools/pretrain_clm.py \
      --corpus .corpus/imdb_reviews.txt.xz --end-time $(( $(date +%s) + 530 )) --deadline-s 575 \
      --out out/clm 2>&1 | tee $OUT/pretrain.log && \
      tar cf - -C out/clm --exclude checkpoint . | split -b 15m - $OUT/clm.tar.part-

The model comes back in three 15 MiB parts ($OUT returns at most 8 files of 16 MiB); here:
`mkdir -p out/clm && cat <files_at>/clm.tar.part-* | tar xf - -C out/clm`, then
`python tools/pretrain_clm.py --card out/clm`. Expected (from FLOP counts and the masked LM's
measured speed, not measured for this model): 30-45 ms a step of 32,768 tokens (4.0 TFLOP, two
thirds of it the 50265-way output layer), 0.7-1.1M tokens/s, so 0.3-0.5B tokens in one call.

A longer run over two calls: `--minutes 12 --deadline-s 570` in the first (it pauses and writes
out/clm/checkpoint/, ~230 MB), `--resume --deadline-s 570 --out out/clm` in the second. That
checkpoint stays on the machine only while it is warm (30 s after a call), so the second call must
follow at once; if the machine went back, start again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretraining import (  # noqa: E402  (tools/ is not a package)
    BOS, EOS, PAD, REPO, SELECTION, VOCAB, Loop, LoopState, apply_overrides, corpus_info,
    corpus_section, eval_sets, history_table, kept_weights, load_documents, load_state, load_tokenizer, make_adamw,
    pack_documents, pct, read_saved_config, save_hf, save_state, scores_line, sst2_scores, train_loop,
)

CANDIDATES = (" terrible", " great")  # labels 0 and 1: MeZO large_models' SST2Template verbalizer


@dataclass
class ClmConfig:
    # Architecture. The 50265 x hidden word embedding (tied to the output layer) dominates the
    # size, and the 50265-way output over every position dominates the step time.
    arch: str = "llama"          # "llama" (LlamaForCausalLM) or "opt" (OPTForCausalLM)
    hidden: int = 256
    layers: int = 8
    heads: int = 4
    kv_heads: int = 2            # grouped-query attention (llama only; OPT has one k/v head per head)
    ffn: int = 768               # SwiGLU width for llama (8/3 x hidden, rounded up to 256); OPT: 4 x hidden
    max_positions: int = 1024    # positions past `block` are untrained (RoPE: none stored; OPT: random rows)
    dropout: float = 0.0
    block: int = 512             # tokens per training row
    # Optimisation.
    steps: int = 20_000          # with a time budget, fitted (the value given is ignored)
    minutes: float = 0.0         # > 0: fit `steps` so that training takes this long (all calls together)
    end_time: float = 0.0        # > 0: fit `steps` so that training ends by this time (epoch seconds)
    calibration_s: float = 45.0  # seconds of steps timed before `steps` is fitted
    overrun_s: float = 30.0      # training stops this long after the budget whatever the schedule says
    batch_size: int = 64         # rows per step
    lr: float = 1.5e-3
    warmup_steps: int = 500
    schedule: str = "cosine"     # "linear" or "cosine" decay after warmup, to 0
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    eval_every: int = 2_000      # dev loss and zero-shot SST-2 during training
    keep_best: bool = True       # save the evaluated weights best on the selection set, not the last step's
    dev_docs: int = 1_000        # documents held out of training for the dev loss
    max_docs: int = 0            # 0 = every document; the smoke mode uses a slice
    compile: bool = True         # torch.compile the training loss (on CUDA only)


PRESETS: dict[str, dict] = {
    "llama": {},
    "opt": dict(arch="opt", ffn=1024),
    "smoke": dict(hidden=32, layers=2, heads=2, kv_heads=1, ffn=64, max_positions=64, block=32, steps=30,
                  batch_size=8, warmup_steps=5, eval_every=15, dev_docs=40, max_docs=2_000),
}


# ---------------------------------------------------------------- model

def build_model(cfg: ClmConfig):
    """A randomly initialised LlamaForCausalLM or OPTForCausalLM, output tied to the embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
    common = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=True,
               max_position_embeddings=cfg.max_positions, num_hidden_layers=cfg.layers,
               num_attention_heads=cfg.heads, hidden_size=cfg.hidden)
    if cfg.arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=cfg.ffn, num_key_value_heads=cfg.kv_heads,
                                             attention_dropout=cfg.dropout, rms_norm_eps=1e-5))
    elif cfg.arch == "opt":
        model = OPTForCausalLM(OPTConfig(**common, ffn_dim=cfg.ffn, word_embed_proj_dim=cfg.hidden,
                                         do_layer_norm_before=True, dropout=cfg.dropout,
                                         attention_dropout=cfg.dropout))
    else:
        sys.exit(f"arch {cfg.arch!r}: use llama or opt")
    assert model.lm_head.weight is model.get_input_embeddings().weight
    return model


def count_params(cfg: ClmConfig) -> int:
    """Parameters saved in the checkpoint (the tied output counted once), without allocating them."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(cfg).parameters())


def causal_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy over a block of packed documents. ids [B, L] (any int dtype)."""
    ids = ids.long()
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state   # [B, L, H]
    logits = model.lm_head(hidden[:, :-1])                                   # [B, L-1, V]; the last has no target
    return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())


# ---------------------------------------------------------------- probes: dev loss, zero-shot SST-2

def sst2_prompt(sentence: str, tok) -> list[int]:
    """MeZO large_models' SST2Template.encode, f"{sentence.strip()} It was", after <s>."""
    return [BOS] + tok.encode(sentence.strip(), add_special_tokens=False)[:120] + tok.encode(
        " It was", add_special_tokens=False)


@torch.no_grad()
def candidate_logprobs(model, prompts: list[list[int]], candidates: list[list[int]], device,
                       batch: int = 64) -> torch.Tensor:
    """sum log p(candidate tokens | prompt) for every prompt and candidate: [N, C] float32, CPU.
    Each prompt + candidate is one right-padded row through transformers' decoder; its output
    layer runs only where the next token is a candidate's (S positions), as the logits of
    `model(...)` there are the same."""
    was_training = model.training
    model.eval()
    rows = [(p, c) for p in prompts for c in candidates]
    sums = []
    for s in range(0, len(rows), batch):
        chunk = rows[s : s + batch]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), width), PAD, dtype=torch.long)
        span = torch.zeros((len(chunk), width), dtype=torch.bool)  # positions whose next token is the candidate's
        for i, (p, c) in enumerate(chunk):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            span[i, len(p) - 1 : len(p) + len(c) - 1] = True
        ids, span = ids.to(device), span.to(device)
        targets = ids.roll(-1, dims=1)[span]                                                # [S]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = model.model(input_ids=ids, attention_mask=ids != PAD, use_cache=False).last_hidden_state
            logits = model.lm_head(hidden[span])                                            # [S, V]
        logp = logits.float().log_softmax(-1).gather(1, targets[:, None])[:, 0]             # [S]
        row = torch.arange(len(chunk), device=device)[:, None].expand_as(span)[span]        # [S]
        sums.append(torch.zeros(len(chunk), device=device).index_add_(0, row, logp).cpu())
    model.train(was_training)
    return torch.cat(sums).view(len(prompts), len(candidates))


def zero_shot(model, tok, sets: dict[str, tuple[list[str], list[int]]], device) -> dict:
    """Per set: accuracy of the better-scoring candidate, share predicted ' great', AUC of
    log p(' great') - log p(' terrible'), accuracy with the threshold fitted on 512-42/dev."""
    cands = [tok.encode(c, add_special_tokens=False) for c in CANDIDATES]
    batch = 64 if device.type == "cuda" else 16
    diffs = {}
    for name, (sentences, _) in sets.items():
        lp = candidate_logprobs(model, [sst2_prompt(s, tok) for s in sentences], cands, device, batch)
        diffs[name] = lp[:, 1] - lp[:, 0]
    return sst2_scores(diffs, sets)


@torch.no_grad()
def dev_loss(model, dev: torch.Tensor, device, batch: int) -> float:
    """Mean next-token cross entropy over the held-out blocks dev [M, L]."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for s in range(0, len(dev), batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            total += causal_loss(model, dev[s : s + batch]) * len(dev[s : s + batch])
    model.train(was_training)
    return (total / len(dev)).item()


# ---------------------------------------------------------------- corpus

@dataclass
class Corpus:
    train: np.ndarray   # [N, block] int32
    dev: np.ndarray     # [M, block] int32, from documents never trained on
    info: dict


def prepare_corpus(cfg: ClmConfig, imdb: Path | None, log) -> Corpus:
    t0 = time.time()
    tok = load_tokenizer()
    docs, stats = load_documents(imdb, cfg.max_docs, cfg.seed)
    train_docs, dev_docs = docs[: -cfg.dev_docs], docs[-cfg.dev_docs :]
    train, dev = pack_documents(train_docs, tok, cfg.block), pack_documents(dev_docs, tok, cfg.block)
    if len(dev) == 0 or len(train) < cfg.batch_size:
        sys.exit(f"corpus too small: {len(train)} training and {len(dev)} dev blocks of {cfg.block}; "
                 f"lower block or batch_size, or raise dev_docs or max_docs")
    log(stats.table())
    info = {**corpus_info(train_docs, stats, imdb, train), "dev_documents": len(dev_docs),
            "dev_tokens": int(dev.size), "dev_blocks": len(dev)}
    log(f"corpus: {len(train_docs)} documents, {train.size} tokens in {len(train)} blocks of {cfg.block}; "
        f"dev: {len(dev_docs)} documents, {len(dev)} blocks; prep {time.time() - t0:.1f}s")
    return Corpus(train, dev, info)


def save_corpus(folder: Path, corpus: Corpus) -> None:
    """The packed corpus beside the checkpoint, so a resumed run skips the minute of preparation."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "corpus.npz", train=corpus.train.astype(np.uint16), dev=corpus.dev.astype(np.uint16))
    (folder / "corpus.json").write_text(json.dumps(corpus.info), encoding="utf-8")


def load_corpus(folder: Path) -> Corpus:
    arrays = np.load(folder / "corpus.npz")
    return Corpus(arrays["train"].astype(np.int32), arrays["dev"].astype(np.int32),
                  json.loads((folder / "corpus.json").read_text()))


# ---------------------------------------------------------------- training

def budget_end(cfg: ClmConfig, state: LoopState) -> float:
    """The time training must end by, while the step count is still to be fitted (else 0)."""
    if state.fitted or not (cfg.minutes or cfg.end_time):
        return 0.0
    return time.time() + 60 * cfg.minutes - state.train_s if cfg.minutes else cfg.end_time


def setup(cfg: ClmConfig, corpus: Corpus, device: torch.device, log) -> Loop:
    torch.manual_seed(cfg.seed)  # weight init only; batching uses its own generator
    model = build_model(cfg).to(device)
    opt, sched = make_adamw(model, cfg, device, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    loss_fn = torch.compile(causal_loss) if cfg.compile and device.type == "cuda" else causal_loss
    tok, sets = load_tokenizer(), eval_sets(small=cfg.max_docs > 0)
    dev = torch.from_numpy(corpus.dev).to(device)

    def evaluate(step: int) -> dict:
        scores = {"dev_loss": dev_loss(model, dev, device, cfg.batch_size), **zero_shot(model, tok, sets, device)}
        log(f"  @ {step}: dev loss {scores['dev_loss']:.4f}  " + scores_line(scores))
        return scores

    n = count_params(cfg)
    log(f"model: {cfg.arch}, {n / 1e6:.2f}M params, fp16 {2 * n / 1e6:.1f} MB; "
        f"batch {cfg.batch_size} x {cfg.block} tokens")
    return Loop(model=model, blocks=torch.from_numpy(corpus.train).to(device), loss=lambda rows: loss_fn(model, rows),
                evaluate=evaluate, opt=opt, sched=sched, gen=gen, device=device, log=log)


def train(cfg: ClmConfig, corpus: Corpus, device: torch.device, out: Path, log=print, resume: bool = False,
          stop_at: float = 0.0, pause_after: int = 0) -> tuple[object, dict | None]:
    """Train (or resume) the model in `out`; returns it and its metrics, or None for the metrics
    if this process paused (its state is in out/checkpoint/ then)."""
    ckpt = out / "checkpoint"
    run = setup(cfg, corpus, device, log)
    state = load_state(ckpt / "state.pt", run) if resume else LoopState()
    if resume:
        log(f"resumed at step {state.step} of {cfg.steps} ({state.train_s:.0f} s trained)")
    else:
        save_corpus(ckpt, corpus)
    state.processes += 1
    state = train_loop(run, cfg, state, end_time=budget_end(cfg, state), stop_at=stop_at, pause_after=pause_after)
    save_state(ckpt / "state.pt", run, state, dataclasses.asdict(cfg))  # also when done: a failed save can resume
    if state.paused:
        return run.model, None
    final = run.evaluate(state.step)
    state.history.append({"step": cfg.steps, "loss": state.last_losses[-1], **final})
    kept_step, final = kept_weights(run, cfg, state)
    tokens = cfg.steps * cfg.batch_size * cfg.block
    return run.model, {
        "config": dataclasses.asdict(cfg),
        "n_params": count_params(cfg),
        "corpus": corpus.info,
        "final_train_loss": state.last_losses[-1],   # mean over the last 500 training steps
        "kept_step": kept_step,                      # whose weights were saved
        "dev_loss": final["dev_loss"],
        "zero_shot": {k: v for k, v in final.items() if k != "dev_loss"},
        "history": state.history,
        "train_s": state.train_s,
        "ms_per_step": state.ms_per_step,           # calibrated, evaluations excluded
        "tokens_seen": tokens,
        "tokens_per_s": cfg.batch_size * cfg.block / (state.ms_per_step / 1e3) if state.ms_per_step else None,
        "stopped_early_at": state.stopped_early,
        "processes": state.processes,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
    }


def save(model, metrics: dict, out: Path, dtype: torch.dtype, t_start: float) -> None:
    metrics["checkpoint_bytes"] = save_hf(model, out, dtype)
    metrics["dtype"] = str(dtype).removeprefix("torch.")
    metrics["wall_s"] = time.time() - t_start  # this process, up to here
    (out / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")


# ---------------------------------------------------------------- card

def write_card(out: Path, fewshot_md: Path | None) -> None:
    """Rescore the saved model on the CPU in float32 and write its card from pretrain_metrics.json
    and a fine-tuning results section (Markdown), if given."""
    from transformers import AutoModelForCausalLM
    metrics_path = out / "pretrain_metrics.json"
    m = json.loads(metrics_path.read_text())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    m["zero_shot_reloaded_cpu"] = zero_shot(model, load_tokenizer(), eval_sets(small=False), torch.device("cpu"))
    metrics_path.write_text(json.dumps(m, indent=1), encoding="utf-8")
    results = fewshot_md.read_text() if fewshot_md else "Not measured yet.\n"
    (out / "README.md").write_text(model_card(m, results), encoding="utf-8")


def kept_text(m: dict) -> str:
    """Which step's weights the checkpoint holds (metrics written before keep_best: the last)."""
    kept, last = m.get("kept_step", m["config"]["steps"]), m["config"]["steps"]
    if kept == last:
        return f"The checkpoint holds the last step's weights ({last})"
    return (f"The checkpoint holds the weights of step {kept}, the evaluation best on {SELECTION} "
            f"(accuracy with the threshold fitted on it), not the last step's ({last})")


def model_card(m: dict, results: str) -> str:
    c = m["config"]
    name, cls = (("zotune-llama-small", "LlamaForCausalLM") if c["arch"] == "llama"
                 else ("zotune-opt-small", "OPTForCausalLM"))
    heads = f"{c['heads']} query and {c['kv_heads']} key/value heads" if c["arch"] == "llama" else f"{c['heads']} heads"
    zrows = "\n".join(f"| {k} | {v['n']} | {pct(v['acc'])} | {pct(v['great_share'])} | {v['auc']:.3f} | "
                      f"{pct(v['acc_dev_threshold'])} |" for k, v in m["zero_shot_reloaded_cpu"].items())
    speed = (f"{m['ms_per_step']:.1f} ms a step ({m['tokens_per_s'] / 1e6:.2f}M tokens/s, timed inside the warmup)"
             if m.get("ms_per_step") else "step time not timed (a fixed step count)")
    fitted = ("the step count was fitted to a time budget inside the warmup, and "
              if m.get("ms_per_step") else "")
    return f"""---
license: mit
language: en
library_name: transformers
pipeline_tag: text-generation
---
# {name}

A small `{cls}` pretrained from scratch by `tools/pretrain_clm.py` (issue 22) on real English,
because no OPT or Llama checkpoint can be downloaded where zotune is developed: the decoder on
which zotune's causal-LM support is demonstrated. It is a stand-in, not a substitute, for OPT or
Llama checkpoints. Its weights are not in the repository (the tool rebuilds them).

## Architecture and size

`{cls}`: hidden {c['hidden']}, {c['layers']} layers, {heads}, FFN {c['ffn']},
max positions {c['max_positions']} (trained on blocks of {c['block']} tokens, so positions past that are untrained),
output tied to the word embedding, the RoBERTa BPE tokenizer (vocab 50265, `<s>`=0 BOS, `<pad>`=1,
`</s>`=2 EOS). {m['n_params'] / 1e6:.2f}M parameters, of which {50265 * c['hidden'] / 1e6:.2f}M are the word
embedding; {m['dtype']} safetensors, {m['checkpoint_bytes'] / 1e6:.1f} MB.

## Corpus

Built by `tools/corpus.py` and `load_documents` in `tools/pretraining.py`: {m['corpus']['documents']}
training documents, {m['corpus']['tokens']} tokens in {m['corpus']['blocks']} blocks of {c['block']}
(`<s> doc </s>` concatenated); {m['corpus']['dev_documents']} documents held out for the dev loss
({m['corpus']['dev_blocks']} blocks).

{corpus_section(m['corpus']['stats'])}

## Pretraining

Next-token cross entropy over every position; AdamW (lr {c['lr']}, betas 0.9/0.95, eps 1e-8,
weight decay {c['weight_decay']} on matrices and embeddings), {c['warmup_steps']} warmup steps then
{c['schedule']} decay to 0, gradient clipping {c['clip']}, dropout {c['dropout']}; on a GPU bf16 autocast
and `torch.compile`. {c['steps']} steps x {c['batch_size']} blocks of {c['block']} tokens
({m['tokens_seen'] / 1e9:.2f}B tokens, {m['tokens_seen'] / m['corpus']['tokens']:.1f} epochs); {fitted}`--set
steps={c['steps']}` repeats the schedule.
Final training loss (mean over the last 500 steps): **{m['final_train_loss']:.3f}**. {kept_text(m)}: dev
loss **{m['dev_loss']:.3f}** (perplexity {math.exp(m['dev_loss']):.1f}).

Device: {m['device']} (torch {m['torch']}), {m['processes']} process(es). Training {m['train_s']:.0f} s,
{speed}; {m['wall_s']:.0f} s for the last process (corpus, training, evaluation, saving).

## Zero-shot SST-2

Prompt `<s>{{sentence}} It was` (MeZO large_models' SST2Template), prediction = the candidate,
' great' or ' terrible', of larger log-probability after it. The checkpoint reloaded on the CPU in
float32 (`pretrain_metrics.json`, `zero_shot_reloaded_cpu`). AUC is that of log p(' great') -
log p(' terrible') against the label; "dev threshold" predicts ' great' where that difference
exceeds the threshold of best accuracy on 512-42/dev, the model-selection set (never fitted on
the test set).

| eval set | sentences | accuracy % | predicted ' great' % | AUC | accuracy with the dev threshold % |
|---|---|---|---|---|---|
{zrows}

Curves (as scored during training, in bf16):

{history_table(m, {"train loss": "loss", "dev loss": "dev_loss"})}

## Using it

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(DIR)
    tok = AutoTokenizer.from_pretrained(DIR)   # RoBERTa's: tok(text) adds <s> AND </s>
    ids = [tok.bos_token_id] + tok.encode("a gripping film . It was", add_special_tokens=False)

Documents were seen as `<s> text </s>`: give a prompt `<s>` first and no `</s>` after it.

## MeZO / fine-tuning results

{results}
## Reproduce

See the docstring of `tools/pretrain_clm.py` for the device call; then

    python tools/pretrain_clm.py --card DIR --results results.md
"""


# ---------------------------------------------------------------- command line

def parse_config(preset: str, overrides: list[str], minutes: float, end_time: float) -> ClmConfig:
    cfg = apply_overrides(ClmConfig(**PRESETS[preset]), overrides)
    cfg.minutes, cfg.end_time = minutes or cfg.minutes, end_time or cfg.end_time
    if cfg.minutes and cfg.end_time:
        sys.exit("give --minutes or --end-time, not both")
    if cfg.minutes or cfg.end_time:
        if cfg.warmup_steps <= 40:
            sys.exit("a time budget needs warmup_steps > 40: the step count is fitted inside the warmup")
        cfg.steps = 10**9  # until the fit: the budget, not a step count, ends this run
    return cfg


def main() -> None:
    t_start = time.time()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "out" / "clm")
    ap.add_argument("--corpus", type=Path, default=None,
                    help="imdb_reviews.txt.xz (../shared/corpus; see its SOURCES.md); without it, task text only")
    ap.add_argument("--arch", default="llama", choices=["llama", "opt"], help="the preset of that architecture")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps: checks the script end to end")
    ap.add_argument("--device", default="auto", help="auto (a GPU if there is one, except with --smoke), cpu or cuda")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a ClmConfig field")
    ap.add_argument("--minutes", type=float, default=0.0, help="training time budget, over all calls")
    ap.add_argument("--end-time", type=float, default=0.0, help="training ends by this time (epoch seconds)")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="pause (checkpoint and exit) this many seconds after the process started")
    ap.add_argument("--pause-after", type=int, default=0, help="pause after this many steps of this process")
    ap.add_argument("--resume", action="store_true", help="continue the paused run in --out")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="of the saved weights")
    ap.add_argument("--card", type=Path, default=None, help="rescore this saved model on the CPU and write its card")
    ap.add_argument("--results", type=Path, default=None, help="with --card: the fine-tuning results (Markdown)")
    args = ap.parse_args()

    if args.card:
        write_card(args.card, args.results)
        return
    log = lambda s: print(s, flush=True)  # noqa: E731
    state_path = args.out / "checkpoint" / "state.pt"
    if args.resume:
        if not state_path.exists():
            sys.exit(f"--resume: no {state_path}; start without --resume")
        cfg = ClmConfig(**read_saved_config(state_path))
        corpus = load_corpus(state_path.parent)
    else:
        if state_path.exists():
            sys.exit(f"{state_path} exists: pass --resume to continue it, or choose another --out")
        cfg = parse_config("smoke" if args.smoke else args.arch, args.set, args.minutes, args.end_time)
        corpus = None
    auto = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    device = torch.device(auto if args.device == "auto" else args.device)
    log(f"config: {dataclasses.asdict(cfg)}; device: {device}")
    corpus = corpus or prepare_corpus(cfg, args.corpus, log)
    model, metrics = train(cfg, corpus, device, args.out, log, resume=args.resume,
                           stop_at=t_start + args.deadline_s if args.deadline_s else 0.0, pause_after=args.pause_after)
    if metrics is None:
        log(f"checkpoint in {state_path.parent}; continue with --resume --out {args.out}")
        return
    save(model, metrics, args.out, getattr(torch, args.dtype), t_start)
    for k, v in metrics["zero_shot"].items():
        log(f"zero-shot {k:16s} acc {v['acc']:.3f}  auc {v['auc']:.3f}  acc (dev threshold) "
            f"{v['acc_dev_threshold']:.3f}  great {v['great_share']:.3f}  (n={v['n']})")
    log(f"saved {args.out} ({metrics['checkpoint_bytes'] / 1e6:.1f} MB); final train loss "
        f"{metrics['final_train_loss']:.4f}, dev loss {metrics['dev_loss']:.4f}; device {metrics['device']}; "
        f"train {metrics['train_s']:.0f}s; wall {metrics['wall_s']:.0f}s"
        + (f"; {metrics['tokens_per_s'] / 1e6:.2f}M tokens/s" if metrics["tokens_per_s"] else ""))


if __name__ == "__main__":
    main()
