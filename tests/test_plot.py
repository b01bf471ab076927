"""zotune plot: a PNG of loss, |projected grad| and dev accuracy from a run's metrics.jsonl."""

import json

import pytest

from zotune.cli import main
from zotune.errors import UserError
from zotune.plot import ema, plot_run

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fake_run(path, *, adam=False, steps=60):
    """A run directory as train.py writes it (the plot reads only these files)."""
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            record = {"step": step, "loss": 0.7 - 0.004 * step + 0.05 * (-1) ** step,
                      "projected_grad": None if adam else (-1) ** step * 3.0 / step, "lr": 1e-3}
            if step % 20 == 0:
                record["dev_accuracy"] = 0.5 + step / 400
            f.write(json.dumps(record) + "\n")
    (path / "config.json").write_text(json.dumps({"optimizer": "adam" if adam else "mezo", "trainable": "lora",
                                                  "task": "sst2", "k": 16, "seed": 42, "lr": 1e-3, "eps": 1e-2}))
    return path


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000


@pytest.mark.parametrize("adam", [False, True])
def test_plot_writes_a_png_next_to_the_run(tmp_path, adam):
    run = _fake_run(tmp_path / "run", adam=adam)
    assert plot_run(run) == run / "run.png"
    _assert_png(run / "run.png")


def test_plot_of_a_real_training_run(tmp_path, tiny_mlm_dir):
    from zotune.config import TrainConfig
    from zotune.train import train
    run = tmp_path / "run"
    train(TrainConfig(model=str(tiny_mlm_dir), steps=4, eval_steps=2, log_steps=1, quiet=True, device="cpu",
                      output_dir=str(run), trainable="bias", lr=1e-3, eps=1e-2, batch_size=8))
    assert main(["plot", str(run), "--output", str(tmp_path / "out" / "p.png")]) == 0
    _assert_png(tmp_path / "out" / "p.png")


def test_plot_skips_nan_and_tolerates_a_torn_last_line(tmp_path):
    run = _fake_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 61, "loss": float("nan"), "projected_grad": float("inf"), "lr": 1e-3}) + "\n")
        f.write('{"step": 62, "lo')  # killed mid-write
    _assert_png(plot_run(run, tmp_path / "x.png"))


def test_ema_is_unbiased_at_the_start():
    assert ema([2.0, 2.0, 2.0], 5) == pytest.approx([2.0, 2.0, 2.0])


def test_plot_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    for run, message in [(tmp_path / "nope", "does not exist"), (tmp_path, "has no metrics.jsonl"),
                         (tmp_path / "empty", "is empty")]:
        assert main(["plot", str(run)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(UserError):
        plot_run(tmp_path / "nope")


def test_dev_curves_mean_band_and_lines(tmp_path):
    from zotune.plot import plot_dev_curves
    runs = []
    for seed in range(3):  # dev at steps 20, 40, 60; a seed with an extra step is cut to the shared ones
        run = _fake_run(tmp_path / f"run{seed}", steps=60 + 20 * (seed == 0))
        runs.append(run)
    out = plot_dev_curves({"MeZO (full), lr 1e-5": runs, "MeZO (LoRA+head), lr 1e-3": runs[1:]},
                          {"zero-shot": 0.6, "Adam (full)": 0.7}, tmp_path / "pic" / "dev.png", "title")
    _assert_png(out)
    with pytest.raises(UserError, match="no runs"):
        plot_dev_curves({"x": []}, {}, tmp_path / "y.png", "t")
