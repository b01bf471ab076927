"""Decoder-only causal language models, OPT and the Llama family, on packed tokens.

One file, read top to bottom: config, embeddings, attention, layer, head, model. Two
families share it, told apart by `CausalConfig.family`:
  opt    learned positions (numbered from 2, OPT's offset), LayerNorm before each block
         (do_layer_norm_before; after it for OPT-350m), ReLU feed-forward, biases, a final
         LayerNorm, and project_in/project_out where word_embed_proj_dim != hidden_size
  llama  RoPE, RMSNorm, SwiGLU feed-forward (gate and up stacked in one matrix), grouped-query
         attention, no biases except Qwen2's q/k/v (and Llama's optional attention/mlp biases)
Either ties its LM head to the word embeddings or has its own (tie_word_embeddings).

As model/roberta.py: the model owns the maths, the runner owns batching, device and dtype;
there is no padding (attention is causal within each sequence, layers/attention.py); trained
tensors of a PairedModule come as [2, ...] pairs in a MeZO pair (PackedBatch.paired), whose
first half runs at θ + εz and second at θ − εz. The head computes logits only at the rows
it is asked for: `score_index` [S] names packed tokens whose NEXT token is scored, and the
last layer computes its output projection and feed-forward for those rows alone.

Scored rows belong in PackedBatch.mask_index (the rows the head reads, whatever the model),
so that PackedBatch.paired, .to() and CUDA-graph buffers carry them; the runner then passes
`batch.mask_index` as score_index. MaskedLM reads one <mask> row per sequence there, CausalLM
any number of rows per sequence, in packed order. No new batch field.

Shape notation: T = packed tokens, B = sequences, S = scored rows, E = hidden size, W = word
embedding size (OPT's word_embed_proj_dim, else E), N = query heads, G = key/value heads,
D = head dim, F = feed-forward size, V = vocabulary, P = prefix length, R = LoRA rank.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from zotune.layers.attention import varlen_attention
from zotune.layers.batch import PackedBatch
from zotune.layers.linear import ACTIVATIONS, linear
from zotune.layers.norm import add_layer_norm, rms_norm
from zotune.layers.rope import ROPE_TYPES, apply_rotary, inverse_frequencies, rotary_tables
from zotune.model.roberta import LanguageModel, LoRA, PairedModule

FAMILIES = ("opt", "llama")


@dataclass(frozen=True)
class CausalConfig:
    family: str               # "opt" or "llama"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int        # rows of OPT's position table (max_position_embeddings + 2); Llama: unused
    num_kv_heads: int | None = None    # None: num_heads (no grouping)
    head_dim: int | None = None        # None: hidden_size // num_heads
    word_embed_dim: int | None = None  # OPT's word_embed_proj_dim; None: hidden_size
    norm_eps: float = 1e-5
    hidden_act: str = "relu"  # OPT's feed-forward activation; the Llama family's gate is "silu"
    position_offset: int = 0  # OPT numbers positions from 2 (its embedding's offset); RoPE from 0
    pre_norm: bool = True     # OPT's do_layer_norm_before (False in OPT-350m: post-LN blocks)
    final_norm: bool = True   # a norm before the head (OPT: pre_norm and not _remove_final_layer_norm)
    qkv_bias: bool = True     # OPT enable_bias; Llama attention_bias; Qwen2 always
    out_bias: bool = True     # OPT enable_bias; Llama attention_bias; Qwen2 never
    ffn_bias: bool = True     # OPT enable_bias; Llama mlp_bias
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False)  # HF rope_parameters beyond theta
    hidden_dropout: float = 0.0      # used only by the backprop baseline (model.train())
    attention_dropout: float = 0.0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; known: {FAMILIES}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.family == "opt" and self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
        if self.family == "llama" and self.hidden_act != "silu":
            raise ValueError(f"the Llama family's SwiGLU needs hidden_act 'silu', not {self.hidden_act!r}")
        if (self.rope_scaling or {}).get("rope_type", "default") not in ROPE_TYPES:
            raise ValueError(f"unsupported RoPE scaling {self.rope_scaling}; known: {ROPE_TYPES}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim(self) -> int:
        """The head dimension D."""
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def embed_dim(self) -> int:
        """W, the width of the word embeddings (and of the head's decoder)."""
        return self.word_embed_dim or self.hidden_size

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """Rows of query, key and value in the stacked qkv weight: N*D, G*D, G*D."""
        return self.num_heads * self.dim, self.kv_heads * self.dim, self.kv_heads * self.dim


def _norm(cfg: CausalConfig) -> nn.Module:
    """The family's norm module (a holder of its weights; the maths is in layers/norm.py)."""
    if cfg.family == "llama":
        return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


def _apply_norm(owner: PairedModule, batch: PackedBatch, name: str, x: torch.Tensor,
                h: torch.Tensor | None = None) -> torch.Tensor:
    """norm(x + h) (h None: norm(x)) with `owner`'s norm `name`, its weights as `batch` reads them."""
    module = getattr(owner, name)
    if isinstance(module, nn.RMSNorm):
        return rms_norm(x if h is None else x + h, owner.read(batch, f"{name}.weight", module.weight), module.eps)
    return add_layer_norm(x, h, *owner.weights(batch, name), module.eps)


class Embeddings(nn.Module):
    def __init__(self, cfg: CausalConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden_size) if cfg.family == "opt" else None
        self.project_in = nn.Linear(cfg.embed_dim, cfg.hidden_size, bias=False) \
            if cfg.embed_dim != cfg.hidden_size else None
        self.dropout = cfg.hidden_dropout

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.word(batch.input_ids)                                  # [T, W]
        if self.project_in is not None:
            x = linear(x, self.project_in.weight, None)                 # [T, E]
        if self.position is not None:
            x = x + self.position(batch.positions)  # OPT: positions from 2, as its table is indexed
        return F.dropout(x, self.dropout, self.training)


class Attention(PairedModule):
    def __init__(self, cfg: CausalConfig):
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.dim
        self.sizes = cfg.qkv_sizes
        self.qkv = nn.Linear(cfg.hidden_size, sum(self.sizes), bias=cfg.qkv_bias)  # query, key, value stacked
        self.out = nn.Linear(self.sizes[0], cfg.hidden_size, bias=cfg.out_bias)
        self.attention_dropout = cfg.attention_dropout
        # Parameter-efficient additions, attached by optim/subsets.py; None means absent.
        self.lora_q: LoRA | None = None
        self.lora_v: LoRA | None = None
        self.prefix_k: nn.Parameter | None = None  # [P, G*D] key/value rows before every sequence
        self.prefix_v: nn.Parameter | None = None

    def project(self, x: torch.Tensor, batch: PackedBatch, rope) -> tuple[torch.Tensor, ...]:
        """q [T, N, D], k and v [T, G, D] of x: [T, E]: LoRA added, q and k rotated (RoPE)."""
        q, k, v = linear(x, *self.weights(batch, "qkv")).split(self.sizes, dim=-1)
        if self.lora_q is not None:
            q = self.lora_q.add_to(q, x, bool(batch.pair_seqs))
            v = self.lora_v.add_to(v, x, bool(batch.pair_seqs))
        q = q.unflatten(-1, (self.num_heads, self.head_dim))           # [T, N, D]
        k, v = (t.unflatten(-1, (self.kv_heads, self.head_dim)) for t in (k, v))  # [T, G, D]
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return q, k, v

    def forward(self, x: torch.Tensor, batch: PackedBatch, rope, rows: torch.Tensor | None = None,
                cache: "LayerCache | None" = None) -> torch.Tensor:
        """[T, E] -> [T, E]; with `rows` [S], the output at those rows alone: [S, E]. With a
        `cache`, the batch's keys and values are appended to the earlier forwards' there, and
        the batch's SharedContext indexes them all (greedy decoding, engine/generate.py)."""
        q, k, v = self.project(x, batch, rope)
        if cache is not None:
            k, v = cache.extend(k, v)                                   # [T_cached + T, G, D]
        prefix_k = prefix_v = None
        if self.prefix_k is not None:
            # [P, G, D]; in a pair [2, P, G, D]. Used as they are: a prefix is what a Hugging Face
            # past_key_values cache would hold, keys already rotated (MeZO large_models/prefix.py).
            split = lambda t: t.unflatten(-1, (self.kv_heads, self.head_dim))  # noqa: E731
            prefix_k = split(self.read(batch, "prefix_k", self.prefix_k))
            prefix_v = split(self.read(batch, "prefix_v", self.prefix_v))
        attended = varlen_attention(q, k, v, batch, prefix_k, prefix_v,
                                    self.attention_dropout if self.training else 0.0, causal=True)  # [T, N, D]
        if rows is not None:
            attended = attended[rows]                                   # [S, N, D]
        return linear(attended.flatten(1), *self.weights(batch, "out"))  # [T or S, E]


class Layer(PairedModule):
    """A decoder block: pre-norm (x + attention(norm(x)), then x + ffn(norm(x))), or OPT-350m's
    post-norm (norm(x + attention(x)), then norm(x + ffn(x)))."""

    def __init__(self, cfg: CausalConfig):
        super().__init__()
        self.attention_norm = _norm(cfg)
        self.attention = Attention(cfg)
        self.ffn_norm = _norm(cfg)
        self.gated = cfg.family == "llama"  # SwiGLU: ffn_in holds gate and up, stacked
        ffn_rows = 2 * cfg.intermediate_size if self.gated else cfg.intermediate_size
        self.ffn_in = nn.Linear(cfg.hidden_size, ffn_rows, bias=cfg.ffn_bias)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.ffn_bias)
        self.activation = cfg.hidden_act
        self.pre_norm, self.dropout = cfg.pre_norm, cfg.hidden_dropout

    def attention_input(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        return _apply_norm(self, batch, "attention_norm", x) if self.pre_norm else x

    def forward(self, x: torch.Tensor, batch: PackedBatch, rope, rows: torch.Tensor | None = None,
                cache: "LayerCache | None" = None) -> torch.Tensor:
        """[T, E] -> [T, E]; with `rows` [S], the output at those rows alone: [S, E]."""
        h = F.dropout(self.attention(self.attention_input(x, batch), batch, rope, rows, cache), self.dropout,
                      self.training)
        x = x if rows is None else x[rows]                              # [T or S, E]
        if not self.pre_norm:
            x = _apply_norm(self, batch, "attention_norm", x, h)
            return _apply_norm(self, batch, "ffn_norm", x, F.dropout(self.ffn(x, batch), self.dropout, self.training))
        x = x + h
        return x + F.dropout(self.ffn(_apply_norm(self, batch, "ffn_norm", x), batch), self.dropout, self.training)

    def ffn(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        if self.gated:  # SwiGLU (Shazeer 2020): down(silu(gate x) * up x)
            gate, up = linear(x, *self.weights(batch, "ffn_in")).chunk(2, dim=-1)  # 2 x [., F]
            h = F.silu(gate) * up
        else:
            h = linear(x, *self.weights(batch, "ffn_in"), self.activation)        # [., F]
        return linear(h, *self.weights(batch, "ffn_out"))                          # [., E]


class Head(PairedModule):
    """The final norm (where the model has one), OPT's project_out (where W != E) and the
    decoder: the word embeddings when tied, a matrix of its own when not."""

    def __init__(self, cfg: CausalConfig):
        super().__init__()
        self.norm = _norm(cfg) if cfg.final_norm else None
        self.project_out = nn.Linear(cfg.hidden_size, cfg.embed_dim, bias=False) \
            if cfg.embed_dim != cfg.hidden_size else None
        self.decoder = None if cfg.tie_word_embeddings else nn.Parameter(torch.empty(cfg.vocab_size, cfg.embed_dim))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        if self.norm is not None:
            x = _apply_norm(self, batch, "norm", x)                     # [S, E]
        if self.project_out is not None:
            x = linear(x, self.read(batch, "project_out.weight", self.project_out.weight), None)  # [S, W]
        decoder = word_embeddings if self.decoder is None else self.read(batch, "decoder", self.decoder)
        return linear(x, decoder, None)                                 # [S, V]


class LayerCache:
    """One layer's keys and values of every token that earlier forwards computed, in the order
    they were computed, in buffers of `capacity` rows allocated at the first forward (so that a
    step writes its own rows only, not a copy of all the earlier ones)."""

    def __init__(self, capacity: int):
        self.capacity, self.rows = capacity, 0
        self.k = self.v = None  # [capacity, G, D] each

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a forward's [T, G, D] rows; returns all rows so far, [T_cached + T, G, D] each."""
        end = self.rows + k.shape[0]
        if end > self.capacity:
            raise ValueError(f"a key/value cache of {self.capacity} rows cannot take {end}")
        if self.k is None:
            self.k, self.v = (t.new_empty((self.capacity, *t.shape[1:])) for t in (k, v))
        self.k[self.rows:end], self.v[self.rows:end] = k, v
        self.rows = end
        return self.k[:end], self.v[:end]


class KeyValueCache:
    """Every layer's LayerCache, for forwards with the same weights (decoding a batch of prompts
    token by token): a forward computes its new tokens only and attends to the cached rows its
    batch's SharedContext names. Rows are numbered in the order forwards computed them; at most
    `capacity` of them (the prompts' tokens and every token to be appended)."""

    def __init__(self, num_layers: int, capacity: int):
        self.layers = [LayerCache(capacity) for _ in range(num_layers)]

    @property
    def rows(self) -> int:
        """Rows cached so far, the same in every layer."""
        return self.layers[0].rows


class CausalLM(LanguageModel):
    def __init__(self, cfg: CausalConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)

    def forward(self, batch: PackedBatch, score_index: torch.Tensor, score_targets: torch.Tensor,
                hidden: torch.Tensor | None = None, start_layer: int = 0) -> torch.Tensor:
        """[S] float32 log p(score_targets[s] | the tokens up to and including score_index[s]):
        each scored row's log-softmax over the full vocabulary, read at its target. score_index
        [S] indexes the packed tokens (in a pair, both halves: the first half's rows first);
        score_targets [S] are the tokens that follow them. `hidden` [T, E], if given, is the
        input of layer `start_layer` (from the trunk cache)."""
        logits = self.logits(batch, score_index, hidden, start_layer).float()            # [S, V]
        return logits.gather(1, score_targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

    def logits(self, batch: PackedBatch, score_index: torch.Tensor, hidden: torch.Tensor | None = None,
               start_layer: int = 0, cache: "KeyValueCache | None" = None) -> torch.Tensor:
        """[S, V] next-token logits at the rows score_index [S] (all T rows: torch.arange(T)).
        With a `cache` (from layer 0), each layer's keys and values of the batch join it."""
        x = self.embeddings(batch) if hidden is None else hidden          # [T, E]
        rope = self.rope(batch)
        layers = self.layers[start_layer:]
        caches = cache.layers if cache is not None else [None] * len(layers)
        for layer, layer_cache in zip(layers[:-1], caches):
            x = layer(x, batch, rope, cache=layer_cache)
        # The head reads the scored rows only, so the last layer's output projection and
        # feed-forward run on those rows (its attention still reads every token's keys).
        x = layers[-1](x, batch, rope, score_index, caches[-1]) if len(layers) else x[score_index]  # [S, E]
        return self.head(x, self.embeddings.word.weight, batch)

    def rope(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary tables (cos, sin) [T, D] at the batch's positions, for every layer; None in OPT."""
        if self.config.family != "llama":
            return None
        cfg = self.config
        inv_freq = inverse_frequencies(cfg.dim, cfg.rope_theta, cfg.rope_scaling, batch.positions.device)
        return rotary_tables(batch.positions, inv_freq)

    def modules_from(self, start_layer: int) -> list[nn.Module]:
        """The modules whose tensors forward() reads when it starts at `start_layer`: the
        embeddings (the head reads the word embeddings when tied), the layers from
        `start_layer` on, and the head."""
        return [self.embeddings, *self.layers[start_layer:], self.head]

    def trunk(self, batch: PackedBatch, end_layer: int) -> torch.Tensor:
        """Hidden states entering layer `end_layer`: [T, E]."""
        x, rope = self.embeddings(batch), self.rope(batch)
        for layer in self.layers[:end_layer]:
            x = layer(x, batch, rope)
        return x

    @torch.no_grad()
    def key_values(self, batch: PackedBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's keys (rotated) and values of the batch's tokens, [T, G*D] each, as a
        Hugging Face past_key_values cache holds them: what prefix tuning initialised from real
        activations starts as (optim/subsets.py; MeZO large_models/prefix.py)."""
        x, rope, out = self.embeddings(batch), self.rope(batch), []
        for layer in self.layers:
            _, k, v = layer.attention.project(layer.attention_input(x, batch), batch, rope)
            out.append((k.flatten(1).contiguous(), v.flatten(1).contiguous()))  # own storage, not qkv's
            x = layer(x, batch, rope)
        return out
