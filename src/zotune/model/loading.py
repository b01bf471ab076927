"""Load Hugging Face masked-LM checkpoints into zotune's MaskedLM, strictly.

The name map below is the specification: every tensor of the checkpoint is either
mapped to a zotune tensor, stacked into one (query/key/value -> qkv), or listed as
deliberately ignored. A missing, unexpected or misshapen tensor is an error, never a
silent random initialisation.
"""

import json
from pathlib import Path

import torch

from zotune.errors import UserError
from zotune.model.roberta import MaskedLM, ModelConfig

# architecture -> (prefix of the encoder's tensors, head layout)
ARCHITECTURES = {
    "RobertaForMaskedLM": ("roberta", "roberta"),
    "XLMRobertaForMaskedLM": ("roberta", "roberta"),
    "BertForMaskedLM": ("bert", "bert"),
}

# Per-layer rows: HF name under `{prefix}.encoder.layer.{i}.` -> (zotune name under
# `layers.{i}.`, index in a stacked tensor or None). Each row exists for .weight and .bias.
_LAYER_ROWS = [
    ("attention.self.query", "attention.qkv", 0),
    ("attention.self.key", "attention.qkv", 1),
    ("attention.self.value", "attention.qkv", 2),
    ("attention.output.dense", "attention.out", None),
    ("attention.output.LayerNorm", "attention.norm", None),
    ("intermediate.dense", "ffn_in", None),
    ("output.dense", "ffn_out", None),
    ("output.LayerNorm", "ffn_norm", None),
]
_EMBEDDING_ROWS = [
    ("embeddings.word_embeddings.weight", "embeddings.word.weight"),
    ("embeddings.position_embeddings.weight", "embeddings.position.weight"),
    ("embeddings.token_type_embeddings.weight", "embeddings.token_type.weight"),
    ("embeddings.LayerNorm.weight", "embeddings.norm.weight"),
    ("embeddings.LayerNorm.bias", "embeddings.norm.bias"),
]
_HEAD_ROWS = {
    "roberta": [
        ("lm_head.dense.weight", "head.dense.weight"),
        ("lm_head.dense.bias", "head.dense.bias"),
        ("lm_head.layer_norm.weight", "head.norm.weight"),
        ("lm_head.layer_norm.bias", "head.norm.bias"),
        ("lm_head.bias", "head.bias"),
    ],
    "bert": [
        ("cls.predictions.transform.dense.weight", "head.dense.weight"),
        ("cls.predictions.transform.dense.bias", "head.dense.bias"),
        ("cls.predictions.transform.LayerNorm.weight", "head.norm.weight"),
        ("cls.predictions.transform.LayerNorm.bias", "head.norm.bias"),
        ("cls.predictions.bias", "head.bias"),
    ],
}
_DECODER = {"roberta": "lm_head.decoder.weight", "bert": "cls.predictions.decoder.weight"}
# Present in some checkpoints, not part of the masked-LM computation.
_IGNORED_SUFFIXES = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")
# HF's forward adds the decoder Linear's own bias. Tied checkpoints store it once, as the
# head bias; untied ones may store both, and then the decoder's is the one in use.
_DECODER_BIAS = {"lm_head.bias": "lm_head.decoder.bias", "cls.predictions.bias": "cls.predictions.decoder.bias"}

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def weight_map(cfg: ModelConfig, architecture: str) -> list[tuple[str, str, int | None]]:
    """Rows (HF name, zotune name, stack index or None) for every tensor of the model."""
    prefix, head = ARCHITECTURES[architecture]
    rows = [(f"{prefix}.{hf}", zt, None) for hf, zt in _EMBEDDING_ROWS]
    for i in range(cfg.num_layers):
        for hf, zt, index in _LAYER_ROWS:
            for kind in ("weight", "bias"):
                rows.append((f"{prefix}.encoder.layer.{i}.{hf}.{kind}", f"layers.{i}.{zt}.{kind}", index))
    rows += [(hf, zt, None) for hf, zt in _HEAD_ROWS[head]]
    if not cfg.tie_word_embeddings:
        rows.append((_DECODER[head], "head.decoder", None))
    return rows


# config.json keys that size the model: each a positive integer.
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings")


def config_from_hf(hf: dict, source: str = "config.json") -> tuple[ModelConfig, str]:
    if not isinstance(hf, dict):
        raise UserError(f"{source} holds a JSON {type(hf).__name__}, not a model config; re-save the checkpoint")
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list):
        architectures = [architectures]
    known = [a for a in architectures if a in ARCHITECTURES]
    if not known:
        raise UserError(f"{source}: unsupported architecture {architectures or hf.get('model_type')}; "
                        f"zotune loads {', '.join(ARCHITECTURES)}")
    architecture = known[0]
    bad = [k for k in _REQUIRED_KEYS if not isinstance(hf.get(k), int) or isinstance(hf[k], bool) or hf[k] < 1]
    if bad:
        raise UserError(f"{source} lacks a positive integer {', '.join(bad)}; the checkpoint's config is incomplete, "
                        f"re-save it with save_pretrained")
    if hf["hidden_size"] % hf["num_attention_heads"]:
        raise UserError(f"{source}: hidden_size {hf['hidden_size']} is not a multiple of num_attention_heads "
                        f"{hf['num_attention_heads']}")
    is_bert = ARCHITECTURES[architecture][1] == "bert"
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        max_positions=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 1),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12), hidden_act=hf.get("hidden_act", "gelu"),
        head_act=hf.get("hidden_act", "gelu") if is_bert else "gelu",
        position_offset=0 if is_bert else hf.get("pad_token_id", 1) + 1,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1))
    return cfg, architecture


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local directory, or a Hub id downloaded through huggingface_hub where a network exists."""
    path = Path(name_or_path)
    if path.is_dir():
        if any((path / name).is_file() for name in ("trajectory.jsonl", "metrics.jsonl", "summary.json")):
            raise UserError(f"{name_or_path} is a zotune run directory, not a checkpoint; write one with "
                            f"`zotune export {name_or_path} --output DIR` and pass DIR")
        return path
    if path.exists():
        raise UserError(f"--model {name_or_path} is a file; pass the checkpoint directory")
    if str(name_or_path).startswith((".", "/")) or str(name_or_path).count("/") > 1:
        raise UserError(f"model directory {name_or_path} does not exist; check the --model path")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(name_or_path), allow_patterns=[
            "config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin*",
            "tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "sentencepiece*"]))
    except Exception as exc:  # offline, unknown id, gated repo: all need the same advice
        raise UserError(f"--model {name_or_path} is not a local directory and could not be downloaded "
                        f"({type(exc).__name__}); pass a local checkpoint directory") from None


def read_checkpoint(model_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF config dict, all tensors by HF name), with every failure turned into a UserError."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{model_dir} has no config.json; pass a Hugging Face checkpoint directory")
    hf_config = read_hf_config(model_dir)
    files = _weight_files(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file
                tensors.update(load_file(file))
            else:
                tensors.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        except Exception as exc:  # truncated or corrupted files raise many different types
            raise UserError(f"cannot read weights {file}: {type(exc).__name__}: {str(exc)[:120]}; "
                            f"the file is truncated or corrupted, re-download or re-save it") from None
    return hf_config, tensors


def read_hf_config(model_dir: Path) -> dict:
    """The checkpoint's config.json, checked (config_from_hf) before anything else is read, so
    a bad one is reported as itself, not as the tokenizer or weights it breaks."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{model_dir} has no config.json; pass a Hugging Face checkpoint directory")
    try:
        hf_config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {config_path}: {exc}; the file is corrupted, re-save the checkpoint") from None
    config_from_hf(hf_config, str(config_path))
    return hf_config


def _weight_files(model_dir: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError) as exc:
                raise UserError(f"cannot read shard index {path}: {exc}; re-save the checkpoint") from None
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise UserError(f"{model_dir} lacks weight shard(s) {', '.join(missing)} named in {name}")
            return [model_dir / s for s in shards]
        return [path]
    raise UserError(f"{model_dir} has no weights (looked for {', '.join(WEIGHT_FILES)}); "
                    f"pass a directory written by save_pretrained")


def to_zotune_state(tensors: dict[str, torch.Tensor], cfg: ModelConfig, architecture: str,
                    source: str) -> dict[str, torch.Tensor]:
    """Apply the name map: HF tensors -> zotune state dict (q/k/v stacked into qkv)."""
    rows = weight_map(cfg, architecture)
    expected = {hf for hf, _, _ in rows}
    decoder = _DECODER[ARCHITECTURES[architecture][1]]
    unexpected = [n for n in tensors if n not in expected and n not in _DECODER_BIAS.values()
                  and not n.endswith(_IGNORED_SUFFIXES) and not (cfg.tie_word_embeddings and n == decoder)]
    if unexpected:
        raise UserError(f"{source} has tensors zotune does not know: {', '.join(sorted(unexpected)[:5])}; "
                        f"is it a {architecture} checkpoint?")
    missing = sorted(expected - tensors.keys())
    if missing:
        raise UserError(f"{source} lacks tensor(s) {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}; the checkpoint is incomplete")
    state: dict[str, torch.Tensor] = {}
    stacks: dict[str, list] = {}
    for hf, zt, index in rows:
        if index is None:
            state[zt] = tensors.get(_DECODER_BIAS.get(hf), tensors[hf])
        else:
            stacks.setdefault(zt, [None, None, None])[index] = tensors[hf]
    for zt, parts in stacks.items():
        state[zt] = torch.cat(parts)
    return state


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig, architecture: str) -> dict[str, torch.Tensor]:
    """The name map backwards: a zotune state dict -> HF tensor names (qkv split into three)."""
    out = {}
    for hf, zt, index in weight_map(cfg, architecture):
        out[hf] = state[zt] if index is None else state[zt].chunk(3)[index]
        if not cfg.tie_word_embeddings and hf in _DECODER_BIAS:
            # An untied HF head reads its decoder Linear's own bias (transformers 5 does not tie
            # it to the head's): write the one bias under both names.
            out[_DECODER_BIAS[hf]] = out[hf].clone()
    return {name: t.contiguous() for name, t in out.items()}


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> MaskedLM:
    hf_config, tensors = read_checkpoint(model_dir)
    cfg, architecture = config_from_hf(hf_config, str(model_dir / "config.json"))
    state = to_zotune_state(tensors, cfg, architecture, str(model_dir))
    with torch.device("meta"):
        model = MaskedLM(cfg)
    for name, param in model.state_dict().items():
        if tuple(state[name].shape) != tuple(param.shape):
            hf = next(h for h, z, _ in weight_map(cfg, architecture) if z == name)
            raise UserError(f"{model_dir}: tensor {hf} has shape {tuple(state[name].shape)}, config.json "
                            f"implies {tuple(param.shape)}; the config and weights do not match")
    state = {name: t.to(device=device, dtype=dtype) for name, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
