"""Export a finished run to the Hugging Face ecosystem.

`rebuild` turns a run directory back into the fine-tuned zotune model: the base checkpoint
named in RUN/config.json, the same trainable subset (same seed, so LoRA/prefix shapes and
names match), and RUN/best.safetensors loaded into it, strictly.

`export` then writes, for masked LMs (RoBERTa) and causal LMs (OPT, the Llama family) alike,
through the loader's name maps (loading.weight_map, stack_sizes):
  full, bias, top:K   a Hugging Face checkpoint directory (base config.json, model.safetensors
                      through loading.to_hf_state, tokenizer files) for
                      transformers.AutoModelFor{MaskedLM,CausalLM}.from_pretrained(DIR);
  lora                a PEFT adapter directory (adapter_config.json, adapter_model.safetensors)
                      for peft.PeftModel.from_pretrained(base, DIR), or with merge_lora a full
                      checkpoint with the update folded into the query/value weights;
  lora+head           a full checkpoint as for lora with merge_lora, whose head is the trained
                      one and whose decoder is its own (config.json: tie_word_embeddings false);
  prefix              a PEFT prefix-tuning adapter for the Llama family (prefix on every layer);
                      a UserError for RoBERTa (no format for key/value prefixes on a masked LM),
                      for OPT (PEFT moves OPT's learned positions on by the prefix length, so the
                      logits would differ) and for a prefix on some layers only.
The functions below `rebuild` take the zotune model itself (write_huggingface, write_peft,
merged_state, peft_adapter), so any code that holds a fine-tuned model can write it.
"""

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zotune.config import TrainConfig
from zotune.errors import UserError, require
from zotune.layers.rope import apply_rotary, inverse_frequencies, rotary_tables
from zotune.model.causal_lm import CausalConfig, CausalLM
from zotune.model.loading import (config_from_hf, read_hf_config, resolve_model_dir, stack_sizes, to_hf_state,
                                  weight_map)
from zotune.model.roberta import MaskedLM, ModelConfig
from zotune.records import BEST_NAME
from zotune.session import load_trainable
from zotune.trajectory import run_config_here


@dataclass
class Rebuilt:
    """A run's fine-tuned model and where it came from."""
    config: TrainConfig
    model_dir: Path                 # the base checkpoint
    hf_config: dict                 # the base checkpoint's config.json
    architecture: str               # e.g. RobertaForMaskedLM
    model: MaskedLM | CausalLM      # base + subset + best.safetensors, eval mode, float32, CPU


def rebuild(run_dir: str | Path, cfg: TrainConfig | None = None) -> Rebuilt:
    """The run's fine-tuned model; `cfg`: its config as run_config_here reads it (default: with
    the base checkpoint its config.json names)."""
    run_dir = Path(run_dir)
    cfg = cfg or run_config_here(run_dir)
    weights = run_dir / BEST_NAME
    if not weights.is_file():
        raise UserError(f"{run_dir} has no {BEST_NAME} (the run never reached a dev evaluation); "
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


def merged_state(model: MaskedLM | CausalLM) -> dict[str, torch.Tensor]:
    """The model's state dict with every LoRA update folded into the stacked qkv weight:
    W_q += (alpha / R) B_q A_q, W_v += (alpha / R) B_v A_v (Hu et al. 2021, section 4.1).
    The parts' rows come from loading.stack_sizes (a causal LM's k and v are narrower under
    grouped-query attention). A prefix has no place among the weights: UserError."""
    if any(layer.attention.prefix_k is not None for layer in model.layers):
        raise UserError("a prefix cannot be merged into a checkpoint's weights; export the run without --merge-lora "
                        "(a PEFT prefix-tuning adapter), or evaluate it with zotune")
    state = {name: t for name, t in model.state_dict().items() if ".lora_" not in name}
    for i, layer in enumerate(model.layers):
        attention = layer.attention
        if attention.lora_q is None:
            continue
        name = f"layers.{i}.attention.qkv.weight"
        q, k, v = state[name].split(stack_sizes(model.config, name))    # [N*D, E], [G*D, E], [G*D, E]
        q = q + attention.lora_q.scaling * attention.lora_q.B @ attention.lora_q.A
        v = v + attention.lora_v.scaling * attention.lora_v.B @ attention.lora_v.A
        state[name] = torch.cat([q, k, v])
    return state


def write_huggingface(model: MaskedLM | CausalLM, architecture: str, base_config: dict, out: Path) -> None:
    """config.json and model.safetensors of a checkpoint for transformers' AutoModelFor*.from_pretrained
    (LoRA merged, merged_state): the base checkpoint's config.json as it is (architectures,
    vocabulary), untied if the model's head has a decoder of its own (lora+head), float32."""
    hf_state = to_hf_state(merged_state(model), model.config, architecture)
    hf_config = dict(base_config)
    if not model.config.tie_word_embeddings:
        hf_config["tie_word_embeddings"] = False
    for key in ("dtype", "torch_dtype"):  # transformers 5 and 4 names
        if key in hf_config:
            hf_config[key] = "float32"
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file({n: t.detach().cpu().contiguous() for n, t in hf_state.items()}, out / "model.safetensors",
              metadata={"format": "pt"})


def peft_adapter(model: MaskedLM | CausalLM, architecture: str, base_model: str | Path):
    """(PEFT config, tensors under PEFT's names) of the model's LoRA matrices or prefix, for
    peft.PeftModel.from_pretrained(base, DIR) on the checkpoint `base_model`. The adapter holds
    nothing else: a head trained beside LoRA (lora+head) needs write_huggingface."""
    attentions = [layer.attention for layer in model.layers]
    if any(a.lora_q is not None for a in attentions):
        return _lora_adapter(model, architecture, base_model)
    if any(a.prefix_k is not None for a in attentions):
        return _prefix_adapter(model, base_model)
    raise UserError("the model has no LoRA matrices or prefix to write as a PEFT adapter; "
                    "export it as a Hugging Face checkpoint")


def _lora_adapter(model: MaskedLM | CausalLM, architecture: str, base_model: str | Path):
    """PEFT names a LoRA matrix after the module it wraps, under `base_model.model.`, without the
    adapter name: base_model.model.roberta.encoder.layer.1.attention.self.query.lora_A.weight,
    base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight (checked by saving
    get_peft_model adapters of transformers' RobertaForMaskedLM and LlamaForCausalLM with peft
    0.21). The wrapped modules are the loader's: weight_map's qkv rows with stack index 0 and 2
    (query/value, q_proj/v_proj), whose last name is PEFT's target. zotune's A [R, E] and
    B [out, R] are PEFT's lora_A.weight and lora_B.weight as they are; both scale by alpha / R."""
    from peft import LoraConfig
    modules = {(zt, index): hf.removesuffix(".weight")
               for hf, zt, index in weight_map(model.config, architecture) if hf.endswith(".weight")}
    tensors, layers, targets = {}, [], set()
    for i, layer in enumerate(model.layers):
        attention = layer.attention
        if attention.lora_q is None:
            continue
        layers.append(i)
        for lora, index in ((attention.lora_q, 0), (attention.lora_v, 2)):
            module = modules[(f"layers.{i}.attention.qkv.weight", index)]
            targets.add(module.rsplit(".", 1)[-1])
            tensors[f"base_model.model.{module}.lora_A.weight"] = lora.A.detach().contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = lora.B.detach().contiguous()
    lora = model.layers[layers[0]].attention.lora_q
    rank = lora.A.shape[0]
    config = LoraConfig(r=rank, lora_alpha=lora.scaling * rank, lora_dropout=0.0, bias="none",
                        target_modules=sorted(targets), base_model_name_or_path=str(Path(base_model).resolve()),
                        layers_to_transform=layers if len(layers) < model.config.num_layers else None,
                        task_type="CAUSAL_LM" if isinstance(model, CausalLM) else None, inference_mode=True)
    return config, tensors


def _prefix_adapter(model: CausalLM, base_model: str | Path):
    """PEFT's prefix tuning keeps one tensor, prompt_embeddings [P, L*2*G*D]: per virtual token,
    each layer's key then value rows, [G, D] each (peft_model.get_prompt reads it so into a
    past_key_values cache). zotune's prefix_k and prefix_v [P, G*D] are such rows, with one
    difference: PEFT's base model numbers the real tokens from P, after the prefix, and zotune
    from 0. Llama's RoPE is relative, so the keys turned on by P positions give the same
    scores (R(m + P)q . R(P)k = R(m)q . k); OPT's learned positions have no such fix."""
    from peft import PrefixTuningConfig
    cfg = model.config
    attentions = [layer.attention for layer in model.layers]
    refuse_prefix(cfg, every_layer=all(a.prefix_k is not None for a in attentions))
    length = attentions[0].prefix_k.shape[0]
    rows = []
    for attention in attentions:
        keys = attention.prefix_k.detach().unflatten(-1, (cfg.kv_heads, cfg.dim))     # [P, G, D]
        inv_freq = inverse_frequencies(cfg.dim, cfg.rope_theta, cfg.rope_scaling, keys.device)
        cos, sin = rotary_tables(torch.full((length,), length, device=keys.device), inv_freq)  # [P, D]
        rows += [apply_rotary(keys, cos, sin).flatten(1), attention.prefix_v.detach()]        # [P, G*D] each
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length, num_layers=cfg.num_layers,
                                token_dim=cfg.kv_heads * cfg.dim, num_attention_heads=cfg.kv_heads,
                                base_model_name_or_path=str(Path(base_model).resolve()), inference_mode=True)
    return config, {"prompt_embeddings": torch.cat(rows, dim=1).contiguous()}                # [P, L*2*G*D]


def refuse_prefix(cfg: ModelConfig | CausalConfig, every_layer: bool) -> None:
    """UserError where a prefix-tuned model has no PEFT form that gives zotune's logits."""
    if not isinstance(cfg, CausalConfig):
        raise UserError("prefix-tuning runs cannot be exported: transformers and PEFT have no format for "
                        "key/value prefixes on a RoBERTa masked LM; evaluate the run with zotune instead")
    if cfg.family != "llama":
        raise UserError(f"prefix-tuning runs of {cfg.family.upper()} cannot be exported: PEFT's prefix tuning moves "
                        f"the learned positions of the tokens on by the prefix length, zotune's prefix (as MeZO's) "
                        f"does not; evaluate the run with zotune instead")
    if not every_layer:
        raise UserError("a prefix on some layers only (--layers) cannot be exported: PEFT's prefix tuning has one "
                        "in every layer; train the prefix on every layer, or evaluate the run with zotune")


def write_peft(model: MaskedLM | CausalLM, architecture: str, base_model: str | Path, out: Path) -> None:
    """adapter_config.json (PEFT's own, peft_type LORA or PREFIX_TUNING) and adapter_model.safetensors."""
    config, tensors = peft_adapter(model, architecture, base_model)
    config.save_pretrained(out)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})


def export(run_dir: str | Path, output: str | Path, merge_lora: bool = False, model: str | None = None) -> str:
    """Write the run's fine-tuned model to `output` (which must not hold files yet); returns
    the format written: "huggingface" or "peft". `model`: where the run's base checkpoint lies
    now, for a run moved from another machine (run_config_here)."""
    cfg = run_config_here(run_dir, model)
    peft = cfg.trainable == "prefix" or (cfg.trainable == "lora" and not merge_lora)
    if cfg.trainable == "prefix":
        model_dir = resolve_model_dir(cfg.model)
        model_config, _ = config_from_hf(read_hf_config(model_dir), str(model_dir / "config.json"))
        refuse_prefix(model_config, every_layer=cfg.layers is None
                      or set(cfg.layers) == set(range(model_config.num_layers)))
        if merge_lora:
            raise UserError("--merge-lora: a prefix-tuning run has no LoRA to merge; export it without --merge-lora "
                            "(a PEFT prefix-tuning adapter)")
    if peft:
        require("peft", "peft", f"exporting a {cfg.trainable} run as a PEFT adapter"
                + (" (or pass --merge-lora)" if cfg.trainable == "lora" else ""))
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"export output {output} already exists and is not empty; pass a new directory")
    rebuilt = rebuild(run_dir, cfg)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temporary directory and rename at the end: a failed export leaves nothing
    # under the final name that looks complete.
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        if peft:
            write_peft(rebuilt.model, rebuilt.architecture, rebuilt.model_dir, staging)
        else:
            from zotune.evaluate import load_tokenizer
            write_huggingface(rebuilt.model, rebuilt.architecture, rebuilt.hf_config, staging)
            load_tokenizer(rebuilt.model_dir, rebuilt.config.tokenizer).save_pretrained(staging)
        if output.exists():
            output.rmdir()
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return "peft" if peft else "huggingface"
