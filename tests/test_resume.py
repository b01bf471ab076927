"""`zotune train --resume`: a run killed with SIGKILL at a random step and resumed ends
bit-identical to an uninterrupted one (issue 7)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from zotune.trajectory import LOG_NAME


def _train_args(model_dir, run, steps=60):
    return ["train", "--model", str(model_dir), "--device", "cpu", "--trainable", "lora", "--steps", str(steps),
            "--eval-steps", "20", "--log-steps", "5", "--snapshot-every", "15", "--log-every", "10",
            "--lr", "1e-2", "--eps", "1e-2", "--batch-size", "8", "--quiet", "--output-dir", str(run)]


def _zotune(*args):
    # One thread each: the same arithmetic in every process, and two runs side by side on a small CI box.
    return subprocess.Popen([sys.executable, "-m", "zotune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _logged_steps(run) -> int:
    try:
        return (run / LOG_NAME).read_text().count("\n") - 1
    except FileNotFoundError:
        return 0


def _same(a, b):
    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, tiny_mlm_dir):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = _zotune(*_train_args(tiny_mlm_dir, whole))
    victim = _zotune(*_train_args(tiny_mlm_dir, killed))
    kill_after = random.Random().randint(8, 50)
    deadline = time.monotonic() + 300
    while _logged_steps(killed) < kill_after and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed / "summary.json").exists()

    resumed = _zotune("train", "--resume", str(killed))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert json.loads((killed / "summary.json").read_text())["resumed_from_step"] >= kill_after, kill_after
    assert reference.wait(timeout=300) == 0
    for name in ("final.safetensors", "best.safetensors"):
        assert _same(whole / name, killed / name), (name, kill_after)
    assert (whole / "metrics.jsonl").read_text() == (killed / "metrics.jsonl").read_text(), kill_after
    records = [(run / LOG_NAME).read_text().splitlines()[1:] for run in (whole, killed)]  # headers name their dirs
    assert records[0] == records[1], kill_after
    summaries = [json.loads((run / "summary.json").read_text()) for run in (whole, killed)]
    assert summaries[0]["best_step"] == summaries[1]["best_step"]
    assert summaries[0]["test_accuracy"] == summaries[1]["test_accuracy"]


def test_resuming_a_finished_run_is_a_no_op(tmp_path, tiny_mlm_dir):
    run = tmp_path / "run"
    assert _zotune(*_train_args(tiny_mlm_dir, run, steps=10)).wait(timeout=300) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    again = _zotune("train", "--resume", str(run))
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    summary = json.loads(before["summary.json"])
    assert f"test {summary['test_accuracy']:.3f}" in out  # the finished run's result, printed again
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def _one_line_error(process, message):
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zotune: error:") and message in lines[0], err


def test_a_resume_that_differs_from_the_log_is_a_user_error(tmp_path, tiny_mlm_dir):
    import shutil
    from tests.conftest import save_tiny_roberta

    model = tmp_path / "model"
    shutil.copytree(tiny_mlm_dir, model)
    run = tmp_path / "run"
    assert _zotune(*_train_args(model, run, steps=10)).wait(timeout=300) == 0
    (run / "summary.json").unlink()  # as if killed before the end

    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "lr": 0.5}))
    _one_line_error(_zotune("train", "--resume", str(run)), "differs from the trajectory log in lr")
    (run / "config.json").write_text(json.dumps(config))

    save_tiny_roberta(tmp_path / "other", vocab_size=50265, hidden=32, layers=2, heads=4,
                      max_position_embeddings=514, seed=1)
    shutil.copy(tmp_path / "other" / "model.safetensors", model / "model.safetensors")
    _one_line_error(_zotune("train", "--resume", str(run)), "is not the one the run started from")
    _one_line_error(_zotune("train", "--resume", str(run), "--lr", "1"), "drop --lr")
    _one_line_error(_zotune("train", "--resume", str(tmp_path / "nothing")), "cannot read")
    assert not (run / "summary.json").exists()


def test_ctrl_c_keeps_every_step_and_resumes(tmp_path, tiny_mlm_dir):
    # --log-every larger than the run: only the exit path's flush can put the steps on disk.
    run = tmp_path / "run"
    args = _train_args(tiny_mlm_dir, run, steps=400)
    args[args.index("--log-every") + 1] = "1000"
    victim = _zotune(*args)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").exists() or (run / "metrics.jsonl").read_text().count("\n") < 3:
        assert victim.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGINT)
    _, err = victim.communicate(timeout=60)
    assert victim.returncode == 130 and err.strip().splitlines() == ["zotune: interrupted"], err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert _logged_steps(run) >= metrics[-1]["step"] >= 15  # the log holds at least every metrics step
    resumed = _zotune("train", "--resume", str(run))
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert json.loads((run / "summary.json").read_text())["steps"] == 400


def test_a_run_written_before_a_config_field_existed_still_resumes(tmp_path, tiny_mlm_dir):
    # Runs from before `pair` existed ran unpaired, and their config.json and log header lack it.
    from zotune.config import TrainConfig, read_run_config
    from zotune.train import train
    options = dict(model=str(tiny_mlm_dir), device="cpu", trainable="lora", steps=6, eval_steps=3, log_steps=1,
                   lr=1e-2, eps=1e-2, batch_size=8, quiet=True, pair=False)
    whole, old = tmp_path / "whole", tmp_path / "old"
    for run in (whole, old):
        train(TrainConfig(**options, output_dir=str(run)))
    config = json.loads((old / "config.json").read_text())
    del config["pair"]
    (old / "config.json").write_text(json.dumps(config))
    header, *records = [json.loads(line) for line in (old / LOG_NAME).read_text().splitlines()]
    del header["config"]["pair"]
    (old / LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in [header, *records[:3]]))  # killed at step 3
    cfg = read_run_config(old)
    assert cfg.pair is False
    assert train(cfg, resume=True)["resumed_from_step"] == 3
    assert _same(whole / "final.safetensors", old / "final.safetensors")


def test_a_run_resumes_elsewhere_from_its_small_files_alone(tmp_path, tiny_mlm_dir, capsys):
    """What tools/fewshot_table.py's bundle carries of an unfinished run (config.json,
    metrics.jsonl, zero_shot.json, trajectory.jsonl; no snapshot, no best-dev weights) resumes
    it on another machine to the same end: the log rebuilds the best-dev weights too. Its base
    checkpoint lies elsewhere there: --model says where, and the log's sha256 checks it."""
    import shutil
    from zotune.cli import main
    from zotune.config import TrainConfig
    from zotune.train import train
    options = dict(model=str(tiny_mlm_dir), device="cpu", trainable="lora", steps=12, eval_steps=4, log_steps=2,
                   lr=1e-2, eps=1e-2, batch_size=8, quiet=True)
    whole, moved = tmp_path / "whole", tmp_path / "moved"
    summary = train(TrainConfig(**options, output_dir=str(whole)))
    assert summary["best_step"] < 12  # so that the best-dev weights are the rebuilt ones
    killed_at = summary["best_step"] + 3
    moved.mkdir()
    for name in ("config.json", "zero_shot.json"):
        shutil.copy(whole / name, moved / name)
    header, *records = (whole / LOG_NAME).read_text().splitlines(True)
    (moved / LOG_NAME).write_text("".join([header, *records[:killed_at]]))
    metrics = (whole / "metrics.jsonl").read_text().splitlines(True)
    (moved / "metrics.jsonl").write_text("".join(m for m in metrics if json.loads(m)["step"] <= killed_at))
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "model": "/the/first/machine/model"}))
    from tests.conftest import save_tiny_roberta
    save_tiny_roberta(tmp_path / "other", vocab_size=50265, hidden=32, layers=2, heads=4,
                      max_position_embeddings=514, seed=1)
    capsys.readouterr()  # transformers' progress bar
    for flags, message in [([], "/the/first/machine/model, which is not on this machine; give that checkpoint's "
                                "folder with --model DIR"),
                           (["--model", str(tmp_path / "other")], "is not the one the run started from")]:
        assert main(["train", "--resume", str(moved), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (moved / "summary.json").exists()
    assert main(["train", "--resume", str(moved), "--model", str(tiny_mlm_dir)]) == 0
    for name in ("final.safetensors", "best.safetensors"):
        assert _same(whole / name, moved / name), name
    resumed = json.loads((moved / "summary.json").read_text())
    assert resumed["resumed_from_step"] == killed_at
    assert (resumed["best_step"], resumed["test_accuracy"]) == (summary["best_step"], summary["test_accuracy"])
    assert (moved / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()


def test_a_run_killed_before_its_first_step_scores_zero_shot_when_resumed(tmp_path, tiny_mlm_dir):
    """A deadline's SIGTERM can land while a run scores its starting weights: the resume, still at
    those weights, scores them, and the summary has its zero-shot row as an uninterrupted run's."""
    from zotune.config import TrainConfig, read_run_config
    from zotune.train import train
    options = dict(model=str(tiny_mlm_dir), device="cpu", trainable="lora", steps=4, eval_steps=2, log_steps=2,
                   lr=1e-2, eps=1e-2, batch_size=8, quiet=True)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for run in (whole, killed):
        summary = train(TrainConfig(**options, output_dir=str(run)))
    for name in ("zero_shot.json", "summary.json", "metrics.jsonl", "best.safetensors", "final.safetensors"):
        (killed / name).unlink()
    header = (killed / LOG_NAME).read_text().splitlines(True)[0]
    (killed / LOG_NAME).write_text(header)  # killed after the log's header, before any step
    resumed = train(read_run_config(killed), resume=True)
    assert resumed["zero_shot"] == summary["zero_shot"] is not None
    assert resumed["test_accuracy"] == summary["test_accuracy"]


def test_kills_at_many_instants_of_resumes_lose_nothing(tmp_path, tiny_mlm_dir):
    # Issue 21: a resume killed during its start-up (before its first log point) used to leave
    # metrics.jsonl empty. Kill resumes at instants spread over start-up, the log and metrics
    # rewrites, steps and snapshot writes (one every 5 steps); each kill must leave every
    # metrics line the run had, and the run must still end bit-identical.
    def args(run):
        a = _train_args(tiny_mlm_dir, run, steps=150)
        a[a.index("--snapshot-every") + 1] = "5"
        return a
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = _zotune(*args(whole))
    victim = _zotune(*args(killed))
    deadline = time.monotonic() + 300
    while _logged_steps(killed) < 12 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert victim.poll() is None, victim.communicate()[1]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    rng = random.Random()
    instants = [0.3 * i + rng.uniform(0, 0.3) for i in range(1, 25, 2)]  # seconds after the start: ~0.3 .. 7.5
    for instant in instants:
        metrics = (killed / "metrics.jsonl").read_text()
        before = metrics[:metrics.rfind("\n") + 1]  # its complete lines
        resumed = _zotune("train", "--resume", str(killed))
        try:
            resumed.wait(timeout=instant)
        except subprocess.TimeoutExpired:
            resumed.send_signal(signal.SIGKILL)
        _, err = resumed.communicate()
        assert resumed.returncode in (0, -signal.SIGKILL), (instant, err)
        assert (killed / "metrics.jsonl").read_text().startswith(before), instant
        if resumed.returncode == 0:
            break
    else:
        last = _zotune("train", "--resume", str(killed))
        _, err = last.communicate(timeout=300)
        assert last.returncode == 0, err
    assert reference.wait(timeout=300) == 0
    for name in ("final.safetensors", "best.safetensors"):
        assert _same(whole / name, killed / name), (name, instants)
    assert (whole / "metrics.jsonl").read_text() == (killed / "metrics.jsonl").read_text(), instants
    records = [(run / LOG_NAME).read_text().splitlines()[1:] for run in (whole, killed)]
    assert records[0] == records[1], instants
    summaries = [json.loads((run / "summary.json").read_text()) for run in (whole, killed)]
    assert (summaries[0]["best_step"], summaries[0]["test_accuracy"]) == (summaries[1]["best_step"],
                                                                           summaries[1]["test_accuracy"])


def test_sigterm_keeps_every_step_and_resumes(tmp_path, tiny_mlm_dir):
    # What kill, Docker and Slurm send: handled like Ctrl-C, with its own line and exit status.
    run = tmp_path / "run"
    args = _train_args(tiny_mlm_dir, run, steps=150)
    args[args.index("--log-every") + 1] = "1000"  # only the exit path's flush puts the steps on disk
    victim = _zotune(*args)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").exists() or (run / "metrics.jsonl").read_text().count("\n") < 3:
        assert victim.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGTERM)
    _, err = victim.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert victim.returncode == 143 and len(lines) == 1 and "terminated" in lines[0], err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert _logged_steps(run) >= metrics[-1]["step"] >= 15
    resumed = _zotune("train", "--resume", str(run))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert json.loads((run / "summary.json").read_text())["steps"] == 150
