"""tools/pretrain_clm.py: model sizes, the SST-2 probe against transformers' full logits, learning
on a repeated text, exact resume, and an end-to-end CPU smoke run with a decontaminated corpus."""

import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import corpus
import pretrain_clm as C
import pretraining as T

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small run faster on one thread; two threads stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kw) -> C.ClmConfig:
    return C.ClmConfig(**{**C.PRESETS["smoke"], **kw})


def synthetic_corpus(cfg: C.ClmConfig, text: str, n_train: int = 24, n_dev: int = 4) -> C.Corpus:
    """Blocks of one text repeated, packed as the tool packs documents."""
    blocks = T.pack_documents([text] * 200, T.load_tokenizer(), cfg.block)
    assert len(blocks) >= n_train + n_dev
    return C.Corpus(blocks[:n_train], blocks[n_train : n_train + n_dev], {"documents": 200})


def test_default_config_counts():
    """The default is the size the docstring states, and each preset builds (on meta)."""
    assert C.count_params(C.ClmConfig()) == 19_163_648
    assert 50265 * 256 / C.count_params(C.ClmConfig()) > 0.6  # the embedding dominates: tied, counted once
    assert 18e6 < C.count_params(C.ClmConfig(**C.PRESETS["opt"])) < 21e6


def test_sst2_prompt_is_mezo_template():
    tok = T.load_tokenizer()
    ids = C.sst2_prompt(" it 's a charming journey . ", tok)
    assert ids[0] == T.BOS and ids[-2:] == [85, 21]  # " It", " was"
    assert tok.decode(ids) == "<s>it 's a charming journey . It was"
    assert [tok.encode(c, add_special_tokens=False) for c in C.CANDIDATES] == [[T.TERRIBLE], [T.GREAT]]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_candidate_logprobs_match_transformers_full_logits(arch):
    """Batched, right-padded, output layer on the candidate positions only == each row alone
    through model(...).logits; candidates of one and several tokens."""
    torch.manual_seed(0)
    model = C.build_model(tiny(arch=arch, ffn=64 if arch == "llama" else 128)).eval()
    prompts = [[T.BOS, 100, 200, 300], [T.BOS, 7], [T.BOS, 11, 12, 13, 14, 15, 16]]
    cands = [[372], [6587, 42, 9]]
    got = C.candidate_logprobs(model, prompts, cands, torch.device("cpu"), batch=4)
    for i, p in enumerate(prompts):
        for j, c in enumerate(cands):
            ids = torch.tensor([p + c])
            logp = model(input_ids=ids).logits[0].log_softmax(-1)                # [L, V]
            want = sum(logp[len(p) - 1 + k, t] for k, t in enumerate(c))
            assert got[i, j].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5), (i, j)


def test_loss_decreases_on_repeated_text():
    cfg = tiny(steps=25, warmup_steps=5, lr=3e-3, eval_every=0, batch_size=4)
    data = synthetic_corpus(cfg, "The film was great and the acting was great too.")
    run = C.setup(cfg, data, torch.device("cpu"), log=lambda s: None)
    losses, loss = [], run.loss
    run.loss = lambda rows: losses.append(loss(rows)) or losses[-1]
    T.train_loop(run, cfg, T.LoopState())
    first, last = sum(l.item() for l in losses[:3]) / 3, sum(l.item() for l in losses[-3:]) / 3
    assert len(losses) == 25 and first > 10.0 and last < first - 1.5, (first, last)


def test_resume_continues_exactly(tmp_path):
    """12 steps in one process == 5, a pause (checkpoint), then a resumed process for the rest:
    same weights, same 500-step loss record, same final scores."""
    cfg_kw = dict(steps=12, warmup_steps=3, eval_every=0)
    data = synthetic_corpus(tiny(), "A slow, sad and very long film about nothing much.")
    straight, metrics = C.train(tiny(**cfg_kw), data, torch.device("cpu"), tmp_path / "a", log=lambda s: None)

    cfg = tiny(**cfg_kw)
    _, paused = C.train(cfg, data, torch.device("cpu"), tmp_path / "b", log=lambda s: None, pause_after=5)
    assert paused is None and (tmp_path / "b" / "checkpoint" / "state.pt").exists()
    saved = T.read_saved_config(tmp_path / "b" / "checkpoint" / "state.pt")
    again = C.load_corpus(tmp_path / "b" / "checkpoint")
    assert (again.train == data.train).all() and (again.dev == data.dev).all()
    resumed, metrics_b = C.train(C.ClmConfig(**saved), again, torch.device("cpu"), tmp_path / "b",
                                 log=lambda s: None, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert metrics_b["processes"] == 2 and metrics["processes"] == 1
    for key in ("final_train_loss", "dev_loss", "zero_shot", "history"):
        assert metrics_b[key] == metrics[key], key


def test_the_weights_best_on_the_selection_set_are_kept(tmp_path, monkeypatch):
    """keep_best: with the selection score scripted to peak at the step-4 evaluation of 12 steps,
    the model returned (and saved) is the step-4 model (that of a run paused at step 4), the
    metrics are that evaluation's and say so; keep_best off returns the last step's model."""
    cfg_kw = dict(steps=12, warmup_steps=3, eval_every=4)
    data = synthetic_corpus(tiny(), "A film with one good scene and a lot of waiting around.")
    scripted = iter([0.7, 0.6, 0.5])  # steps 4, 8, then the final evaluation at 12
    monkeypatch.setattr(T, "selection_score", lambda scores: next(scripted))
    kept, metrics = C.train(tiny(**cfg_kw), data, torch.device("cpu"), tmp_path / "a", log=lambda s: None)
    monkeypatch.setattr(T, "selection_score", lambda scores: 0.0)
    at_4, _ = C.train(tiny(**cfg_kw), data, torch.device("cpu"), tmp_path / "b", log=lambda s: None, pause_after=4)
    last, metrics_last = C.train(tiny(**cfg_kw, keep_best=False), data, torch.device("cpu"), tmp_path / "c",
                                 log=lambda s: None)
    for (name, a), b, c in zip(kept.state_dict().items(), at_4.state_dict().values(), last.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(kept.state_dict().values(), last.state_dict().values()))
    step_4 = metrics["history"][0]
    assert metrics["kept_step"] == 4 and step_4["step"] == 4 and metrics["dev_loss"] == step_4["dev_loss"]
    assert metrics["zero_shot"] == {k: v for k, v in step_4.items() if k not in ("step", "loss", "dev_loss")}
    assert metrics_last["kept_step"] == 12 and metrics_last["dev_loss"] == metrics_last["history"][-1]["dev_loss"]
    assert "holds the weights of step 4" in C.kept_text(metrics) and "last step's weights (12)" in C.kept_text(metrics_last)


def test_opt_checkpoint_loads_with_auto_model(tmp_path):
    torch.manual_seed(0)
    model = C.build_model(tiny(arch="opt", ffn=128)).eval()
    ids = torch.tensor([[T.BOS, 5, 6, 7, 8]])
    want = model(input_ids=ids).logits
    assert T.save_hf(model, tmp_path, torch.float32) > 0
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "OPTForCausalLM" and torch.equal(loaded(input_ids=ids).logits, want)


def test_smoke_run_end_to_end(tmp_path):
    """Task text plus a small IMDB-format file whose one review holds an SST-2 test sentence: the
    review is dropped, the checkpoint loads with AutoModelForCausalLM, a second start without
    --resume refuses, and the card is written."""
    test_sentence = corpus._tsv_columns(corpus.DATA / "SST-2/glue/dev.tsv.gz", ("sentence",))[5]
    reviews = ["I liked it a lot, the acting was good.", "Meh. " + test_sentence.upper() + " Really.",
               "Not my kind of film, too long by half."] * 300  # so that some land in the 2,000 documents kept
    imdb = tmp_path / "reviews.txt.xz"
    with lzma.open(imdb, "wt", encoding="utf-8") as f:
        f.write("\n".join(reviews) + "\n")
    out = tmp_path / "model"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a 1.6M-parameter model: one thread is faster
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "tools" / "pretrain_clm.py"), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=600, env=env)
    proc = run("--smoke", "--corpus", str(imdb), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "zero-shot glue/dev (test)" in proc.stdout and "dev loss" in proc.stdout

    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    stats = metrics["corpus"]["stats"]
    assert stats["raw"]["IMDB reviews"] == 900 and stats["kept"]["IMDB reviews"] == 600
    assert stats["reviews_removed"]["SST-2"] == 300
    assert metrics["corpus"]["documents"] + metrics["corpus"]["dev_documents"] == 2000
    assert metrics["device"] == "CPU" and metrics["dtype"] == "float16" and len(metrics["history"]) == 2
    tok = T.load_tokenizer()
    packed = np.load(out / "checkpoint" / "corpus.npz")
    text = tok.decode(np.concatenate([packed["train"].ravel(), packed["dev"].ravel()]).tolist())
    assert "acting was good" in text and test_sentence.upper().strip() not in text

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float16"
    assert (config["bos_token_id"], config["eos_token_id"], config["num_key_value_heads"]) == (T.BOS, T.EOS, 1)
    ids = torch.tensor([C.sst2_prompt("a fine film .", tok)])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], T.VOCAB) and torch.isfinite(logits).all()

    proc = run("--smoke", "--corpus", str(imdb), "--out", str(out))
    assert proc.returncode != 0 and "--resume" in proc.stderr

    proc = run("--card", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    card = (out / "README.md").read_text()
    for needle in ("# zotune-llama-small", "## Corpus", "IMDB reviews | 900 | 600", "## Zero-shot SST-2",
                   "| step | train loss | dev loss |", "Not measured yet"):
        assert needle in card, needle
    rescored = json.loads((out / "pretrain_metrics.json").read_text())["zero_shot_reloaded_cpu"]
    assert set(rescored) == {T.SELECTION, T.TEST} and rescored[T.TEST]["n"] == 872
