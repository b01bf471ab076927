"""benchmarks/causal_step.py on the CPU with tiny shapes: the reference and zotune score the
same batch to the same loss (the reference in float16, zotune in float32), and the table has a
row per model and precision."""

import causal_step
import pytest
import torch


@pytest.mark.parametrize("graphs", [False, True])  # --graphs: on the CPU the runner has none, nor the label
def test_the_reference_and_zotune_score_the_same_batch(one_thread, graphs):
    config = {**causal_step.OPT_1_3B, **causal_step.TINY, "max_position_embeddings": 512}
    rows = causal_step.measure("opt-tiny", config, torch.device("cpu"), ["float32"], batch_size=4, steps=1,
                               graphs=graphs)
    assert [(r["model"], r["precision"]) for r in rows] == [("opt-tiny", "float32")]
    row = rows[0]
    assert abs(row["reference_loss"] - row["loss"]) <= 1e-2 * abs(row["loss"])
    assert row["reference_ms"] > 0 and row["step_ms"] > 0 and row["forward_ms"] > 0
    assert row["step_peak"] is None  # no CUDA: no memory figure is printed rather than a made-up one
    lines = causal_step.table(rows, "the CPU", 4).splitlines()
    assert len(lines) == 4 and lines[1].count("|") == lines[3].count("|")


def test_left_padding_scores_each_candidate_at_the_end():
    from zotune.tasks.causal import CandidateExample
    examples = [CandidateExample((5, 6, 7), ((8,), (9, 10)), 1)]
    batch = causal_step.left_padded(examples, pad_id=1, device="cpu")
    assert batch["ids"].shape == (2, 8)
    assert batch["ids"][0].tolist() == [1] * 4 + [5, 6, 7, 8] and batch["ids"][1].tolist() == [1] * 3 + [5, 6, 7, 9, 10]
    assert batch["attention"].sum(1).tolist() == [4, 5] and batch["option_len"].tolist() == [1, 2]
