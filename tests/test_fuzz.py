"""Bad input, generated systematically (issue 21): a bad value for every `train` flag and every
--config field, and damaged copies of every file format zotune reads (checkpoints, TSV data,
run directories, trajectory logs, metrics logs, snapshots). Each case runs the CLI in-process
and must end with exit status 2, one line on stderr, no traceback, and every file that existed
before exactly as it was (nothing created where a run was refused)."""

import json
import os
import shutil
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from zotune.cli import main
from zotune.config import TrainConfig
from zotune.train import train
from zotune.trajectory import LOG_NAME, SNAPSHOT_NAME

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_mlm_dir):
    """A finished LoRA run (with a snapshot), a file, and the tiny checkpoint: what the cases damage."""
    root = tmp_path_factory.mktemp("fuzz")
    train(TrainConfig(model=str(tiny_mlm_dir), device="cpu", trainable="lora", steps=6, eval_steps=3, log_steps=1,
                      snapshot_every=2, lr=1e-2, eps=1e-2, batch_size=8, quiet=True, output_dir=str(root / "run")))
    (root / "a-file").write_text("not a directory\n")
    return root


def _tree(*roots) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for root in roots for p in [root, *root.rglob("*")]}


def _refused(capsys, argv, *roots, absent=()):
    """main(argv) refuses in one line and changes nothing under `roots`; `absent` stays absent."""
    before = _tree(*roots)
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's errors
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zotune: error:"), err
    assert _tree(*roots) == before
    assert not any(Path(p).exists() for p in absent)
    return lines[0]


# --- every train flag -----------------------------------------------------------------------------

_STRING_VALUES = {  # a bad value for each string field without choices
    "model": "/nonexistent/model", "tokenizer": "/nonexistent/tokenizer", "task": "nope", "trainable": "top:x",
    "data_dir": "/nonexistent/data", "template": "*cls**sent_0*_It_was.*sep+*", "label_words": "terrible,very good",
    "cache_budget": "lots", "device": "tpu", "output_dir": None,  # None: the world's plain file
}


def _kinds(f):
    return getattr(f.type, "__args__", (f.type,))


def _flag_cases():
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "recipe":
            yield f.name, ["--recipe", "nope"]
        elif f.type is bool:  # a switch takes no value
            yield f.name, [f"--no-{f.name.replace('_', '-')}=1" if f.default else f"{flag}=1"]
        elif f.name == "layers":
            yield "layers-text", [flag, "a,b"]
            yield "layers-range", [flag, "-1"]
            yield "layers-full", [flag, "0", "--trainable", "full"]
        elif int in _kinds(f):
            yield f"{f.name}-fraction", [flag, "1.5"]
            yield f"{f.name}-negative", [flag, "-1"]
        elif float in _kinds(f):
            yield from ((f"{f.name}-{v}", [flag, v]) for v in ("nan", "inf", "-1"))
        elif f.metadata["choices"]:
            yield f.name, [flag, "bogus"]
        else:
            yield f.name, [flag, _STRING_VALUES[f.name]]
    yield "lora-rank-zero", ["--lora-rank", "0"]
    yield "num-prefix-zero", ["--num-prefix", "0", "--trainable", "prefix"]
    yield "num-prefix-on-lora", ["--num-prefix", "3"]
    yield "lora-alpha-on-full", ["--lora-alpha", "4", "--trainable", "full"]
    yield "unknown-flag", ["--nope", "1"]
    yield "resume-with-flags", ["--resume", "RUN", "--lr", "1"]
    yield "resume-nothing", ["--resume", "/nonexistent/run"]


@pytest.mark.parametrize("name,flags", list(_flag_cases()), ids=[n for n, _ in _flag_cases()])
def test_every_bad_train_flag_is_refused(capsys, world, tiny_mlm_dir, name, flags):
    flags = [str(world / "a-file") if v is None else str(world / "run") if v == "RUN" else v for v in flags]
    out = world / "new-run"
    argv = ["train", *flags] if "--resume" in flags else [
        "train", "--model", str(tiny_mlm_dir), "--output-dir", str(out), "--quiet", *flags]
    if name != "output_dir" and "--device" not in flags:
        argv += ["--device", "cpu"]
    _refused(capsys, argv, world, tiny_mlm_dir, absent=[out])


# --- every --config field, and the file itself ----------------------------------------------------

def _config_cases():
    for f in fields(TrainConfig):
        kinds = _kinds(f)
        wrong = {bool: "yes", str: 5, int: "3", float: "1e-3"}
        yield f"{f.name}-type", {f.name: "0,1" if f.name == "layers" else wrong[next(
            k for k in (bool, int, float, str) if k in kinds)]}
        yield f"{f.name}-list", {f.name: [[1]] if f.name == "layers" else [1]}
        if type(None) not in kinds and f.default is not None:
            yield f"{f.name}-null", {f.name: None}
        if int in kinds and f.type is not bool:
            yield f"{f.name}-fraction", {f.name: 2.5}
        if float in kinds:
            yield f"{f.name}-nan", {f.name: float("nan")}
            yield f"{f.name}-infinity", {f.name: float("inf")}
    yield "unknown-key", {"nope": 1}
    yield "layers-int", {"layers": 3}
    yield "layers-bools", {"layers": [True]}
    yield "whole-list", [{"lr": 1e-3}]
    yield "whole-number", 5
    yield "whole-string", "lr"


@pytest.mark.parametrize("name,values", list(_config_cases()), ids=[n for n, _ in _config_cases()])
def test_every_bad_config_field_is_refused(capsys, tmp_path, world, tiny_mlm_dir, name, values):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(values))  # Python's json writes NaN and Infinity, as a hand-edited file might
    out = tmp_path / "new-run"
    given = values if isinstance(values, dict) else {}
    flags = {"model": tiny_mlm_dir, "output_dir": out, "device": "cpu"}  # a flag would override the field
    argv = ["train", "--config", config] + [a for name, value in flags.items() if name not in given
                                            for a in ("--" + name.replace("_", "-"), value)]
    _refused(capsys, argv, world, tiny_mlm_dir, tmp_path, absent=[out])


@pytest.mark.parametrize("text", ["", "{", "\x00\xff", "[1, 2"])
def test_an_unreadable_config_file_is_refused(capsys, tmp_path, world, text):
    config = tmp_path / "config.json"
    config.write_text(text)
    _refused(capsys, ["train", "--config", config, "--output-dir", tmp_path / "r"], tmp_path, absent=[tmp_path / "r"])


# --- output paths ---------------------------------------------------------------------------------

def test_output_paths_that_cannot_be_a_run_are_refused(capsys, tmp_path, world, tiny_mlm_dir):
    base = ["train", "--model", tiny_mlm_dir, "--device", "cpu", "--quiet", "--output-dir"]
    assert "is a file" in _refused(capsys, [*base, world / "a-file"], world)
    assert "which is a file" in _refused(capsys, [*base, world / "a-file" / "run"], world)
    assert "already holds a run" in _refused(capsys, [*base, world / "run"], world)
    # --overwrite of something that is not a zotune run: a model checkpoint, a folder of notes
    assert "not one" in _refused(capsys, [*base, tiny_mlm_dir, "--overwrite"], world, tiny_mlm_dir)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "config.json").write_text('{"lr": 1}')
    (notes / "todo.txt").write_text("keep me")
    assert "todo.txt" in _refused(capsys, [*base, notes, "--overwrite"], tmp_path)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "not writable" in _refused(capsys, [*base, locked / "run"], tmp_path)


# --- checkpoints ----------------------------------------------------------------------------------

_CHECKPOINT_CONFIGS = {
    "invalid": "{not json", "empty": "", "list": "[]", "number": "3",
    "missing-keys": '{"architectures": ["RobertaForMaskedLM"]}',
    "string-size": None,  # the real config with hidden_size "32"
    "unknown-architecture": '{"architectures": ["GPT2LMHeadModel"]}',
}


def _checkpoint(tmp_path, tiny_mlm_dir, config_text) -> Path:
    """A copy of the tiny checkpoint (its big files linked) with another config.json."""
    model = tmp_path / "model"
    model.mkdir()
    for p in tiny_mlm_dir.iterdir():
        if p.name != "config.json":
            (model / p.name).symlink_to(p)
    if config_text is None:
        config = json.loads((tiny_mlm_dir / "config.json").read_text())
        config_text = json.dumps({**config, "hidden_size": "32"})
    (model / "config.json").write_text(config_text)
    return model


@pytest.mark.parametrize("kind", list(_CHECKPOINT_CONFIGS))
def test_a_bad_checkpoint_config_is_named(capsys, tmp_path, tiny_mlm_dir, kind):
    model = _checkpoint(tmp_path, tiny_mlm_dir, _CHECKPOINT_CONFIGS[kind])
    line = _refused(capsys, ["eval", "--model", model, "--device", "cpu"], tmp_path, tiny_mlm_dir)
    assert "config.json" in line and "tokenizer" not in line, line


@pytest.mark.parametrize("kind", ["truncated", "empty", "missing", "no-config"])
def test_bad_checkpoint_files_are_refused(capsys, tmp_path, tiny_mlm_dir, kind):
    model = _checkpoint(tmp_path, tiny_mlm_dir, (tiny_mlm_dir / "config.json").read_text())
    weights = model / "model.safetensors"
    weights.unlink()
    if kind == "truncated":
        weights.write_bytes((tiny_mlm_dir / "model.safetensors").read_bytes()[:1000])
    elif kind == "empty":
        weights.write_bytes(b"")
    elif kind == "no-config":
        weights.symlink_to(tiny_mlm_dir / "model.safetensors")
        (model / "config.json").unlink()
    _refused(capsys, ["eval", "--model", model, "--device", "cpu"], tmp_path, tiny_mlm_dir)


def test_a_run_directory_given_as_a_model_says_what_to_do(capsys, world):
    for command in (["eval"], ["predict", "--text", "fine"], ["train", "--output-dir", world / "x"]):
        assert "zotune export" in _refused(capsys, [*command, "--model", world / "run", "--device", "cpu"], world)


# --- eval and predict inputs ----------------------------------------------------------------------

_TSV = {"no-header-column": "text\tlabel\nfine\t1\n", "wrong-fields": "sentence\tlabel\nfine\t1\textra\n",
        "bad-label": "sentence\tlabel\nfine\t7\n", "empty": "", "header-only": "sentence\tlabel\n",
        "empty-sentence": "sentence\tlabel\n \t1\n", "binary": "\x00\x01\x02"}


@pytest.mark.parametrize("kind", list(_TSV))
def test_bad_data_files_are_refused(capsys, tmp_path, tiny_mlm_dir, kind):
    data = tmp_path / "data.tsv"
    data.write_text(_TSV[kind])
    _refused(capsys, ["eval", "--model", tiny_mlm_dir, "--data", data, "--device", "cpu"], tmp_path, tiny_mlm_dir)


@pytest.mark.parametrize("args", [
    ["predict", "--text", ""], ["predict", "--text", "a\tb"], ["predict", "--task", "rte", "--text", "premise only"],
    ["predict", "--task", "rte", "--text", "premise\t "], ["predict"], ["predict", "--text", "x", "--max-length", "0"],
    ["eval", "--batch-size", "0"], ["eval", "--k", "1.5"], ["eval", "--split", "valid"], ["eval", "--k", "7"],
    ["eval", "--data-dir", "/nonexistent"], ["eval", "--task", "nope"], ["eval", "--template", "*cls*"],
    ["sweep", "--output-dir", "X", "--lrs", "fast"], ["sweep", "--output-dir", "X", "--lrs", "1e-3",
                                                      "--runs-per-device", "0"],
    ["nope"], [],
], ids=lambda a: " ".join(a) or "nothing")
def test_bad_eval_predict_and_sweep_arguments_are_refused(capsys, tmp_path, tiny_mlm_dir, args):
    args = [str(tmp_path / "sweep") if a == "X" else a for a in args]
    if args and args[0] in ("eval", "predict"):
        args += ["--model", str(tiny_mlm_dir), "--device", "cpu"]
    _refused(capsys, args, tmp_path, tiny_mlm_dir, absent=[tmp_path / "sweep"])


# --- run directories, trajectory logs, metrics, snapshots -----------------------------------------

def _copy_run(world, tmp_path, unfinished=True) -> Path:
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "output_dir": str(run)}))
    if unfinished:
        (run / "summary.json").unlink()
    return run


def _edit_line(path: Path, number: int, edit):
    lines = path.read_text().splitlines()
    lines[number - 1] = edit(lines[number - 1])
    path.write_text("\n".join(lines) + "\n")


def _json_edit(change):
    def edit(line):
        record = json.loads(line)
        change(record)
        return json.dumps(record)
    return edit


_LOG_DAMAGE = {  # (line, edit): a middle line, so it is never taken for a torn last write
    "garbage": (3, lambda line: "garbage"),
    "not-an-object": (3, lambda line: "5"),
    "missing-key": (3, _json_edit(lambda r: r.pop("lr"))),
    "extra-key": (3, _json_edit(lambda r: r.update(extra=1))),
    "wrong-step": (3, _json_edit(lambda r: r.update(step=7))),
    "other-seed": (3, _json_edit(lambda r: r.update(seeds=[r["seeds"][0] + 1]))),
    "no-seeds": (3, _json_edit(lambda r: r.update(seeds=[]))),
    "bad-hex": (3, _json_edit(lambda r: r.update(grads=["zzzzzzzz"]))),
    "grads-count": (3, _json_edit(lambda r: r.update(grads=r["grads"] * 2))),
    "loss-number": (3, _json_edit(lambda r: r.update(loss=0.5))),
    "lr-negative": (3, _json_edit(lambda r: r.update(lr=-1.0))),
    "lr-string": (3, _json_edit(lambda r: r.update(lr="0.01"))),
    "skipped-string": (3, _json_edit(lambda r: r.update(skipped="no"))),
    "header-garbage": (1, lambda line: "{"),
    "header-list": (1, lambda line: "[]"),
    "header-version": (1, _json_edit(lambda h: h.update(version=99))),
    "header-no-config": (1, _json_edit(lambda h: h.pop("config"))),
    "header-layout": (1, _json_edit(lambda h: h["layout"].pop())),
    "header-model": (1, _json_edit(lambda h: h.update(model_sha256="0" * 64))),
    "header-initial": (1, _json_edit(lambda h: h.update(initial_sha256="0" * 64))),
}


@pytest.mark.parametrize("command", ["replay", "resume"])
@pytest.mark.parametrize("kind", list(_LOG_DAMAGE))
def test_a_damaged_trajectory_log_is_refused(capsys, tmp_path, world, kind, command):
    run = _copy_run(world, tmp_path)
    _edit_line(run / LOG_NAME, *_LOG_DAMAGE[kind])
    argv = ["replay", run, "--output", tmp_path / "out"] if command == "replay" else ["train", "--resume", run]
    _refused(capsys, argv, tmp_path, absent=[tmp_path / "out", run / "summary.json"])


_RUN_DAMAGE = {
    "metrics-garbage": lambda run: _edit_line(run / "metrics.jsonl", 2, lambda line: "garbage"),
    "metrics-step-text": lambda run: _edit_line(run / "metrics.jsonl", 2, _json_edit(lambda r: r.update(step="2"))),
    "metrics-loss-text": lambda run: _edit_line(run / "metrics.jsonl", 2, _json_edit(lambda r: r.update(loss="x"))),
    "metrics-out-of-order": lambda run: _edit_line(run / "metrics.jsonl", 2, _json_edit(lambda r: r.update(step=9))),
    "snapshot-truncated": lambda run: (run / SNAPSHOT_NAME).write_bytes((run / SNAPSHOT_NAME).read_bytes()[:200]),
    "snapshot-empty": lambda run: (run / SNAPSHOT_NAME).write_bytes(b""),
    "config-list": lambda run: (run / "config.json").write_text("[]"),
    "config-empty": lambda run: (run / "config.json").write_text(""),
    "config-type": lambda run: _edit_line(run / "config.json", 1, lambda line: '{"lr": "fast"}'),
    "config-changed": lambda run: (run / "config.json").write_text(
        json.dumps({**json.loads((run / "config.json").read_text()), "eps": 0.5})),
    "no-log": lambda run: (run / LOG_NAME).unlink(),
    "empty-log": lambda run: (run / LOG_NAME).write_text(""),
}


@pytest.mark.parametrize("kind", list(_RUN_DAMAGE))
def test_a_damaged_run_directory_is_refused_by_resume(capsys, tmp_path, world, kind):
    run = _copy_run(world, tmp_path)
    _RUN_DAMAGE[kind](run)
    _refused(capsys, ["train", "--resume", run], tmp_path, absent=[run / "summary.json"])


@pytest.mark.parametrize("command", ["export", "plot", "replay"])
@pytest.mark.parametrize("kind", ["nonexistent", "a-file", "empty", "config-list", "best-truncated",
                                  "metrics-garbage", "output-is-a-file"])
def test_damaged_runs_are_refused_by_export_plot_and_replay(capsys, tmp_path, world, command, kind):
    run = _copy_run(world, tmp_path, unfinished=False)
    output = tmp_path / "out"
    if kind == "nonexistent":
        run = tmp_path / "nothing"
    elif kind == "a-file":
        run = world / "a-file"
    elif kind == "empty":
        run = tmp_path / "empty"
        run.mkdir()
    elif kind == "config-list":
        (run / "config.json").write_text("[]")
        (run / LOG_NAME).write_text("[]\n")
        (run / "metrics.jsonl").write_text("[]\n[]\n")
    elif kind == "best-truncated":
        (run / "best.safetensors").write_bytes(b"\x00" * 10)
        (run / LOG_NAME).write_text((run / LOG_NAME).read_text()[:-1])  # replay: step 6 torn, still fine...
        (run / "metrics.jsonl").write_text("{}\n{}\n")  # ...so damage what plot and replay read too
        _edit_line(run / LOG_NAME, 2, lambda line: "garbage")
    elif kind == "metrics-garbage":
        _edit_line(run / "metrics.jsonl", 2, lambda line: "garbage")
        _edit_line(run / LOG_NAME, 2, lambda line: "garbage")
        (run / "best.safetensors").unlink()
    elif kind == "output-is-a-file":
        output = world / "a-file" / "out"
    argv = {"export": ["export", run, "--output", output], "plot": ["plot", run, "--output", output / "p.png"],
            "replay": ["replay", run, "--output", output]}[command]
    _refused(capsys, argv, tmp_path, world, absent=[tmp_path / "out"])


# --- missing optional dependencies ----------------------------------------------------------------

@pytest.mark.parametrize("module,command", [
    ("matplotlib", ["plot", "RUN", "--output", "OUT/p.png"]),
    ("peft", ["export", "RUN", "--output", "OUT"]),
    ("torch.utils.tensorboard", ["train", "--tensorboard", "--output-dir", "OUT", "--device", "cpu"]),
])
def test_a_missing_optional_dependency_names_its_extra(capsys, monkeypatch, tmp_path, world, module, command):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    argv = [str(world / "run") if a == "RUN" else a.replace("OUT", str(tmp_path / "out")) for a in command]
    assert "pip install 'zotune[" in _refused(capsys, argv, world, absent=[tmp_path / "out"])


# --- causal LMs: encoder-only flags, tasks without a causal row or data -----------------------------

@pytest.mark.parametrize("args", [
    ["train", "--template", "*cls**sent_0*_It_was*mask*.*sep+*"], ["train", "--label-words", "bad,good"],
    ["train", "--task", "squad", "--seed", "3"], ["train", "--task", "nope"], ["train", "--task", "cb"],
    ["train", "--task", "boolq", "--seed", "0"], ["train", "--trainable", "top:9"],
    ["eval", "--template", "*cls*"], ["eval", "--label-words", "bad,good"], ["eval", "--data", "data.tsv"],
    ["eval", "--task", "squad", "--seed", "3"], ["eval", "--task", "nope"], ["eval", "--k", "7"],
    ["eval", "--task", "wic", "--seed", "3"], ["predict", "--text", "a\tb"], ["predict", "--text", " "],
    ["predict", "--task", "copa", "--text", "not json"], ["predict", "--task", "copa", "--text", "[1, 2]"],
    ["predict", "--task", "copa", "--text", '{"premise": "It rained."}'], ["predict", "--task", "squad", "--text", "x"],
], ids=lambda a: " ".join(a))
def test_bad_causal_inputs_are_refused(capsys, tmp_path, tiny_causal_dir, args):
    run = tmp_path / "run"
    args = [*args, "--model", tiny_causal_dir, "--device", "cpu", *(["--output-dir", run] if args[0] == "train" else [])]
    (tmp_path / "data.tsv").write_text("sentence\tlabel\nfine\t1\n")
    _refused(capsys, args, tmp_path, tiny_causal_dir, absent=[run])
