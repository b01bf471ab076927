"""together.py: runs trained a step of each in turn, in one process, end as each run alone does
(the same logs, weights and accuracies), and an interruption leaves every one resumable."""

import json

import pytest
import torch
from safetensors.torch import load_file

import zotune.train as train_module
from zotune.config import TrainConfig
from zotune.errors import UserError
from zotune.together import RunsFailed, one_round, train_together
from zotune.train import train

KEPT = ("steps", "best_step", "dev_accuracy", "test_accuracy", "bad_steps")
COUNTED = ("forward_passes", "tokens_computed")  # a resumed run counts its own process's work only


def _config(model_dir, run_dir, **overrides) -> TrainConfig:
    options = dict(model=str(model_dir), steps=8, eval_steps=4, log_steps=2, snapshot_every=3, quiet=True,
                   device="cpu", output_dir=str(run_dir), trainable="lora", lr=1e-2, eps=1e-2, batch_size=8)
    return TrainConfig(**{**options, **overrides})


# Two MeZO runs of different subsets and lengths, and an Adam run: each the way train() ends it.
RUNS = [dict(), dict(trainable="top:1", seed=21, steps=5), dict(optimizer="adam", trainable="full", lr=1e-3, steps=6)]


def _same_run(a, b, fields=KEPT + COUNTED) -> None:
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert {k: sa[k] for k in fields} == {k: sb[k] for k in fields}
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    if (a / "trajectory.jsonl").exists():  # its records; the header names the run directory
        records = [(d / "trajectory.jsonl").read_text().splitlines()[1:] for d in (a, b)]
        assert records[0] == records[1] and records[0]
    for name in ("best.safetensors", "final.safetensors"):
        if (a / name).exists():
            wa, wb = load_file(a / name), load_file(b / name)
            assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa), name


def test_runs_in_turn_end_as_each_alone(tmp_path, tiny_mlm_dir):
    alone = [train(_config(tiny_mlm_dir, tmp_path / f"alone{i}", **o)) for i, o in enumerate(RUNS)]
    together = train_together([_config(tiny_mlm_dir, tmp_path / f"together{i}", **o) for i, o in enumerate(RUNS)])
    assert [s["steps"] for s in together] == [s["steps"] for s in alone] == [8, 5, 6]
    for i in range(len(RUNS)):
        _same_run(tmp_path / f"alone{i}", tmp_path / f"together{i}")
    # a finished run is not trained again: its summary comes back as it is
    again = train_together([_config(tiny_mlm_dir, tmp_path / "together1", **RUNS[1])], resume=[True])
    assert again[0] == json.loads((tmp_path / "together1" / "summary.json").read_text())


def test_an_interruption_leaves_every_run_resumable(tmp_path, tiny_mlm_dir, monkeypatch):
    """Ctrl-C in the second run's fourth step stops both MeZO runs; resumed together, they end
    bit-identical to uninterrupted runs."""
    runs = RUNS[:2]
    for i, o in enumerate(runs):
        train(_config(tiny_mlm_dir, tmp_path / f"alone{i}", **o))
    real = train_module.mezo_stepper

    def interrupting(cfg, session):
        step_fn = real(cfg, session)

        def step(step, *args):
            if cfg.seed == 21 and step == 3:
                raise KeyboardInterrupt
            return step_fn(step, *args)
        return step
    monkeypatch.setattr(train_module, "mezo_stepper", interrupting)
    cfgs = [_config(tiny_mlm_dir, tmp_path / f"together{i}", **o) for i, o in enumerate(runs)]
    with pytest.raises(KeyboardInterrupt):
        train_together(cfgs)
    assert not any((tmp_path / f"together{i}" / "summary.json").exists() for i in range(2))
    monkeypatch.setattr(train_module, "mezo_stepper", real)
    summaries = train_together(cfgs, resume=[True, True])
    assert [s["resumed_from_step"] for s in summaries] == [4, 3]  # the first run had taken its fourth step
    for i in range(2):
        _same_run(tmp_path / f"alone{i}", tmp_path / f"together{i}", KEPT)


@pytest.mark.parametrize("content", ['[["--steps", "1"]]', '{"runs": []}', '{"runs": [["--steps", "1"], 3]}', "{"])
def test_a_bad_jobs_file_is_one_line(tmp_path, capsys, content):
    from zotune.cli import main
    jobs = tmp_path / "jobs.json"
    jobs.write_text(content)
    assert main(["train-together", str(jobs)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zotune: error:") and "\n" not in err and str(jobs) in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_their_streams_end_as_each_alone_on_a_gpu(tmp_path, tiny_mlm_dir):
    """On CUDA each run steps on a stream of its own, through its CUDA graphs: the streams
    order nothing between runs, so each must still end as it does alone."""
    runs = RUNS[:2]
    for i, o in enumerate(runs):
        train(_config(tiny_mlm_dir, tmp_path / f"alone{i}", device="cuda", **o))
    train_together([_config(tiny_mlm_dir, tmp_path / f"together{i}", device="cuda", **o) for i, o in enumerate(runs)])
    for i in range(len(runs)):
        _same_run(tmp_path / f"alone{i}", tmp_path / f"together{i}", KEPT)


def test_a_run_stopped_by_a_user_error_ends_alone(tmp_path, tiny_mlm_dir, monkeypatch):
    """A run that stops on a UserError (here at its third step) leaves its siblings to finish as
    they would alone; the error names the run that stopped."""
    train(_config(tiny_mlm_dir, tmp_path / "alone0", **RUNS[0]))
    real = train_module.mezo_stepper

    def failing(cfg, session):
        step_fn = real(cfg, session)

        def step(step, *args):
            if cfg.seed == 21 and step == 2:
                raise UserError("a stand-in for any UserError of a step")
            return step_fn(step, *args)
        return step
    monkeypatch.setattr(train_module, "mezo_stepper", failing)
    cfgs = [_config(tiny_mlm_dir, tmp_path / f"together{i}", **o) for i, o in enumerate(RUNS[:2])]
    with pytest.raises(RunsFailed, match=r"1 of 2 runs stopped: .*together1: a stand-in") as failed:
        train_together(cfgs)
    assert failed.value.summaries[1] is None and failed.value.summaries[0]["steps"] == 8
    assert not (tmp_path / "together1" / "summary.json").exists()
    _same_run(tmp_path / "alone0", tmp_path / "together0")


def test_one_round_steps_each_unfinished_run_once_in_order():
    taken = []

    def steps(name, n):
        for i in range(n):
            taken.append(f"{name}{i}")
            yield
        return f"{name} done"
    runs, times = [steps("a", 2), steps("b", 1), steps("c", 3)], [None, None, None]
    rounds = 0
    while any(t is None for t in times):
        one_round(runs, [None] * 3, times)
        rounds += 1
    assert taken == ["a0", "b0", "c0", "a1", "c1", "c2"] and times == ["a done", "b done", "c done"] and rounds == 4
