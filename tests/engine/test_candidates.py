"""Candidate scoring on the runner floor (engine/candidates.py): per-candidate summed
log-probabilities equal transformers', the loss is the MeZO large-model objective computed
directly, and a MeZO pair's losses are the two passes' losses."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny_causal import VOCAB
from zotune.engine.candidates import CausalRunner, pack_candidates
from zotune.model.loading import load_model
from zotune.optim.flat import FlatParameters
from zotune.optim.subsets import SubsetOptions, attach_pair_weights, select_trainable
from zotune.tasks.causal import CandidateExample

def random_examples(n: int, candidates: int, seed: int, lengths=(1, 4)) -> list[CandidateExample]:
    """n examples, prompts of 1-12 tokens, continuations of lengths[0]..lengths[1] tokens."""
    rng = random.Random(seed)
    tokens = lambda k: tuple(rng.randrange(3, VOCAB) for _ in range(k))  # noqa: E731
    return [CandidateExample(tokens(rng.randint(1, 12)), tuple(tokens(rng.randint(*lengths)) for _ in range(candidates)),
                             rng.randrange(candidates)) for _ in range(n)]


def hf_sums(hf, examples) -> torch.Tensor:
    """[N, C] transformers' summed log-probabilities, each candidate run alone with its prompt."""
    rows = []
    with torch.inference_mode():
        for e in examples:
            row = []
            for c in e.candidate_ids:
                ids = torch.tensor([e.prompt_ids + c])
                logprobs = hf(input_ids=ids).logits[0].log_softmax(-1)          # [P+L, V]
                at = torch.arange(len(e.prompt_ids) - 1, len(e.prompt_ids) + len(c) - 1)
                row.append(logprobs[at, torch.tensor(c)].sum())
            rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("share", [True, False], ids=["shared-prompts", "plain"])
def test_summed_logprobs_equal_transformers(model_dir, one_thread, share):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    runner = CausalRunner(load_model(model_dir), torch.device("cpu"), share_prompts=share)
    examples = random_examples(5, 3, seed=1)
    with torch.inference_mode():
        sums, lengths = runner.candidate_logprobs(runner.pack(examples))
    want = hf_sums(hf, examples)
    torch.testing.assert_close(sums, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert lengths.tolist() == [[len(c) for c in e.candidate_ids] for e in examples]


@pytest.mark.parametrize("normalised,objective", [(True, "candidates"), (False, "candidates"), (True, "gold")])
def test_loss_is_the_objective_computed_directly(model_dir, one_thread, normalised, objective):
    runner = CausalRunner(load_model(model_dir), torch.device("cpu"), length_normalised=normalised,
                          objective=objective)
    examples = random_examples(4, 2, seed=2)
    labels = torch.tensor([e.label for e in examples])
    with torch.inference_mode():
        batch = runner.pack(examples)
        sums, lengths = runner.candidate_logprobs(batch)
        loss = runner.loss(batch, labels)
        scores = runner.logits(batch)
    means = sums / lengths
    assert torch.equal(scores, means if normalised else sums)
    if objective == "gold":
        gold = [(sums[i, y], lengths[i, y]) for i, y in enumerate(labels.tolist())]
        want = -sum(s for s, _ in gold) / sum(n for _, n in gold)
    else:
        want = -(means if normalised else sums).log_softmax(-1)[torch.arange(4), labels].mean()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec,layers", [("top:1", None), ("lora", (1,)), ("prefix", None)])
def test_pair_loss_is_the_two_losses(model_dir, one_thread, spec, layers):
    model = load_model(model_dir)
    flat = FlatParameters(select_trainable(model, spec, SubsetOptions(layers=layers, seed=1)), lambda n, p: False)
    assert attach_pair_weights(model, flat)
    flat.plus.copy_(flat.buffer + 0.05 * torch.randn(flat.numel, generator=torch.Generator().manual_seed(0)))
    runner = CausalRunner(model, torch.device("cpu"))
    runner.enable_pairs(flat.names)
    examples = random_examples(3, 2, seed=3)
    labels = torch.tensor([e.label for e in examples])
    with torch.inference_mode():
        batch = runner.pack(examples)
        pair = runner.pair_loss(batch, labels)
        minus = runner.loss(batch, labels)
        with flat.reading_plus():
            plus = runner.loss(batch, labels)
    assert plus != minus
    torch.testing.assert_close(pair, torch.stack([plus, minus]), rtol=1e-6, atol=1e-6)
    if spec == "top:1":  # every tensor above the trunk trains: each half as its pass, bit for bit
        assert torch.equal(pair, torch.stack([plus, minus]))


def test_counts_of_the_plain_layout():
    examples = random_examples(3, 2, seed=4)
    batch = pack_candidates(examples, 0, share_prompts=False)
    sequences = [e.prompt_ids + c[:-1] for e in examples for c in e.candidate_ids]
    assert batch.plain_tokens == batch.batch.num_tokens == sum(map(len, sequences))
    assert batch.padded_tokens == len(sequences) * max(map(len, sequences))
    assert batch.targets.tolist() == [t for e in examples for c in e.candidate_ids for t in c]
    # Each scored row but a candidate's last is followed, in the packed tokens, by its target.
    rows, ids = batch.batch.mask_index.tolist(), batch.batch.input_ids.tolist()
    last = set(batch.table.gather(1, (batch.lengths.view(-1, 1) - 1)).view(-1).tolist())
    assert all(ids[rows[s] + 1] == batch.targets[s] for s in range(len(rows)) if s not in last)


# Sharing changes which rows each matmul multiplies together, and the CPU's GEMM kernels (MKL /
# oneDNN) pick their blocking by row count, so a row's sums may round differently: the
# attention itself is bit-identical (tests/layers/test_attention.py), the scores agree to a few
# float32 ulps (|difference| ~ 2e-6 on sums of ~-20). Hence 1e-6 relative, not bit equality.
SHARING_TOLERANCE = dict(rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("spec,layers", [(None, None), ("top:1", None), ("lora", (1,)), ("prefix", None)])
def test_sharing_prompts_gives_the_plain_scores(model_dir, one_thread, spec, layers):
    model = load_model(model_dir)
    runners = [CausalRunner(model, torch.device("cpu"), share_prompts=share) for share in (True, False)]
    examples = random_examples(6, 3, seed=5)
    pair = spec is not None
    if pair:  # inside a MeZO pair: each half's candidates read their half's prompt
        flat = FlatParameters(select_trainable(model, spec, SubsetOptions(layers=layers, seed=1)), lambda n, p: False)
        assert attach_pair_weights(model, flat)
        flat.plus.copy_(flat.buffer + 0.05 * torch.randn(flat.numel, generator=torch.Generator().manual_seed(0)))
    with torch.inference_mode():
        shared, plain = (r.candidate_logprobs(r.pack(examples), pair=pair)[0] for r in runners)
    torch.testing.assert_close(shared, plain, **SHARING_TOLERANCE)
    assert shared.shape == (12 if pair else 6, 3)


def brute_force_tokens(examples) -> tuple[int, int]:
    """(tokens with shared prompts, tokens of the plain layout), counted token by token."""
    shared = plain = 0
    for e in examples:
        shared += sum(1 for _ in e.prompt_ids)
        for c in e.candidate_ids:
            shared += sum(1 for _ in c[:-1])
            plain += sum(1 for _ in e.prompt_ids + c[:-1])
    return shared, plain


def test_counts_equal_a_brute_force_count(model_dir):
    runner = CausalRunner(load_model(model_dir), torch.device("cpu"))
    first, second = random_examples(4, 3, seed=6), random_examples(5, 2, seed=7, lengths=(1, 1))
    model = runner.model
    flat = FlatParameters(select_trainable(model, "top:1"), lambda n, p: False)
    attach_pair_weights(model, flat)
    with torch.inference_mode():
        runner.candidate_logprobs(runner.pack(first))
        runner.pair_loss(runner.pack(second), torch.tensor([e.label for e in second]))
    (s1, p1), (s2, p2) = brute_force_tokens(first), brute_force_tokens(second)
    stats = runner.stats
    assert (stats.forward_passes, stats.tokens_computed, stats.plain_tokens) == (2, s1 + 2 * s2, p1 + 2 * p2)
    # One-token candidates (SST-2's words): only the prompts are packed.
    assert runner.pack(second).batch.num_tokens == sum(len(e.prompt_ids) for e in second) == s2
    report = runner.cache_stats()["prefix_sharing"]
    assert report == {"tokens_computed": s1 + 2 * s2, "plain_tokens": p1 + 2 * p2,
                      "tokens_saved": p1 + 2 * p2 - s1 - 2 * s2,
                      "saved_share": (p1 + 2 * p2 - s1 - 2 * s2) / (p1 + 2 * p2)}


def test_the_trunk_cache_serves_shared_prompts(model_dir, one_thread):
    model = load_model(model_dir)
    names = [n for n, _ in select_trainable(model, "top:1")]
    cached, uncached = CausalRunner(model, torch.device("cpu")), CausalRunner(model, torch.device("cpu"))
    cached.enable_cache(names, 1 << 20)
    a, b = random_examples(4, 3, seed=8), random_examples(3, 3, seed=9)
    with torch.inference_mode():
        first, again = (cached.candidate_logprobs(cached.pack(a))[0] for _ in range(2))
        mixed = cached.candidate_logprobs(cached.pack(a[:2] + b))[0]
        want, want_mixed = (uncached.candidate_logprobs(uncached.pack(x))[0] for x in (a, a[:2] + b))
    # A miss runs the whole batch's trunk as the forward would: the same bits; a batch of
    # other companions computes rows in other GEMMs (SHARING_TOLERANCE's reason).
    assert torch.equal(first, want) and torch.equal(again, want)
    torch.testing.assert_close(mixed, want_mixed, **SHARING_TOLERANCE)
    sequences = lambda x: len(pack_candidates(x, 0).batch.seq_lens)  # noqa: E731  (prompts and continuations)
    stats = cached.cache_stats()
    assert (stats["lookups"], stats["hits"]) == (2 * sequences(a) + sequences(a[:2] + b), sequences(a) + sequences(a[:2]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision,tolerance", [("float32", 1e-5), ("tf32", 2e-2)])
def test_shared_prompts_on_gpu_match_the_cpu(model_dir, precision, tolerance):
    # FlashAttention varlen over the gathered prompt keys (tf32), or the exact-float32 SDPA path.
    examples = random_examples(8, 3, seed=10)
    cpu = CausalRunner(load_model(model_dir), torch.device("cpu"))
    gpu = CausalRunner(load_model(model_dir).to("cuda"), torch.device("cuda"), precision)
    with torch.inference_mode():
        want = cpu.candidate_logprobs(cpu.pack(examples))[0]
        got = gpu.candidate_logprobs(gpu.pack(examples))[0].cpu()
        got_pair = gpu.candidate_logprobs(gpu.pack(examples), pair=True)[0].cpu()
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(got_pair, torch.cat([want, want]), rtol=tolerance, atol=tolerance)
