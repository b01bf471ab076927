"""CI has no GPU, so the GPU tests and the CUDA-only paths never run there: a name they use
that nobody defines would first fail on a device (a helper deleted with its last CPU caller did
once, in tests/engine/test_graphs.py). pyflakes reads every file without running it."""

import io
from pathlib import Path

import pytest

pyflakes = pytest.importorskip("pyflakes", reason="pyflakes comes with the test extras (CI has it)")
from pyflakes.api import checkRecursive  # noqa: E402
from pyflakes.reporter import Reporter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_tests_and_tools_have_no_undefined_or_unused_names():
    warnings, errors = io.StringIO(), io.StringIO()
    count = checkRecursive([str(ROOT / d) for d in ("src", "tests", "tools")], Reporter(warnings, errors))
    assert count == 0, warnings.getvalue() + errors.getvalue()
