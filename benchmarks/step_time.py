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

    python benchmarks/step_time.py            # prints a table; --steps N to time more steps
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

from common import median_ms, random_roberta_large, reference_mezo_step, session, sst2_prompt, sst2_train

from zotune.model.loading import config_from_hf, to_hf_state
from zotune.optim.mezo import MezoStepper, direction_seed, mezo_step

EPS, LR = 1e-3, 1e-6


def batches(sequences, labels, batch_size: int, count: int):
    """`count` batches of `batch_size` random examples (all of them when there are fewer)."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        index = sorted(torch.randperm(len(sequences), generator=generator)[:batch_size].tolist())
        out.append(([sequences[i] for i in index], labels[index]))
    return out


# ---- (a) the reference step ------------------------------------------------------------

def padded(batch, pad_id: int, length: int = 128):
    sequences, labels = batch
    ids = torch.full((len(sequences), length), pad_id)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
        attention[i, :len(s)] = 1
    return ids.cuda(), attention.cuda(), labels.cuda()


def reference_step_fn(model, batch, mask_id, label_word_ids):
    ids, attention, labels = batch
    mask_rows = (ids == mask_id).nonzero()[:, 1]

    def loss():
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention).logits
            return F.cross_entropy(logits[torch.arange(len(ids)), mask_rows][:, label_word_ids], labels)
    return reference_mezo_step([p for p in model.parameters() if p.requires_grad], loss, EPS, LR)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    from transformers import RobertaConfig, RobertaForMaskedLM

    from common import ROBERTA_LARGE
    device_name = torch.cuda.get_device_name()
    prompt = sst2_prompt()
    label_word_ids = torch.tensor(prompt.label_word_ids, device="cuda")
    cfg, arch = config_from_hf(ROBERTA_LARGE)
    rows = []
    for k, batch_size in ((16, 32), (512, 64)):
        sample = batches(*sst2_train(prompt, k), batch_size, 8)
        tokens = statistics.mean(sum(len(s) for s in b[0]) for b in sample)

        # (b) and (c): zotune's engine on a random RoBERTa-large, in each GPU precision.
        zotune = {}
        for precision, graphs, mode in (("tf32", False, "eager"), ("tf32", True, "CUDA graphs"),
                                        ("bf16", True, "CUDA graphs"), ("bf16", True, "graph per pass")):
            model = random_roberta_large()
            hf_state = {n: t.cpu() for n, t in to_hf_state(model.state_dict(), cfg, arch).items()}
            # As zotune train builds a full run (Session.build): flattened before the runner exists.
            built = session("full", model, precision=precision, cuda_graphs=graphs, cache=False, pair=False,
                            decay_all=True)
            runner, flat = built.runner, built.flat
            packed = [(runner.pack(s), labels.cuda()) for s, labels in sample]

            def forward():
                with torch.inference_mode():
                    runner.loss(*packed[0])
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            forward_ms = median_ms(forward, args.steps)
            forward_peak = torch.cuda.max_memory_allocated()

            stepper = MezoStepper(runner, flat, EPS, 0.0)
            torch.cuda.empty_cache()
            counter = {"step": 0}

            def zotune_step():
                i = counter["step"]
                counter["step"] += 1
                batch, labels = packed[i % len(packed)]
                with torch.inference_mode():
                    if mode == "graph per pass":
                        mezo_step(flat, lambda: runner.loss(batch, labels), [direction_seed(0, i, 0)], EPS, LR, 0.0)
                    else:
                        stepper(batch, labels, [direction_seed(0, i, 0)], LR)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step_ms = median_ms(zotune_step, args.steps, warmup=len(packed))  # every shape captured first
            zotune[f"{precision}, {mode}"] = (step_ms, torch.cuda.max_memory_allocated(), forward_ms, forward_peak)
            del built, model, runner, flat, packed, stepper
            torch.cuda.empty_cache()

        # (a) the reference on the same weights, float32, TF32 off (its default) and on.
        with torch.device("cuda"):
            hf = RobertaForMaskedLM(RobertaConfig(**ROBERTA_LARGE)).eval()
        hf.load_state_dict(hf_state, strict=False)  # the tied decoder and buffers come from the module
        reference = {}
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            step = reference_step_fn(hf, padded(sample[0], 1), prompt.mask_id, label_word_ids)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            reference[tf32] = (median_ms(step, max(3, args.steps // 2)), torch.cuda.max_memory_allocated())
        torch.backends.cuda.matmul.allow_tf32 = True
        del hf, step
        torch.cuda.empty_cache()
        for precision, (ms, peak, fwd_ms, fwd_peak) in zotune.items():
            rows.append((f"k={k}", batch_size, tokens, reference, precision, ms, peak, fwd_ms, fwd_peak))

    print(f"\nMeZO step, RoBERTa-large (random weights), SST-2 seed-42 batches, on {device_name}")
    print("| setting | batch | tokens (packed) | (a) reference ms | (a) +TF32 ms | (b) zotune mode | (b) ms "
          "| speed-up vs (a) | vs (a)+TF32 | (b) peak GiB | (c) forward ms | (c) peak GiB | memory (b)/(c) "
          "| (a) peak GiB | 100k steps (a) h | 100k steps (b) h |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    gib = 1 << 30
    for setting, batch_size, tokens, ref, precision, ms, peak, fwd_ms, fwd_peak in rows:
        print(f"| {setting} | {batch_size} | {tokens:.0f} | {ref[False][0]:.1f} | {ref[True][0]:.1f} | {precision} "
              f"| {ms:.2f} | {ref[False][0] / ms:.1f}x | {ref[True][0] / ms:.1f}x | {peak / gib:.2f} | {fwd_ms:.2f} "
              f"| {fwd_peak / gib:.2f} | {peak / fwd_peak:.2f} | {ref[False][1] / gib:.2f} "
              f"| {ref[False][0] * 1e5 / 3.6e6:.2f} | {ms * 1e5 / 3.6e6:.2f} |")


if __name__ == "__main__":
    main()
