"""Trainable subsets: which tensors MeZO perturbs (and Adam updates); the rest stay frozen.

Spec strings, decided once at build time:
  full        every parameter (the MeZO paper's main setting)
  bias        bias terms only (BitFit, Ben Zaken et al. 2022)
  lora        rank-R updates on query and value (Hu et al. 2021), A random and B zero
  lora+head   lora, and the MLM head with a decoder of its own: the MeZO paper's LoRA setting.
              MeZO's LoRA runs (medium_models/run.py, --apply_lora) freeze only the
              roberta.* base weights, so the LM head trains too, and the head of its RoBERTa
              prompt model (src/models.py, RobertaModelForPromptFinetuning) is not tied to the
              word embeddings; here the decoder starts as a copy of them (so nothing changes
              at step 0) and trains on its own. Plain `lora` trains the LoRA matrices only.
  prefix      P key/value rows per layer (Li & Liang 2021), initialised from the real
              activations of random tokens, as MeZO's medium_models/src/prefix.py does
  top:K       the top K layers and the MLM head (its tied decoder is the input embedding,
              so it stays frozen)
`layers` restricts bias/lora/prefix to some layers (e.g. the upper ones).

Each works for a causal LM (model/causal_lm.py) too, through the same layer_of. There, `bias`
exists only where the architecture has biases (OPT; of the Llama family only Qwen2's q/k/v
and checkpoints with attention_bias or mlp_bias); `lora` wraps q and v as MeZO's
large_models/lora.py does for OPT's q_proj and v_proj (v is narrower under grouped-query
attention); `prefix` rows precede every sequence, every token attends to them, and they start
as the keys (rotated, where RoPE) and values of random tokens, as a Hugging Face
past_key_values cache holds them: MeZO's large_models/prefix.py with --prefix_init_by_real_act.
"""

import re
from dataclasses import dataclass

import torch
from torch import nn

from zotune.layers.batch import pack
from zotune.errors import UserError
from zotune.model.causal_lm import CausalLM
from zotune.model.roberta import LoRA, MaskedLM, PairedModule
from zotune.optim.flat import FlatParameters

SUBSETS = ("full", "bias", "lora", "lora+head", "prefix", "top:K")


@dataclass(frozen=True)
class SubsetOptions:
    lora_rank: int = 8
    lora_alpha: float = 16.0
    num_prefix: int = 5
    layers: tuple[int, ...] | None = None  # None: every layer
    seed: int = 0                           # for LoRA's A and the prefix's random tokens


def no_weight_decay(name: str) -> bool:
    """Biases and LayerNorm weights take no weight decay (the usual HF/MeZO grouping)."""
    module = name.rsplit(".", 1)[0]
    return name.endswith("bias") or module.endswith("norm")  # norm, ffn_norm: every LayerNorm is named *norm


def no_decay_names(trainable: list[tuple[str, nn.Parameter]], decay_all: bool = False) -> set[str]:
    """The parameter groups, decided here once for MeZO (FlatParameters) and Adam alike: the
    trainable tensors that take no weight decay (no_weight_decay), or none with decay_all."""
    return set() if decay_all else {name for name, _ in trainable if no_weight_decay(name)}


def select_trainable(model: MaskedLM | CausalLM, spec: str, options: SubsetOptions = SubsetOptions()
                     ) -> list[tuple[str, nn.Parameter]]:
    """Attach whatever the subset adds (LoRA, prefixes), freeze everything else, and return
    the trainable (name, parameter) pairs in model order."""
    num_layers = model.config.num_layers
    layers = tuple(range(num_layers)) if options.layers is None else options.layers
    if any(i < 0 or i >= num_layers for i in layers):
        raise UserError(f"--layers {list(layers)} is outside this model's layers 0..{num_layers - 1}")
    in_layers = lambda name: model.layer_of(name) in layers  # noqa: E731
    generator = torch.Generator().manual_seed(options.seed)

    if spec == "full":
        keep = lambda name: True  # noqa: E731
    elif spec == "bias":
        # With --layers, the embeddings' biases (below every layer) stay frozen too; the head's are kept.
        keep = lambda name: name.endswith("bias") and (  # noqa: E731
            in_layers(name) or model.layer_of(name) == num_layers
            or (options.layers is None and model.layer_of(name) < 0))
    elif spec == "lora":
        _attach_lora(model, layers, options, generator)
        keep = lambda name: ".lora_" in name  # noqa: E731
    elif spec == "lora+head":
        _attach_lora(model, layers, options, generator)
        model.untie_decoder()
        keep = lambda name: ".lora_" in name or model.layer_of(name) == num_layers  # noqa: E731  (the head)
    elif spec == "prefix":
        _attach_prefix(model, layers, options.num_prefix, generator)
        keep = lambda name: ".prefix_" in name  # noqa: E731
    elif match := re.fullmatch(r"top:(\d+)", spec):
        k = int(match.group(1))
        if not 1 <= k <= num_layers:
            raise UserError(f"--trainable top:{k} needs 1 <= K <= {num_layers} (this model's layer count)")
        keep = lambda name: model.layer_of(name) >= num_layers - k  # noqa: E731  (the head is num_layers)
    else:
        raise UserError(f"unknown --trainable {spec!r}; choose one of {', '.join(SUBSETS)} (e.g. top:4)")

    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(keep(name))
        if param.requires_grad:
            trainable.append((name, param))
    if not trainable and spec == "bias" and not any(name.endswith("bias") for name, _ in model.named_parameters()):
        raise UserError("--trainable bias: this model has no bias terms (Llama-architecture checkpoints have none, "
                        "except Qwen2's q/k/v biases); choose full, lora, prefix or top:K")
    if not trainable:
        raise UserError(f"--trainable {spec} selects no parameter in layers {list(layers)}")
    return trainable


def _attach_lora(model: MaskedLM | CausalLM, layers, options: SubsetOptions, generator: torch.Generator) -> None:
    hidden = model.config.hidden_size
    # q's and v's widths: N*D and G*D in a causal LM (grouped-query attention), E in an encoder
    q_width, _, v_width = model.config.qkv_sizes if isinstance(model, CausalLM) else (hidden,) * 3
    device, dtype = model.embeddings.word.weight.device, model.embeddings.word.weight.dtype
    for i in layers:
        attention = model.layers[i].attention
        for slot, width in (("lora_q", q_width), ("lora_v", v_width)):
            lora = LoRA(hidden, width, options.lora_rank, options.lora_alpha, generator)
            setattr(attention, slot, lora.to(device=device, dtype=dtype))


@torch.no_grad()
def _attach_prefix(model: MaskedLM | CausalLM, layers, num_prefix: int, generator: torch.Generator) -> None:
    # Run P random tokens through the model and keep each layer's key/value rows:
    # prefixes that start as real activations train better than random vectors (MeZO, App. E).
    # The tokens come from the seeded CPU generator, whatever the model's device; Session.build
    # selects the subset before it moves the model, so the activations are the CPU's too.
    cfg = model.config
    device = model.embeddings.word.weight.device
    tokens = torch.randint(0, cfg.vocab_size, (num_prefix,), generator=generator).tolist()
    batch = pack([tokens], None, cfg.position_offset).to(device)
    key_values = model.key_values(batch) if isinstance(model, CausalLM) else _encoder_key_values(model, batch)
    for i in layers:
        attention = model.layers[i].attention
        attention.prefix_k, attention.prefix_v = (nn.Parameter(t) for t in key_values[i])


def _encoder_key_values(model: MaskedLM, batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = model.embeddings(batch)                                         # [P, E]
    key_values = []
    for layer in model.layers:  # the plain model's activations: attach nothing until the end
        _, k, v = layer.attention.qkv(x).chunk(3, dim=-1)               # [P, E] each
        key_values.append((k.clone(), v.clone()))
        x = layer(x, batch)
    return key_values


def pair_owners(model: MaskedLM | CausalLM, names: list[str]) -> dict[str, tuple[PairedModule, str]] | None:
    """For each trainable tensor, the nearest module above it that can run a pair and the
    tensor's name there ((attention, "qkv.weight"), (lora_q, "A")); None if one has no such module."""
    owners = {}
    for name in names:
        path = name.split(".")
        for cut in range(len(path) - 1, 0, -1):
            module = model.get_submodule(".".join(path[:cut]))
            if isinstance(module, PairedModule):
                owners[name] = (module, ".".join(path[cut:]))
                break
        else:
            return None
    return owners


def attach_pair_weights(model: MaskedLM | CausalLM, flat: FlatParameters) -> bool:
    """Let MeZO run its +eps z and -eps z passes as one batch (PackedBatch.paired): each
    trainable tensor's pair (FlatParameters.pair_views, which adds flat's second buffer) goes
    to the nearest module above it that can run a pair (PairedModule: the layers, their
    attention, LoRA and the head). The embeddings cannot: a subset that trains them (`full`,
    `bias` on every layer) gets nothing. Returns whether it attached them."""
    owners = pair_owners(model, flat.names)
    if owners is None:
        return False
    for name, view in flat.pair_views().items():
        module, key = owners[name]
        module.pair[key] = view
    return True
