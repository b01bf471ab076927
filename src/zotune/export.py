"""Export a finished run to the Hugging Face ecosystem.

`rebuild` turns a run directory back into the fine-tuned zotune model: the base checkpoint
named in RUN/config.json, the same trainable subset (same seed, so LoRA/prefix shapes and
names match), and RUN/best.safetensors loaded into it, strictly.

`export` then writes
  full, bias, top:K   a Hugging Face checkpoint directory (base config.json, model.safetensors
                      through loading.to_hf_state, tokenizer files) for
                      transformers.AutoModelForMaskedLM.from_pretrained(DIR);
  lora                a PEFT adapter directory (adapter_config.json, adapter_model.safetensors)
                      for peft.PeftModel.from_pretrained(base, DIR), or with merge_lora a full
                      checkpoint with the update folded into the query/value weights;
  lora+head           a full checkpoint as for lora with merge_lora, whose head is the trained
                      one and whose decoder is its own (config.json: tie_word_embeddings false);
  prefix              nothing: neither transformers nor PEFT has a format for key/value
                      prefixes on a RoBERTa masked LM, so it is a UserError.
"""

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zotune.config import TrainConfig, read_run_config
from zotune.errors import UserError, require
from zotune.model.loading import config_from_hf, resolve_model_dir, to_hf_state, weight_map
from zotune.model.roberta import MaskedLM
from zotune.session import load_trainable


@dataclass
class Rebuilt:
    """A run's fine-tuned model and where it came from."""
    config: TrainConfig
    model_dir: Path                 # the base checkpoint
    hf_config: dict                 # the base checkpoint's config.json
    architecture: str               # e.g. RobertaForMaskedLM
    model: MaskedLM                 # base + subset + best.safetensors, eval mode, float32, CPU


def rebuild(run_dir: str | Path) -> Rebuilt:
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    weights = run_dir / "best.safetensors"
    if not weights.is_file():
        raise UserError(f"{run_dir} has no best.safetensors (the run never reached a dev evaluation); "
                        f"train with --steps at least --eval-steps")
    model_dir = resolve_model_dir(cfg.model)
    model, trainable = load_trainable(cfg)  # as the run built it: the same names and shapes
    hf_config = json.loads((model_dir / "config.json").read_text())
    _, architecture = config_from_hf(hf_config, str(model_dir / "config.json"))
    try:
        state = load_file(weights)
    except Exception as exc:  # truncated or corrupted files raise several types
        raise UserError(f"cannot read {weights}: {type(exc).__name__}; the file is truncated or corrupted") from None
    expected = dict(trainable)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise UserError(f"{weights} does not match --trainable {cfg.trainable} of {cfg.model} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was the base model changed?")
    with torch.no_grad():
        for name, param in trainable:
            if state[name].shape != param.shape:
                raise UserError(f"{weights}: {name} has shape {tuple(state[name].shape)}, the model expects "
                                f"{tuple(param.shape)}; was the base model changed?")
            param.copy_(state[name])
    model.requires_grad_(False)
    return Rebuilt(cfg, model_dir, hf_config, architecture, model.eval())


def merged_state(model: MaskedLM) -> dict[str, torch.Tensor]:
    """The model's state dict with every LoRA update folded into the fused qkv weight:
    W_q += (alpha / R) B_q A_q, W_v += (alpha / R) B_v A_v (Hu et al. 2021, section 4.1)."""
    state = {name: t for name, t in model.state_dict().items() if ".lora_" not in name}
    for i, layer in enumerate(model.layers):
        attention = layer.attention
        if attention.lora_q is None:
            continue
        q, k, v = state[f"layers.{i}.attention.qkv.weight"].chunk(3)     # 3 x [E, E]
        q = q + attention.lora_q.scaling * attention.lora_q.B @ attention.lora_q.A
        v = v + attention.lora_v.scaling * attention.lora_v.B @ attention.lora_v.A
        state[f"layers.{i}.attention.qkv.weight"] = torch.cat([q, k, v])
    return state


def peft_adapter(rebuilt: Rebuilt) -> tuple[dict, dict[str, torch.Tensor]]:
    """(LoraConfig keyword arguments, tensors under PEFT's names) for a LoRA run.

    PEFT names a LoRA matrix after the module it wraps, under `base_model.model.`, without the
    adapter name: base_model.model.roberta.encoder.layer.1.attention.self.query.lora_A.weight
    (checked by saving a get_peft_model adapter of transformers' RobertaForMaskedLM with peft
    0.21). The wrapped module's HF name comes from loading.weight_map, whose qkv rows with stack
    index 0 and 2 are the query and value Linears. zotune's A [R, E] and B [E, R] are PEFT's
    lora_A.weight and lora_B.weight as they are; both scale by lora_alpha / r."""
    model, cfg = rebuilt.model, rebuilt.config
    modules = {(zt, index): hf.removesuffix(".weight")
               for hf, zt, index in weight_map(model.config, rebuilt.architecture) if hf.endswith(".weight")}
    tensors, layers = {}, []
    for i, layer in enumerate(model.layers):
        attention = layer.attention
        if attention.lora_q is None:
            continue
        layers.append(i)
        for lora, index in ((attention.lora_q, 0), (attention.lora_v, 2)):
            module = modules[(f"layers.{i}.attention.qkv.weight", index)]
            tensors[f"base_model.model.{module}.lora_A.weight"] = lora.A.detach().contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = lora.B.detach().contiguous()
    config = dict(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                  target_modules=["query", "value"], base_model_name_or_path=str(rebuilt.model_dir.resolve()),
                  layers_to_transform=layers if len(layers) < model.config.num_layers else None,
                  inference_mode=True)
    return config, tensors


def export(run_dir: str | Path, output: str | Path, merge_lora: bool = False) -> str:
    """Write the run's fine-tuned model to `output` (which must not hold files yet); returns
    the format written: "huggingface" or "peft"."""
    trainable = read_run_config(run_dir).trainable
    if trainable == "lora" and not merge_lora:
        require("peft", "peft", "exporting a LoRA run as a PEFT adapter (or pass --merge-lora)")
    if trainable == "prefix":
        raise UserError("prefix-tuning runs cannot be exported: transformers and PEFT have no format for "
                        "key/value prefixes on a RoBERTa masked LM; evaluate the run with zotune instead")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"export output {output} already exists and is not empty; pass a new directory")
    rebuilt = rebuild(run_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temporary directory and rename at the end: a failed export leaves nothing
    # under the final name that looks complete.
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        if rebuilt.config.trainable == "lora" and not merge_lora:
            kind = "peft"
            _write_peft(rebuilt, staging)
        else:
            kind = "huggingface"
            _write_huggingface(rebuilt, staging)
        if output.exists():
            output.rmdir()
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return kind


def _write_huggingface(rebuilt: Rebuilt, out: Path) -> None:
    from zotune.evaluate import load_tokenizer
    state = merged_state(rebuilt.model)
    hf_state = to_hf_state(state, rebuilt.model.config, rebuilt.architecture)
    # The base config.json as it is (architectures, vocabulary), untied if the run untied the
    # decoder; the weights are float32.
    hf_config = dict(rebuilt.hf_config)
    if not rebuilt.model.config.tie_word_embeddings:  # lora+head trained a decoder of its own
        hf_config["tie_word_embeddings"] = False
    for key in ("dtype", "torch_dtype"):  # transformers 5 and 4 names
        if key in hf_config:
            hf_config[key] = "float32"
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file({n: t.detach().cpu().contiguous() for n, t in hf_state.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    load_tokenizer(rebuilt.model_dir, rebuilt.config.tokenizer).save_pretrained(out)


def _write_peft(rebuilt: Rebuilt, out: Path) -> None:
    from peft import LoraConfig
    config, tensors = peft_adapter(rebuilt)
    LoraConfig(**config).save_pretrained(out)  # PEFT's own adapter_config.json, peft_type LORA
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
