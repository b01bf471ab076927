"""Precision: how the model's matmuls compute on CUDA, chosen per run and set only around the
work (never as a global switch). The weights stay float32 in every mode, so MeZO's tiny updates
are not rounded away; the CPU computes in float32 whatever the choice.

  tf32     float32 weights, TF32 matmuls (cuBLAS and the few-row Triton kernel); attention
           over all tokens in bf16 (FlashAttention's varlen kernel), the last layer's <mask>
           queries in float32 — the default
  bf16     bf16 autocast per matmul (no weight cache: it would hold a bf16 copy of every
           weight); attention as in tf32
  float32  exact float32: TF32 off, every matmul (cuBLAS and the few-row Triton kernel) in IEEE
           float32, and attention over all tokens in float32 too (a block-diagonal masked SDPA,
           layers/attention.py), at the cost of its [N, T, T] scores. What `--precision float32`
           changes against tf32 is measured by benchmarks/precision_gap.py.

The layers read the choice where they run: layers/linear.py and layers/attention.py
(attention_kernel) follow torch.backends.cuda.matmul.allow_tf32, as cuBLAS does, which this
context sets on entry and restores on exit.
"""

import torch

from zotune.errors import UserError

PRECISIONS = ("tf32", "bf16", "float32")


class Precision:
    """A reusable context: `with precision:` around a forward (or its capture, or a backward)."""

    def __init__(self, name: str, device: torch.device):
        if name not in PRECISIONS:
            raise UserError(f"unknown --precision {name!r}; use {', '.join(PRECISIONS)}")
        self.name, self.cuda = name, device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False,
                                       enabled=self.cuda and name == "bf16")
        self._saved: list[bool] = []

    def __enter__(self):
        if self.cuda:
            self._saved.append(torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = self.name != "float32"
        self.autocast.__enter__()
        return self

    def __exit__(self, *exc):
        self.autocast.__exit__(*exc)
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = self._saved.pop()
        return False
