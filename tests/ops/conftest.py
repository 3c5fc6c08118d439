"""Fixtures for the op tests: the backend under test (every available one) and a fixed RNG seed per test.

The helpers live in ``_ops_helpers.py`` beside this file; this directory goes on ``sys.path`` so that the test
modules import them whatever pytest's import mode.
"""

import os
import sys

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from _ops_helpers import available_backends  # noqa: E402

import fastbert.ops as ops  # noqa: E402

CPU_BACKENDS = available_backends("cpu")
CUDA_BACKENDS = available_backends("cuda")


@pytest.fixture(autouse=True)
def _seed_and_reset_backend():
    torch.manual_seed(0)
    yield
    ops.set_backend(None)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Each backend available for CPU tensors, selected with set_backend for the test, reset afterwards."""
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend(None)


@pytest.fixture(params=CUDA_BACKENDS)
def cuda_backend(request):
    """Each backend available for CUDA tensors (the tests using it are marked cuda and skipped without a GPU)."""
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend(None)
