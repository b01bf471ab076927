"""End-to-end training runs on a tiny random RoBERTa with the real vocabulary and SST-2 data."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ON_GPU
from zotune.config import TrainConfig
from zotune.errors import UserError
from zotune.model.loading import load_model
from zotune.records import window_means as _window_means
from zotune.train import batch_indices, train

SUMMARY_FIELDS = {"steps", "forward_passes", "tokens_computed", "padding_tokens_avoided", "wall_time_s",
                  "steps_per_s", "peak_memory_bytes", "dev_accuracy", "test_accuracy", "cache"}


def _run(tmp_path, model_dir, name, **overrides):
    options = dict(model=str(model_dir), steps=6, eval_steps=3, log_steps=1, quiet=True, device="cpu",
                   output_dir=str(tmp_path / name), trainable="top:1", lr=1e-3, eps=1e-2, batch_size=16)
    options.update(overrides)
    return train(TrainConfig(**options)), tmp_path / name


def test_mezo_run_writes_metrics_summary_and_best_weights(tmp_path, tiny_mlm_dir):
    summary, run = _run(tmp_path, tiny_mlm_dir, "run")
    assert SUMMARY_FIELDS <= summary.keys()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "projected_grad", "lr"} <= r.keys() for r in lines)
    assert [r["step"] for r in lines if "dev_accuracy" in r] == [3, 6]
    assert 0 <= summary["dev_accuracy"] <= 1 and 0 <= summary["test_accuracy"] <= 1
    # 6 steps x 1 pass (top:1 runs its ± passes as one batch) + 2 dev evaluations (32 examples, one
    # pass each) + final dev + test (872 / 64 = 14)
    assert summary["forward_passes"] == 6 + 2 + 1 + 14
    assert summary["padding_tokens_avoided"] > 0 and summary["tokens_computed"] > 0
    assert summary["peak_memory_bytes"] > 0 and summary["steps_per_s"] > 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    assert set(load_file(run / "best.safetensors")) == {n for n, _ in _trainable_names(tiny_mlm_dir, "top:1")}


def _trainable_names(model_dir, spec):
    from zotune.optim.subsets import select_trainable
    return select_trainable(load_model(model_dir), spec)


def test_same_seed_same_trajectory_bit_for_bit(tmp_path, tiny_mlm_dir):
    _, a = _run(tmp_path, tiny_mlm_dir, "a", trainable="lora")
    _, b = _run(tmp_path, tiny_mlm_dir, "b", trainable="lora")
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    wa, wb = load_file(a / "best.safetensors"), load_file(b / "best.safetensors")
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


@pytest.mark.parametrize("trainable", ["lora", "lora+head", "bias", "prefix", "top:1"])
def test_frozen_parameters_are_never_touched(tmp_path, tiny_mlm_dir, trainable):
    from zotune.optim.mezo import mezo_step
    from zotune.session import Session

    before = {n: p.detach().clone() for n, p in load_model(tiny_mlm_dir).named_parameters()}
    session = Session.build(TrainConfig(model=str(tiny_mlm_dir), trainable=trainable, device="cpu", pair=False))
    model, chosen, flat, runner = session.model, session.trainable, session.flat, session.runner
    batch = runner.pack([session.prompt.encode(("a fine film ",)), session.prompt.encode(("dull ",))])
    labels = torch.tensor([1, 0])
    with torch.inference_mode():
        for step in range(3):
            mezo_step(flat, lambda: runner.loss(batch, labels), [step], 1e-2, 1e-2, 0.1)
    names = {n for n, _ in chosen}
    for n, p in model.named_parameters():
        if n not in names and n in before:
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in chosen if n in before) or trainable in ("lora", "prefix")


def test_adam_baseline_trains_with_backprop(tmp_path, tiny_mlm_dir):
    summary, run = _run(tmp_path, tiny_mlm_dir, "adam", optimizer="adam", lr=1e-3, trainable="full")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["projected_grad"] is None for r in lines)
    base = load_model(tiny_mlm_dir).state_dict()
    best = load_file(run / "best.safetensors")
    assert any(not torch.equal(best[n], base[n]) for n in best if n in base)


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e-3])
def test_adam_clips_the_gradient_norm_before_each_step(tiny_mlm_dir, monkeypatch, max_grad_norm):
    from zotune.session import Session
    from zotune.train import adam_stepper

    norms = []  # the trainable tensors' total gradient norm as AdamW sees it
    adam_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return adam_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert TrainConfig(optimizer="adam").max_grad_norm == 1.0  # the reference's HF Trainer default
    cfg = TrainConfig(model=str(tiny_mlm_dir), optimizer="adam", trainable="full", device="cpu", lr=1e-3,
                      max_grad_norm=max_grad_norm)
    session = Session.build(cfg)
    step_fn = adam_stepper(cfg, session)
    sequences = [session.prompt.encode(("a fine film ",)), session.prompt.encode(("dull ",))]
    for i in range(2):
        step_fn(i, sequences, torch.tensor([1, 0]), cfg.lr)
    if max_grad_norm:
        assert norms == pytest.approx([max_grad_norm] * 2, rel=1e-4)
    else:
        assert min(norms) > 1e-2  # unclipped, far above the limit the other case sets


def test_batches_are_epoch_permutations_sorted_within_a_batch():
    assert all(batch_indices(10, batch, 0, step) == list(range(10)) for batch in (10, 64) for step in range(3))
    seen = [batch_indices(10, 4, 0, step) for step in range(3)]  # one epoch: 4 + 4 + 2
    assert sorted(i for b in seen for i in b) == list(range(10))
    assert all(b == sorted(b) for b in seen) and [len(b) for b in seen] == [4, 4, 2]
    assert batch_indices(10, 4, 0, 3) != seen[0] or batch_indices(10, 4, 0, 4) != seen[1]


def test_runs_taking_turns_in_one_process_keep_their_epoch_orders():
    """Twelve runs stepping in turn (together.py) draw each epoch's permutation once, not at every
    step: a cache of one order was evicted by the next run's step."""
    from zotune.train import _epoch_order
    _epoch_order.cache_clear()
    for step in range(5):  # 5 steps of one epoch (512 examples, batch 64: 8 a epoch)
        for seed in range(12):
            batch_indices(512, 64, seed, step)
    assert _epoch_order.cache_info().misses == 12


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 0, "--batch-size 0 must be at least 1"),
    ("lr", -1.0, "--lr -1.0 is negative"),
    ("eps", -1e-3, "--eps -0.001 must be positive"),
    ("optimizer", "sgd", "unknown --optimizer"),
    ("select_steps", 15_000, "--select-steps 15000 must be a multiple of --eval-steps 10000"),  # mezo's 10,000
])
def test_bad_config_values_are_user_errors(field, value, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        TrainConfig(**{field: value})


def test_k_larger_than_the_data_allows(tmp_path, tiny_mlm_dir):
    with pytest.raises(UserError, match="no file"):
        _run(tmp_path, tiny_mlm_dir, "k", k=1000)


def test_tensorboard_logs_the_metrics(tmp_path, tiny_mlm_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, run = _run(tmp_path, tiny_mlm_dir, "tb", tensorboard=True)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in events.Scalars("loss")] == [r["step"] for r in lines]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in lines])
    assert [e.step for e in events.Scalars("dev_accuracy")] == [3, 6]


def test_select_steps_picks_the_best_dev_among_its_steps_only():
    from zotune.records import RunRecords, best_of
    cfg = TrainConfig(steps=7, eval_steps=1, select_steps=3)  # selects 3, 6 and the last, 7
    kept = [{"step": s, "dev_accuracy": d} for s, d in [(1, 0.9), (2, 0.5), (3, 0.6), (4, 0.95), (5, 0.6), (6, 0.6)]]
    assert best_of(kept, cfg.selects) == {"dev_accuracy": 0.6, "step": 3}  # 6 ties with 3: the earliest
    assert best_of(kept, TrainConfig(steps=7, eval_steps=1).selects)["step"] == 4  # every evaluation
    records = RunRecords.__new__(RunRecords)
    records.writes, records.selects, records.best = False, cfg.selects, best_of(kept, cfg.selects)
    records.offer(0.99, 5, {})  # better, but not a step that selects
    records.offer(0.7, 7, {})   # the last step selects
    assert records.best == {"dev_accuracy": 0.7, "step": 7}


def test_a_run_with_select_steps_logs_every_evaluation_and_selects_among_its_steps(tmp_path, tiny_mlm_dir):
    summary, run = _run(tmp_path, tiny_mlm_dir, "select", eval_steps=1, select_steps=3)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    dev = {r["step"]: r["dev_accuracy"] for r in lines if "dev_accuracy" in r}
    assert list(dev) == [1, 2, 3, 4, 5, 6]  # the curve keeps every evaluation
    assert summary["best_step"] == max((3, 6), key=lambda step: (dev[step], -step))
    assert summary["dev_accuracy"] == dev[summary["best_step"]]


def test_overwrite_leaves_nothing_of_the_old_run(tmp_path, tiny_mlm_dir):
    from zotune.plot import plot_run
    _, run = _run(tmp_path, tiny_mlm_dir, "old", tensorboard=True, steps=3)
    plot_run(run)
    assert (run / "run.png").is_file() and (run / "tensorboard").is_dir()
    summary, _ = _run(tmp_path, tiny_mlm_dir, "old", overwrite=True, optimizer="adam", steps=2, eval_steps=2)
    assert sorted(p.name for p in run.iterdir()) == ["best.safetensors", "config.json", "metrics.jsonl",
                                                    "summary.json", "zero_shot.json"]
    assert json.loads((run / "config.json").read_text())["optimizer"] == "adam" and summary["steps"] == 2


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("trainable,layers", [("lora", None), ("prefix", None), ("top:1", None), ("top:2", None),
                                              ("bias", (1,)), ("lora+head", None)])
def test_pair_as_one_batch_matches_the_passes_one_by_one(tmp_path, tiny_mlm_dir, trainable, layers, device,
                                                         monkeypatch):
    if trainable == "lora+head":
        # Its decoder, a copy of the tiny model's embeddings, is most of this model, so no pair
        # would fit; in roberta-large it is 14 %. Let it fit, to test the decoder's pair.
        monkeypatch.setattr("zotune.session.SECOND_BUFFER_SHARE", 1.0)
    # Both runs make the same sweeps; only the matmuls over the frozen weights see a batch twice
    # as tall, and BLAS may sum a taller matrix in another order, so the losses may differ in the
    # last float32 bits (on the CI machine's CPU they come out bit-identical). On a GPU, TF32
    # matmuls and bf16 attention round at ~1e-3, and a graph bucket's filler rows change the
    # shapes too. The paired run makes one forward per direction instead of two.
    rel = 1e-6 if device == "cpu" else 2e-3
    options = dict(trainable=trainable, layers=layers, n_spsa=2, weight_decay=0.1, device=device)
    paired, a = _run(tmp_path, tiny_mlm_dir, "paired", pair=True, **options)
    single, b = _run(tmp_path, tiny_mlm_dir, "single", pair=False, **options)
    for x, y in zip(*[[json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (a, b)]):
        assert x["loss"] == pytest.approx(y["loss"], rel=rel)
        # g = (L+ - L-) / 2 eps magnifies the GPU's rounding; the bound there still catches a swap of L+ and L-.
        g_rel, g_abs = (1e-4, 1e-4) if device == "cpu" else (0.1, 0.05)
        assert x["projected_grad"] == pytest.approx(y["projected_grad"], rel=g_rel, abs=g_abs)
    wa, wb = load_file(a / "final.safetensors"), load_file(b / "final.safetensors")
    rtol, atol = (1e-5, 1e-6) if device == "cpu" else (1e-3, 1e-3)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=rtol, atol=atol)
    assert single["forward_passes"] - paired["forward_passes"] == 6 * 2  # 6 steps x 2 directions, one pass each saved


@pytest.mark.parametrize("trainable", ["top:1", "lora"])
def test_a_second_buffer_saves_a_sweep_and_changes_no_bit(tmp_path, tiny_mlm_dir, trainable, monkeypatch):
    # With theta + eps z kept apart, a direction's first sweep leaves what the first two leave
    # (optim/sweep.py perturb_apart); n-SPSA and weight decay cover the restores between directions.
    options = dict(trainable=trainable, n_spsa=2, weight_decay=0.1, pair=False)
    kept, a = _run(tmp_path, tiny_mlm_dir, "kept", **options)
    monkeypatch.setattr("zotune.session.SECOND_BUFFER_SHARE", 0.0)
    swept, b = _run(tmp_path, tiny_mlm_dir, "swept", **options)
    assert (kept["sweeps_per_direction"], swept["sweeps_per_direction"]) == (2, 3)
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    wa, wb = load_file(a / "final.safetensors"), load_file(b / "final.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)


def test_train_time_leaves_out_dev_evaluations(tmp_path, tiny_mlm_dir, monkeypatch):
    import time
    import zotune.train as train_module
    real_sums = train_module.metric_sums

    def slow_sums(*args, **kwargs):  # every evaluation takes at least 0.3 s more
        time.sleep(0.3)
        return real_sums(*args, **kwargs)
    monkeypatch.setattr(train_module, "metric_sums", slow_sums)
    summary, _ = _run(tmp_path, tiny_mlm_dir, "run")  # 2 dev evaluations in the loop, dev and test after it
    assert 0 < summary["train_time_s"] <= summary["wall_time_s"] - 4 * 0.3
    assert summary["steps_per_s"] == pytest.approx(6 / summary["train_time_s"])
    # Where the time went: dev and test before the steps and after them, dev twice in the loop.
    phases = summary["phase_s"]
    assert list(phases) == list(train_module.PHASES) and min(phases.values()) >= 0
    assert phases["zero_shot"] >= 2 * 0.3 and phases["dev_evals"] >= 2 * 0.3 and phases["final"] >= 2 * 0.3
    assert phases["steps"] < summary["train_time_s"] + 1e-9 and phases["checkpoints"] > 0  # best.safetensors
    assert sum(phases.values()) <= summary["wall_time_s"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_time_holds_the_gpus_work(tmp_path, tiny_mlm_dir, monkeypatch):
    # The host issues a step long before the GPU runs it: a clock read without a sync would
    # time the host alone. Each step here also makes the GPU spin for a known time.
    import time
    from zotune.optim.mezo import MezoStepper
    spin = 50_000_000  # GPU clock cycles
    torch.cuda._sleep(spin)  # a first spin lets an idle GPU raise its clock: the spins below run at speed
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(5):
        torch.cuda._sleep(spin)
    torch.cuda.synchronize()
    spin_s = (time.perf_counter() - started) / 5
    real_call = MezoStepper.__call__

    def slow_step(self, *args, **kwargs):
        result = real_call(self, *args, **kwargs)
        torch.cuda._sleep(spin)
        return result
    monkeypatch.setattr(MezoStepper, "__call__", slow_step)
    summary, _ = _run(tmp_path, tiny_mlm_dir, "run", device="cuda", steps=20, eval_steps=20, log_steps=20)
    assert summary["train_time_s"] >= 0.9 * 20 * spin_s, (summary["train_time_s"], spin_s)


def test_window_means_average_each_steps_gradients_then_the_steps_in_float32():
    window = [(torch.tensor(1.0), torch.tensor([1.0, 2.0])), (torch.tensor(2.0), torch.tensor([4.0, 5.0]))]
    assert _window_means(window) == (1.5, 3.0)
    # Added in order in float32: 1e8 + 1 rounds back to 1e8, so the three losses sum to 0 (1/3 in float64).
    window = [(torch.tensor(v), None) for v in (1e8, 1.0, -1e8)]
    assert _window_means(window) == (0.0, None)
