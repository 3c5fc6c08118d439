"""Fixtures of the fuzz tests: the backend under test (every one available for CPU tensors; Triton through its
interpreter), reset after each test. The accuracy rule and baselines come from tests/ops/_ops_helpers.py, the
hypothesis profiles and tensor builders from _fuzz.py beside this file; both directories go on sys.path."""

import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
_OPS_TESTS = os.path.join(os.path.dirname(_HERE), "ops")
for path in (_HERE, _OPS_TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

from _ops_helpers import available_backends  # noqa: E402

import fastbert.ops as ops  # noqa: E402

CPU_BACKENDS = available_backends("cpu")
CUDA_BACKENDS = available_backends("cuda")


def pytest_terminal_summary(terminalreporter):
    from _fuzz import CASES_PASSED, PROFILE

    if CASES_PASSED:
        terminalreporter.write_sep("-", f"fuzz cases passed ({PROFILE} profile, FASTBERT_FUZZ=deep for more)")
        for test_id, count in sorted(CASES_PASSED.items()):
            terminalreporter.write_line(f"{count:6d}  {test_id}")


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend(None)


@pytest.fixture(params=CUDA_BACKENDS)
def cuda_backend(request):
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend(None)
