"""Session.build: the one place a run's model, trainable tensors and runner are built.

The order is fixed, and every caller (train, replay, export, the tests and the benchmarks)
goes through it, so none repeats the sequence:

  1. pick the device and join the process group: under torchrun on CUDA, cuda:LOCAL_RANK
     (distributed.rank_device), before anything is placed on a device;
  2. load the model and attach the trainable subset on the CPU (load_trainable), so that
     LoRA's A and the prefix's activations do not depend on the device;
  3. MeZO: flatten the trainable tensors into one buffer (FlatParameters), decide whether the
     ± passes run as one pair, and add the second buffer where it pays;
  4. move the buffers, then the model, to the device, and give the pairs their views there;
  5. only then build the runner, its trunk cache and its CUDA graphs, over a model that no
     longer changes.

A checkpoint whose config.json names a causal LM (OPT, the Llama family) takes the candidate
path in steps 2 and 5: the task's causal row and tokenizer (evaluate.CausalPrompt) instead of
an LM-BFF prompt, and a CausalRunner (engine/candidates.py) instead of a ModelRunner; the
trainable subset, buffers, pairs, trunk cache, CUDA graphs and torchrun process group are built
alike.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from zotune.config import TrainConfig
from zotune.distributed import Group, init_from_env, rank_device
from zotune.engine.candidates import CausalRunner
from zotune.engine.runner import ModelRunner, resolve_device
from zotune.errors import UserError
from zotune.evaluate import CausalPrompt, causal_runner, load_causal_prompt, load_prompt, split_inputs
from zotune.model.causal_lm import CausalLM
from zotune.model.loading import is_causal_checkpoint, load_model, resolve_model_dir
from zotune.model.roberta import MaskedLM
from zotune.optim.flat import FlatParameters
from zotune.optim.subsets import SubsetOptions, attach_pair_weights, no_decay_names, pair_owners, select_trainable
from zotune.tasks.causal import CausalTask
from zotune.tasks.tasks import Task
from zotune.tasks.templates import PromptTemplate

# A second buffer of the trainable tensors is kept while it is at most this share of the model.
SECOND_BUFFER_SHARE = 0.25


@dataclass
class Session:
    cfg: TrainConfig
    group: Group | None                 # None unless launched by torchrun
    task: Task | CausalTask
    prompt: PromptTemplate | CausalPrompt  # a masked LM's LM-BFF prompt, or a causal LM's candidates
    model: MaskedLM | CausalLM
    trainable: list[tuple[str, nn.Parameter]]
    flat: FlatParameters | None         # MeZO: the trainable tensors as views of one buffer
    paired: bool                        # MeZO: a direction's ± passes are one forward
    runner: ModelRunner | CausalRunner

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that writes the run directory."""
        return self.group is None or self.group.is_main

    @classmethod
    def build(cls, cfg: TrainConfig, base: MaskedLM | None = None) -> "Session":
        """`base`: a model to start from instead of cfg.model's checkpoint (the benchmarks'
        random RoBERTa-large); with it, give cfg.tokenizer."""
        device = rank_device(resolve_device(cfg.device))
        group = init_from_env(device, cfg.dist_timeout)
        _check_group(cfg, group)
        causal = isinstance(base, CausalLM) if base is not None else is_causal_checkpoint(resolve_model_dir(cfg.model))
        load = load_causal_prompt if causal else load_prompt
        task, prompt = load(cfg.model, cfg.task, cfg.tokenizer, cfg.template, cfg.label_words, cfg.max_length)
        model, trainable = load_trainable(cfg, base)
        flat, paired = None, False
        if cfg.optimizer == "mezo":
            flat = flatten(trainable, cfg.decay_all)
            paired = cfg.pair and second_buffer_fits(flat, model) and pair_owners(model, flat.names) is not None
            graphed_ranks = group is not None and device.type == "cuda" and cfg.cuda_graphs
            add_second_buffer(flat, model, graphed_ranks, paired)
            flat.to(device)  # first: the model's trainable Parameters then already are views there
        model.to(device)
        if paired:
            attach_pair_weights(model, flat)
        names = [name for name, _ in trainable]
        runner = causal_runner(model, task, device, cfg.precision, cfg.cuda_graphs) if causal else ModelRunner(
            model, prompt.label_word_ids, prompt.mask_id, device, cfg.precision, cfg.cuda_graphs,
            prompt.tokenizer.pad_token_id)
        if cfg.cache:
            runner.enable_cache(names, cfg.cache_budget_bytes, cfg.cache_spill)
        if paired:
            runner.enable_pairs(names)
        return cls(cfg, group, task, prompt, model, trainable, flat, paired, runner)

    def read_splits(self, data_dir: Path) -> tuple[dict, dict]:
        """The train, dev and test examples of the run's task, and what the runner packs of each:
        a masked LM's encoded prompts, or a causal LM's candidate examples themselves."""
        read = {s: split_inputs(self.task, self.prompt, data_dir, self.cfg.k, self.cfg.seed, s)
                for s in ("train", "dev", "test")}
        return {s: examples for s, (examples, _) in read.items()}, {s: inputs for s, (_, inputs) in read.items()}


def _check_group(cfg: TrainConfig, group: Group | None) -> None:
    if group is None:
        return
    if cfg.optimizer != "mezo":
        raise UserError("torchrun scale-out runs MeZO only; run --optimizer adam as a single process")
    if cfg.directions_per_rank is None and cfg.batch_size < group.world:
        raise UserError(f"--batch-size {cfg.batch_size} is smaller than the {group.world} ranks sharing it")


def load_trainable(cfg: TrainConfig, base: MaskedLM | None = None) -> tuple[MaskedLM, list[tuple[str, nn.Parameter]]]:
    """The base model with cfg's subset attached, on the CPU: what a run starts from (the same
    options and seed give LoRA's and the prefix's tensors the same names, shapes and values)."""
    model = base if base is not None else load_model(resolve_model_dir(cfg.model))  # a bad checkpoint: UserError
    trainable = select_trainable(model, cfg.trainable, SubsetOptions(
        cfg.lora_rank, cfg.lora_alpha, cfg.num_prefix, cfg.layers, cfg.seed))
    return model, trainable


def flatten(trainable: list[tuple[str, nn.Parameter]], decay_all: bool) -> FlatParameters:
    """The trainable tensors as one buffer, decayed ones first (no_decay_names decides)."""
    return FlatParameters(trainable, no_decay_names(trainable, decay_all))


def second_buffer_fits(flat: FlatParameters, model: nn.Module) -> bool:
    """Whether a second buffer of the trainable tensors is small next to the model: not for
    `full` or the like, since MeZO trains in inference memory."""
    return flat.numel <= SECOND_BUFFER_SHARE * sum(p.numel() for p in model.parameters())


def add_second_buffer(flat: FlatParameters, model: nn.Module, graphed_ranks: bool = False,
                      paired: bool = False) -> bool:
    """Give MeZO a second buffer for theta + eps z (FlatParameters.add_plus) where it pays, and
    say whether `flat` has one: two sweeps a direction instead of three, the same weights bit
    for bit, for a copy of the trainable tensors. A pair needs one. Otherwise it is added
    where it fits (second_buffer_fits), and not for data-parallel ranks on CUDA graphs
    (`graphed_ranks`), whose forwards are graphs of their own that the + pass's weight
    addresses would recapture."""
    if paired or (not graphed_ranks and second_buffer_fits(flat, model)):
        flat.add_plus()
    return flat.plus is not None
