"""tools/fewshot_table.py --aggregate-only: both aggregates of finished grids, nothing run or written there."""

import json
import sys

import fewshot_table


def test_aggregate_only_prints_and_stores_both_aggregates(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "fewshot"
    # One lr wins seed 13, the other seed 21; 3e-5 has the better mean dev. A grid of a subset
    # the script does not run is aggregated too, under its folder's name.
    for grid, trainable, lr, seed, dev, test in [
            ("MeZO-full-k16", "full", 1e-5, 13, 0.9, 0.8), ("MeZO-full-k16", "full", 1e-5, 21, 0.5, 0.5),
            ("MeZO-full-k16", "full", 3e-5, 13, 0.8, 0.7), ("MeZO-full-k16", "full", 3e-5, 21, 0.7, 0.9),
            ("MeZO-lora+head-k16", "lora+head", 1e-3, 13, 0.6, 0.6)]:
        run = runs / grid / f"{trainable}-lr{lr:g}-seed{seed}"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps(
            {"model": "m", "task": "sst2", "k": 16, "optimizer": "mezo", "trainable": trainable, "lr": lr,
             "seed": seed, "steps": 50, "eps": 1e-3, "batch_size": 32}))
        (run / "summary.json").write_text(json.dumps({"dev_accuracy": dev, "test_accuracy": test, "device": "cpu"}))
    before = sorted(runs.rglob("*"))
    output = tmp_path / "table.json"
    monkeypatch.setattr(sys, "argv", ["fewshot_table.py", "--aggregate-only", "--runs-dir", str(runs), "--ks", "16",
                                      "--output", str(output)])
    fewshot_table.main()
    assert sorted(runs.rglob("*")) == before
    stored = json.loads(output.read_text())["runs"]
    assert list(stored) == ["MeZO (full)", "MeZO-lora+head"]
    cell = stored["MeZO (full)"]["16"]
    assert cell["paper"] == [0.8, 0.9] and cell["paper_lrs"] == {"13": 1e-5, "21": 3e-5}
    assert cell["zotune"] == [0.7, 0.9] and cell["zotune_lr"] == 3e-5
    assert "50 steps, batch 32" in cell["settings"]  # the runs' own settings, not the script's
    printed = capsys.readouterr().out
    assert "| MeZO (full) | 85.0 (5.0) | 80.0 (10.0) |" in printed and "k=16 paper | k=16 zotune" in printed
