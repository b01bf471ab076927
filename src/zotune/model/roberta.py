"""RoBERTa / XLM-RoBERTa (and BERT) encoder with its masked-LM head, on packed tokens.

One file, read top to bottom: config, embeddings, attention, layer, head, model.
The model owns the maths; batching, device and dtype belong to the runner
(engine/runner.py). There is no padding anywhere: tokens of all sequences are
concatenated and attention is block-diagonal (layers/attention.py). The nn.Linear modules
hold the weights (and their checkpoint names); the matmuls go through layers/linear.py, which
runs those of few rows, such as the last layer's <mask> rows, as a split-K kernel on CUDA.
A MeZO pair (PackedBatch.paired) runs the batch twice over in one forward, its first half at
θ + εz and its second at θ − εz: the modules holding trained tensors (PairedModule) then hand
linear() and add_layer_norm() [2, ...] pairs of them, which split the rows in the middle.

Shape notation: T = packed tokens, B = sequences, M = <mask> positions, E = hidden size,
N = heads, D = head dim (E = N * D), F = feed-forward size, V = vocabulary, C = label words,
P = prefix length, R = LoRA rank.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from zotune.layers.attention import varlen_attention
from zotune.layers.batch import PackedBatch
from zotune.layers.linear import ACTIVATIONS, linear
from zotune.layers.norm import add_layer_norm


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    head_act: str = "gelu"    # RoBERTa's LM head hard-codes exact GELU; BERT's uses hidden_act
    position_offset: int = 2  # RoBERTa numbers positions from padding_idx + 1 = 2; BERT from 0
    tie_word_embeddings: bool = True
    hidden_dropout: float = 0.1     # used only by the backprop baseline (model.train())
    attention_dropout: float = 0.1

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        for act in (self.hidden_act, self.head_act):
            if act not in ACTIVATIONS:
                raise ValueError(f"unsupported activation {act!r}; known: {sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class PairedModule(nn.Module):
    """A module that can run a MeZO pair (PackedBatch.paired): the batch twice over, its first
    half at θ + εz and its second at θ − εz, in one forward. `pair` maps the names of its
    trained tensors ("qkv.weight", "A") to their [2, ...] pairs, views of FlatParameters' two
    buffers (FlatParameters.pair_views), set by optim/subsets.py attach_pair_weights."""

    def __init__(self):
        super().__init__()
        self.pair: dict[str, torch.Tensor] = {}

    def read(self, batch: PackedBatch, name: str, own: torch.Tensor) -> torch.Tensor:
        """`own`, this module's tensor `name`, as `batch` reads it: in a pair, its [2, ...] pair
        if it trains (layers/linear.py and layers/norm.py take either)."""
        return self.pair.get(name, own) if batch.pair_seqs else own

    def weights(self, batch: PackedBatch, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias of submodule `name` (an nn.Linear or nn.LayerNorm) as `batch`
        reads them (read)."""
        module = getattr(self, name)
        return self.read(batch, f"{name}.weight", module.weight), self.read(batch, f"{name}.bias", module.bias)


class LoRA(PairedModule):
    """Low-rank update x -> (alpha / R) * x Aᵀ Bᵀ, initialised as LoRA does: A random, B zero,
    so the model starts exactly where the checkpoint is (Hu et al. 2021)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        # nn.Linear's default init, as in the LoRA reference code; an explicit generator keeps runs reproducible.
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.scaling = alpha / rank

    def add_to(self, y: torch.Tensor, x: torch.Tensor, paired: bool = False) -> torch.Tensor:
        """y + (alpha / R) x Aᵀ Bᵀ for x: [rows, in], y: [rows, out]; the up-projection, the scaling
        and the sum are one GEMM (addmm), so the [rows, out] term is never written on its own.
        `paired`, in a MeZO pair: each half of the rows takes its own A and B (`pair`):
        one batched GEMM for each product on a GPU; on a CPU each half as the unpaired pass
        computes it, so the bits are its."""
        if not paired:
            return torch.addmm(y, x @ self.A.t(), self.B.t(), alpha=self.scaling)
        A, B = self.pair["A"], self.pair["B"]  # [2, R, in], [2, out, R]
        if not x.is_cuda:
            return torch.cat([torch.addmm(y_half, x_half @ a.t(), b.t(), alpha=self.scaling)
                              for y_half, x_half, a, b in zip(y.chunk(2), x.chunk(2), A, B)])
        down = torch.bmm(x.reshape(2, -1, x.shape[-1]), A.transpose(1, 2))                      # [2, rows/2, R]
        return torch.baddbmm(y.reshape(2, -1, y.shape[-1]), down, B.transpose(1, 2), alpha=self.scaling).flatten(0, 1)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = cfg.hidden_dropout

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        # Single-segment inputs: every token has token type 0, as in LM-BFF prompts.
        x = self.word(batch.input_ids) + self.position(batch.positions) + self.token_type.weight[0]  # [T, E]
        return F.dropout(self.norm(x), self.dropout, self.training)


class Attention(PairedModule):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # query, key, value stacked
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout, self.attention_dropout = cfg.hidden_dropout, cfg.attention_dropout
        # Parameter-efficient additions, attached by optim/subsets.py; None means absent.
        self.lora_q: LoRA | None = None
        self.lora_v: LoRA | None = None
        self.prefix_k: nn.Parameter | None = None  # [P, E] key/value rows every sequence attends to
        self.prefix_v: nn.Parameter | None = None

    def forward(self, x: torch.Tensor, batch: PackedBatch, masks_only: bool = False) -> torch.Tensor:
        """[T, E] -> [T, E]; with `masks_only`, [M, E]: the output at each sequence's <mask> alone."""
        weight, bias = self.weights(batch, "qkv")  # [3E, E] and [3E] ([2, ...] each in a pair)
        if masks_only:
            # Only the <mask> rows reach the head: queries there, keys and values everywhere.
            hidden = x.shape[1]
            rows = x[batch.mask_index]                                                    # [M, E]
            q = linear(rows, weight[..., :hidden, :], bias[..., :hidden])                 # [M, E]
            k, v = linear(x, weight[..., hidden:, :], bias[..., hidden:]).chunk(2, dim=-1)  # 2 x [T, E]
        else:
            rows = x
            q, k, v = linear(x, weight, bias).chunk(3, dim=-1)  # 3 x [T, E]
        if self.lora_q is not None:
            q = self.lora_q.add_to(q, rows, bool(batch.pair_seqs))
            v = self.lora_v.add_to(v, x, bool(batch.pair_seqs))
        split = lambda t: t.unflatten(-1, (self.num_heads, self.head_dim))  # noqa: E731  [., E] -> [., N, D]
        prefix_k = prefix_v = None
        if self.prefix_k is not None:
            # [P, N, D]; in a pair [2, P, N, D], the first half attending to the +eps z prefix
            prefix_k = split(self.read(batch, "prefix_k", self.prefix_k))
            prefix_v = split(self.read(batch, "prefix_v", self.prefix_v))
        attended = varlen_attention(split(q), split(k), split(v), batch, prefix_k, prefix_v,
                                    self.attention_dropout if self.training else 0.0, masks_only)  # [T or M, N, D]
        attended = linear(attended.flatten(1), *self.weights(batch, "out"))  # [T or M, E]
        return add_layer_norm(rows, F.dropout(attended, self.dropout, self.training), *self.weights(batch, "norm"),
                              self.norm.eps)


class Layer(PairedModule):
    """Post-LayerNorm transformer block, as in BERT/RoBERTa."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.ffn_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.activation = cfg.hidden_act
        self.dropout = cfg.hidden_dropout

    def forward(self, x: torch.Tensor, batch: PackedBatch, masks_only: bool = False) -> torch.Tensor:
        x = self.attention(x, batch, masks_only)                         # [T, E], or [M, E]
        h = linear(x, *self.weights(batch, "ffn_in"), self.activation)   # [., F]
        h = linear(h, *self.weights(batch, "ffn_out"))                   # [., E]
        return add_layer_norm(x, F.dropout(h, self.dropout, self.training), *self.weights(batch, "ffn_norm"),
                              self.ffn_norm.eps)


class MLMHead(PairedModule):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.activation = cfg.head_act
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        # An untied decoder has its own matrix; a tied one reads the word embeddings.
        self.decoder = None if cfg.tie_word_embeddings else nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor, label_word_ids: torch.Tensor | None,
                batch: PackedBatch) -> torch.Tensor:
        h = linear(x, *self.weights(batch, "dense"), self.activation)      # [M, E]
        h = add_layer_norm(h, None, *self.weights(batch, "norm"), self.norm.eps)
        # [V, E] and [V] (in a pair, [2, V, E] and [2, V] where they train)
        decoder = word_embeddings if self.decoder is None else self.read(batch, "decoder", self.decoder)
        bias = self.read(batch, "bias", self.bias)
        if label_word_ids is not None:
            # Classification needs C rows of the V-row decoder: skip the rest of the vocabulary.
            decoder, bias = decoder[..., label_word_ids, :], bias[..., label_word_ids]  # [C, E], [C]
        return linear(h, decoder, bias)                                 # [M, C] or [M, V]


class LanguageModel(nn.Module):
    """What the runner, the subsets and the exports ask of either model kind (MaskedLM below,
    CausalLM in model/causal_lm.py), both laid out as embeddings, layers, head."""

    def layer_of(self, name: str) -> int:
        """Where the parameter `name` sits in the forward order: -1 for the embeddings, i for
        layer i (including the LoRA and prefix tensors attached to it), num_layers for the head.
        The runner and the subsets ask this rather than parse names themselves."""
        root, _, rest = name.partition(".")
        if root == "embeddings":
            return -1
        if root == "layers":
            return int(rest.split(".", 1)[0])
        if root == "head":
            return self.config.num_layers
        raise KeyError(f"{name!r} is not a parameter name of this model")

    def untie_decoder(self) -> None:
        """Give the head a decoder of its own, a copy of the word embeddings (the logits do not
        change), so that training one leaves the other as it is. Already untied: nothing to do."""
        if self.head.decoder is None:
            self.head.decoder = nn.Parameter(self.embeddings.word.weight.detach().clone())
            self.config = replace(self.config, tie_word_embeddings=False)


class MaskedLM(LanguageModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.head = MLMHead(cfg)

    def forward(self, batch: PackedBatch, label_word_ids: torch.Tensor | None = None,
                hidden: torch.Tensor | None = None, start_layer: int = 0) -> torch.Tensor:
        """Logits at each sequence's <mask>: [M, C] for the given label words, else [M, V].
        `hidden` [T, E], if given, is the input of layer `start_layer` (from the trunk cache)."""
        x = self.embeddings(batch) if hidden is None else hidden           # [T, E]
        layers = self.layers[start_layer:]
        for layer in layers[:-1]:
            x = layer(x, batch)
        # The head reads the <mask> rows only, so the last layer computes only those rows (and
        # every token's keys and values): exact, and most of a step's work above a cached trunk.
        x = layers[-1](x, batch, masks_only=True) if len(layers) else x[batch.mask_index]  # [M, E]
        return self.head(x, self.embeddings.word.weight, label_word_ids, batch)

    def modules_from(self, start_layer: int) -> list[nn.Module]:
        """The modules whose tensors forward() reads when it starts at `start_layer`: the
        embeddings (the head reads the word embeddings as its decoder when tied), the layers
        from `start_layer` on, and the head."""
        return [self.embeddings, *self.layers[start_layer:], self.head]

    def trunk(self, batch: PackedBatch, end_layer: int) -> torch.Tensor:
        """Hidden states entering layer `end_layer`: [T, E]."""
        x = self.embeddings(batch)
        for layer in self.layers[:end_layer]:
            x = layer(x, batch)
        return x
