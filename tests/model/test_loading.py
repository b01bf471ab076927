"""Checkpoint loading: strict name map, sharded files, and one-line errors for bad checkpoints."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import save_tiny_roberta
from zotune.errors import UserError
from zotune.model.loading import load_model


def test_sharded_and_bin_checkpoints_load_the_same_weights(tmp_path):
    hf = save_tiny_roberta(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a, b = load_model(tmp_path / "single"), load_model(tmp_path / "sharded")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_pytorch_bin_checkpoint(tmp_path):
    save_tiny_roberta(tmp_path / "m")
    state = load_file(tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "m" / "pytorch_model.bin")
    model = load_model(tmp_path / "m")
    assert torch.equal(model.embeddings.word.weight, state["roberta.embeddings.word_embeddings.weight"])


def _error(path) -> str:
    with pytest.raises(UserError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_config(tmp_path):
    assert "no config.json" in _error(tmp_path)


def test_unknown_architecture(tmp_path, tiny_roberta_dir):
    config = json.loads((tiny_roberta_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tiny_roberta_dir / "config.json").write_text(json.dumps(config))
    assert "unsupported architecture" in _error(tiny_roberta_dir)


def test_no_weights(tiny_roberta_dir):
    (tiny_roberta_dir / "model.safetensors").unlink()
    assert "has no weights" in _error(tiny_roberta_dir)


def test_truncated_weights(tiny_roberta_dir):
    path = tiny_roberta_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    assert "truncated or corrupted" in _error(tiny_roberta_dir)


def test_missing_tensor(tiny_roberta_dir):
    path = tiny_roberta_dir / "model.safetensors"
    state = load_file(path)
    del state["roberta.encoder.layer.1.attention.self.key.weight"]
    save_file(state, path)
    assert "lacks tensor(s) roberta.encoder.layer.1.attention.self.key.weight" in _error(tiny_roberta_dir)


def test_unexpected_tensor(tiny_roberta_dir):
    path = tiny_roberta_dir / "model.safetensors"
    state = load_file(path)
    state["classifier.dense.weight"] = torch.zeros(2, 2)
    save_file(state, path)
    assert "does not know: classifier.dense.weight" in _error(tiny_roberta_dir)


def test_shape_mismatch(tiny_roberta_dir):
    config = json.loads((tiny_roberta_dir / "config.json").read_text())
    config["intermediate_size"] += 1
    (tiny_roberta_dir / "config.json").write_text(json.dumps(config))
    assert "has shape" in _error(tiny_roberta_dir)


def test_missing_directory(tmp_path):
    from zotune.model.loading import resolve_model_dir
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_dir(tmp_path / "nope")


def test_the_default_model_is_recorded_by_name_and_found_here(tmp_path, monkeypatch, tiny_roberta_dir):
    """A default run's config.json names the shipped model, not this machine's path to it, so that
    another checkout resumes, sweeps or exports it; a folder of that name in the working
    directory still comes first, as any local path does."""
    import shutil
    from zotune.cli import run_settings
    from zotune.config import DEFAULT_MODEL
    from zotune.model.loading import resolve_model_dir
    assert run_settings([])["model"] == "zotune-roberta-small"
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("zotune-roberta-small") == DEFAULT_MODEL and DEFAULT_MODEL.is_dir()
    shutil.copytree(tiny_roberta_dir, tmp_path / "zotune-roberta-small")
    assert resolve_model_dir("zotune-roberta-small") == Path("zotune-roberta-small")


def test_hf_names_round_trip(tiny_roberta_dir):
    from zotune.model.loading import config_from_hf, read_checkpoint, to_hf_state
    hf_config, tensors = read_checkpoint(tiny_roberta_dir)
    cfg, arch = config_from_hf(hf_config)
    back = to_hf_state(load_model(tiny_roberta_dir).state_dict(), cfg, arch)
    assert back.keys() <= tensors.keys()
    assert all(torch.equal(back[n], tensors[n]) for n in back)
