"""Prefix sharing for causal-LM candidate scoring (engine/candidates.py): tokens computed and
time per forward with each prompt packed once (its candidates continue it) against the plain
layout (every candidate with its whole prompt), on SST-2- and COPA-shaped batches.

SST-2 (MeZO large_models template "<sentence> It was" + " terrible" / " great", k=16 seed 42)
has one-token candidates: shared, the prompt's last row scores both. COPA (MeZO's sample,
seed 0) has two multi-token continuations of a short prompt; its sample is not shipped
(data/SOURCES.md says how to write it), and without it the COPA line says so. A random OPT-architecture model
(no download; RoBERTa's BPE, which is GPT-2's, for the token ids) of the size asked:

    python benchmarks/prefix_sharing.py                      # tiny model on the CPU
    python benchmarks/prefix_sharing.py --device cuda --size opt-1.3b --precision bf16

It prints the device, then per task: tokens computed shared / plain, and ms per forward
(median of --repeats after warm-up, common.median_ms).
"""

import argparse

import torch

from common import REPO, median_ms  # noqa: F401  (REPO: puts src/ on the path)
from zotune.engine.candidates import CausalRunner  # noqa: E402
from zotune.errors import UserError  # noqa: E402
from zotune.model.causal_lm import CausalConfig, CausalLM  # noqa: E402
from zotune.tasks.causal import load_examples  # noqa: E402

# (hidden, layers, heads, feed-forward) of OPT configs; tiny runs anywhere in seconds
SIZES = {"tiny": (64, 2, 4, 128), "opt-125m": (768, 12, 12, 3072), "opt-1.3b": (2048, 24, 32, 8192)}
OPT_BOS = 2  # OPT's tokenizer starts every prompt with </s>


def random_opt(size: str, device: torch.device) -> CausalLM:
    hidden, layers, heads, ffn = SIZES[size]
    cfg = CausalConfig(family="opt", vocab_size=50272, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       intermediate_size=ffn, max_positions=2050, position_offset=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalLM(cfg)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def batches(batch_size: int) -> dict:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(REPO / "models/zotune-roberta-small")
    out = {"sst2": load_examples("sst2", "train", tokenizer, bos=OPT_BOS, k=16, seed=42)[:batch_size]}
    try:
        out["copa"] = load_examples("copa", "train", tokenizer, bos=OPT_BOS, seed=0)[:batch_size]
    except UserError as e:
        print(f"copa: skipped, {e}")
    return out


def forward_ms(runner: CausalRunner, batch, repeats: int) -> float:
    return median_ms(lambda: runner.candidate_logprobs(batch), repeats, device=runner.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", default="tiny", choices=list(SIZES))
    parser.add_argument("--precision", default="tf32", choices=["tf32", "bf16", "float32"])
    parser.add_argument("--batch-size", type=int, default=16, help="examples per batch (MeZO's 16)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; model: random OPT {args.size}; precision {args.precision}; batch {args.batch_size}")
    model = random_opt(args.size, device)
    runners = {share: CausalRunner(model, device, args.precision, share_prompts=share) for share in (True, False)}
    with torch.inference_mode():
        for task, examples in batches(args.batch_size).items():
            packed = {s: runners[s].pack(examples) for s in (True, False)}
            shared, plain = packed[True], packed[False]
            assert shared.plain_tokens == plain.batch.num_tokens  # the packer's count is the plain batch
            times = {s: forward_ms(runners[s], packed[s], args.repeats) for s in (True, False)}
            print(f"{task}: tokens computed {shared.batch.num_tokens} shared / {plain.batch.num_tokens} plain "
                  f"({shared.batch.num_tokens / plain.batch.num_tokens:.2f}); ms per forward "
                  f"{times[True]:.2f} shared / {times[False]:.2f} plain ({times[False] / times[True]:.2f}x)")


if __name__ == "__main__":
    main()
