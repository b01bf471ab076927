"""zotune export: a trained run -> a Hugging Face checkpoint or a PEFT adapter whose logits match zotune's."""

import json

import pytest
import torch
from safetensors.torch import load_file

from zotune.cli import main
from zotune.config import TrainConfig
from zotune.layers.batch import pack
from zotune.errors import UserError
from zotune.evaluate import accuracy, load_tokenizer
from zotune.export import export, rebuild
from zotune.model.loading import load_model
from zotune.tasks.tasks import TASKS
from zotune.tasks.templates import PromptTemplate
from zotune.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = ["a gorgeous , witty , seductive movie .", "boring and flat ", "the plot is thin but the acting sings",
             "an utterly dreadful waste of two hours"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_mlm_dir):
    """Short real MeZO runs, one per subset, with an lr large enough that the weights move."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, overrides in {
        "full": dict(trainable="full"),
        "bias": dict(trainable="bias"),
        "top1": dict(trainable="top:1"),
        "lora": dict(trainable="lora", lora_rank=4, lora_alpha=8.0),
        "lora_upper": dict(trainable="lora", layers=(1,), lora_rank=2, lora_alpha=6.0),
        "lora_head": dict(trainable="lora+head", lora_rank=4, lora_alpha=8.0),
    }.items():
        cfg = TrainConfig(**{**dict(model=str(tiny_mlm_dir), steps=2, eval_steps=2, log_steps=1, quiet=True,
                                    device="cpu", output_dir=str(root / name), lr=5e-2, eps=1e-2,
                                    batch_size=8), **overrides})
        out[name] = (root / name, train(cfg))
    return out


def _sequences(model_dir):
    task = TASKS["sst2"]
    prompt = PromptTemplate(load_tokenizer(model_dir, None), task.template, task.label_words, task.max_length)
    return prompt, [prompt.encode((s,)) for s in SENTENCES]


@torch.inference_mode()
def _zotune_logits(model, prompt, seqs):
    return model(pack(seqs, prompt.mask_id, model.config.position_offset))          # [B, V]


@torch.inference_mode()
def _hf_logits(hf, prompt, seqs):
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), prompt.tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)], attention_mask[i, :len(s)] = torch.tensor(s), 1
    logits = hf(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[torch.arange(len(seqs)), torch.tensor([s.index(prompt.mask_id) for s in seqs])]  # [B, V]


def _assert_close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def _assert_weights_moved(run, model_dir):
    base = load_model(model_dir).state_dict()
    best = load_file(run / "best.safetensors")
    moved = [n for n, t in best.items() if n in base and not torch.equal(t, base[n])]
    lora_b = [n for n, t in best.items() if n.endswith("lora_q.B") and t.abs().max() > 0]
    assert moved or lora_b, "training left the weights where they started; raise the test's lr"


@pytest.mark.parametrize("name", ["full", "bias", "top1", "lora_head"])
def test_huggingface_export_matches_zotune_logits(tmp_path, runs, tiny_mlm_dir, name):
    from transformers import AutoModelForMaskedLM
    run, _ = runs[name]
    _assert_weights_moved(run, tiny_mlm_dir)
    assert export(run, tmp_path / "hf") == "huggingface"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["RobertaForMaskedLM"]
    hf = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    prompt, seqs = _sequences(tmp_path / "hf")  # the tokenizer files were copied too
    ours = rebuild(run).model
    _assert_close(_hf_logits(hf, prompt, seqs), _zotune_logits(ours, prompt, seqs))
    # ... and the export is the fine-tuned model, not the base one
    base = AutoModelForMaskedLM.from_pretrained(tiny_mlm_dir).eval()
    assert not torch.allclose(_hf_logits(base, prompt, seqs), _zotune_logits(ours, prompt, seqs))


@pytest.mark.parametrize("name", ["lora", "lora_upper"])
def test_peft_adapter_matches_zotune_logits(tmp_path, runs, tiny_mlm_dir, name):
    from peft import PeftModel
    from transformers import AutoModelForMaskedLM
    run, _ = runs[name]
    _assert_weights_moved(run, tiny_mlm_dir)
    assert export(run, tmp_path / "adapter") == "peft"
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["target_modules"] in (
        ["query", "value"], ["value", "query"])
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (cfg["lora_rank"], cfg["lora_alpha"])
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.roberta.encoder.layer.1.attention.self.query.lora_A.weight" in keys
    assert len(keys) == 4 * (2 if cfg["layers"] is None else len(cfg["layers"]))

    peft_model = PeftModel.from_pretrained(AutoModelForMaskedLM.from_pretrained(tiny_mlm_dir), tmp_path / "adapter")
    peft_model.eval()
    prompt, seqs = _sequences(tiny_mlm_dir)
    ours = rebuild(run).model
    want = _zotune_logits(ours, prompt, seqs)
    _assert_close(_hf_logits(peft_model, prompt, seqs), want)
    base = AutoModelForMaskedLM.from_pretrained(tiny_mlm_dir).eval()
    assert not torch.allclose(_hf_logits(base, prompt, seqs), want)  # the adapter does something

    # --merge-lora folds the update into query/value: a plain HF checkpoint with the same logits
    assert export(run, tmp_path / "merged", merge_lora=True) == "huggingface"
    merged = AutoModelForMaskedLM.from_pretrained(tmp_path / "merged").eval()
    _assert_close(_hf_logits(merged, prompt, seqs), want)


def test_lora_head_exports_an_untied_checkpoint(tmp_path, runs, tiny_mlm_dir):
    from transformers import AutoModelForMaskedLM
    run, _ = runs["lora_head"]
    assert "head.decoder" in load_file(run / "best.safetensors")
    assert export(run, tmp_path / "hf") == "huggingface"  # LoRA merged: PEFT's adapter has no trained head
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    hf = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    base = AutoModelForMaskedLM.from_pretrained(tiny_mlm_dir).eval()
    # The input embeddings are the base model's; the decoder is the trained one.
    assert torch.equal(hf.roberta.embeddings.word_embeddings.weight, base.roberta.embeddings.word_embeddings.weight)
    assert not torch.equal(hf.lm_head.decoder.weight, hf.roberta.embeddings.word_embeddings.weight)
    assert torch.equal(hf.lm_head.decoder.weight, rebuild(run).model.head.decoder)


def test_rebuilt_model_reproduces_the_runs_dev_accuracy(runs):
    from zotune.engine.runner import ModelRunner
    from zotune.evaluate import encode, predict
    from zotune.tasks.data import default_data_dir, load_split
    run, summary = runs["lora"]
    rebuilt = rebuild(run)
    prompt, _ = _sequences(rebuilt.model_dir)
    runner = ModelRunner(rebuilt.model, prompt.label_word_ids, prompt.mask_id, torch.device("cpu"), "tf32",
                         False, prompt.tokenizer.pad_token_id)
    dev = load_split(TASKS["sst2"], default_data_dir(), 16, 42, "dev")
    assert accuracy(predict(runner, encode(prompt, dev), 64), dev) == summary["dev_accuracy"]


def test_prefix_runs_are_a_clear_user_error(tmp_path, runs):
    run = tmp_path / "prefix"  # the check reads config.json only, before any weights
    run.mkdir()
    cfg = json.loads((runs["lora"][0] / "config.json").read_text())
    # The LoRA run's rank and alpha go back to their defaults: a prefix config with them is now refused.
    (run / "config.json").write_text(json.dumps({**cfg, "trainable": "prefix", "lora_rank": 8, "lora_alpha": 16.0}))
    with pytest.raises(UserError, match="prefix-tuning runs cannot be exported"):
        export(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export_and_one_line_errors(tmp_path, runs, capsys):
    assert main(["export", str(runs["bias"][0]), "--output", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert str(tmp_path / "hf") in capsys.readouterr().out
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.json").write_text((runs["bias"][0] / "config.json").read_text())
    for run, output, message in [
        (tmp_path / "nope", tmp_path / "new", "does not exist"),
        (runs["bias"][0], tmp_path / "hf", "already exists and is not empty"),
        (empty, tmp_path / "new", "has no best.safetensors"),
    ]:
        assert main(["export", str(run), "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "new").exists()


def test_a_moved_run_exports_with_model_saying_where_its_base_lies(tmp_path, runs, tiny_mlm_dir, capsys):
    """A run copied from another machine names a base checkpoint that is not here: export says
    so in one line; --model gives the folder, checked against the run's logged sha256."""
    import shutil
    from tests.conftest import save_tiny_roberta
    moved = tmp_path / "moved"
    shutil.copytree(runs["bias"][0], moved)
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "model": "/the/first/machine/model"}))
    save_tiny_roberta(tmp_path / "other", vocab_size=50265, hidden=32, layers=2, heads=4,
                      max_position_embeddings=514, seed=1)
    capsys.readouterr()  # transformers' progress bar
    for flags, message in [([], "which is not on this machine; give that checkpoint's folder with --model DIR"),
                           (["--model", str(tmp_path / "other")], "is not the one the run started from")]:
        assert main(["export", str(moved), "--output", str(tmp_path / "refused"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "refused").exists()
    assert main(["export", str(moved), "--output", str(tmp_path / "hf"), "--model", str(tiny_mlm_dir)]) == 0
    assert main(["export", str(runs["bias"][0]), "--output", str(tmp_path / "original")]) == 0
    assert load_file(tmp_path / "hf" / "model.safetensors").keys() == load_file(
        tmp_path / "original" / "model.safetensors").keys()
    moved_weights, original = (load_file(tmp_path / d / "model.safetensors") for d in ("hf", "original"))
    assert all(torch.equal(moved_weights[n], original[n]) for n in original)
