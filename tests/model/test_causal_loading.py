"""Causal-LM checkpoints: dispatch on the architecture, sharded safetensors, the way back to
Hugging Face names, and one-line errors for what zotune cannot load."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny_causal import save_tiny_causal
from zotune.errors import UserError
from zotune.model.causal_lm import CausalLM
from zotune.model.loading import config_from_hf, load_model, read_checkpoint, to_hf_state
from zotune.model.roberta import MaskedLM

# (kind, tied head, config extras)
ROUND_TRIPS = [("opt", True, {}), ("opt", False, {"word_embed_proj_dim": 16}),
               ("llama", False, {"num_key_value_heads": 2}), ("qwen2", True, {"num_key_value_heads": 2}),
               ("mistral", False, {"num_key_value_heads": 1})]


def _error(path) -> str:
    with pytest.raises(UserError) as info:
        load_model(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_load_model_returns_the_class_of_the_architecture(tmp_path, tiny_roberta_dir):
    save_tiny_causal(tmp_path / "llama", "llama")
    assert isinstance(load_model(tmp_path / "llama"), CausalLM)
    assert isinstance(load_model(tiny_roberta_dir), MaskedLM)


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_a_sharded_checkpoint_loads_the_same_weights(tmp_path, kind):
    save_tiny_causal(tmp_path / "single", kind, tie=False)
    save_tiny_causal(tmp_path / "sharded", kind, tie=False, max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = load_model(tmp_path / "single"), load_model(tmp_path / "sharded")
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(x, b.state_dict()[name]) for name, x in a.state_dict().items())


@pytest.mark.parametrize("kind,tie,extra", ROUND_TRIPS,
                         ids=[f"{k}-{'tied' if t else 'untied'}" for k, t, _ in ROUND_TRIPS])
def test_hf_names_round_trip(tmp_path, kind, tie, extra):
    save_tiny_causal(tmp_path / kind, kind, tie=tie, **extra)
    hf_config, tensors = read_checkpoint(tmp_path / kind)
    cfg, architecture = config_from_hf(hf_config)
    back = to_hf_state(load_model(tmp_path / kind).state_dict(), cfg, architecture)
    assert back.keys() == tensors.keys() - ({"lm_head.weight"} if tie else set())
    assert all(torch.equal(back[n], tensors[n]) for n in back)


def test_opt_checkpoint_saved_from_the_base_model(tmp_path):
    # facebook/opt-* weights name their tensors decoder.* (saved from OPTModel), not model.decoder.*
    save_tiny_causal(tmp_path / "m", "opt")
    path = tmp_path / "m" / "model.safetensors"
    state = load_file(path)
    save_file({name.removeprefix("model."): t for name, t in state.items()}, path)
    model = load_model(tmp_path / "m")
    assert torch.equal(model.embeddings.word.weight, state["model.decoder.embed_tokens.weight"])


def test_missing_tensor(tmp_path):
    save_tiny_causal(tmp_path / "m", "llama")
    path = tmp_path / "m" / "model.safetensors"
    state = load_file(path)
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, path)
    assert "lacks tensor(s) model.layers.1.self_attn.k_proj.weight" in _error(tmp_path / "m")


def test_unexpected_tensor(tmp_path):
    save_tiny_causal(tmp_path / "m", "llama")
    path = tmp_path / "m" / "model.safetensors"
    state = load_file(path)
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)  # a Qwen2 bias in a Llama
    save_file(state, path)
    assert "does not know: model.layers.0.self_attn.q_proj.bias" in _error(tmp_path / "m")


def test_misshapen_stacked_tensor(tmp_path):
    save_tiny_causal(tmp_path / "m", "llama", num_key_value_heads=2)
    _edit_config(tmp_path / "m", num_key_value_heads=4)  # the weights' k and v have 2 heads
    assert "model.layers.0.self_attn.k_proj.weight has shape (16, 32)" in _error(tmp_path / "m")


def test_misshapen_tensor(tmp_path):
    save_tiny_causal(tmp_path / "m", "opt")
    _edit_config(tmp_path / "m", max_position_embeddings=100)
    assert "model.decoder.embed_positions.weight has shape" in _error(tmp_path / "m")


def test_mistral_with_a_sliding_window_is_refused(tmp_path):
    save_tiny_causal(tmp_path / "m", "mistral")
    _edit_config(tmp_path / "m", sliding_window=64)
    assert "sliding-window attention" in _error(tmp_path / "m")
    _edit_config(tmp_path / "m", sliding_window=4096)  # no sequence reaches it: full attention
    assert isinstance(load_model(tmp_path / "m"), CausalLM)


def test_unsupported_rope_and_incomplete_config(tmp_path):
    save_tiny_causal(tmp_path / "m", "llama")
    _edit_config(tmp_path / "m", rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0})
    assert "RoPE 'yarn'" in _error(tmp_path / "m")
    _edit_config(tmp_path / "m", rope_parameters=None, rope_theta=10000.0, rope_scaling={"type": "linear"})
    assert "lacks factor" in _error(tmp_path / "m")
    _edit_config(tmp_path / "m", rope_scaling=None, intermediate_size=None)
    assert "lacks a positive integer intermediate_size" in _error(tmp_path / "m")


def test_transformers_4_rope_fields(tmp_path):
    # rope_theta and rope_scaling at the top level, as transformers 4 wrote them
    save_tiny_causal(tmp_path / "m", "llama")
    _edit_config(tmp_path / "m", rope_parameters=None, rope_theta=5000.0,
                 rope_scaling={"type": "linear", "factor": 2.0})
    cfg = load_model(tmp_path / "m").config
    assert cfg.rope_theta == 5000.0 and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
