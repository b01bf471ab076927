"""`zotune sweep`: a grid of real runs, one table with mean (std) per cell and the best lr by dev."""

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from zotune.cli import main, run_settings
from zotune.errors import UserError
from zotune.grid import Cell, aggregate, aggregate_dir, paper_aggregate


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
    both = result["aggregates"]["top:1"]  # the paper's aggregate and zotune's, side by side
    assert both["zotune"]["lr"] == best["lr"] and both["paper"]["seeds"] == [13, 42]
    assert "paper's rule" in (out / "results.md").read_text()
    # A second call finds every run finished and only rewrites the table.
    capsys.readouterr()
    assert main(args) == 0
    assert "done " not in capsys.readouterr().out
    # The folder asked for other settings: its finished runs are not those runs, so none is skipped
    # as done and nothing runs.
    results = (out / "results.json").read_text()
    assert main([a if a != "16" else "8" for a in args]) == 2  # --batch-size 16 -> 8
    err = capsys.readouterr().err
    assert "holds a finished run of other settings (batch_size 16, not 8)" in err and len(err.splitlines()) == 1
    assert (out / "results.json").read_text() == results


def test_a_run_to_resume_must_be_the_plans_too(tmp_path, monkeypatch):
    import zotune.grid as grid
    job = grid.Job(tmp_path, Cell("full", 1e-3, 13), ("--steps", "10"))
    job.run_dir.mkdir(parents=True)
    (job.run_dir / "config.json").write_text(json.dumps({**run_settings(grid.job_flags(job)), "steps": 20}))
    grid.check_finished([job], run_settings)  # neither finished nor resumable: it starts afresh, from the job's flags
    monkeypatch.setattr(grid, "resumable", lambda run_dir: True)  # --resume would continue it from its own config
    with pytest.raises(UserError, match=r"holds an unfinished run of other settings \(steps 20, not 10\)"):
        grid.check_finished([job], run_settings)


def _finished_run(grid, trainable, lr, seed, dev, test, **config):
    """A run folder as `zotune train` leaves it, with only the fields the aggregates read."""
    cell = Cell(trainable, lr, seed)
    (grid / cell.name).mkdir(parents=True)
    (grid / cell.name / "config.json").write_text(json.dumps(
        {"model": "m", "task": "sst2", "k": 16, "optimizer": "mezo", "trainable": trainable, "lr": lr, "seed": seed,
         "steps": 10, "eps": 1e-3, "batch_size": 4, **config}))
    (grid / cell.name / "summary.json").write_text(json.dumps({"dev_accuracy": dev, "test_accuracy": test,
                                                               "device": "cpu"}))
    return cell


# Seeds 1 and 2 do best at lr 1e-3, seed 3 at 1e-2; 1e-3 has the better mean dev (0.767 against 0.733).
GRID = {(1e-3, 1): (0.9, 0.70), (1e-3, 2): (0.9, 0.72), (1e-3, 3): (0.5, 0.40),
        (1e-2, 1): (0.8, 0.60), (1e-2, 2): (0.8, 0.61), (1e-2, 3): (0.6, 0.65)}


def test_paper_and_zotune_aggregates_differ_where_the_rules_do(tmp_path):
    cells = [_finished_run(tmp_path, "full", lr, seed, dev, test) for (lr, seed), (dev, test) in GRID.items()]
    result = aggregate(tmp_path, cells)["aggregates"]["full"]
    # zotune: one lr for every seed, the best by mean dev.
    assert result["zotune"]["lr"] == 1e-3 and result["zotune"]["test"] == [0.70, 0.72, 0.40]
    # MeZO's gather_result.py: each seed's best-dev run over the whole grid.
    paper = result["paper"]
    assert paper["seeds"] == [1, 2, 3] and paper["lr"] == [1e-3, 1e-3, 1e-2]
    assert paper["test"] == [0.70, 0.72, 0.65] and paper["runs_per_seed"] == [2, 2, 2]
    assert paper["test_mean"] == pytest.approx(statistics.mean([0.70, 0.72, 0.65]))
    assert paper["test_std"] == pytest.approx(float(np.std([0.70, 0.72, 0.65])))  # population std, as numpy's
    assert result["zotune"]["test_mean"] == pytest.approx(0.60667, abs=1e-5)


def test_paper_aggregate_breaks_dev_ties_by_run_name(tmp_path):
    # Equal dev: gather_result.py keeps the first of the runs sorted by output_dir.
    runs = {Cell("lora", 1e-2, 5): {"dev_accuracy": 0.8, "test_accuracy": 0.5},
            Cell("lora", 1e-3, 5): {"dev_accuracy": 0.8, "test_accuracy": 0.9}}
    assert sorted(c.name for c in runs)[0] == "lora-lr0.001-seed5"
    assert paper_aggregate(runs)["test"] == [0.9]


def test_aggregate_dir_reads_finished_runs_and_writes_nothing(tmp_path):
    for (lr, seed), (dev, test) in GRID.items():
        _finished_run(tmp_path, "full", lr, seed, dev, test)
    (tmp_path / "full-lr0.1-seed1").mkdir()  # unfinished: no summary.json, left out
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = aggregate_dir(tmp_path)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert result["aggregates"]["full"]["paper"]["test"] == [0.70, 0.72, 0.65]
    assert result["config"]["k"] == 16 and len(result["cells"]) == 2
    assert "paper's rule" in result["table"] and "zotune's rule" in result["table"]


def test_aggregate_dir_refuses_a_mixed_folder(tmp_path):
    _finished_run(tmp_path, "full", 1e-3, 1, 0.9, 0.7)
    _finished_run(tmp_path, "full", 1e-3, 2, 0.9, 0.7, k=512)
    with pytest.raises(UserError, match=r"differs .* in \['k'\]"):
        aggregate_dir(tmp_path)
    with pytest.raises(UserError, match="no finished run"):
        aggregate_dir(tmp_path / "full-lr0.001-seed1")


def _job(tmp_path, model_dir, steps, model_in="flag"):
    """A job over `model_dir`, named by the --model flag or (model_in "config") by a --config file."""
    from zotune.grid import Job
    model = ("--model", str(model_dir))
    if model_in == "config":
        config = tmp_path / f"config-{Path(model_dir).name}.json"
        config.write_text(json.dumps({"model": str(model_dir)}))
        model = ("--config", str(config))
    args = (*model, "--steps", str(steps), "--eval-steps", "10", "--log-steps", "5",
            "--snapshot-every", "10", "--log-every", "5", "--batch-size", "8", "--eps", "1e-2")
    return Job(tmp_path / "grid", Cell("lora", 1e-2, 13), args)


@pytest.mark.parametrize("model_in", ["flag", "config"])
def test_run_jobs_resumes_an_unfinished_mezo_run(tmp_path, tiny_mlm_dir, model_in):
    """Killed mid-run, then continued with its checkpoint moved to another folder, as a grid
    moved to another machine is, the new folder named by a flag or a --config file: the run is
    matched to the job by the sha256 its log pinned and resumes with --model; another
    checkpoint there is a run of other settings."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import save_tiny_roberta
    from zotune.grid import check_finished, resumable, run_jobs
    from zotune.trajectory import LOG_NAME
    shutil.copytree(tiny_mlm_dir, tmp_path / "model_here")
    job = _job(tmp_path, tmp_path / "model_here", 40)
    command = [sys.executable, "-m", "zotune", "train", *job.train_args, "--trainable", "lora", "--lr", "0.01",
               "--seed", "13", "--output-dir", str(job.run_dir), "--quiet", "--device", "cpu"]
    victim = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    log = job.run_dir / LOG_NAME
    while (not log.exists() or log.read_text().count("\n") < 12) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert resumable(job.run_dir) and not (job.run_dir / "summary.json").exists()
    (tmp_path / "model_here").rename(tmp_path / "model_there")
    save_tiny_roberta(tmp_path / "other", vocab_size=50265, hidden=32, layers=2, heads=4,
                      max_position_embeddings=514, seed=1)
    with pytest.raises(UserError, match="holds an unfinished run of other settings \\(model "):
        check_finished([_job(tmp_path, tmp_path / "other", 40, model_in)], run_settings)
    job = _job(tmp_path, tmp_path / "model_there", 40, model_in)
    check_finished([job], run_settings)
    assert run_jobs([job], ["cpu"], run_settings, quiet=True, keep_weights=False) == []
    summary = json.loads((job.run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] >= 11 and summary["steps"] == 40
    assert not list(job.run_dir.glob("*.safetensors"))  # keep_weights=False


def test_a_finished_adam_run_moved_elsewhere_is_matched_by_its_summarys_sha256(tmp_path, tiny_mlm_dir):
    """An Adam run keeps no trajectory log; its summary.json pins the base weights, so a grid
    continued where the checkpoint lies in another folder counts it as done, and another
    checkpoint there is a run of other settings."""
    import shutil

    from tests.conftest import save_tiny_roberta
    from zotune.grid import Job, check_finished
    from zotune.trajectory import model_sha256

    def adam_job(model_dir):
        return Job(tmp_path / "grid", Cell("full", 1e-3, 13),
                   ("--model", str(model_dir), "--optimizer", "adam", "--steps", "2", "--eval-steps", "2",
                    "--batch-size", "4"))
    shutil.copytree(tiny_mlm_dir, tmp_path / "model_here")
    job = adam_job(tmp_path / "model_here")
    assert _run_on_the_cpu([job]) == []
    summary = json.loads((job.run_dir / "summary.json").read_text())
    assert summary["model_sha256"] == model_sha256(str(tmp_path / "model_here"))
    (tmp_path / "model_here").rename(tmp_path / "model_there")
    check_finished([adam_job(tmp_path / "model_there")], run_settings)  # done: nothing to run
    save_tiny_roberta(tmp_path / "other", vocab_size=50265, hidden=32, layers=2, heads=4,
                      max_position_embeddings=514, seed=1)
    with pytest.raises(UserError, match="holds a finished run of other settings \\(model "):
        check_finished([adam_job(tmp_path / "other")], run_settings)


def _run_on_the_cpu(jobs):
    from zotune.grid import run_jobs
    return run_jobs(jobs, ["cpu"], run_settings, quiet=True, keep_weights=False)


def test_run_jobs_stops_at_the_deadline(tmp_path, tiny_mlm_dir):
    import time

    from zotune.grid import run_jobs
    job = _job(tmp_path, tiny_mlm_dir, 10_000_000)
    started = time.monotonic()
    assert run_jobs([job], ["cpu"], run_settings, quiet=True, deadline=started + 2) == [job]
    assert time.monotonic() - started < 60 and not (job.run_dir / "summary.json").exists()
    assert run_jobs([job], ["cpu"], run_settings, quiet=True, deadline=time.monotonic()) == [job]  # nothing starts past it


def test_runs_per_process_trains_runs_in_turn_to_the_same_results(tmp_path, tiny_mlm_dir):
    """Three runs, two to a process (`zotune train-together`, then a process of one): each ends
    as it does in a process of its own; and the deadline stops a process of several runs."""
    import time

    from zotune.grid import Cell, Job, run_jobs
    base = _job(tmp_path, tiny_mlm_dir, 6)
    cells = [Cell("lora", 1e-2, 13), Cell("lora", 1e-2, 21), Cell("top:1", 1e-2, 42)]
    apart = [Job(tmp_path / "apart", cell, base.train_args) for cell in cells]
    together = [Job(tmp_path / "together", cell, base.train_args) for cell in cells]
    assert run_jobs(apart, ["cpu"], run_settings, quiet=True) == []
    assert run_jobs(together, ["cpu"], run_settings, quiet=True, runs_per_process=2) == []
    for a, b in zip(apart, together):
        sa, sb = (json.loads((job.run_dir / "summary.json").read_text()) for job in (a, b))
        assert (sa["dev_accuracy"], sa["test_accuracy"], sa["best_step"]) == \
            (sb["dev_accuracy"], sb["test_accuracy"], sb["best_step"])
        assert (a.run_dir / "metrics.jsonl").read_text() == (b.run_dir / "metrics.jsonl").read_text()
    assert (tmp_path / "together" / "lora-lr0.01-seed13+1.json").exists()  # the pair's jobs file

    long = [Job(tmp_path / "long", cell, _job(tmp_path, tiny_mlm_dir, 10_000_000).train_args) for cell in cells[:2]]
    started = time.monotonic()
    assert run_jobs(long, ["cpu"], run_settings, quiet=True, runs_per_process=2, deadline=started + 3) == long
    assert time.monotonic() - started < 60 and not any((job.run_dir / "summary.json").exists() for job in long)


def test_a_failed_run_of_a_process_leaves_the_others_finished(tmp_path, tiny_mlm_dir):
    """Of two runs trained together, one cannot start (its folder holds something that is not a
    zotune run): the other finishes, and the error names the failed run only."""
    from zotune.grid import Cell, Job, run_jobs
    base = _job(tmp_path, tiny_mlm_dir, 4)
    jobs = [Job(tmp_path / "grid", cell, base.train_args) for cell in (Cell("lora", 1e-2, 13), Cell("lora", 1e-2, 21))]
    jobs[1].run_dir.mkdir(parents=True)
    (jobs[1].run_dir / "notes.txt").write_text("mine\n")
    with pytest.raises(UserError, match=r"^1 run\(s\) failed: \S+seed21 \(exit 2, see \S+seed13\+1\.log\)$"):
        run_jobs(jobs, ["cpu"], run_settings, quiet=True, runs_per_process=2)
    assert (jobs[0].run_dir / "summary.json").exists() and not (jobs[1].run_dir / "summary.json").exists()
    assert "is not one" in (tmp_path / "grid" / "lora-lr0.01-seed13+1.log").read_text()


def test_mps_server_starts_a_daemon_of_its_own_and_quits_it(tmp_path, monkeypatch):
    """A stand-in for NVIDIA's control program records how it is called: started as a daemon
    and told to quit, both with the pipe and log folders the yielded environment names."""
    from zotune.grid import mps_server
    calls = _fake_mps_control(tmp_path, monkeypatch)
    import signal
    before = signal.getsignal(signal.SIGTERM)
    with mps_server(tmp_path / "mps") as env:
        assert env == {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "mps" / "pipe"),
                       "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "mps" / "log")}
        assert (tmp_path / "mps" / "pipe").is_dir() and calls.read_text() == f"-d stdin= {tmp_path}/mps/pipe\n"
        with pytest.raises(SystemExit):  # a SIGTERM unwinds through the quit below
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    assert calls.read_text().splitlines()[1] == f" stdin=quit {tmp_path}/mps/pipe"
    assert signal.getsignal(signal.SIGTERM) is before


def test_mps_server_without_the_control_program_is_a_user_error(tmp_path, monkeypatch):
    from zotune.grid import mps_server
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="--mps needs nvidia-cuda-mps-control"):
        with mps_server(tmp_path / "mps"):
            pass


def test_run_jobs_gives_every_process_the_extra_environment(tmp_path, monkeypatch):
    import zotune.grid as grid
    seen = []
    monkeypatch.setattr(grid, "_call", lambda command, out, env, deadline: seen.append(env) or 1)
    jobs = [grid.Job(tmp_path / "grid", Cell("lora", 1e-2, seed), ("--steps", "1")) for seed in (13, 21)]
    with pytest.raises(UserError, match="2 run"):
        grid.run_jobs(jobs, ["cpu"], run_settings, quiet=True, env={"CUDA_MPS_PIPE_DIRECTORY": "/p"})
    assert len(seen) == 2 and all(env["CUDA_MPS_PIPE_DIRECTORY"] == "/p" and "OMP_NUM_THREADS" in env for env in seen)


def _fake_mps_control(tmp_path, monkeypatch):
    """A stand-in for NVIDIA's control program on PATH; it appends how it was called to the file returned."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "nvidia-cuda-mps-control"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$* stdin=$(test "$1" = -d || cat) $CUDA_MPS_PIPE_DIRECTORY" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    return calls


def test_sweep_mps_makes_every_run_a_client_and_quits_the_server(tmp_path, monkeypatch):
    import zotune.grid as grid
    calls = _fake_mps_control(tmp_path, monkeypatch)
    seen = []
    monkeypatch.setattr(grid, "_call", lambda command, out, env, deadline: seen.append(env) or 1)
    with pytest.raises(UserError, match="2 run"):
        grid.run_grid(tmp_path / "grid", [13, 21], [1e-2], ["lora"], ["--steps", "1"], ["0"], run_settings, quiet=True,
                      mps=True)
    pipes = {env["CUDA_MPS_PIPE_DIRECTORY"] for env in seen}
    assert len(seen) == 2 and len(pipes) == 1  # one server for all the runs
    pipe = pipes.pop()
    assert calls.read_text().splitlines() == [f"-d stdin= {pipe}", f" stdin=quit {pipe}"]
    assert not Path(pipe).parent.exists()  # the server's temporary folder, removed after it quit


def test_sweep_mps_on_the_cpu_is_refused_before_anything_is_written(tmp_path, capsys):
    assert main(["sweep", "--output-dir", str(tmp_path / "grid"), "--lrs", "1e-2", "--devices", "cpu", "--mps",
                 "--steps", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "zotune: error: --mps lets processes share a GPU, and these runs go to the CPU: drop --mps"]
    assert not (tmp_path / "grid").exists()


@pytest.mark.parametrize("flags, says", [
    (["--seeds", "13,13"], "--seeds, --lrs or --trainable names a value twice (run full-lr0.01-seed13 would be "
                           "started twice); give each once"),
    (["--lrs", "1e-2,0.01"], "names a value twice (run full-lr0.01-seed13 and 4 more would be started twice)"),
    (["--eps", "-1"], "--eps -1.0 must be positive"),  # each run would have refused it, one by one
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag")])
def test_a_grid_no_run_could_start_is_refused_before_anything_is_written(tmp_path, capsys, flags, says):
    args = ["sweep", "--output-dir", str(tmp_path / "grid"), "--lrs", "1e-2", "--devices", "cpu", "--steps", "1"]
    try:
        code = main(args + flags)
    except SystemExit as exit_:  # a flag the train parser does not know exits from it, as `zotune train` would
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zotune: error: ") and says in err[0]
    assert not (tmp_path / "grid").exists()


def test_process_groups_keep_adam_runs_alone():
    from zotune.grid import Job, process_groups
    mezo, adam = ("--optimizer", "mezo"), ("--optimizer", "adam")
    jobs = [Job(Path("g"), Cell("full", 1e-5, seed), args)
            for seed, args in enumerate([mezo, mezo, adam, mezo, (), ("--optimizer=adam",), mezo])]
    groups = process_groups(jobs, 3)
    assert [[job.cell.seed for job in group] for group in groups] == [[0, 1, 3], [2], [4, 6], [5]]
    assert process_groups(jobs, 1) == [[job] for job in jobs]


def test_the_table_counts_runs_that_stopped_early(tmp_path):
    for (lr, seed), (dev, test) in GRID.items():
        _finished_run(tmp_path, "full", lr, seed, dev, test)
    path = tmp_path / "full-lr0.01-seed2" / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "stopped_early": {"step": 8, "why": "diverged"}}))
    result = aggregate_dir(tmp_path)
    assert {c["lr"]: c["stopped_early"] for c in result["cells"]} == {1e-3: 0, 1e-2: 1}
    assert "| 3 (1 stopped early: diverged) |" in result["table"] and result["table"].count("stopped early") == 1
