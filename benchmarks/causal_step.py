"""MeZO step time and memory for decoder-only LMs (issue 22): MeZO's large_models reference
step against zotune's, on OPT-1.3B and a Llama-architecture model of about 1B parameters.

(a) reference: princeton-nlp/MeZO's large_models step (trainer.py, zo_step and zo_update) as
    its scripts run it: the Hugging Face model loaded in float16 (--load_float16), SST-2 as
    classification over candidates (--train_as_classification): every candidate is a whole
    sequence (prompt + candidate), the 2 x 16 sequences left-padded to a multiple of 8;
    logits at every position, log_softmax over the vocabulary, the candidate tokens'
    log-probabilities averaged, cross entropy over each example's candidates. The step:
    four Python loops over the parameters, each reseeding with torch.manual_seed and drawing
    torch.normal per tensor (perturb +1, perturb -2, perturb +1, then the update
    θ - lr (g z + wd θ) with wd = 0 on all but biases and norms), each a `param.data = ...`
    copy. TF32 as PyTorch defaults (off).
(b) zotune: `zotune train`'s MeZO step for a causal LM (Session.build, MezoStepper): float32
    weights in one flat buffer, one Philox sweep kernel per perturbation, restore fused with
    the update; packed tokens with each prompt computed once and its candidates continuing it
    (engine/candidates.py), log-probabilities only at the candidate tokens. "(b) sweeps" times
    the step's three sweeps alone (one CUDA graph; on a GPU only): the part of the step that
    memory bandwidth bounds whatever the forward costs. Eager by default;
    with --graphs the session has CUDA graphs (`zotune train` without --no-cuda-graphs): each
    step is one graph replay, and the precision column says "CUDA graphs" where one ran
    (on CUDA only: on the CPU the runner has none and the row is the eager step).
(c) zotune's inference-only forward of the same batch: the memory MeZO should stay within
    (through the forward's graph where (b) has graphs).

Random weights from each model's real config (no download), saved and loaded as a user's
float16 checkpoint would be; the real SST-2 k=16 seed-42 training examples with MeZO's
template, tokenized with RoBERTa's BPE (GPT-2's, so OPT's ids; for the Llama shape the ids
are merely in range). Batch 16 examples, as MeZO's scripts.

    python benchmarks/causal_step.py                 # on a GPU: the table
    python benchmarks/causal_step.py --graphs        # zotune's step as one CUDA graph replay
    python benchmarks/causal_step.py --size tiny     # tiny shapes, any device (the CPU test)
"""

import argparse
import tempfile

import torch
import torch.nn.functional as F

from common import (REPO, Peak, figure, gib, median_ms, ratio, reference_mezo_step, release,  # noqa: F401  (REPO: src/)
                    step_sweeps_ms)
from zotune.config import TrainConfig  # noqa: E402
from zotune.evaluate import load_causal_prompt, split_inputs  # noqa: E402
from zotune.optim.mezo import MezoStepper, direction_seed  # noqa: E402
from zotune.session import Session  # noqa: E402

EPS, LR = 1e-3, 1e-7
TOKENIZER = str(REPO / "models/zotune-roberta-small")

# The config.json values of facebook/opt-1.3b and meta-llama/Llama-3.2-1B that shape the model.
OPT_1_3B = dict(model_type="opt", architectures=["OPTForCausalLM"], hidden_size=2048, ffn_dim=8192,
                num_hidden_layers=24, num_attention_heads=32, vocab_size=50272, max_position_embeddings=2048,
                word_embed_proj_dim=2048, do_layer_norm_before=True, activation_function="relu", enable_bias=True,
                tie_word_embeddings=True, pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0)
LLAMA_1B = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
                rope_theta=500000.0, tie_word_embeddings=True, pad_token_id=0, bos_token_id=128000,
                eos_token_id=128001, rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                       high_freq_factor=4.0, original_max_position_embeddings=8192))
TINY = dict(hidden_size=64, ffn_dim=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, word_embed_proj_dim=64)
MODELS = {"opt-1.3b": OPT_1_3B, "llama-1b": LLAMA_1B}


def hf_model(config: dict, device: str):
    """A random Hugging Face model of `config`, float16 as the reference loads it."""
    from transformers import AutoConfig, AutoModelForCausalLM
    values = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    hf_config = AutoConfig.for_model(config["model_type"], **values)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float16)
    return model.eval()


def train_examples(model_dir: str, batch_size: int) -> list:
    """The first `batch_size` SST-2 k=16 seed-42 training examples as candidate examples."""
    task, prompt = load_causal_prompt(model_dir, "sst2", TOKENIZER)
    return split_inputs(task, prompt, REPO / "data", 16, 42, "train")[1][:batch_size]


# ---- (a) the reference step ------------------------------------------------------------------

def left_padded(examples, pad_id: int, device) -> dict:
    """Every candidate as its own sequence, left-padded to a multiple of 8, as MeZO's collator."""
    sequences = [list(e.prompt_ids) + list(c) for e in examples for c in e.candidate_ids]
    length = -(-max(map(len, sequences)) // 8) * 8
    ids = torch.full((len(sequences), length), pad_id)
    attention = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, length - len(s):] = torch.tensor(s)
        attention[i, length - len(s):] = 1
    option_len = torch.tensor([len(c) for e in examples for c in e.candidate_ids])
    labels = torch.tensor([e.label for e in examples])
    return {k: v.to(device) for k, v in dict(ids=ids, attention=attention, option_len=option_len,
                                              labels=labels).items()}


def reference_loss(model, batch, n_options: int) -> torch.Tensor:
    """MeZO large_models' classification loss: mean log-probability of each candidate's tokens
    (the last option_len positions), cross entropy over an example's candidates."""
    with torch.inference_mode():
        logits = model(input_ids=batch["ids"], attention_mask=batch["attention"]).logits[:, :-1]
        targets = batch["ids"][:, 1:]
        positions = torch.arange(targets.shape[1], device=targets.device)
        scored = positions[None, :] >= targets.shape[1] - batch["option_len"][:, None]
        token = F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        mean = (token * scored).sum(-1) / scored.sum(-1)
        return F.cross_entropy(mean.view(-1, n_options), batch["labels"])


def reference_step_fn(model, batch, n_options: int):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = [not any(s in n for s in ("bias", "layer_norm", "layernorm")) for n, _ in named]  # zo_update's test
    return reference_mezo_step([p for _, p in named], lambda: reference_loss(model, batch, n_options), EPS, LR,
                               decayed)


# ---- (b), (c) zotune ---------------------------------------------------------------------------

def zotune_rows(model_dir: str, device: torch.device, precisions, batch_size: int, steps: int,
                graphs: bool = False) -> dict:
    """{precision label: (step ms, step peak, forward ms, forward peak, loss at the start, sweeps ms)} for
    zotune's MeZO step, eager or (`graphs`) through CUDA graphs where the device has them."""
    out = {}
    for precision in precisions:
        label, *figures = zotune_row(model_dir, device, precision, batch_size, steps, graphs)
        out[label] = tuple(figures)
        release(device)  # the row's session is gone: its memory goes before the next one's
    return out


def zotune_row(model_dir: str, device: torch.device, precision: str, batch_size: int, steps: int,
               graphs: bool = False) -> tuple:
    """(precision label, step ms, step peak, forward ms, forward peak, loss at the start, the
    step's sweeps alone in ms (CUDA only)); the label says "CUDA graphs" only where the runner
    has them (`graphs` on a CUDA device)."""
    cfg = TrainConfig(model=model_dir, tokenizer=TOKENIZER, task="sst2", k=16, seed=42, trainable="full",
                      device=str(device), precision=precision, cuda_graphs=graphs, cache=False)
    session = Session.build(cfg)
    examples = train_examples(model_dir, batch_size)
    runner = session.runner
    label = f"{precision}, CUDA graphs" if runner.graphs is not None else precision
    batch, labels = runner.pack(examples), torch.tensor([e.label for e in examples])
    with torch.inference_mode():
        start_loss = runner.loss(batch, labels.to(device)).item()
    with Peak(device) as forward_peak:
        with torch.inference_mode():
            forward_ms = median_ms(lambda: runner.loss(batch, labels.to(device)), steps, device=device)
    stepper = MezoStepper(runner, session.flat, EPS, 0.0, session.paired)
    counter = {"step": 0}

    def step():
        counter["step"] += 1
        with torch.inference_mode():
            stepper(batch, labels, [direction_seed(0, counter["step"], 0)], LR)
    with Peak(device) as step_peak:
        step_ms = median_ms(step, steps, device=device)
    sweeps_ms = step_sweeps_ms(session.flat, EPS, steps) if device.type == "cuda" else None
    return label, step_ms, step_peak.bytes, forward_ms, forward_peak.bytes, start_loss, sweeps_ms


def measure(name: str, config: dict, device: torch.device, precisions, batch_size: int, steps: int,
            graphs: bool = False) -> list[dict]:
    """The rows of one model: the reference step, then zotune's in each precision (through CUDA
    graphs with `graphs`)."""
    hf = hf_model(config, str(device))
    parameters = sum(p.numel() for p in hf.parameters())
    with tempfile.TemporaryDirectory() as model_dir:
        hf.save_pretrained(model_dir)  # a float16 checkpoint, as the Hub's
        examples = train_examples(model_dir, batch_size)
        batch = left_padded(examples, config["pad_token_id"], device)
        n_options = len(examples[0].candidate_ids)
        reference_start = reference_loss(hf, batch, n_options).item()  # the same batch as zotune's, scored alike
        step = reference_step_fn(hf, batch, n_options)
        with Peak(device) as reference_peak:
            reference_ms = median_ms(step, max(3, steps // 2), device=device)
        tokens_padded = batch["ids"].numel()
        del hf, step, batch
        release(device)
        ours = zotune_rows(model_dir, device, precisions, batch_size, steps, graphs)
    return [dict(model=name, parameters=parameters, padded_tokens=tokens_padded, reference_ms=reference_ms,
                 reference_peak=reference_peak.bytes, reference_loss=reference_start, precision=p, step_ms=s,
                 step_peak=sp, forward_ms=f, forward_peak=fp, loss=loss, sweeps_ms=sw)
            for p, (s, sp, f, fp, loss, sw) in ours.items()]


def table(rows: list[dict], device_name: str, batch_size: int) -> str:
    lines = [f"MeZO step, random weights from real configs, SST-2 k=16 seed-42 batch of {batch_size}, on {device_name}",
             "| model | parameters | (a) reference ms | (a) peak GiB | (b) zotune precision | (b) ms | speed-up "
             "| (b) peak GiB | (b) sweeps ms | (c) forward ms | (c) peak GiB | memory (b)/(c) | 100k steps (a) h "
             "| 100k steps (b) h | loss at θ (a) / (b) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:,.0f}M | {r['reference_ms']:.1f} | "
                     f"{gib(r['reference_peak'])} | {r['precision']} | {r['step_ms']:.1f} | "
                     f"{r['reference_ms'] / r['step_ms']:.1f}x | {gib(r['step_peak'])} | "
                     f"{figure(r['sweeps_ms'], '.1f')} | "
                     f"{r['forward_ms']:.1f} | "
                     f"{gib(r['forward_peak'])} | {ratio(r['step_peak'], r['forward_peak'])} | "
                     f"{r['reference_ms'] * 1e5 / 3.6e6:.2f} | {r['step_ms'] * 1e5 / 3.6e6:.2f} "
                     f"| {r['reference_loss']:.4f} / {r['loss']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", default="real", choices=["real", "tiny"], help="tiny: 2-layer shapes, for a check")
    parser.add_argument("--models", default="opt-1.3b,llama-1b")
    parser.add_argument("--precisions", default="bf16,tf32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--graphs", action="store_true",
                        help="zotune's session with CUDA graphs (each step one replay); default eager")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    precisions = args.precisions.split(",") if device.type == "cuda" else ["float32"]
    rows = []
    for model in args.models.split(","):
        config = MODELS[model] if args.size == "real" else {**MODELS[model], **TINY,
                                                             "vocab_size": 50272, "max_position_embeddings": 512}
        rows += measure(model, config, device, precisions, args.batch_size, args.steps, args.graphs)
        print(table(rows[-len(precisions):], name, args.batch_size), flush=True)
    print()
    print(table(rows, name, args.batch_size))


if __name__ == "__main__":
    main()
