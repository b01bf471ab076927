"""Fixtures of the runner-floor tests."""

import pytest

from tests.tiny_causal import save_tiny_causal

# The causal LMs the runner floor is checked on: OPT, and Llama with grouped-query attention and
# an untied head (tests/tiny_causal.py's vocabulary).
CAUSAL_MODELS = {"opt": ("opt", {}), "llama-gqa-untied": ("llama", {"num_key_value_heads": 2, "tie": False})}


@pytest.fixture(scope="module", params=list(CAUSAL_MODELS))
def model_dir(request, tmp_path_factory):
    kind, extra = CAUSAL_MODELS[request.param]
    path = tmp_path_factory.mktemp("causal") / request.param
    save_tiny_causal(path, kind, **extra)
    return path
