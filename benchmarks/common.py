"""What the GPU benchmarks share: real SST-2 batches, a RoBERTa-large-sized zotune model with
random weights (no download), the reference MeZO step, event-based timing (the host's clock for
a check on the CPU), peak memory around a block, and the tables' cells."""

import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# Appended, not put first: a zotune named on PYTHONPATH (an older commit's src/, as a baseline for a
# same-machine comparison) must win over this checkout's. Put first, it never did.
sys.path.append(str(REPO / "src"))

from zotune.model.loading import config_from_hf  # noqa: E402
from zotune.tasks.data import default_data_dir, load_split  # noqa: E402
from zotune.tasks.tasks import TASKS  # noqa: E402
from zotune.tasks.templates import PromptTemplate  # noqa: E402

ROBERTA_LARGE = json.loads((REPO / "benchmarks/roberta-large-config.json").read_text())


def sst2_prompt() -> PromptTemplate:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(REPO / "models/zotune-roberta-small")
    task = TASKS["sst2"]
    return PromptTemplate(tokenizer, task.template, task.label_words, task.max_length)


def sst2_train(prompt: PromptTemplate, k: int, seed: int = 42) -> tuple[list[list[int]], torch.Tensor]:
    """The real SST-2 k-shot training split, encoded with LM-BFF's template."""
    examples = load_split(TASKS["sst2"], default_data_dir(), k, seed, "train")
    return [prompt.encode(e.sentences) for e in examples], torch.tensor([e.label for e in examples])


def session(trainable: str, base=None, model: str | None = None, device: str = "cuda", **options):
    """A zotune.session.Session as zotune train builds it (SST-2's prompt, the real RoBERTa
    tokenizer), over `base` (default: a random RoBERTa-large on the GPU), or over the checkpoint
    in folder `model` (on `device`)."""
    from zotune.config import TrainConfig
    from zotune.session import Session
    if model is not None:
        return Session.build(TrainConfig(model=model, task="sst2", trainable=trainable, device=device, **options))
    cfg = TrainConfig(model="random-roberta-large", tokenizer=str(REPO / "models/zotune-roberta-small"), task="sst2",
                      trainable=trainable, device=device, **options)
    return Session.build(cfg, random_roberta_large(device) if base is None else base)


def random_roberta_large(device="cuda", config: dict = ROBERTA_LARGE):
    """zotune's MaskedLM with RoBERTa-large's config (or `config`, a Hugging Face config.json's
    values) and BERT-style N(0, 0.02) weights."""
    from zotune.model.roberta import MaskedLM
    cfg, _ = config_from_hf(config)
    torch.manual_seed(0)
    with torch.device(device):
        model = MaskedLM(cfg)
        for name, p in model.named_parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def reference_mezo_step(params: list[torch.Tensor], loss, eps: float, lr: float, decayed: list[bool] | None = None):
    """princeton-nlp/MeZO's step as its trainers write it, as a function that runs one step: four
    Python loops over the parameters, each reseeding with torch.manual_seed and drawing
    torch.normal per tensor (perturb +1, perturb -2, perturb +1, then the update with z drawn
    again), each a `param.data = ...` copy; the projected gradient read back with .item().
    `decayed` (large_models' zo_update) marks the tensors whose update also computes the weight
    decay term, wd * param with wd = 0 here, as that trainer does. Seeds count steps from 0."""
    decayed = decayed or [False] * len(params)
    state = {"step": 0}

    def perturb(seed, scale):
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scale * z * eps

    def step():
        seed = state["step"]
        state["step"] += 1
        perturb(seed, 1)
        loss1 = loss()
        perturb(seed, -2)
        loss2 = loss()
        projected_grad = ((loss1 - loss2) / (2 * eps)).item()
        perturb(seed, 1)
        torch.manual_seed(seed)
        for p, decays in zip(params, decayed):
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data - lr * (projected_grad * z + 0.0 * p.data) if decays else p.data - lr * (projected_grad * z)
    return step


def median_ms(fn, steps: int, warmup: int = 3, device: torch.device | str = "cuda") -> float:
    """Median wall time of fn(): on a GPU from CUDA events around each call, elsewhere from the
    host's clock (for a check on the CPU; its figures are no GPU's)."""
    for _ in range(warmup):
        fn()
    if torch.device(device).type != "cuda":
        return statistics.median(_host_ms(fn) for _ in range(steps))
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _host_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


class Peak:
    """The largest allocated CUDA memory while the block ran (None elsewhere)."""

    def __init__(self, device: torch.device):
        self.cuda, self.bytes = torch.device(device).type == "cuda", None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()
        return False


def release(device: torch.device) -> None:
    """Free what earlier rows left, so that the next row's peak is its own: a graphed session
    holds its graphs' memory pools through reference cycles, which only the collector breaks."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def figure(value: float | None, form: str = ".2f", unit: str = "") -> str:
    """A measured number as a table cell; "-" where nothing was measured (None: no CUDA memory
    figure on the CPU, no TF32 run)."""
    return "-" if value is None else f"{format(value, form)}{unit}"


def gib(nbytes: int | None) -> str:
    return figure(None if nbytes is None else nbytes / (1 << 30))


def ratio(a: float | None, b: float | None, form: str = ".2f", unit: str = "") -> str:
    return figure(None if a is None or b is None else a / b, form, unit)


def back_to_back_ms(fn, steps: int, repeats: int = 5) -> float:
    """Time per call of fn() called `steps` times back to back, as a training loop calls its
    step: the host may issue the next call while the GPU runs this one, and nothing waits in
    between. The median over `repeats` such blocks, from CUDA events around each block."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / steps)
    return statistics.median(times)


def step_sweeps_ms(flat, eps: float, steps: int) -> float:
    """A MeZO step's sweeps over `flat` alone, captured as one CUDA graph as in a graphed step
    (+eps z, -2 eps z, restore fused with the update; one pass that keeps theta + eps z apart
    where the stepper pairs): the weights' memory traffic a step pays before any forward."""
    from zotune.optim.sweep import perturb, perturb_apart, restore_and_update, seed_tensor
    seed, g = seed_tensor(1, "cuda"), torch.ones((), device="cuda")
    sweeps = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(sweeps):
        if flat.plus is not None:
            perturb_apart(flat, seed, eps)
        else:
            perturb(flat, seed, eps)
            perturb(flat, seed, -eps, times=2)
        restore_and_update(flat, seed, eps, [seed], [g], 0.0, 0.0)
    return back_to_back_ms(sweeps.replay, steps)
