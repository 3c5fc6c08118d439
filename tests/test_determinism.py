"""Deterministic backward: two identical training steps (same weights, batch and seed, dropout on) give bitwise
identical gradients on every backend, and ``fastbert.ops.set_deterministic`` keeps implementations that reduce
with atomics out of the way (none of fastbert's kernels does today: docs/ROBUSTNESS.md has the survey)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import fastbert
import fastbert.ops as ops
from fastbert.ops import _backend

CPU_BACKENDS = [n for n, s in ops.backends("cpu").items() if s.available]
CUDA_BACKENDS = [n for n, s in ops.backends("cuda").items() if s.available]


@pytest.fixture(autouse=True)
def _reset():
    yield
    ops.set_backend(None)
    ops.set_deterministic(None)


# ----------------------------------------------------------------------------------------------------------------
# the switch


@pytest.fixture
def probe_op():
    """A throwaway op with a deterministic torch implementation and an atomics-style triton one."""
    name = "determinism_probe_fwd"
    _backend.register_impl(name, "torch", lambda: "torch")
    _backend.register_impl(name, "triton", lambda: "triton", deterministic=False)
    yield name
    del _backend._IMPLS[name]
    _backend._NONDETERMINISTIC.discard((name, "triton"))
    _backend._resolve.cache_clear()


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs the triton backend (interpreter) to be available")
def test_deterministic_mode_skips_nondeterministic_implementations(probe_op):
    ops.set_backend("triton")
    assert _backend.impl(probe_op, "cpu")() == "triton"
    ops.set_deterministic(True)
    assert ops.deterministic()
    assert _backend.impl(probe_op, "cpu")() == "torch"
    assert _backend.resolved_backend(probe_op, "cpu") == "torch"
    ops.set_deterministic(False)
    assert _backend.impl(probe_op, "cpu")() == "triton"


def test_deterministic_follows_torch_and_the_environment(monkeypatch):
    assert not ops.deterministic()
    monkeypatch.setenv("FASTBERT_DETERMINISTIC", "1")
    assert ops.deterministic()
    monkeypatch.delenv("FASTBERT_DETERMINISTIC")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert ops.deterministic()
        ops.set_deterministic(False)  # an explicit choice wins
        assert not ops.deterministic()
    finally:
        torch.use_deterministic_algorithms(previous)
    with pytest.raises(TypeError, match="set_deterministic"):
        ops.set_deterministic(1)


def test_every_registered_kernel_is_deterministic():
    # The survey in docs/ROBUSTNESS.md says no fastbert kernel reduces with atomics; a new one that does must be
    # registered with deterministic=False (and get a deterministic alternative), and the survey updated.
    assert not _backend._NONDETERMINISTIC, sorted(_backend._NONDETERMINISTIC)


# ----------------------------------------------------------------------------------------------------------------
# two identical training steps


def _tiny_mlm(device):
    config = transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=40, max_position_embeddings=16, hidden_dropout_prob=0.2,
                                     attention_probs_dropout_prob=0.2)
    torch.manual_seed(0)
    return fastbert.BertForMaskedLM(config).to(device).train()


def _step_gradients(model, device, seed):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 61, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:], mask[2, 3:] = 0, 0
    labels = ids.masked_fill(mask == 0, -100)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout seeds come from torch's default generator
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_bitwise_identical_steps(backend, device):
    ops.set_backend(backend)
    ops.set_deterministic(True)
    base = _tiny_mlm(device)
    runs = [_step_gradients(copy.deepcopy(base), device, seed=123) for _ in range(2)]
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), f"{name}: gradients differ between two identical steps"
    # Dropout is on: another seed must change the gradients (else the test would not see a dropout mask mismatch).
    _, grads_c = _step_gradients(copy.deepcopy(base), device, seed=124)
    assert any(not torch.equal(g, grads_c[n]) for n, g in grads_a.items())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_two_identical_training_steps_give_identical_gradients(backend):
    _assert_bitwise_identical_steps(backend, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_two_identical_training_steps_give_identical_gradients_cuda(backend):
    _assert_bitwise_identical_steps(backend, "cuda")
