"""zotune's packed causal LM equals transformers' model run on each sequence alone, case by case:
the next-token logits at every position of every sequence, and the log-probabilities of the
tokens that follow."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny_causal import VOCAB, save_tiny_causal
from zotune.layers.batch import pack
from zotune.model.causal_lm import CausalLM
from zotune.model.loading import load_model

# At D = 8, one frequency of each of llama3's bands: kept, interpolated, stretched.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 200}

# (name, kind, tied head, lengths of the sequences packed together, config extras)
CASES = [
    ("opt-tied", "opt", True, [3, 17, 1, 40], {}),
    ("opt-untied", "opt", False, [9, 30, 2], {}),
    ("opt-project-in-out", "opt", True, [12, 5, 33], {"word_embed_proj_dim": 16}),
    # OPT-350m's layout: project_in/out and LayerNorm after each block, no final norm
    ("opt-350m-post-norm", "opt", False, [7, 21], {"word_embed_proj_dim": 16, "do_layer_norm_before": False}),
    ("opt-no-bias", "opt", True, [6, 11], {"enable_bias": False}),
    ("llama-mha-tied", "llama", True, [1, 19, 64, 8], {}),
    ("llama-gqa-untied", "llama", False, [25, 3, 90], {"num_key_value_heads": 2}),
    ("llama-mqa-head-dim", "llama", True, [14, 6], {"num_key_value_heads": 1, "head_dim": 16}),
    ("llama-attention-mlp-bias", "llama", False, [10, 4], {"attention_bias": True, "mlp_bias": True}),
    ("llama3-rope-scaling", "llama", True, [120, 9], {"rope_parameters": LLAMA3_ROPE}),
    ("llama-linear-rope", "llama", False, [50, 2], {"rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                                                        "rope_theta": 10000.0}}),
    ("qwen2-qkv-bias", "qwen2", False, [15, 37, 4], {"num_key_value_heads": 2}),
    ("qwen2-tied-mha", "qwen2", True, [8, 3], {"num_key_value_heads": 4}),
    ("mistral-no-window", "mistral", False, [22, 13], {"num_key_value_heads": 2}),
]


def _sequences(lengths, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


def _hf_logits(hf, sequences) -> torch.Tensor:
    """[T, V]: transformers' logits, each sequence run alone (no padding), concatenated."""
    with torch.inference_mode():
        return torch.cat([hf(input_ids=torch.tensor([s])).logits[0] for s in sequences])


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("name,kind,tie,lengths,extra", CASES, ids=[c[0] for c in CASES])
def test_logits_match_transformers(tmp_path, one_thread, name, kind, tie, lengths, extra):
    save_tiny_causal(tmp_path / name, kind, tie=tie, **extra)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32).eval()  # what a user gets
    ours = load_model(tmp_path / name)
    assert isinstance(ours, CausalLM)
    sequences = _sequences(lengths, len(name))
    batch = pack(sequences, None, ours.config.position_offset)
    want = _hf_logits(hf, sequences)                                       # [T, V]
    with torch.inference_mode():
        every_row = torch.arange(batch.num_tokens)
        _close(ours.logits(batch, every_row), want)
        # Log-probabilities of the next token, at every row that has one.
        scored = torch.tensor([i for i, (start, n) in enumerate(zip(batch.cu_seqlens[:-1].tolist(), lengths))
                               for i in range(start, start + n - 1)], dtype=torch.long)
        targets = batch.input_ids[scored + 1]
        got = ours(batch, scored, targets)                                 # [S]
    want_logprobs = want.log_softmax(-1)[scored, targets]
    torch.testing.assert_close(got, want_logprobs, rtol=1e-5, atol=1e-5)


def test_logits_at_some_rows_are_those_rows_of_all(tmp_path, one_thread):
    # The last layer computes only the scored rows: the same values as every row, then picked.
    save_tiny_causal(tmp_path / "m", "llama", num_key_value_heads=2)
    model = load_model(tmp_path / "m")
    batch = pack(_sequences([7, 12, 3], 0), None, 0)
    rows = torch.tensor([0, 6, 9, 18, 21])
    with torch.inference_mode():
        every = model.logits(batch, torch.arange(batch.num_tokens))
        some = model.logits(batch, rows)
        cached = model.logits(batch, rows, hidden=model.trunk(batch, 1), start_layer=1)
    torch.testing.assert_close(some, every[rows], rtol=1e-6, atol=1e-6)
    assert torch.equal(cached, some)  # the trunk is the forward's own first layer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision,tolerance", [("float32", 1e-5), ("tf32", 2e-2), ("bf16", 3e-2)])
@pytest.mark.parametrize("kind,extra", [("opt", {}), ("llama", {"num_key_value_heads": 2})], ids=["opt", "llama-gqa"])
def test_cuda_paths_agree_with_the_cpu(tmp_path, kind, extra, precision, tolerance):
    # The CUDA kernels (FlashAttention varlen with a causal window, the exact-float32 masked SDPA,
    # the few-row Triton matmuls of the scored rows) against the CPU reference, each precision.
    from zotune.engine.precision import Precision
    save_tiny_causal(tmp_path / "m", kind, **extra)
    cpu, gpu = load_model(tmp_path / "m"), load_model(tmp_path / "m", device="cuda")
    batch = pack(_sequences([5, 40, 17, 90], 3), None, cpu.config.position_offset)
    rows = torch.tensor([0, 4, 30, 44, 61, 150])
    with torch.inference_mode():
        want = cpu.logits(batch, rows)
        with Precision(precision, torch.device("cuda")):
            got = gpu.logits(batch.to("cuda"), rows.cuda()).float().cpu()
    error = ((got - want).norm() / want.norm()).item()
    assert error < tolerance, error
