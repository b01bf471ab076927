"""benchmarks/precision_gap.py runs on the CPU (float32 only): its table has a row per k and
subset, and float32 measured twice from the same weights agrees exactly."""

import precision_gap


def test_precision_gap_table_on_the_cpu(tiny_mlm_dir, one_thread):
    rows = precision_gap.measure(str(tiny_mlm_dir), "cpu", ["float32"], ["full", "lora", "top:1"], [16], 3)
    assert [(r["k"], r["subset"], r["precision"]) for r in rows] == [
        (16, "full", "float32"), (16, "lora", "float32"), (16, "top:1", "float32")]
    for row in rows:
        assert row["directions"] == 3 and row["sign agreement"] == 1.0
        assert row["g rel err median"] == row["g rel err max"] == row["g rel err norm"] == 0.0
        assert row["loss rel err max"] == 0.0
    text = precision_gap.table(rows, "the CPU").splitlines()
    assert len(text) == 3 + len(rows) and all(line.count("|") == len(precision_gap.COLUMNS) + 1 for line in text[1:])


def test_compare_measures_against_the_reference_prefix():
    import torch
    ref_g, ref_l = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    row = precision_gap.compare(torch.tensor([1.1, 2.0], dtype=torch.float64), torch.full((4,), 1.5, dtype=torch.float64),
                                ref_g, ref_l)
    assert row["directions"] == 2 and row["sign agreement"] == 0.5
    assert abs(row["g rel err max"] - 2.0) < 1e-12 and abs(row["loss rel err max"] - 0.5) < 1e-12
