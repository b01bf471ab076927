"""Load Hugging Face checkpoints into zotune, strictly: masked LMs (RoBERTa, XLM-R, BERT) into
MaskedLM, causal LMs (OPT; Llama, and Mistral and Qwen2 where their configs map onto it) into
CausalLM. load_model dispatches on config.json's `architectures`.

The name maps below are the specification: every tensor of the checkpoint is either
mapped to a zotune tensor, stacked into one (query/key/value -> qkv, gate/up -> ffn_in), or
listed as deliberately ignored. A missing, unexpected or misshapen tensor is an error, never a
silent random initialisation. to_hf_state runs a map backwards, for exports.
"""

import json
from pathlib import Path

import torch

from zotune.errors import UserError
from zotune.layers.rope import ROPE_TYPES
from zotune.model.causal_lm import CausalConfig, CausalLM
from zotune.model.roberta import MaskedLM, ModelConfig
from zotune.shipped import SHIPPED_MODELS

# architecture -> (prefix of the encoder's tensors, head layout)
ARCHITECTURES = {
    "RobertaForMaskedLM": ("roberta", "roberta"),
    "XLMRobertaForMaskedLM": ("roberta", "roberta"),
    "BertForMaskedLM": ("bert", "bert"),
}
# Causal-LM architecture -> CausalConfig.family
CAUSAL_ARCHITECTURES = {
    "OPTForCausalLM": "opt",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",  # Llama's tensors and maths, where no sliding window is in effect
    "Qwen2ForCausalLM": "llama",    # Llama's, with q/k/v biases
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
    if isinstance(cfg, CausalConfig):
        return _causal_weight_map(cfg)
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


def config_from_hf(hf: dict, source: str = "config.json") -> tuple[ModelConfig | CausalConfig, str]:
    """(zotune config, architecture) of a checkpoint's config.json: a ModelConfig for a masked
    LM, a CausalConfig for a causal one."""
    if not isinstance(hf, dict):
        raise UserError(f"{source} holds a JSON {type(hf).__name__}, not a model config; re-save the checkpoint")
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list):
        architectures = [architectures]
    known = [a for a in architectures if a in ARCHITECTURES or a in CAUSAL_ARCHITECTURES]
    if not known:
        raise UserError(f"{source}: unsupported architecture {architectures or hf.get('model_type')}; "
                        f"zotune loads {', '.join([*ARCHITECTURES, *CAUSAL_ARCHITECTURES])}")
    architecture = known[0]
    if architecture in CAUSAL_ARCHITECTURES:
        return _causal_config_from_hf(hf, architecture, source), architecture
    _require_positive(hf, _REQUIRED_KEYS, source)
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


def _require_positive(hf: dict, keys, source: str) -> None:
    bad = [k for k in keys if not isinstance(hf.get(k), int) or isinstance(hf[k], bool) or hf[k] < 1]
    if bad:
        raise UserError(f"{source} lacks a positive integer {', '.join(bad)}; the checkpoint's config is incomplete, "
                        f"re-save it with save_pretrained")


# ---- causal LMs: OPT and the Llama family -------------------------------------------------

# Per-layer rows: HF name under the layer -> (zotune name under `layers.{i}.`, stack index or
# None, which CausalConfig bias flag gives it a .bias row; None: a norm, which has a bias where
# it is a LayerNorm).
_OPT_LAYER_ROWS = [
    ("self_attn.q_proj", "attention.qkv", 0, "qkv_bias"),
    ("self_attn.k_proj", "attention.qkv", 1, "qkv_bias"),
    ("self_attn.v_proj", "attention.qkv", 2, "qkv_bias"),
    ("self_attn.out_proj", "attention.out", None, "out_bias"),
    ("self_attn_layer_norm", "attention_norm", None, None),
    ("fc1", "ffn_in", None, "ffn_bias"),
    ("fc2", "ffn_out", None, "ffn_bias"),
    ("final_layer_norm", "ffn_norm", None, None),
]
_LLAMA_LAYER_ROWS = [
    ("self_attn.q_proj", "attention.qkv", 0, "qkv_bias"),
    ("self_attn.k_proj", "attention.qkv", 1, "qkv_bias"),
    ("self_attn.v_proj", "attention.qkv", 2, "qkv_bias"),
    ("self_attn.o_proj", "attention.out", None, "out_bias"),
    ("input_layernorm", "attention_norm", None, None),
    ("mlp.gate_proj", "ffn_in", 0, "ffn_bias"),  # SwiGLU's gate and up, stacked: [2F, E]
    ("mlp.up_proj", "ffn_in", 1, "ffn_bias"),
    ("mlp.down_proj", "ffn_out", None, "ffn_bias"),
    ("post_attention_layernorm", "ffn_norm", None, None),
]
# Where each family's tensors live in an HF checkpoint (*ForCausalLM's base model prefix).
_CAUSAL_PREFIX = {"opt": "model.decoder.", "llama": "model."}
# Present in some checkpoints, not part of the computation: RoPE's tables (older Llama saves).
_CAUSAL_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _causal_weight_map(cfg: CausalConfig) -> list[tuple[str, str, int | None]]:
    prefix, opt = _CAUSAL_PREFIX[cfg.family], cfg.family == "opt"
    kinds = lambda flag: ("weight", "bias") if (getattr(cfg, flag) if flag else opt) else ("weight",)  # noqa: E731
    rows = [(f"{prefix}embed_tokens.weight", "embeddings.word.weight", None)]
    if opt:
        rows.append((f"{prefix}embed_positions.weight", "embeddings.position.weight", None))
    if cfg.embed_dim != cfg.hidden_size:
        rows.append((f"{prefix}project_in.weight", "embeddings.project_in.weight", None))
    for i in range(cfg.num_layers):
        for hf, zt, index, flag in (_OPT_LAYER_ROWS if opt else _LLAMA_LAYER_ROWS):
            for kind in kinds(flag):
                rows.append((f"{prefix}layers.{i}.{hf}.{kind}", f"layers.{i}.{zt}.{kind}", index))
    if cfg.final_norm:
        rows += [(f"{prefix}{'final_layer_norm' if opt else 'norm'}.{kind}", f"head.norm.{kind}", None)
                 for kind in kinds(None)]
    if cfg.embed_dim != cfg.hidden_size:
        rows.append((f"{prefix}project_out.weight", "head.project_out.weight", None))
    if not cfg.tie_word_embeddings:
        rows.append(("lm_head.weight", "head.decoder", None))
    return rows


def _causal_config_from_hf(hf: dict, architecture: str, source: str) -> CausalConfig:
    family = CAUSAL_ARCHITECTURES[architecture]
    sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
             "ffn_dim" if family == "opt" else "intermediate_size")
    _require_positive(hf, sizes, source)
    common = dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                  num_heads=hf["num_attention_heads"], attention_dropout=hf.get("attention_dropout", 0.0))
    if family == "opt":
        if not hf.get("layer_norm_elementwise_affine", True):
            raise UserError(f"{source}: layer_norm_elementwise_affine false (LayerNorms without weights) is not "
                            f"supported; zotune loads OPT checkpoints whose LayerNorms have weights")
        pre_norm, bias = hf.get("do_layer_norm_before", True), hf.get("enable_bias", True)
        fields = dict(common, family="opt", intermediate_size=hf["ffn_dim"],
                      max_positions=hf["max_position_embeddings"] + 2,  # OPTLearnedPositionalEmbedding's offset
                      position_offset=2, word_embed_dim=hf.get("word_embed_proj_dim") or hf["hidden_size"],
                      hidden_act=hf.get("activation_function", "relu"), pre_norm=pre_norm,
                      final_norm=pre_norm and not hf.get("_remove_final_layer_norm", False),
                      qkv_bias=bias, out_bias=bias, ffn_bias=bias, hidden_dropout=hf.get("dropout", 0.1),
                      tie_word_embeddings=hf.get("tie_word_embeddings", True))
    else:
        _refuse_sliding_window(hf, architecture, source)
        theta, scaling = _rope_from_hf(hf, source)
        qwen2 = architecture == "Qwen2ForCausalLM"
        attention_bias = hf.get("attention_bias", False)
        fields = dict(common, family="llama", intermediate_size=hf["intermediate_size"],
                      max_positions=hf["max_position_embeddings"], num_kv_heads=hf.get("num_key_value_heads"),
                      head_dim=hf.get("head_dim"), norm_eps=hf.get("rms_norm_eps", 1e-6),
                      hidden_act=hf.get("hidden_act", "silu"), qkv_bias=qwen2 or attention_bias,
                      out_bias=not qwen2 and attention_bias, ffn_bias=not qwen2 and hf.get("mlp_bias", False),
                      tie_word_embeddings=hf.get("tie_word_embeddings", False), rope_theta=theta, rope_scaling=scaling)
    try:
        return CausalConfig(**fields)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{source}: {exc}; zotune cannot build this {architecture}") from None


def _refuse_sliding_window(hf: dict, architecture: str, source: str) -> None:
    """Mistral attends within a window of sliding_window tokens, Qwen2 where use_sliding_window;
    zotune's attention is full, so it loads them only where the window never takes effect."""
    window = hf.get("sliding_window")
    if architecture == "Qwen2ForCausalLM":
        in_effect = bool(hf.get("use_sliding_window")) and window is not None
    else:
        in_effect = window is not None and window < hf["max_position_embeddings"]
    if in_effect:
        raise UserError(f"{source}: sliding-window attention (sliding_window {window}) is not supported; zotune "
                        f"loads {architecture} checkpoints whose attention is full (sliding_window null)")


def _rope_from_hf(hf: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, scaling or None) from `rope_parameters` (transformers 5) or `rope_theta`
    and `rope_scaling` (transformers 4)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta, scaling = params["rope_theta"], params
    else:
        theta, scaling = hf.get("rope_theta", 10000.0), hf.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise UserError(f"{source}: rope_scaling {scaling!r} is not a mapping; re-save the checkpoint")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES or scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{source}: RoPE {kind!r} (partial_rotary_factor {scaling.get('partial_rotary_factor', 1.0)})"
                        f" is not supported; zotune implements {', '.join(ROPE_TYPES)} over the whole head")
    needs = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[kind]
    missing = [k for k in needs if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise UserError(f"{source}: RoPE {kind!r} lacks {', '.join(missing)}; the checkpoint's config is incomplete")
    return float(theta), None if kind == "default" else {"rope_type": kind, **{k: scaling[k] for k in needs}}


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local directory, a model shipped in this repository by name (zotune.shipped), or a Hub
    id downloaded through huggingface_hub where a network exists."""
    path = Path(name_or_path)
    if not path.exists() and str(name_or_path) in SHIPPED_MODELS:
        path = SHIPPED_MODELS[str(name_or_path)]
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
    files = weight_files(model_dir)
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


def is_causal_checkpoint(model_dir: Path) -> bool:
    """Whether the checkpoint's config.json names a causal LM (CAUSAL_ARCHITECTURES): what picks
    the candidate-scoring path over the masked-LM prompts. A bad config is a UserError."""
    cfg, _ = config_from_hf(read_hf_config(model_dir), str(model_dir / "config.json"))
    return isinstance(cfg, CausalConfig)


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files: its one file, or the shards its index names, sorted."""
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
    if isinstance(cfg, CausalConfig):
        return _causal_state(tensors, cfg, architecture, source)
    rows = weight_map(cfg, architecture)
    expected = {hf for hf, _, _ in rows}
    decoder = _DECODER[ARCHITECTURES[architecture][1]]
    unexpected = [n for n in tensors if n not in expected and n not in _DECODER_BIAS.values()
                  and not n.endswith(_IGNORED_SUFFIXES) and not (cfg.tie_word_embeddings and n == decoder)]
    _check_names(unexpected, expected, tensors, source, f"is it a {architecture} checkpoint?")
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


def _check_names(unexpected: list[str], expected: set[str], tensors: dict, source: str, hint: str) -> None:
    """The strict part of the name map, for either model kind: no tensor it does not name (but
    those the caller lets pass), and every tensor it names."""
    if unexpected:
        raise UserError(f"{source} has tensors zotune does not know: {', '.join(sorted(unexpected)[:5])}; {hint}")
    missing = sorted(expected - tensors.keys())
    if missing:
        raise UserError(f"{source} lacks tensor(s) {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}; the checkpoint is incomplete")


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig | CausalConfig,
                architecture: str) -> dict[str, torch.Tensor]:
    """The name map backwards: a zotune state dict -> HF tensor names (stacked tensors split
    into their parts, stack_sizes). A tied head writes no decoder: transformers ties it."""
    out = {}
    for hf, zt, index in weight_map(cfg, architecture):
        out[hf] = state[zt] if index is None else state[zt].split(stack_sizes(cfg, zt))[index]
        if not cfg.tie_word_embeddings and hf in _DECODER_BIAS:
            # An untied HF masked-LM head reads its decoder Linear's own bias (transformers 5 does
            # not tie it to the head's): write the one bias under both names.
            out[_DECODER_BIAS[hf]] = out[hf].clone()
    return {name: t.contiguous() for name, t in out.items()}


def _causal_state(tensors: dict[str, torch.Tensor], cfg: CausalConfig, architecture: str,
                  source: str) -> dict[str, torch.Tensor]:
    if cfg.family == "opt":  # OPT's original checkpoints were saved from OPTModel: decoder.* without model.
        tensors = {f"model.{n}" if n.startswith("decoder.") else n: t for n, t in tensors.items()}
    rows = weight_map(cfg, architecture)
    expected = {hf for hf, _, _ in rows}
    unexpected = [n for n in tensors if n not in expected and not n.endswith(_CAUSAL_IGNORED_SUFFIXES)
                  and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    _check_names(unexpected, expected, tensors, source,
                 f"is it a {architecture} checkpoint, and does its config.json match it?")
    state: dict[str, torch.Tensor] = {}
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    for hf, zt, index in rows:
        if index is None:
            state[zt] = tensors[hf]
        else:
            stacks.setdefault(zt, {})[index] = tensors[hf]
    for zt, parts in stacks.items():
        columns = (cfg.hidden_size,) if zt.endswith(".weight") else ()  # qkv and ffn_in both read [., E]
        for i, size in enumerate(stack_sizes(cfg, zt)):
            if tuple(parts[i].shape) != (size, *columns):
                hf = next(h for h, z, j in rows if z == zt and j == i)
                raise UserError(f"{source}: tensor {hf} has shape {tuple(parts[i].shape)}, config.json implies "
                                f"{(size, *columns)}; the config and weights do not match")
        state[zt] = torch.cat([parts[i] for i in sorted(parts)])
    return state


def stack_sizes(cfg: ModelConfig | CausalConfig, zotune_name: str) -> list[int]:
    """Rows of each part of the stacked tensor `zotune_name`: q, k, v (a causal LM's
    grouped-query attention makes k and v narrower; an encoder's are E each), or SwiGLU's gate
    and up."""
    if ".qkv." in zotune_name:
        return list(cfg.qkv_sizes) if isinstance(cfg, CausalConfig) else [cfg.hidden_size] * 3
    return [cfg.intermediate_size] * 2


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> MaskedLM | CausalLM:
    """The checkpoint in `model_dir` as the zotune model of its architecture (MaskedLM for a
    masked LM, CausalLM for a causal one), in eval mode."""
    hf_config, tensors = read_checkpoint(model_dir)
    cfg, architecture = config_from_hf(hf_config, str(model_dir / "config.json"))
    state = to_zotune_state(tensors, cfg, architecture, str(model_dir))
    with torch.device("meta"):
        model = CausalLM(cfg) if isinstance(cfg, CausalConfig) else MaskedLM(cfg)
    for name, param in model.state_dict().items():
        if tuple(state[name].shape) != tuple(param.shape):
            hf = next(h for h, z, _ in weight_map(cfg, architecture) if z == name)
            raise UserError(f"{model_dir}: tensor {hf} has shape {tuple(state[name].shape)}, config.json "
                            f"implies {tuple(param.shape)}; the config and weights do not match")
    state = {name: t.to(device=device, dtype=dtype) for name, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
