"""Causal LMs end to end through the CLI: a tiny random Llama (grouped-query attention) and OPT
train with MeZO on SST-2 k=16, a run interrupted mid-way resumes to the uninterrupted run's
bits, `eval --predictions` writes scores that transformers reproduces, and the SuperGLUE
tasks train from MeZO's samples (COPA: the gold-continuation objective) and with Adam."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from zotune.cli import main
from zotune.evaluate import leading_token
from zotune.optim.mezo import MezoStepper
from zotune.tasks.causal import load_examples
from zotune.trajectory import LOG_NAME

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_args(model_dir, run, *extra):
    subset = "lora" if "llama" in model_dir.name else "top:1"  # LoRA pairs; top:1 pairs over the trunk cache
    return ["train", "--model", model_dir, "--task", "sst2", "--k", "16", "--seed", "42", "--device", "cpu",
            "--trainable", subset, "--steps", "20", "--eval-steps", "10", "--log-steps", "5", "--snapshot-every", "5",
            "--lr", "1e-2", "--eps", "1e-2", "--batch-size", "16", "--quiet", "--output-dir", run, *extra]


def _run(argv) -> int:
    return main([str(a) for a in argv])


def test_train_then_resume_is_bit_identical(tmp_path, tiny_causal_dir, monkeypatch):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _run(_train_args(tiny_causal_dir, whole)) == 0
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["test_accuracy"] is not None
    sharing = summary["cache"]["prefix_sharing"]
    assert 0 < sharing["tokens_computed"] < sharing["plain_tokens"]  # SST-2's one-word candidates share the prompt
    assert sharing["tokens_computed"] == summary["tokens_computed"]

    calls = {"n": 0}
    step = MezoStepper.__call__

    def interrupted(self, *args, **kwargs):  # Ctrl-C at the 13th step: logs flushed, run resumable
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(MezoStepper, "__call__", interrupted)
    assert _run(_train_args(tiny_causal_dir, cut)) == 130
    monkeypatch.setattr(MezoStepper, "__call__", step)
    assert not (cut / "summary.json").exists()
    assert _run(["train", "--resume", cut]) == 0
    for name in ("final.safetensors", "best.safetensors"):
        a, b = load_file(whole / name), load_file(cut / name)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), name
    records = [(run / LOG_NAME).read_text().splitlines()[1:] for run in (whole, cut)]
    assert records[0] == records[1]
    assert (whole / "metrics.jsonl").read_text() == (cut / "metrics.jsonl").read_text()
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["resumed_from_step"] == 12 and resumed["test_accuracy"] == summary["test_accuracy"]
    # replay: the base model and the log alone rebuild the final tensors
    assert _run(["replay", whole, "--output", tmp_path / "replayed"]) == 0
    replayed, final = load_file(tmp_path / "replayed" / "trainable.safetensors"), load_file(whole / "final.safetensors")
    assert all(torch.equal(replayed[n], final[n]) for n in final)


def test_eval_predictions_match_transformers(tmp_path, tiny_causal_dir):
    out = tmp_path / "preds.jsonl"
    assert _run(["eval", "--model", tiny_causal_dir, "--task", "sst2", "--split", "dev", "--device", "cpu",
                 "--batch-size", "8", "--predictions", out]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_dir)
    examples = load_examples("sst2", "dev", tokenizer, bos=leading_token(tokenizer), k=16, seed=42)
    assert len(rows) == len(examples) == 32
    hf = AutoModelForCausalLM.from_pretrained(tiny_causal_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        for row, example in zip(rows, examples):
            want = []
            for candidate in example.candidate_ids:
                logprobs = hf(input_ids=torch.tensor([example.prompt_ids + candidate])).logits[0].log_softmax(-1)
                at = torch.arange(len(example.prompt_ids) - 1, len(example.prompt_ids) + len(candidate) - 1)
                want.append(logprobs[at, torch.tensor(candidate)].sum().item())
            assert row["label"] == example.label
            assert row["candidate_logprobs"] == pytest.approx(want, rel=1e-5, abs=1e-5)
            means = [s / n for s, n in zip(row["candidate_logprobs"], row["candidate_tokens"])]
            assert row["pred"] == max(range(2), key=means.__getitem__)  # SST-2 scores by the mean


@pytest.mark.parametrize("task,extra", [("copa", ["--trainable", "prefix"]),
                                        ("cb", ["--optimizer", "adam", "--trainable", "bias"])])
def test_superglue_tasks_train_from_mezo_samples(tmp_path, tiny_causal_dir, task, extra):
    if "bias" in extra and "llama" in tiny_causal_dir.name:
        extra = ["--optimizer", "adam", "--trainable", "lora"]  # Llama has no biases
    run = tmp_path / "run"
    assert _run(["train", "--model", tiny_causal_dir, "--task", task, "--seed", "0", "--device", "cpu",
                 "--steps", "2", "--eval-steps", "2", "--batch-size", "4", "--eval-batch-size", "32", "--quiet",
                 "--output-dir", run, *extra]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == task and summary["dev_accuracy"] is not None
