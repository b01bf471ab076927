"""MeZO step time and memory on a GPU: the reference step vs zotune's, for RoBERTa-large.

(a) reference: princeton-nlp/MeZO's step as written in medium_models/src/trainer.py:
    Hugging Face RobertaForMaskedLM in float32, the batch padded to 128 tokens, and four
    Python loops over every parameter, each reseeding with torch.manual_seed and drawing
    torch.normal per tensor (perturb +1, perturb -2, perturb +1, update), with
    `param.data = param.data + ...` copies. Measured with TF32 off (the reference's
    default) and on.
(b) zotune: packed batch, no autograd, LM head at the masks only, one Philox sweep kernel
    per perturbation over a flat float32 buffer, restore fused with the update; with CUDA
    graphs the whole step is one graph replay, as `zotune train` runs it (MezoStepper). The
    "graph per pass" row is the step as runs 2 and 3 ran it: a graph per forward pass, the
    sweeps launched from Python.
(c) an inference-only forward of the same batch through zotune's engine: the memory
    MeZO should stay within.

RoBERTa-large config with random weights (no download); real SST-2 k=16 and k=512
batches (seed 42 splits) tokenized with the real RoBERTa tokenizer and LM-BFF's template.
The last column is each side's loss at the starting weights on the same batch: (a) and (b)
compute the same objective (tests/benchmarks/test_step_time.py runs all of this on the CPU
with tiny shapes, in float32, where the two agree to 1e-4).

    python benchmarks/step_time.py            # prints a table; --steps N to time more steps
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

from common import (ROBERTA_LARGE, Peak, figure, gib, median_ms, random_roberta_large, ratio, reference_mezo_step,
                    release, session, sst2_prompt, sst2_train)

from zotune.model.loading import config_from_hf, to_hf_state
from zotune.optim.mezo import MezoStepper, direction_seed, mezo_step

EPS, LR = 1e-3, 1e-6
# (precision, CUDA graphs, label) of each zotune row
MODES = (("tf32", False, "eager"), ("tf32", True, "CUDA graphs"), ("bf16", True, "CUDA graphs"),
         ("bf16", True, "graph per pass"))


def batches(sequences, labels, batch_size: int, count: int):
    """`count` batches of `batch_size` random examples (all of them when there are fewer)."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        index = sorted(torch.randperm(len(sequences), generator=generator)[:batch_size].tolist())
        out.append(([sequences[i] for i in index], labels[index]))
    return out


# ---- (a) the reference step ------------------------------------------------------------

def padded(batch, pad_id: int, device, length: int = 128):
    sequences, labels = batch
    ids = torch.full((len(sequences), length), pad_id)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
        attention[i, :len(s)] = 1
    return ids.to(device), attention.to(device), labels.to(device)


def reference_loss_fn(model, batch, mask_id, label_word_ids):
    """The reference's objective on one padded batch, as a function: cross entropy over the
    label words' logits at each mask (the masks found once, outside the step)."""
    ids, attention, labels = batch
    mask_rows = (ids == mask_id).nonzero()[:, 1]

    def loss():
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention).logits
            return F.cross_entropy(logits[torch.arange(len(ids)), mask_rows][:, label_word_ids], labels)
    return loss


def reference_rows(config: dict, hf_state: dict, batch, prompt, steps: int, device: torch.device) -> dict:
    """{tf32: (step ms, peak bytes or None)} of the reference step on `hf_state`'s weights,
    float32 with TF32 off (its default) and, on a GPU, on; and its loss at those weights."""
    from transformers import RobertaConfig, RobertaForMaskedLM
    with torch.device(device):
        hf = RobertaForMaskedLM(RobertaConfig(**config)).eval()
    hf.load_state_dict(hf_state, strict=False)  # the tied decoder and buffers come from the module
    loss = reference_loss_fn(hf, padded(batch, 1, device), prompt.mask_id,
                             torch.tensor(prompt.label_word_ids, device=device))
    loss_at_theta = loss().item()
    out = {}
    for tf32 in (False, True) if device.type == "cuda" else (False,):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        step = reference_mezo_step([p for p in hf.parameters() if p.requires_grad], loss, EPS, LR)
        with Peak(device) as peak:
            ms = median_ms(step, max(3, steps // 2), device=device)
        out[tf32] = (ms, peak.bytes)
    torch.backends.cuda.matmul.allow_tf32 = True
    return {"steps": out, "loss": loss_at_theta}


# ---- (b), (c) zotune ---------------------------------------------------------------------

def zotune_row(config: dict, sample, precision: str, graphs: bool, mode: str, steps: int,
               device: torch.device) -> tuple[dict, dict]:
    """zotune's step ((b): ms, peak) and inference forward ((c): ms, peak) on a random model of
    `config`, and its loss at those weights; with the weights as a Hugging Face state dict."""
    model = random_roberta_large(device, config)
    cfg, arch = config_from_hf(config)
    hf_state = {n: t.cpu() for n, t in to_hf_state(model.state_dict(), cfg, arch).items()}
    # As zotune train builds a full run (Session.build): flattened before the runner exists.
    built = session("full", model, device=str(device), precision=precision, cuda_graphs=graphs, cache=False,
                    pair=False, decay_all=True)
    runner, flat = built.runner, built.flat
    packed = [(runner.pack(s), labels.to(device)) for s, labels in sample]

    def forward():
        with torch.inference_mode():
            return runner.loss(*packed[0])
    loss_at_theta = forward().item()
    with Peak(device) as forward_peak:
        forward_ms = median_ms(forward, steps, device=device)
    stepper, counter = MezoStepper(runner, flat, EPS, 0.0), {"step": 0}
    release(device)

    def zotune_step():
        i = counter["step"]
        counter["step"] += 1
        batch, labels = packed[i % len(packed)]
        with torch.inference_mode():
            if mode == "graph per pass":
                mezo_step(flat, lambda: runner.loss(batch, labels), [direction_seed(0, i, 0)], EPS, LR, 0.0)
            else:
                stepper(batch, labels, [direction_seed(0, i, 0)], LR)
    with Peak(device) as step_peak:
        step_ms = median_ms(zotune_step, steps, warmup=len(packed), device=device)  # every shape captured first
    return dict(step_ms=step_ms, step_peak=step_peak.bytes, forward_ms=forward_ms, forward_peak=forward_peak.bytes,
                loss=loss_at_theta), hf_state


def measure(config: dict, k: int, batch_size: int, modes, steps: int, device: torch.device) -> list[dict]:
    """The rows of one setting (SST-2 k, batch size): zotune's step in each (precision, CUDA
    graphs, label) mode, each beside the reference step on the same weights and batches."""
    prompt = sst2_prompt()
    sample = batches(*sst2_train(prompt, k), batch_size, 8)
    tokens = statistics.mean(sum(len(s) for s in b[0]) for b in sample)
    zotune = {}
    for precision, graphs, mode in modes:
        zotune[f"{precision}, {mode}"], hf_state = zotune_row(config, sample, precision, graphs, mode, steps, device)
        release(device)  # the row's session is gone: its memory goes before the next one's
    reference = reference_rows(config, hf_state, sample[0], prompt, steps, device)
    release(device)
    return [dict(setting=f"k={k}", batch_size=batch_size, tokens=tokens, reference=reference["steps"],
                 reference_loss=reference["loss"], precision=label, **figures) for label, figures in zotune.items()]


def table(rows: list[dict], device_name: str, model: str = "RoBERTa-large") -> str:
    lines = [f"MeZO step, {model} (random weights), SST-2 seed-42 batches, on {device_name}",
             "| setting | batch | tokens (packed) | (a) reference ms | (a) +TF32 ms | (b) zotune mode | (b) ms "
             "| speed-up vs (a) | vs (a)+TF32 | (b) peak GiB | (c) forward ms | (c) peak GiB | memory (b)/(c) "
             "| (a) peak GiB | 100k steps (a) h | 100k steps (b) h | loss at θ (a) / (b) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        (ref_ms, ref_peak), tf32_ms = r["reference"][False], r["reference"].get(True, (None,))[0]
        ms_, peak, forward_peak = r["step_ms"], r["step_peak"], r["forward_peak"]
        lines.append(
            f"| {r['setting']} | {r['batch_size']} | {r['tokens']:.0f} | {ref_ms:.1f} | {figure(tf32_ms, '.1f')} "
            f"| {r['precision']} | {ms_:.2f} | {ref_ms / ms_:.1f}x | {ratio(tf32_ms, ms_, '.1f', 'x')} | {gib(peak)} "
            f"| {r['forward_ms']:.2f} | {gib(forward_peak)} | {ratio(peak, forward_peak)} | {gib(ref_peak)} "
            f"| {ref_ms * 1e5 / 3.6e6:.2f} | {ms_ * 1e5 / 3.6e6:.2f} | {r['reference_loss']:.4f} / {r['loss']:.4f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    device = torch.device("cuda")
    rows = [row for k, batch_size in ((16, 32), (512, 64))
            for row in measure(ROBERTA_LARGE, k, batch_size, MODES, args.steps, device)]
    print()
    print(table(rows, torch.cuda.get_device_name()))


if __name__ == "__main__":
    main()
