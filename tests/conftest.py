"""Shared fixtures: tiny random Hugging Face checkpoints written to disk, as a user's would be."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import RobertaConfig, RobertaForMaskedLM

ROBERTA_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "models" / "zotune-roberta-small"  # the one copy of the RoBERTa BPE files


def save_tiny_roberta(path, *, vocab_size=60, hidden=32, layers=2, heads=4, tie=True, seed=0,
                      architecture_cls=RobertaForMaskedLM, config_cls=RobertaConfig, **extra):
    torch.manual_seed(seed)
    config = config_cls(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden,
                        tie_word_embeddings=tie, **{"max_position_embeddings": 140, **extra})
    model = architecture_cls(config).eval()
    with torch.no_grad():  # random, non-trivial values everywhere (HF initialises biases to zero)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return model


@pytest.fixture
def tiny_roberta_dir(tmp_path):
    save_tiny_roberta(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.fixture(scope="session")
def tiny_mlm_dir(tmp_path_factory):
    """A tiny random RoBERTa with the real RoBERTa vocabulary and tokenizer: a stand-in for a
    user's checkpoint directory that every CLI and training test can run end to end."""
    from transformers import AutoTokenizer
    path = tmp_path_factory.mktemp("models") / "tiny-roberta"
    save_tiny_roberta(path, vocab_size=50265, hidden=32, layers=2, heads=4, max_position_embeddings=514)
    AutoTokenizer.from_pretrained(ROBERTA_TOKENIZER_DIR).save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=["llama", "opt"])
def tiny_causal_dir(request, tmp_path_factory):
    """A tiny random causal LM (Llama with grouped-query attention, or OPT) over the real RoBERTa
    vocabulary, its tokenizer beside it: a user's causal checkpoint for the CLI and training tests."""
    from transformers import AutoTokenizer

    from tests.tiny_causal import save_tiny_causal
    path = tmp_path_factory.mktemp("models") / f"tiny-{request.param}"
    extra = {"num_key_value_heads": 2} if request.param == "llama" else {"max_position_embeddings": 512}
    save_tiny_causal(path, request.param, vocab=50265, **extra)
    AutoTokenizer.from_pretrained(ROBERTA_TOKENIZER_DIR).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def made_up_data(tmp_path_factory):
    """Made-up SuperGLUE and SQuAD originals (`.originals`) and a data folder (`.data`, for
    `--data-dir` / `data_dir=`) holding their seed-0 MeZO samples: the samples of these tasks
    are not shipped (data/SOURCES.md), so every test that reads one reads these."""
    from tests.made_up_data import write_made_up_data
    return write_made_up_data(tmp_path_factory.mktemp("made-up"))


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's per-sequence attention calls take microseconds: intra-op threads only add
    OpenMP spin-waits, which made these tests ~6x slower on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
# A device parameter that runs where CUDA is, marked gpu: parametrize("device", ["cpu", ON_GPU]).
ON_GPU = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs a CUDA device")])


def run_under_triton_interpreter(test_file: str, timeout: float) -> None:
    """Run a test module's __main__ with TRITON_INTERPRET=1: its Triton kernels then run on the
    CPU (numpy float32). A subprocess, because the variable must be set before any kernel is
    defined."""
    root = str(Path(__file__).resolve().parents[1])  # so the module can import tests.conftest
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    subprocess.run([sys.executable, test_file], env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path},
                   check=True, timeout=timeout)


# Where a Triton kernel's check runs: in Triton's CPU interpreter, or on CUDA.
TRITON_DEVICES = [pytest.param("interpreter", marks=needs_triton), ON_GPU]


def run_triton_check(test_file: str, check, device: str, timeout: float = 300) -> None:
    """check(device) on CUDA; for "interpreter", the test module's __main__ (which runs the
    check on the CPU) under TRITON_INTERPRET=1."""
    if device == "interpreter":
        run_under_triton_interpreter(test_file, timeout)
    else:
        check(torch.device(device))
