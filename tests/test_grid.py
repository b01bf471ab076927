"""`zotune sweep`: a grid of real runs, one table with mean (std) per cell and the best lr by dev."""

import json

from zotune.cli import main


def test_sweep_runs_the_grid_and_picks_lr_by_dev(tmp_path, tiny_mlm_dir, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--seeds", "13,42", "--lrs", "1e-3,1e-2", "--trainable", "top:1", "--devices", "cpu",
            "--output-dir", str(out), "--model", str(tiny_mlm_dir), "--steps", "2", "--eval-steps", "1",
            "--batch-size", "16", "--eps", "1e-2", "--runs-per-device", "2"]
    assert main(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert len(result["cells"]) == 2 and all(len(c["dev"]) == 2 for c in result["cells"])
    for cell in result["cells"]:  # the table is the runs' own summaries, aggregated
        seeds = [json.loads((out / f"top1-lr{cell['lr']:g}-seed{s}" / "summary.json").read_text()) for s in (13, 42)]
        assert cell["test"] == [s["test_accuracy"] for s in seeds]
    best = max(result["cells"], key=lambda c: sum(c["dev"]))
    assert result["best_lr"]["top:1"] == best["lr"]
    assert "| top:1 |" in (out / "results.md").read_text()
    # A second call finds every run finished and only rewrites the table.
    capsys.readouterr()
    assert main(args) == 0
    assert "done " not in capsys.readouterr().out
