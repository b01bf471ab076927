"""The trajectory log, `zotune replay`, and numerical faults (issue 7)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from zotune import trajectory
from zotune.cli import main
from zotune.config import TrainConfig
from zotune.engine.runner import ModelRunner
from zotune.errors import UserError
from zotune.optim.flat import FlatParameters
from zotune.optim.mezo import mezo_step
from zotune.train import train


def _run(tmp_path, model_dir, name, **overrides):
    options = dict(model=str(model_dir), steps=12, eval_steps=4, log_steps=2, quiet=True, device="cpu",
                   output_dir=str(tmp_path / name), trainable="lora", lr=1e-2, eps=1e-2, batch_size=16)
    options.update(overrides)
    return train(TrainConfig(**options)), tmp_path / name


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_float32_hex_round_trips_every_value():
    values = torch.tensor([0.0, -0.0, 1e-45, -3.4e38, math.inf, -math.inf, 0.1, 1 / 3], dtype=torch.float32)
    back = trajectory.from_hex(trajectory.to_hex(values))
    assert torch.equal(back.view(torch.int32), values.view(torch.int32))
    nan = trajectory.from_hex(trajectory.to_hex(torch.tensor([math.nan])))
    assert torch.isnan(nan).all()


def test_model_sha256_reads_the_files_once_and_again_when_they_change(tmp_path, tiny_mlm_dir):
    import hashlib
    import shutil

    from zotune.model.loading import weight_files
    shutil.copytree(tiny_mlm_dir, tmp_path / "model")
    weights = weight_files(tmp_path / "model")
    want = hashlib.sha256(b"".join(f.name.encode() + b"\0" + f.read_bytes() for f in weights)).hexdigest()
    misses = trajectory._files_sha256.cache_info().misses
    assert trajectory.model_sha256(str(tmp_path / "model")) == want
    assert trajectory.model_sha256(str(tmp_path / "model")) == want
    assert trajectory._files_sha256.cache_info().misses == misses + 1  # the second call read nothing
    weights[-1].write_bytes(weights[-1].read_bytes() + b"\0")  # other bytes: another size and time
    assert trajectory.model_sha256(str(tmp_path / "model")) != want


@pytest.mark.parametrize("overrides", [{}, {"trainable": "top:1", "n_spsa": 2, "weight_decay": 0.1,
                                            "schedule": "linear"}])
def test_replay_rebuilds_the_final_weights_bit_for_bit(tmp_path, tiny_mlm_dir, capsys, overrides):
    summary, run = _run(tmp_path, tiny_mlm_dir, "run", **overrides)
    header, records = trajectory.read_log(run)
    assert header["model_sha256"] == trajectory.model_sha256(str(tiny_mlm_dir))
    assert header["config"] == TrainConfig(**header["config"]).to_dict()
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(len(r["seeds"]) == len(r["grads"]) == header["config"]["n_spsa"] for r in records)
    capsys.readouterr()  # the training run's own lines
    assert main(["replay", str(run), "--output", str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["written"] == str(tmp_path / "out" / "trainable.safetensors") and report["steps"] == 12
    final = load_file(run / "final.safetensors")
    assert _same(final, load_file(tmp_path / "out" / "trainable.safetensors"))
    assert not _same(final, load_file(run / "best.safetensors")) or summary["best_step"] == 12


@pytest.mark.parametrize("snapshot_step", [None, 2, 5])
def test_restore_rebuilds_the_weights_of_an_earlier_step_on_the_way(tmp_path, snapshot_step):
    """A resumed run whose best-dev weights stayed on another machine gets them from the log:
    restore writes the tensors after step 3 and still ends after the last step, with or
    without a snapshot before the rebuild step, and ignoring one after it."""
    torch.manual_seed(0)
    initial = [("w", torch.randn(300)), ("b", torch.randn(7))]

    def fresh():
        return FlatParameters([(n, torch.nn.Parameter(v.clone())) for n, v in initial], {"b"})

    records = [{"seeds": [11 * s], "grads": trajectory.to_hex(torch.tensor([0.5 - 0.1 * s])), "lr": 1e-2}
               for s in range(6)]
    by_step = []
    for steps in (3, 6):
        flat = fresh()
        trajectory.replay(flat, records[:steps], 1e-2, 0.1)
        by_step.append(flat.state_dict())
    if snapshot_step is not None:
        flat = fresh()
        trajectory.replay(flat, records[:snapshot_step], 1e-2, 0.1)
        trajectory.write_snapshot(tmp_path, flat, snapshot_step)
    flat = fresh()
    trajectory.restore(flat, tmp_path, records, 1e-2, 0.1, rebuild=(3, tmp_path / "best.safetensors"))
    assert _same(load_file(tmp_path / "best.safetensors"), by_step[0])
    assert _same(flat.state_dict(), by_step[1]) and not _same(by_step[0], by_step[1])


def test_a_torn_last_line_is_ignored(tmp_path, tiny_mlm_dir):
    _, run = _run(tmp_path, tiny_mlm_dir, "run", steps=3, eval_steps=3)
    path = run / trajectory.LOG_NAME
    path.write_text(path.read_text() + '{"step": 4, "seeds": [1')
    assert [r["step"] for r in trajectory.read_log(run)[1]] == [1, 2, 3]


def test_replay_refuses_a_different_base_model(tmp_path, tiny_mlm_dir):
    from tests.conftest import save_tiny_roberta
    _, run = _run(tmp_path, tiny_mlm_dir, "run", steps=2, eval_steps=2)
    other = tmp_path / "other"
    save_tiny_roberta(other, vocab_size=50265, hidden=32, layers=2, heads=4, max_position_embeddings=514, seed=1)
    with pytest.raises(UserError, match="is not the one the run started from"):
        trajectory.replay_run(run, tmp_path / "out", model=str(other))


def _nan_loss_at(monkeypatch, bad_calls):
    """Make ModelRunner.loss return NaN on the given calls (2 per MeZO step: L+ then L-; the
    runs below pass pair=False, so each pass is its own call)."""
    real, calls = ModelRunner.loss, [0]

    def loss(self, batch, labels):
        calls[0] += 1
        value = real(self, batch, labels)
        return value * math.nan if bad_calls(calls[0] - 1) else value
    monkeypatch.setattr(ModelRunner, "loss", loss)


def test_nan_steps_are_skipped_counted_logged_and_replayed(tmp_path, tiny_mlm_dir, monkeypatch):
    # Step 3's L- and step 6's L+ are NaN (calls 2 * step + 0/1, steps 0-based).
    _nan_loss_at(monkeypatch, lambda call: call in (2 * 2 + 1, 2 * 5))
    summary, run = _run(tmp_path, tiny_mlm_dir, "run", pair=False)
    assert summary["bad_steps"] == 2
    _, records = trajectory.read_log(run)
    assert [r["step"] for r in records if r["skipped"]] == [3, 6]
    trajectory.replay_run(run, tmp_path / "out")
    assert _same(load_file(run / "final.safetensors"), load_file(tmp_path / "out" / "trainable.safetensors"))


def test_too_many_bad_steps_in_a_row_end_the_run_early_as_a_diverged_one(tmp_path, tiny_mlm_dir, monkeypatch):
    """The run finishes there with its best-dev weights (MeZO's reference trains on through NaN
    losses and keeps its best checkpoint; the steps after would be wasted), and --resume finds
    it finished."""
    _nan_loss_at(monkeypatch, lambda call: call >= 2 * 5)  # every step from step 6 on
    summary, run = _run(tmp_path, tiny_mlm_dir, "run", max_bad_steps=3, steps=40, pair=False)
    assert summary["stopped_early"] == {
        "step": 8, "why": "3 steps in a row had a NaN or Inf loss (--max-bad-steps 3), up to step 8"}
    assert summary["best_step"] in (4, 8) and summary["bad_steps"] == 3
    assert json.loads((run / "summary.json").read_text())["stopped_early"]["step"] == 8
    from zotune.config import read_run_config
    assert train(read_run_config(run), resume=True) == json.loads((run / "summary.json").read_text())
    _, records = trajectory.read_log(run)
    assert len(records) == 8 and [r["skipped"] for r in records] == [False] * 5 + [True] * 3
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8]


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_skipped_step_only_restores(bad, weight_decay, paired):
    """A non-finite loss runs the same sweeps as an lr=0 step: the update is exactly zero.
    Paired, one call returns [L+, L-] (the plus buffer is only read by a paired model)."""
    torch.manual_seed(0)
    params = [("w", torch.nn.Parameter(torch.randn(1000))), ("b", torch.nn.Parameter(torch.randn(10)))]
    a = FlatParameters([(n, torch.nn.Parameter(p.detach().clone())) for n, p in params], {"b"})
    b = FlatParameters([(n, torch.nn.Parameter(p.detach().clone())) for n, p in params], {"b"})
    if paired:
        a.pair_views()
        losses = iter([torch.tensor([1.0, bad])])
    else:
        losses = iter([torch.tensor(1.0), torch.tensor(bad)])
    result = mezo_step(a, lambda: next(losses), [7], 1e-2, 0.5, weight_decay, paired=paired)
    assert not result.finite
    mezo_step(b, lambda: torch.tensor(1.0), [7], 1e-2, 0.0, 0.0)
    assert torch.equal(a.buffer, b.buffer)


def test_k_larger_than_the_data_names_the_folders_that_exist(tmp_path, tiny_mlm_dir):
    with pytest.raises(UserError, match=r"--k 1000 --seed 42.*k-seed folders there: 16-100, 16-13"):
        _run(tmp_path, tiny_mlm_dir, "k", k=1000)
    assert not (tmp_path / "k").exists()


def test_a_bad_streak_between_log_points_still_stops_the_run(tmp_path, tiny_mlm_dir, monkeypatch):
    # Steps 2-5 are bad, step 6 is good again: at the log point (step 8) the current streak is 0,
    # but 4 steps in a row were bad (issue 21: every step counts, not only those at log points).
    _nan_loss_at(monkeypatch, lambda call: 2 * 1 <= call < 2 * 5)
    summary, _ = _run(tmp_path, tiny_mlm_dir, "run", max_bad_steps=3, log_steps=8, eval_steps=8, steps=16, pair=False)
    assert summary["stopped_early"]["why"].startswith("4 steps in a row had a NaN or Inf loss")


def test_adam_counts_bad_steps_too(tmp_path, tiny_mlm_dir, monkeypatch):
    _nan_loss_at(monkeypatch, lambda call: call >= 2)  # one call a step: steps 3.. are bad
    summary, _ = _run(tmp_path, tiny_mlm_dir, "run", optimizer="adam", max_bad_steps=3, log_steps=4, steps=20, lr=1e-3)
    assert summary["stopped_early"] == {
        "step": 8, "why": "6 steps in a row had a NaN or Inf loss (--max-bad-steps 3), up to step 8"}


@pytest.mark.parametrize("trainable", ["prefix", "lora"])
def test_the_initial_trainable_tensors_are_pinned(tmp_path, tiny_mlm_dir, trainable):
    # The header holds the sha256 of the initial tensors (the prefix's come from a forward pass);
    # replay and resume rebuild them and refuse to go on from other bits.
    _, run = _run(tmp_path, tiny_mlm_dir, "run", trainable=trainable, steps=4)
    header, records = trajectory.read_log(run)
    assert len(header["initial_sha256"]) == 64
    trajectory.replay_run(run, tmp_path / "out")
    assert _same(load_file(run / "final.safetensors"), load_file(tmp_path / "out" / "trainable.safetensors"))
    header["initial_sha256"] = "0" * 64
    trajectory.rewrite_log(run, header, records)
    with pytest.raises(UserError, match="initial trainable tensors"):
        trajectory.replay_run(run, tmp_path / "again")
    (run / "summary.json").unlink()
    from zotune.config import read_run_config
    with pytest.raises(UserError, match="initial trainable tensors"):
        train(read_run_config(run), resume=True)


def test_a_diverged_run_ends_early_with_its_best_dev_weights(tmp_path, tiny_mlm_dir):
    """At a step size far too large the loss grows without bound: the run stops at the first
    metrics line past 100x its first step's loss and finishes as a run does (best-dev weights
    tested, summary written); its log replays to its final weights, and --resume finds it finished."""
    summary, run = _run(tmp_path, tiny_mlm_dir, "run", trainable="full", lr=0.1, eps=1e-3, steps=200, pair=False)
    stopped = summary["stopped_early"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = float(trajectory.from_hex([trajectory.read_log(run)[1][0]["loss"]])[0])
    assert stopped["step"] < 200 and stopped["step"] == metrics[-1]["step"] and "the loss diverged" in stopped["why"]
    bar = 100 * max(first, 1.0)
    assert metrics[-1]["loss"] > bar and all(m["loss"] <= bar for m in metrics[:-1])  # the first such line
    assert summary["best_step"] is not None and summary["best_step"] <= stopped["step"]
    assert len(trajectory.read_log(run)[1]) == stopped["step"]
    trajectory.replay_run(run, tmp_path / "out")
    assert _same(load_file(run / "final.safetensors"), load_file(tmp_path / "out" / "trainable.safetensors"))
    again = train(TrainConfig(**json.loads((run / "config.json").read_text())), resume=True)
    assert again == json.loads((run / "summary.json").read_text())


def test_diverged_compares_with_the_first_metrics_line_or_one():
    from zotune.records import RunRecords
    records = RunRecords.__new__(RunRecords)
    records.first_loss = 0.5  # below 1: the bar is 100, not 50
    assert records.diverged({"step": 8, "loss": 99.0}, 100.0) is None
    assert "101 at step 8, against 0.5 at the first step" in records.diverged({"step": 8, "loss": 101.0}, 100.0)
    assert records.diverged({"step": 8, "loss": None}, 100.0) is None  # a non-finite mean: the bad-step count's
    records.first_loss = 3.0
    assert records.diverged({"step": 8, "loss": 299.0}, 100.0) is None and records.diverged({"step": 8, "loss": 301.0}, 100.0)
