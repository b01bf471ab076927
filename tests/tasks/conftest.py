"""The real RoBERTa tokenizer, loaded once: every tasks test encodes with it."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "models" / "zotune-roberta-small"


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)
