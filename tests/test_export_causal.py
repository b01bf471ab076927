"""Exports of causal LMs (OPT, Llama with grouped-query attention, Qwen2's q/k/v biases): a
fine-tuned zotune CausalLM written as a Hugging Face checkpoint or a PEFT adapter gives
transformers' (or peft's) logits equal to zotune's own, case by case."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import ROBERTA_TOKENIZER_DIR
from tests.tiny_causal import VOCAB, save_tiny_causal
from zotune.config import TrainConfig
from zotune.errors import UserError
from zotune.export import export, rebuild, write_huggingface, write_peft
from zotune.layers.batch import pack
from zotune.model.loading import config_from_hf, load_model, read_hf_config
from zotune.optim.subsets import SubsetOptions, select_trainable
from zotune.session import load_trainable

pytestmark = pytest.mark.usefixtures("one_thread")

# (name, kind, tied head, config extras)
CASES = [
    ("opt-tied", "opt", True, {}),
    ("opt-project-in-out-untied", "opt", False, {"word_embed_proj_dim": 16}),
    ("llama-gqa-tied", "llama", True, {"num_key_value_heads": 2}),
    ("llama-gqa-untied", "llama", False, {"num_key_value_heads": 2}),
    ("qwen2-gqa-qkv-bias", "qwen2", True, {"num_key_value_heads": 1}),
]
HAS_BIAS = {"opt", "qwen2"}  # Llama checkpoints have no bias terms: `bias` is refused there
LENGTHS = [9, 1, 23, 4]      # packed together: varied lengths, one of a single token


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    for name, kind, tie, extra in CASES:
        save_tiny_causal(root / name, kind, tie=tie, **extra)
    return root


def _fine_tuned(model_dir, spec, layers=None, seed=0):
    """The checkpoint with `spec` attached and every trainable tensor moved at random (LoRA's
    B starts at zero, the untied head as a copy of the embeddings: a zero update would prove
    nothing)."""
    model = load_model(model_dir)
    trainable = select_trainable(model, spec, SubsetOptions(lora_rank=4, lora_alpha=6.0, layers=layers, seed=seed))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, param in trainable:
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    _, architecture = config_from_hf(read_hf_config(model_dir))
    return model.eval(), architecture


def _sequences():
    rng = random.Random(0)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in LENGTHS]


@torch.inference_mode()
def _zotune_logits(model, sequences):
    batch = pack(sequences, None, model.config.position_offset)
    return model.logits(batch, torch.arange(batch.num_tokens))                 # [T, V]


@torch.inference_mode()
def _hf_logits(hf, sequences):
    """[T, V]: each sequence run alone (no padding), concatenated in packed order."""
    return torch.cat([hf(input_ids=torch.tensor([s])).logits[0] for s in sequences])


def _assert_close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def _auto(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


HF_SUBSETS = [(case, spec) for case in CASES for spec in ("lora", "lora+head", "full", "top:1", "bias")
              if spec != "bias" or case[1] in HAS_BIAS]


@pytest.mark.parametrize("case,spec", HF_SUBSETS, ids=[f"{c[0]}-{s}" for c, s in HF_SUBSETS])
def test_huggingface_checkpoint_matches_zotune_logits(tmp_path, checkpoints, case, spec):
    name, _, tie, _ = case
    model, architecture = _fine_tuned(checkpoints / name, spec)
    base_config = read_hf_config(checkpoints / name)
    write_huggingface(model, architecture, base_config, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == base_config["architectures"]
    # lora+head trains a decoder of its own: the checkpoint is untied and stores lm_head.weight.
    untied = spec == "lora+head" or not tie
    assert written.get("tie_word_embeddings", True) is not untied
    assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) is untied
    sequences = _sequences()
    want = _zotune_logits(model, sequences)
    _assert_close(_hf_logits(_auto(tmp_path), sequences), want)
    # ... and the export is the fine-tuned model, not the base one
    assert not torch.allclose(_hf_logits(_auto(checkpoints / name), sequences), want, rtol=1e-3, atol=1e-4)


PEFT_CASES = [(case, layers) for case in CASES for layers in (None, (1,))]


@pytest.mark.parametrize("case,layers", PEFT_CASES, ids=[f"{c[0]}-layers{l}" for c, l in PEFT_CASES])
def test_peft_lora_adapter_matches_zotune_logits(tmp_path, checkpoints, case, layers):
    from peft import PeftModel
    name = case[0]
    model, architecture = _fine_tuned(checkpoints / name, "lora", layers)
    write_peft(model, architecture, checkpoints / name, tmp_path)
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (adapter["peft_type"], adapter["task_type"]) == ("LORA", "CAUSAL_LM")
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 6.0)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    decoder = ".decoder" if case[1] == "opt" else ""
    assert f"base_model.model.model{decoder}.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert len(keys) == 4 * (model.config.num_layers if layers is None else len(layers))

    peft_model = PeftModel.from_pretrained(_auto(checkpoints / name), tmp_path).eval()
    sequences = _sequences()
    want = _zotune_logits(model, sequences)
    _assert_close(_hf_logits(peft_model, sequences), want)
    assert not torch.allclose(_hf_logits(_auto(checkpoints / name), sequences), want, rtol=1e-3, atol=1e-4)


LLAMA_CASES = [case for case in CASES if case[1] != "opt"]


@pytest.mark.parametrize("case", LLAMA_CASES, ids=[c[0] for c in LLAMA_CASES])
def test_peft_prefix_adapter_matches_zotune_logits(tmp_path, checkpoints, case):
    # PEFT numbers the real tokens from P (after the prefix) and zotune from 0: the exported
    # keys are turned on by P positions, which RoPE's relative angles make exact.
    from peft import PeftModel
    name = case[0]
    model, architecture = _fine_tuned(checkpoints / name, "prefix")
    write_peft(model, architecture, checkpoints / name, tmp_path)
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (adapter["peft_type"], adapter["num_virtual_tokens"]) == ("PREFIX_TUNING", 5)
    peft_model = PeftModel.from_pretrained(_auto(checkpoints / name), tmp_path).eval()
    sequences = _sequences()
    want = _zotune_logits(model, sequences)
    _assert_close(_hf_logits(peft_model, sequences), want)
    assert not torch.allclose(_hf_logits(_auto(checkpoints / name), sequences), want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name,layers,message", [
    ("opt-tied", None, "prefix-tuning runs of OPT cannot be exported"),
    ("llama-gqa-tied", (1,), "a prefix on some layers only"),
])
def test_prefix_adapters_peft_cannot_match_are_refused(tmp_path, checkpoints, name, layers, message):
    model, architecture = _fine_tuned(checkpoints / name, "prefix", layers)
    with pytest.raises(UserError, match=message):
        write_peft(model, architecture, checkpoints / name, tmp_path)
    with pytest.raises(UserError, match="a prefix cannot be merged"):
        write_huggingface(model, architecture, read_hf_config(checkpoints / name), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name,layers,merge,message", [
    ("opt-tied", None, False, "prefix-tuning runs of OPT cannot be exported"),
    ("llama-gqa-tied", (0,), False, "a prefix on some layers only"),
    ("llama-gqa-tied", None, True, "a prefix-tuning run has no LoRA to merge"),
])
def test_export_refuses_prefix_runs_from_their_config_alone(tmp_path, checkpoints, name, layers, merge, message):
    run = tmp_path / "run"  # config.json only: the check comes before any weights are read
    run.mkdir()
    cfg = TrainConfig(model=str(checkpoints / name), trainable="prefix", layers=layers, device="cpu")
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(UserError, match=message):
        export(run, tmp_path / "out", merge_lora=merge)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,spec,merge,kind", [
    ("llama-gqa-tied", "lora+head", False, "huggingface"),
    ("opt-tied", "lora", True, "huggingface"),
    ("llama-gqa-untied", "lora", False, "peft"),
    ("qwen2-gqa-qkv-bias", "prefix", False, "peft"),
])
def test_export_of_a_causal_run_directory(tmp_path, checkpoints, name, spec, merge, kind):
    # A run directory as training leaves it (config.json, best.safetensors of the trainable
    # tensors), through rebuild and export: the path `zotune export` takes.
    from peft import PeftModel
    lora = dict(lora_rank=4, lora_alpha=6.0) if spec.startswith("lora") else {}
    cfg = TrainConfig(model=str(checkpoints / name), trainable=spec, device="cpu",
                      tokenizer=str(ROBERTA_TOKENIZER_DIR), **lora)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    model, trainable = load_trainable(cfg)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, param in trainable:
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    save_file({n: p.detach().contiguous() for n, p in trainable}, run / "best.safetensors")

    assert export(run, tmp_path / "out", merge_lora=merge) == kind
    exported = _auto(tmp_path / "out") if kind == "huggingface" else \
        PeftModel.from_pretrained(_auto(checkpoints / name), tmp_path / "out").eval()
    sequences = _sequences()
    want = _zotune_logits(model.eval(), sequences)
    _assert_close(_zotune_logits(rebuild(run).model, sequences), want)
    _assert_close(_hf_logits(exported, sequences), want)
