"""tools/fewshot_table.py --aggregate-only: both aggregates of finished grids, nothing run or written there."""

import json
import sys

import fewshot_table


def test_aggregate_only_prints_and_stores_both_aggregates(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "fewshot"
    # One lr wins seed 13, the other seed 21; 3e-5 has the better mean dev.
    for lr, seed, dev, test in [(1e-5, 13, 0.9, 0.8), (1e-5, 21, 0.5, 0.5), (3e-5, 13, 0.8, 0.7), (3e-5, 21, 0.7, 0.9)]:
        run = runs / "MeZO-full-k16" / f"full-lr{lr:g}-seed{seed}"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps(
            {"model": "m", "task": "sst2", "k": 16, "optimizer": "mezo", "trainable": "full", "lr": lr, "seed": seed,
             "steps": 50, "eps": 1e-3, "batch_size": 32}))
        (run / "summary.json").write_text(json.dumps({"dev_accuracy": dev, "test_accuracy": test, "device": "cpu"}))
    before = sorted(runs.rglob("*"))
    output = tmp_path / "table.json"
    monkeypatch.setattr(sys, "argv", ["fewshot_table.py", "--aggregate-only", "--runs-dir", str(runs),
                                      "--methods", "MeZO (full)", "--ks", "16", "--output", str(output)])
    fewshot_table.main()
    assert sorted(runs.rglob("*")) == before
    cell = json.loads(output.read_text())["runs"]["MeZO (full)"]["16"]
    assert cell["paper"] == [0.8, 0.9] and cell["paper_lrs"] == {"13": 1e-5, "21": 3e-5}
    assert cell["zotune"] == [0.7, 0.9] and cell["zotune_lr"] == 3e-5
    assert "50 steps, batch 32" in cell["settings"]  # the runs' own settings, not the script's
    printed = capsys.readouterr().out
    assert "| MeZO (full) | 85.0 (5.0) | 80.0 (10.0) |" in printed and "k=16 paper | k=16 zotune" in printed
