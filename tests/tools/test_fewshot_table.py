"""tools/fewshot_table.py: the plan, and --aggregate-only over synthetic finished grids (both
aggregates, the picture, the bundle), nothing run or written under the runs folder."""

import json
import sys
import tarfile
from pathlib import Path

import pytest

import fewshot_table


def _run(runs, grid, trainable, lr, seed, dev, test, steps=50, optimizer="mezo", k=16):
    """A finished run folder with the files the tool reads; dev at steps 25 and `steps`."""
    run = runs / grid / f"{trainable.replace(':', '')}-lr{lr:g}-seed{seed}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(
        {"model": "m", "task": "sst2", "k": k, "optimizer": optimizer, "trainable": trainable, "lr": lr,
         "seed": seed, "steps": steps, "eps": 1e-3, "batch_size": 32}))
    (run / "summary.json").write_text(json.dumps({"dev_accuracy": dev, "test_accuracy": test, "device": "cpu",
                                                  "zero_shot": {"dev_accuracy": 0.6, "test_accuracy": 0.55}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5, "dev_accuracy": a}) + "\n"
                                               for s, a in [(25, dev - 0.1), (steps, dev)]))
    (run / "final.safetensors").write_bytes(b"weights")  # never bundled


def _main(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["fewshot_table.py", *argv])
    fewshot_table.main()


def _plan(monkeypatch, lrs, seeds=fewshot_table.SEEDS):
    """Every table method's lr grid and the seeds set to these: a grid is a table cell once all
    of its planned runs are finished."""
    for name, (trainable, _, flags) in list(fewshot_table.METHODS.items()):
        monkeypatch.setitem(fewshot_table.METHODS, name, (trainable, lrs, flags))
    monkeypatch.setattr(fewshot_table, "SEEDS", seeds)


def test_aggregate_only_prints_and_stores_both_aggregates(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "fewshot"
    _plan(monkeypatch, (1e-5, 3e-5), seeds=(13, 21))
    # One lr wins seed 13, the other seed 21; 3e-5 has the better mean dev. A grid of another
    # name is aggregated too, under its folder's name; unfinished grids are left out: one with a
    # run still going, one whose other runs have not begun.
    for grid, trainable, lr, seed, dev, test in [
            ("MeZO-full-k16", "full", 1e-5, 13, 0.9, 0.8), ("MeZO-full-k16", "full", 1e-5, 21, 0.5, 0.5),
            ("MeZO-full-k16", "full", 3e-5, 13, 0.8, 0.7), ("MeZO-full-k16", "full", 3e-5, 21, 0.7, 0.9),
            ("Other-top1-k16", "top:1", 1e-3, 13, 0.6, 0.6), ("MeZO-lora-k16", "lora", 1e-5, 13, 0.6, 0.6),
            ("MeZO-prefix-k16", "prefix", 1e-5, 13, 0.6, 0.6), ("MeZO-prefix-k16", "prefix", 1e-5, 21, 0.6, 0.6)]:
        _run(runs / "sst2", grid, trainable, lr, seed, dev, test)
    (runs / "sst2" / "MeZO-lora-k16" / "lora-lr1e-05-seed21").mkdir()  # still running
    (runs / "zero_shot.json").write_text(json.dumps(
        {"model": "m", "device": "cpu", "tasks": {"sst2": {"zero-shot": {"16": [0.7, 0.7]}}}}))
    before = sorted(runs.rglob("*"))
    output = tmp_path / "table.json"
    _main(monkeypatch, "--aggregate-only", "--runs-dir", str(runs), "--ks", "16", "--tasks", "sst2",
          "--output", str(output))
    assert sorted(runs.rglob("*")) == before
    stored = json.loads(output.read_text())["runs"]["sst2"]
    assert list(stored) == ["zero-shot", "MeZO (full)", "Other-top1"]
    cell = stored["MeZO (full)"]["16"]
    assert cell["paper"] == [0.8, 0.9] and cell["paper_lrs"] == {"13": 1e-5, "21": 3e-5}
    assert cell["zotune"] == [0.7, 0.9] and cell["zotune_lr"] == 3e-5
    assert "50 steps, batch 32" in cell["settings"]  # the runs' own settings, not the script's
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith("| Other-top1 | 60.0 (0.0) | 60.0 (0.0) | 50 steps, batch 32, eps 0.001, "
                                     "lr grid {0.001} |")  # the table is printed last
    assert "| MeZO (full) | 85.0 (5.0) | 80.0 (10.0) |" in printed and "k=16 paper | k=16 zotune" in printed


def _finish_as_planned(job):
    """A finished run of exactly the job's settings (what its `zotune train` would write)."""
    from zotune.cli import run_settings
    from zotune.grid import job_flags
    job.run_dir.mkdir(parents=True)
    (job.run_dir / "config.json").write_text(json.dumps(run_settings(job_flags(job))))
    (job.run_dir / "summary.json").write_text("{}")


def test_plan_counts_runs_and_estimates_only_from_a_given_speed(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "fewshot"
    model = fewshot_table.MASKED_MODEL
    planned = fewshot_table.plan("table", ["sst2"], [16], ["MeZO (full)", "Adam (full)"], runs, model)
    _finish_as_planned(planned[0][3])  # finished: not counted
    args = ["--plan", "--device", "cpu", "--runs-dir", str(runs), "--tasks", "sst2,rte", "--ks", "16",
            "--methods", "MeZO (full),Adam (full)"]
    _main(monkeypatch, *args)
    out = capsys.readouterr().out
    # 2 tasks x 1 k x (3 + 3 lrs) x 5 seeds; no speed given, no estimate.
    assert "plan: 60 runs, 1 finished, 59 to go (0 to resume), 175,000 steps to go; 1 at a time" in out
    assert "wall time" not in out and "lr grid {3e-06, 1e-05, 3e-05}" in out
    assert "Adam (full): full, 1000 steps, batch 8, linear lr schedule" in out  # ft-paper's, as the reference's
    _main(monkeypatch, *args, "--steps-per-s", "100", "--overhead-s", "10", "--runs-per-device", "4")
    # (29 x 5,000 + 30 x 1,000 steps) / 100 + 59 x 10 s, over 4 runs at a time
    assert f"about {(175_000 / 100 + 590) / 4:.0f} s of wall time" in capsys.readouterr().out


def test_a_finished_run_of_other_settings_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    # Sessions 11-18's Adam runs started from the demo recipe: a constant lr, not the reference's
    # linear decay. Counted as finished they would have stood in for the plan's runs.
    runs = tmp_path / "fewshot"
    job = fewshot_table.plan("table", ["sst2"], [16], ["Adam (full)"], runs, fewshot_table.MASKED_MODEL)[0][3]
    _finish_as_planned(job)
    config = json.loads((job.run_dir / "config.json").read_text())
    (job.run_dir / "config.json").write_text(json.dumps({**config, "schedule": "constant", "recipe": "demo"}))
    before = sorted(runs.rglob("*"))
    with pytest.raises(SystemExit, match="2"):
        _main(monkeypatch, "--device", "cpu", "--runs-dir", str(runs), "--tasks", "sst2", "--ks", "16",
              "--methods", "Adam (full)")
    err = capsys.readouterr().err
    assert f"{job.run_dir} holds a finished run of other settings (schedule 'constant', not 'linear')" in err
    assert f"move {job.output_dir} aside" in err and len(err.splitlines()) == 1
    assert sorted(runs.rglob("*")) == before  # nothing ran, nothing written (zero-shot comes after the check)


def test_paper_protocol_plans_sst2_only_with_the_papers_settings(tmp_path, monkeypatch, capsys):
    _main(monkeypatch, "--plan", "--device", "cpu", "--protocol", "mezo-paper", "--runs-dir", str(tmp_path))
    out = capsys.readouterr().out
    assert "plan: 60 runs, 0 finished, 60 to go (0 to resume), 6,000,000 steps to go" in out
    assert "100000 steps, batch 64, eps 0.001" in out and "MeZO (LoRA+head): lora+head" in out
    assert "dev every 1000, best dev of every 10000" in out  # mezo.sh selects every 10,000
    # Shortened (--mezo-steps), it evaluates six times and selects at each: a valid --select-steps.
    args = fewshot_table._with_steps(fewshot_table.plan("mezo-paper", ["sst2"], [512], ["MeZO (full)"], tmp_path,
                                                        "m")[0][3].train_args, 70)
    assert [args[args.index(flag) + 1] for flag in ("--steps", "--eval-steps", "--select-steps")] == ["70", "11", "11"]
    with pytest.raises(SystemExit):
        _main(monkeypatch, "--plan", "--protocol", "mezo-paper", "--tasks", "rte")
    # k=512 of both methods first when asked (--ks 512,16): the picture's runs finish first.
    jobs = fewshot_table.plan("mezo-paper", ["sst2"], [512, 16], list(fewshot_table.PAPER_METHODS), tmp_path, "m")
    assert [(k, name) for _, k, name, _ in jobs[::15]] == [
        (512, "MeZO (full)"), (512, "MeZO (LoRA+head)"), (16, "MeZO (full)"), (16, "MeZO (LoRA+head)")]


def test_lrs_past_a_grids_edge_plan_only_those_and_bad_ones_are_refused(tmp_path, monkeypatch, capsys):
    # Session 22: every seed of MeZO (LoRA+head) k=512 chose the grid's top lr; --lrs runs past it.
    args = ["--plan", "--device", "cpu", "--protocol", "mezo-paper", "--ks", "512", "--methods", "MeZO (LoRA+head)",
            "--runs-dir", str(tmp_path / "edge")]
    _main(monkeypatch, *args, "--lrs", "1e-4")
    out = capsys.readouterr().out
    assert "plan: 5 runs, 0 finished, 5 to go (0 to resume), 500,000 steps to go" in out
    assert "lr grid {0.0001}" in out
    jobs = fewshot_table.plan("mezo-paper", ["sst2"], [512], ["MeZO (LoRA+head)"], tmp_path, "m", (1e-4, 3e-4))
    assert sorted({job.cell.lr for *_, job in jobs}) == [1e-4, 3e-4] and len(jobs) == 10
    for bad in ("", "1e-4,x", "-1e-4", "nan", "0", "1e-4,0.0001"):
        with pytest.raises(SystemExit, match="2"):
            _main(monkeypatch, *args, f"--lrs={bad}")
        err = capsys.readouterr().err
        assert err.startswith(f"fewshot_table.py: error: --lrs {bad!r} is not a list of learning rates") and \
            len(err.splitlines()) == 1
    assert not (tmp_path / "edge").exists()


def test_a_folder_of_runs_past_a_grids_edge_is_a_cell_at_its_own_lrs(tmp_path, monkeypatch, capsys):
    # Session 24: the edge folder's five runs at 1e-4 were all finished, yet the table had no row
    # for them: the folder was checked against the grid's lrs, whose runs it never has.
    runs, grid = tmp_path / "edge", fewshot_table.grid_dir(Path(), "MeZO (LoRA+head)", "lora+head", 512).name
    for seed in fewshot_table.SEEDS:
        _run(runs / "sst2-mezo-paper", grid, "lora+head", 1e-4, seed, 0.78, 0.8 + seed / 10_000, k=512)
    args = ["--aggregate-only", "--protocol", "mezo-paper", "--runs-dir", str(runs), "--ks", "512",
            "--methods", "MeZO (LoRA+head)", "--output", str(tmp_path / "edge.json")]
    _main(monkeypatch, *args)
    assert "MeZO (LoRA+head)" not in json.loads((tmp_path / "edge.json").read_text())["runs"]["sst2"]
    _main(monkeypatch, *args, "--lrs", "1e-4")
    cell = json.loads((tmp_path / "edge.json").read_text())["runs"]["sst2"]["MeZO (LoRA+head)"]["512"]
    assert cell["zotune_lr"] == 1e-4 and sorted(cell["zotune"]) == [0.8 + seed / 10_000 for seed in fewshot_table.SEEDS]
    assert "lr grid {0.0001}" in cell["settings"]
    # One run of the edge unfinished: no cell yet.
    (runs / "sst2-mezo-paper" / grid / "lora+head-lr0.0001-seed42" / "summary.json").unlink()
    _main(monkeypatch, *args, "--lrs", "1e-4")
    assert "MeZO (LoRA+head)" not in json.loads((tmp_path / "edge.json").read_text())["runs"]["sst2"]
    capsys.readouterr()


@pytest.mark.parametrize("flags, says", [
    (["--ks", "x"], "--ks 'x' is not a list of shot counts"), (["--ks", "16,16"], "--ks '16,16' is not a list"),
    (["--ks", "7"], "k-shot-1k-test has no 7-13 split (5 of the plan's k-seed folders missing); pass --ks among "
                    "the k there: 16, 512"),
    (["--runs-per-device", "0"], "--runs-per-device 0 leaves nothing to run"),
    (["--mezo-steps", "0"], "--mezo-steps 0 leaves nothing to run"),
    (["--deadline", "0"], "--deadline takes a positive number of seconds, not 0"),
    (["--steps-per-s", "nan"], "--steps-per-s takes a positive number of steps a second, not nan"),
    (["--overhead-s=-1"], "--overhead-s takes 0 or more seconds, not -1")])
def test_numbers_and_shots_that_no_run_could_use_are_refused_first(tmp_path, monkeypatch, capsys, flags, says):
    with pytest.raises(SystemExit, match="2"):
        _main(monkeypatch, "--device", "cpu", "--tasks", "sst2", "--runs-dir", str(tmp_path / "runs"), *flags)
    err = capsys.readouterr().err
    assert err.startswith("fewshot_table.py: error: ") and says in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # refused before the zero-shot rows or any run


@pytest.mark.parametrize("archive, magic", [("runs.tar.xz", b"\xfd7zXZ\x00"), ("runs.tgz", b"\x1f\x8b")])
def test_picture_and_bundle_from_finished_grids(tmp_path, monkeypatch, archive, magic):
    runs = tmp_path / "fewshot"
    _plan(monkeypatch, (1e-5, 1e-4))
    for grid, trainable, optimizer in [("MeZO-full-k512", "full", "mezo"), ("MeZO-lora+head-k512", "lora+head", "mezo"),
                                       ("Adam-full-k512", "full", "adam")]:
        for lr in (1e-5, 1e-4):
            for seed in fewshot_table.SEEDS:
                dev = {"full": 0.8, "lora+head": 0.75}[trainable] + lr * 100 + seed / 1000
                _run(runs / "sst2", grid, trainable, lr, seed, dev - (optimizer == "adam") * 0.02, 0.8,
                     optimizer=optimizer, k=512)
    (runs / "sst2" / "MeZO-full-k512" / "full-lr1e-05-seed13+5.log").write_text("zotune: error: why\n")
    (runs / "sst2" / "MeZO-full-k512" / "full-lr1e-05-seed13" / "trajectory.jsonl").write_text("{}\n")  # finished
    unfinished = runs / "sst2" / "MeZO-full-k16" / "full-lr1e-05-seed13"  # killed: no summary.json
    unfinished.mkdir(parents=True)
    for name in ("config.json", "trajectory.jsonl", "snapshot.safetensors"):
        (unfinished / name).write_text("{}\n")
    picture, tgz = tmp_path / "dev.png", tmp_path / "out" / archive
    _main(monkeypatch, "--aggregate-only", "--runs-dir", str(runs), "--tasks", "sst2", "--ks", "512",
          "--methods", "MeZO (full),MeZO (LoRA+head),Adam (full)", "--output", str(tmp_path / "t.json"),
          "--plot", str(picture), "--bundle", str(tgz))
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tgz.read_bytes().startswith(magic)  # xz where the name ends in .xz, else gzip
    with tarfile.open(tgz) as tar:
        names = tar.getnames()
    assert len(names) == 3 * 2 * 5 * 3 + 1 + 2 and not any(n.endswith(".safetensors") for n in names)
    assert "fewshot/sst2/MeZO-full-k512/full-lr1e-05-seed13+5.log" in names  # where a failure says why
    # An unfinished run brings its trajectory log (its continuation elsewhere), a finished one does not.
    assert {"fewshot/sst2/MeZO-full-k16/full-lr1e-05-seed13/trajectory.jsonl",
            "fewshot/sst2/MeZO-full-k16/full-lr1e-05-seed13/config.json"} <= set(names)
    assert "fewshot/sst2/MeZO-full-k512/full-lr1e-05-seed13/trajectory.jsonl" not in names
    assert "fewshot/sst2/MeZO-full-k512/full-lr1e-05-seed13/metrics.jsonl" in names


def test_the_paper_protocol_aggregates_beside_the_tables_runs(tmp_path, monkeypatch, capsys):
    # As gpu_session.sh's header says to finish it: the protocol's runs unpacked into the table's
    # folder (sst2-mezo-paper/ beside sst2/), the picture's Adam line from the table's Adam grid.
    runs = tmp_path / "fewshot"
    for name, (trainable, lrs, _) in fewshot_table.PAPER_METHODS.items():
        grid = fewshot_table.grid_dir(runs / "sst2-mezo-paper", name, trainable, 512).name
        for lr in lrs:
            for seed in fewshot_table.SEEDS:
                _run(runs / "sst2-mezo-paper", grid, trainable, lr, seed, 0.7 + lr * 1000, 0.8, steps=100_000, k=512)
    adam_lrs = fewshot_table.METHODS["Adam (full)"][1]
    for lr in adam_lrs:
        for seed in fewshot_table.SEEDS:
            _run(runs / "sst2", "Adam-full-k512", "full", lr, seed, 0.85 - abs(lr - 3e-5), 0.84, optimizer="adam", k=512)
    import zotune.plot
    drawn, draw = {}, zotune.plot.plot_dev_curves
    monkeypatch.setattr(zotune.plot, "plot_dev_curves",
                        lambda curves, lines, *rest: drawn.update(curves=curves, lines=lines) or draw(curves, lines, *rest))
    picture = tmp_path / "dev-100k.png"
    _main(monkeypatch, "--protocol", "mezo-paper", "--aggregate-only", "--runs-dir", str(runs), "--ks", "512",
          "--output", str(tmp_path / "paper.json"), "--plot", str(picture))
    out = capsys.readouterr().out
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "protocol mezo-paper" in out and "this call" not in out  # aggregating measures no run's time
    rows = json.loads((tmp_path / "paper.json").read_text())["runs"]["sst2"]
    assert rows["MeZO (full)"]["512"]["paper_lrs"] == {str(seed): 1e-5 for seed in fewshot_table.SEEDS}
    assert rows["MeZO (LoRA+head)"]["512"]["zotune_lr"] == 3e-5 and "Adam (full)" not in rows
    assert sorted(drawn["curves"]) == ["MeZO (LoRA+head), lr 3e-05", "MeZO (full), lr 1e-05"]
    assert drawn["lines"] == {"zero-shot": 0.6, "Adam (full), lr 3e-05": pytest.approx(0.85)}
    # An Adam grid not yet complete draws no line; an unfinished MeZO grid, no picture.
    (runs / "sst2" / "Adam-full-k512" / f"full-lr{adam_lrs[-1]:g}-seed100" / "summary.json").unlink()
    _main(monkeypatch, "--protocol", "mezo-paper", "--aggregate-only", "--runs-dir", str(runs), "--ks", "512",
          "--output", str(tmp_path / "paper.json"), "--plot", str(picture))
    assert drawn["lines"] == {"zero-shot": 0.6}
    (runs / "sst2-mezo-paper" / "MeZO-full-k512" / "full-lr1e-06-seed13" / "summary.json").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit, match="2"):
        _main(monkeypatch, "--protocol", "mezo-paper", "--aggregate-only", "--runs-dir", str(runs), "--ks", "512",
              "--output", str(tmp_path / "paper.json"), "--plot", str(picture))
    assert "MeZO-full-k512 has 1 run not finished (full-lr1e-06-seed13)" in capsys.readouterr().err


@pytest.mark.parametrize("tiny_causal_dir", ["llama"], indirect=True)
def test_a_causal_checkpoint_takes_the_causal_protocol_and_refuses_the_others(tmp_path, tiny_causal_dir, monkeypatch,
                                                                               capsys):
    model = str(tiny_causal_dir)
    _main(monkeypatch, "--plan", "--device", "cpu", "--model", model, "--runs-dir", str(tmp_path))
    out = capsys.readouterr().out
    # SST-2 only, 2 ks x 5 seeds: MeZO full 3 lrs and LoRA 5 (80 runs of 2,000 steps), Adam 2 (20 of 1,000)
    assert "plan: 100 runs, 0 finished, 100 to go (0 to resume), 180,000 steps to go" in out
    assert "MeZO (full): full, 2000 steps, batch 16, eps 0.001" in out and "MeZO (LoRA): lora, " in out
    jobs = fewshot_table.plan("causal", ["sst2"], [16], ["Adam (full)"], tmp_path, model)
    assert not any("--no-cuda-graphs" in job.train_args for *_, job in jobs)  # causal LMs run CUDA graphs too
    assert jobs[0][3].output_dir == tmp_path / "sst2-causal" / "Adam-full-k16"
    from tests.conftest import ROBERTA_TOKENIZER_DIR  # the shipped masked LM's folder
    for argv in (["--protocol", "table", "--model", model], ["--protocol", "causal"],
                 ["--protocol", "causal", "--model", str(ROBERTA_TOKENIZER_DIR)],
                 ["--model", model, "--methods", "MeZO (LoRA+head)"]):
        with pytest.raises(SystemExit) as exit_:
            _main(monkeypatch, "--plan", "--device", "cpu", "--runs-dir", str(tmp_path), *argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("fewshot_table.py: error: ") and err.count("\n") == 1, argv


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("tiny_causal_dir", ["llama"], indirect=True)
def test_a_tiny_causal_table_runs_then_aggregates(tmp_path, tiny_causal_dir, monkeypatch, capsys):
    """One seed, one lr, 3 MeZO steps of a real `zotune train` run; then --aggregate-only."""
    monkeypatch.setattr(fewshot_table, "SEEDS", (42,))
    trainable, _, flags = fewshot_table.CAUSAL_METHODS["MeZO (full)"]
    monkeypatch.setitem(fewshot_table.CAUSAL_METHODS, "MeZO (full)", (trainable, (1e-3,), flags))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the run's process too
    runs = tmp_path / "runs"
    common = ["--model", str(tiny_causal_dir), "--device", "cpu", "--ks", "16", "--methods", "MeZO (full)",
              "--runs-dir", str(runs)]
    _main(monkeypatch, *common, "--mezo-steps", "3", "--output", str(tmp_path / "first.json"))
    capsys.readouterr()
    _main(monkeypatch, "--aggregate-only", *common, "--output", str(tmp_path / "table.json"))
    stored = json.loads((tmp_path / "table.json").read_text())
    rows = stored["runs"]["sst2"]
    assert stored["protocol"] == "causal" and stored["models"] == [str(tiny_causal_dir)]
    assert list(rows) == ["zero-shot", "zero-shot, threshold fitted on the seed's dev set", "MeZO (full)"]
    mezo = rows["MeZO (full)"]["16"]
    assert mezo["zotune_lr"] == 1e-3 and "3 steps, batch 16" in mezo["settings"]
    # The tool's zero-shot scorer is the run's own (candidate scores through evaluate.build)
    run = runs / "sst2-causal" / "MeZO-full-k16" / "full-lr0.001-seed42"
    zero_shot = json.loads((run / "summary.json").read_text())["zero_shot"]
    assert rows["zero-shot"]["16"]["paper"] == [zero_shot["test_accuracy"]]
    assert 0 <= rows["zero-shot, threshold fitted on the seed's dev set"]["16"]["paper"][0] <= 1
    assert "| MeZO (full) |" in capsys.readouterr().out


def test_the_shipped_paper_runs_give_the_figures_the_readme_states(tmp_path, monkeypatch):
    # benchmarks/paper-runs.tar.xz holds the finished runs of the paper's protocol; every cell whose
    # seeds are all in is aggregated, and README.md must state both of its aggregates as measured.
    repo = Path(__file__).resolve().parents[2]
    with tarfile.open(repo / "benchmarks" / "paper-runs.tar.xz") as archive:
        archive.extractall(tmp_path, filter="data")
    output = tmp_path / "paper.json"
    _main(monkeypatch, "--protocol", "mezo-paper", "--aggregate-only", "--runs-dir", str(tmp_path / "fewshot-paper"),
          "--output", str(output))
    from zotune.grid import mean_std_text
    readme = (repo / "README.md").read_text()
    cells = [(name, k, cell) for name, by_k in json.loads(output.read_text())["runs"]["sst2"].items()
             if not name.startswith("zero-shot") for k, cell in by_k.items()]
    assert ("MeZO (full)", "512") in {(name, k) for name, k, _ in cells}
    for name, k, cell in cells:
        assert mean_std_text(cell["paper"]) in readme and mean_std_text(cell["zotune"]) in readme, (name, k)
    # Past the LoRA+head k=512 grid's edge (lr 1e-4, runs of their own): the README's figures for
    # it, and, its runs beside the cell's, the four-lr grid still choosing 3e-5 for every seed.
    edge = ["--protocol", "mezo-paper", "--aggregate-only", "--ks", "512", "--methods", "MeZO (LoRA+head)",
            "--output", str(output)]
    _main(monkeypatch, *edge, "--runs-dir", str(tmp_path / "paper-edge"), "--lrs", "1e-4")
    cell = json.loads(output.read_text())["runs"]["sst2"]["MeZO (LoRA+head)"]["512"]
    prose = " ".join(readme.split())  # line breaks aside
    assert f"1e-4 alone tests {mean_std_text(cell['zotune'])}" in prose
    assert f"the mean dev is {mean_std_text(cell['zotune_dev'])}" in prose
    grid = Path("sst2-mezo-paper", "MeZO-lora+head-k512")
    for run in (tmp_path / "paper-edge" / grid).iterdir():
        run.rename(tmp_path / "fewshot-paper" / grid / run.name)
    _main(monkeypatch, *edge, "--runs-dir", str(tmp_path / "fewshot-paper"), "--lrs", "3e-6,1e-5,3e-5,1e-4")
    cell = json.loads(output.read_text())["runs"]["sst2"]["MeZO (LoRA+head)"]["512"]
    assert cell["zotune_lr"] == 3e-5 and set(cell["paper_lrs"].values()) == {3e-5}
    assert f"3e-5's {mean_std_text(cell['zotune_dev'])}" in prose
