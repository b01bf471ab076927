"""Causal LMs end to end through the CLI: a tiny random Llama (grouped-query attention) and OPT
train with MeZO on SST-2 k=16, a run interrupted mid-way resumes to the uninterrupted run's
bits, `eval --predictions` writes scores that transformers reproduces, and the SuperGLUE
tasks train from MeZO's samples (COPA: the gold-continuation objective) and with Adam. The
samples of the SuperGLUE tasks and SQuAD are drawn from made-up originals (made_up_data)."""

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
def test_superglue_tasks_train_from_mezo_samples(tmp_path, tiny_causal_dir, made_up_data, task, extra):
    if "bias" in extra and "llama" in tiny_causal_dir.name:
        extra = ["--optimizer", "adam", "--trainable", "lora"]  # Llama has no biases
    run = tmp_path / "run"
    assert _run(["train", "--model", tiny_causal_dir, "--task", task, "--seed", "0", "--device", "cpu",
                 "--data-dir", made_up_data.data,
                 "--steps", "2", "--eval-steps", "2", "--batch-size", "4", "--eval-batch-size", "32", "--quiet",
                 "--output-dir", run, *extra]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == task and summary["dev_accuracy"] is not None


def _squad_data(made_up_data, tmp_path, sizes=(6, 4, 4)):
    """A data folder holding the first rows of the made-up SQuAD sample, per split."""
    from zotune.tasks.causal import read_sample_file
    from zotune.tasks.mezo_sample import sample_path, write_xz
    for split, n in zip(("train", "dev", "test"), sizes):
        rows = read_sample_file(sample_path(made_up_data.data, "squad", 0, split))[:n]
        write_xz(sample_path(tmp_path, "squad", 0, split), "".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_squad_eval_generates_what_transformers_generates(tmp_path, tiny_causal_dir, made_up_data):
    from zotune.evaluate import MAX_NEW_TOKENS, stop_tokens
    from zotune.tasks.squad import exact_match, f1
    data, out = _squad_data(made_up_data, tmp_path / "data"), tmp_path / "preds.jsonl"
    assert _run(["eval", "--model", tiny_causal_dir, "--task", "squad", "--split", "dev", "--seed", "0",
                 "--data-dir", data, "--max-length", "160", "--device", "cpu", "--batch-size", "3",
                 "--predictions", out, "--output", tmp_path / "result.json"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_dir)
    bos = leading_token(tokenizer)
    examples = load_examples("squad", "dev", tokenizer, bos=bos, data_dir=data, max_length=160)
    hf = AutoModelForCausalLM.from_pretrained(tiny_causal_dir, dtype=torch.float32).eval()
    stop = sorted(stop_tokens(tokenizer))
    for row, example in zip(rows, examples, strict=True):
        prompt = example.prompt_ids[:1] + example.prompt_ids[1:][-(160 - MAX_NEW_TOKENS - 1):]
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            new = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                              max_new_tokens=MAX_NEW_TOKENS, eos_token_id=stop, pad_token_id=1)[0, len(prompt):]
        want = tokenizer.decode(new, skip_special_tokens=True).strip()
        assert row["prediction"] == want and row["answers"] == list(example.answers)
        assert row["f1"] == f1(want, row["answers"]) and row["em"] == exact_match(want, row["answers"])
    result = json.loads((tmp_path / "result.json").read_text())
    assert result == {"f1": pytest.approx(sum(r["f1"] for r in rows) / 4), "em": sum(r["em"] for r in rows) / 4,
                      "n": 4}


def test_squad_scores_a_gold_answer_as_f1_and_em_one(tmp_path, tiny_causal_dir, made_up_data, monkeypatch):
    """The decode, strip and score path: a model that 'generates' the first gold answer and a newline."""
    import zotune.evaluate as E
    prompted = E.build(str(tiny_causal_dir), "squad", device="cpu")
    examples = prompted.prompt.examples("dev", _squad_data(made_up_data, tmp_path), 16, 0)
    tokenizer = prompted.prompt.tokenizer
    gold = {e.prompt_ids: tokenizer.encode(" " + e.answers[0] + "\n", add_special_tokens=False) for e in examples}
    monkeypatch.setattr(E, "greedy", lambda runner, prompts, n, stop: [gold[tuple(p)] for p in prompts])
    results = E.generation_results(prompted.runner, prompted.prompt, examples, 2)
    assert [r["prediction"] for r in results] == [e.answers[0] for e in examples]
    assert all(r["f1"] == 1.0 and r["em"] == 1.0 for r in results)


def test_squad_trains_on_gold_answers_and_selects_by_f1(tmp_path, tiny_causal_dir, made_up_data):
    run, data = tmp_path / "run", _squad_data(made_up_data, tmp_path / "data", (6, 3, 3))
    assert _run(["train", "--model", tiny_causal_dir, "--task", "squad", "--seed", "0", "--device", "cpu",
                 "--data-dir", data, "--max-length", "128", "--trainable", "lora", "--steps", "2", "--eval-steps", "2",
                 "--batch-size", "3", "--eval-batch-size", "3", "--quiet", "--output-dir", run]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric"] == "f1" and summary["dev_accuracy"] == summary["dev_f1"]
    assert {"dev_em", "test_f1", "test_em"} <= summary.keys() and summary["zero_shot"]["dev_accuracy"] is not None
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["dev_accuracy"] == summary["dev_f1"]  # selection reads F1
    assert all(v == v for v in (m["loss"] for m in metrics))   # the gold answers' NLL is a number


def test_boolq_trains_and_evaluates_from_a_mezo_sample(tmp_path, tiny_causal_dir, made_up_data):
    """BoolQ's training split was not found (data/SOURCES.md): the made-up originals' sample, in
    SuperGLUE's format ("Title -- Passage"), goes through the same reader, task row and scoring."""
    from tests.made_up_data import BOOLQ_VALID
    from zotune.tasks.causal import read_sample_file
    from zotune.tasks.mezo_sample import sample_path
    data, run = made_up_data.data, tmp_path / "run"
    assert _run(["train", "--model", tiny_causal_dir, "--task", "boolq", "--seed", "0", "--device", "cpu",
                 "--data-dir", data, "--trainable", "lora", "--steps", "2", "--eval-steps", "2", "--batch-size", "4",
                 "--eval-batch-size", "100", "--quiet", "--output-dir", run]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric"] == "accuracy" and 0 <= summary["test_accuracy"] <= 1
    out = tmp_path / "preds.jsonl"
    assert _run(["eval", "--model", tiny_causal_dir, "--task", "boolq", "--seed", "0", "--data-dir", data,
                 "--device", "cpu", "--predictions", out]) == 0
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    test = read_sample_file(sample_path(data, "boolq", 0, "test"))  # the validation file, permuted
    assert len(preds) == BOOLQ_VALID and [p["label"] for p in preds] == [0 if r["label"] == "true" else 1 for r in test]
    assert {r["passage"] for r in test} == {f"Passage {i}." for i in range(BOOLQ_VALID)}  # the title prefix cut
