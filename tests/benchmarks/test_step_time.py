"""benchmarks/step_time.py on the CPU with tiny shapes: the reference step and zotune's score the
same batch on the same weights to the same loss, and the table has a row per zotune mode."""

import step_time
import torch
from common import ROBERTA_LARGE

TINY = dict(ROBERTA_LARGE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def test_the_reference_and_zotune_score_the_same_batch(one_thread):
    modes = [("float32", False, "eager"), ("float32", False, "graph per pass")]  # the stepper and mezo_step
    rows = step_time.measure(TINY, 16, 8, modes, steps=1, device=torch.device("cpu"))
    assert [row["precision"] for row in rows] == ["float32, eager", "float32, graph per pass"]
    for row in rows:
        assert abs(row["reference_loss"] - row["loss"]) <= 1e-4 * abs(row["loss"])
        assert row["step_ms"] > 0 and row["forward_ms"] > 0 and row["tokens"] > 0
        assert row["step_peak"] is None and list(row["reference"]) == [False]  # no CUDA: no memory, no TF32 row
    lines = step_time.table(rows, "the CPU", "a 2-layer RoBERTa").splitlines()
    assert lines[0] == "MeZO step, a 2-layer RoBERTa (random weights), SST-2 seed-42 batches, on the CPU"
    assert len(lines) == 5 and all(line.count("|") == lines[1].count("|") for line in lines[1:])
    assert lines[3].split("|")[5].strip() == "-"  # the TF32 column where there was no TF32 run
