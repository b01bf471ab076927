"""The command line: eval outputs, and one-line errors with exit code 2 for bad input."""

import json
import subprocess
import sys
import types

import pytest
import torch

from zotune.cli import main


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "zotune", *args], capture_output=True, text=True, timeout=300)


def test_eval_writes_predictions_in_file_order(tmp_path, tiny_mlm_dir):
    data = tmp_path / "mine.tsv"
    data.write_text("sentence\tlabel\na gorgeous , witty film \t1\nboring and flat \t0\nno label here \t1\n")
    out, preds = tmp_path / "out.json", tmp_path / "preds.jsonl"
    assert main(["eval", "--model", str(tiny_mlm_dir), "--task", "sst2", "--data", str(data), "--device", "cpu",
                 "--predictions", str(preds), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["label"] for r in rows] == [1, 0, 1]
    assert all(len(r["logits"]) == 2 and r["pred"] == max(range(2), key=r["logits"].__getitem__) for r in rows)
    result = json.loads(out.read_text())
    assert result["n"] == 3 and result["accuracy"] == sum(r["pred"] == r["label"] for r in rows) / 3


def test_eval_of_an_unlabelled_file_has_null_labels(tmp_path, tiny_mlm_dir):
    data = tmp_path / "unlabelled.tsv"
    data.write_text("sentence\none\ntwo\n")
    preds = tmp_path / "p.jsonl"
    assert main(["eval", "--model", str(tiny_mlm_dir), "--data", str(data), "--device", "cpu",
                 "--predictions", str(preds)]) == 0
    assert [json.loads(line)["label"] for line in preds.read_text().splitlines()] == [None, None]


@pytest.mark.parametrize("args,message", [
    (["train", "--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["train", "--lr", "-1"], "--lr -1.0 is negative"),
    (["train", "--eps", "-0.1"], "--eps -0.1 must be positive"),
    (["train", "--task", "nope"], "unknown --task"),
    (["train", "--trainable", "top:x"], "unknown --trainable"),
    (["train", "--model", "/nonexistent/dir"], "does not exist"),
    (["eval", "--data", "/nonexistent/file.tsv"], "no file /nonexistent/file.tsv"),
    (["train", "--template", "*cls**sent_0*_It_was.*sep+*"], "mask"),
    (["train", "--label-words", "terrible,very good"], "single token"),
])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, tiny_mlm_dir, args, message):
    if "--model" not in args:
        args = [*args, "--model", str(tiny_mlm_dir)]
    if args[0] == "train":
        args = [*args, "--output-dir", str(tmp_path / "run"), "--device", "cpu", "--steps", "1"]
    result = _cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zotune: error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("flags,pair,cache", [([], True, True), (["--no-pair", "--no-cache"], False, False)])
def test_on_by_default_options_have_no_flags(monkeypatch, capsys, flags, pair, cache):
    configs = []
    monkeypatch.setattr("zotune.train.train", lambda cfg, resume=False: configs.append(cfg) or SUMMARY)
    assert main(["train", "--trainable", "lora", "--quiet", *flags]) == 0
    assert (configs[0].trainable, configs[0].pair, configs[0].cache) == ("lora", pair, cache)


SUMMARY = {"optimizer": "mezo", "trainable": "lora", "task": "sst2", "k": 16, "seed": 42, "dev_accuracy": 0.5,
           "test_accuracy": 0.5, "zero_shot": None, "steps": 1, "best_step": 1, "wall_time_s": 1.0, "device": "cpu"}


@pytest.mark.parametrize("flags", [[], ["--output-dir", "elsewhere"], ["--quiet"], ["--task", "sst2", "--seed", "42"]])
def test_the_recipe_does_not_depend_on_other_flags(monkeypatch, capsys, flags):
    # Today's demo unless --recipe names another: an unrelated flag never switches recipe.
    from zotune.config import RECIPES
    configs = []
    monkeypatch.setattr("zotune.train.train", lambda cfg, resume=False: configs.append(cfg) or SUMMARY)
    assert main(["train", *flags]) == 0
    assert configs[0].recipe == "demo"
    assert all(getattr(configs[0], name) == value for name, value in RECIPES["demo"].items())
    assert main(["train", "--recipe", "mezo-paper", *flags]) == 0
    assert (configs[1].lr, configs[1].eps, configs[1].batch_size, configs[1].steps, configs[1].eval_steps,
            configs[1].trainable) == (1e-6, 1e-3, 64, 100_000, 10_000, "full")


def test_the_start_line_names_what_departs_from_the_recipe(monkeypatch):
    from zotune.config import TrainConfig
    from zotune.train import announcement
    session = types.SimpleNamespace(trainable=[("w", torch.zeros(3))], device=torch.device("cpu"))
    assert "recipe demo: mezo top:1 on sst2 k=16 seed 42, 100 steps" in announcement(
        TrainConfig.from_recipe("demo", {}), session)
    paper_like = TrainConfig.from_recipe("demo", {"steps": 100_000, "lr": 1e-6, "trainable": "full", "seed": 42})
    assert paper_like.changed_from_recipe() == ["trainable", "steps", "lr"]
    assert "recipe demo (trainable, steps, lr changed): mezo full on sst2" in announcement(paper_like, session)
    assert TrainConfig(steps=3).changed_from_recipe() == []  # no recipe: nothing to depart from
    # What the demo leaves open comes from the optimizer's paper recipe: Adam decays linearly.
    assert TrainConfig.from_recipe("demo", {"optimizer": "adam"}).schedule == "linear"
    assert TrainConfig.from_recipe("demo", {}).schedule == "constant"


def test_help_shows_defaults_and_recipes(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "mezo-paper" in out and "(default: 1000)" in out and "float32" in out


def test_the_result_says_when_a_run_stopped_early():
    from zotune.cli import result_lines
    summary = {"optimizer": "mezo", "trainable": "full", "task": "sst2", "k": 16, "seed": 13, "dev_accuracy": 0.5,
               "test_accuracy": 0.5, "steps": 200, "best_step": 4, "wall_time_s": 1.0, "device": "cpu", "run_dir": "r",
               "stopped_early": {"step": 8, "why": "the loss diverged: 113 at step 8, against 0.805 at the first step"}}
    assert ("8 of 200 steps, stopped early: the loss diverged: 113 at step 8, against 0.805 at the first step "
            "(lower --lr or --eps, or raise --max-loss-ratio or --max-bad-steps) (best dev at step 4)") in result_lines(summary)
    assert "\n200 steps (best dev at step 4)" in result_lines({**summary, "stopped_early": None})
