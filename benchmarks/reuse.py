"""Trunk-cache speed-up on a GPU: MeZO step time with and without exact computation reuse.

RoBERTa-large config with random weights, real SST-2 k=16 (batch 32 = the whole training
set) and k=512 (batch 64, an epoch of 16 batches) seed-42 batches. For each trainable subset
the cache holds the hidden states entering its lowest perturbed layer. "+ pair" rows also run
each direction's ± passes as one batch, as `zotune train` does by default for these subsets
(top:12 is too large for the second buffer a pair reads); their "no cache" column is the same
unpaired step without the cache, so the speed-up is that of both together.

Every step runs as `zotune train` runs it (MezoStepper): one CUDA graph replay per step, and
θ + εz kept in a second buffer where zotune train keeps one (session.add_second_buffer: every
subset here), so a step sweeps the trainable tensors twice.

The ideal speed-up counts layers only (24 run without the cache, K with it). It ignores the
work no cache can remove: the sweeps over the trainable tensors, measured alone here
(replayed as one CUDA graph, so their GPU time without launch latency), and the head.
"ideal with sweeps" keeps the measured sweeps and scales the rest by K/24.
Step times come from CUDA events around blocks of --steps steps run back to back, as `zotune
train` runs them (the host issues the next step while the GPU runs this one), the median of 5
blocks, after a warm-up epoch. Runs A-D timed each step alone, synchronising after it, so their
figures also hold the host's time to issue a step. The hit rate is counted by the cache over
the timed steps alone.

    python benchmarks/reuse.py
    python benchmarks/reuse.py --k 16 --only top:1 lora-pair
"""

import argparse

import torch

from common import back_to_back_ms, session, sst2_prompt, sst2_train, step_sweeps_ms

from zotune.engine.runner import lowest_perturbed_layer
from zotune.optim.mezo import MezoStepper, direction_seed

UPPER = (20, 21, 22, 23)
# name for --only: (label, subset, layers, ± passes as one batch when cached)
SUBSETS = {"top:1": ("top:1", "top:1", None, False), "top:1-pair": ("top:1, + pair", "top:1", None, True),
           "top:4": ("top:4", "top:4", None, False), "top:4-pair": ("top:4, + pair", "top:4", None, True),
           "top:12": ("top:12", "top:12", None, False), "lora": ("lora, layers 20-23", "lora", UPPER, False),
           "lora-pair": ("lora, layers 20-23, + pair", "lora", UPPER, True),
           "prefix-pair": ("prefix, layers 20-23, + pair", "prefix", UPPER, True)}


def epoch_batches(sequences, labels, batch_size):
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(0)).tolist()
    return [([sequences[i] for i in sorted(order[s:s + batch_size])], labels[sorted(order[s:s + batch_size])])
            for s in range(0, len(order), batch_size)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--k", type=int, nargs="+", choices=(16, 512), default=[16, 512], help="the settings to run")
    parser.add_argument("--only", nargs="+", choices=list(SUBSETS), help="run these rows only")
    args = parser.parse_args()
    prompt = sst2_prompt()
    rows = []
    for k, batch_size in ((16, 32), (512, 64)):
        if k not in args.k:
            continue
        train_batches = epoch_batches(*sst2_train(prompt, k), batch_size)
        for label, spec, layers, paired in [SUBSETS[name] for name in args.only or SUBSETS]:
            times, stats, built = {}, None, None
            for mode in ("no cache", "cache"):
                cached = mode == "cache"
                pair = cached and paired
                # As zotune train builds it (Session.build): the second buffer where it pays.
                built = session(spec, None if built is None else built.model, layers=layers, cache=cached, pair=pair,
                                cache_budget="4G")
                assert built.paired == pair
                model, flat, runner = built.model, built.flat, built.runner
                start = lowest_perturbed_layer(model, [n for n, _ in built.trainable])
                layers_run = model.config.num_layers - start
                ideal = model.config.num_layers / layers_run
                stepper = MezoStepper(runner, flat, 1e-3, 0.0, pair)
                packed = [(runner.pack(s), y) for s, y in train_batches]  # labels on the host, as in zotune train
                counter = {"step": 0}

                def step():
                    i = counter["step"]
                    counter["step"] += 1
                    batch, y = packed[i % len(packed)]
                    seeds = [direction_seed(0, i, 0)]
                    with torch.inference_mode():
                        stepper(batch, y, seeds, 1e-6)
                for _ in range(len(packed)):  # warm-up epoch: fills the cache, captures every shape
                    step()
                before = dict(runner.cache_stats())
                times[mode] = back_to_back_ms(step, args.steps)
                after = runner.cache_stats()
                if mode == "cache":
                    lookups = after["lookups"] - before["lookups"]
                    stats = ((after["hits"] - before["hits"]) / lookups, after["bytes_held"])
            sweep_ms = step_sweeps_ms(flat, 1e-3, args.steps)
            off = times["no cache"]
            ideal_sweeps = off / (sweep_ms + (off - sweep_ms) / ideal)
            speedup = off / times["cache"]
            rows.append((f"k={k}", batch_size, label, off, times["cache"], speedup,
                         ideal, speedup / ideal, sweep_ms, ideal_sweeps, speedup / ideal_sweeps, *stats))
            del built, model, flat, runner, packed, stepper
            torch.cuda.empty_cache()

    print(f"\nTrunk cache, RoBERTa-large (random weights), SST-2 seed-42, on {torch.cuda.get_device_name()}")
    print("| setting | batch | trainable | no cache ms | cache ms | speed-up "
          "| ideal (layers) | of ideal | sweeps ms | ideal with sweeps | of that | hit rate (timed steps) "
          "| cache held MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (setting, bs, label, off, on, speedup, ideal, fraction, sweep_ms, ideal_sweeps, fraction_sweeps,
         hit_rate, held) in rows:
        print(f"| {setting} | {bs} | {label} | {off:.2f} | {on:.2f} | {speedup:.1f}x | {ideal:.1f}x "
              f"| {fraction:.2f} | {sweep_ms:.2f} | {ideal_sweeps:.1f}x | {fraction_sweeps:.2f} "
              f"| {hit_rate:.1%} | {held / (1 << 20):.0f} |")


if __name__ == "__main__":
    main()
