"""Shared pieces of the fuzz tests: hypothesis profiles, size limits per backend, tensors with drawn layouts, masks.

Profiles, picked with ``FASTBERT_FUZZ=quick|deep`` (default quick):

- quick (CI): ``derandomize=True``, so every run draws the same cases and a failure reproduces; a couple of dozen
  examples per op x backend x dtype on the compiled backends and a handful on Triton's interpreter (which runs every
  program of a kernel in Python), at tiny shapes.
- deep: ten times the examples, bigger shapes and head dims (up to the Triton fallback above 128), fresh cases on
  every run; a failure prints the case and a ``@reproduce_failure`` blob.

Inputs stay in the regime where the accuracy rule is meaningful: unit-scale activations, attention scores up to a
few tens (fp32 dot products of larger scores are ill-conditioned: see tests/ops/test_attention_triton.py), LayerNorm
rows of at least 8 features with O(1) spread (rstd multiplies every rounding error of the backward: a row of
nearly equal values has an exact gradient of order 1/sqrt(eps) that no fp32 or fp16 arithmetic reproduces to the
fp32 bound). The fp16 extremes and constant rows have their own tests (test_fp16_stress.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

PROFILE = os.environ.get("FASTBERT_FUZZ", "quick").strip().lower() or "quick"
if PROFILE not in ("quick", "deep"):
    raise ValueError(f"FASTBERT_FUZZ={PROFILE!r}: use quick (the default) or deep")

_COMMON = dict(
    deadline=None,  # the interpreter's first call compiles nothing but is still slow; time is not the point here
    database=None,  # no .hypothesis/ directory in the checkout; failures print their case and blob instead
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Quick skips shrinking: on 2 cores it can take minutes per failure, and the failing case reproduces as drawn.
settings.register_profile("fastbert-fuzz-quick", derandomize=True, phases=[Phase.explicit, Phase.generate], **_COMMON)
settings.register_profile("fastbert-fuzz-deep", derandomize=False, **_COMMON)


@dataclass(frozen=True)
class Limits:
    examples: int  # per op x backend x dtype
    batch: int
    seqlen: int
    heads: int
    headdims: tuple[int, ...]
    rows: int  # row-wise ops: bound on each leading dimension
    hidden: int


_LIMITS = {
    # Head dims include the kernels' fallbacks to the torch implementation: 12 (CUDA: not a multiple of 8),
    # 136 / 160 (CUDA / Triton: above 128).
    ("quick", "native"): Limits(25, batch=3, seqlen=24, heads=3, headdims=(1, 3, 8, 12, 16, 24, 32, 64, 136),
                                rows=9, hidden=160),
    ("quick", "interp"): Limits(10, batch=2, seqlen=9, heads=2, headdims=(1, 3, 8, 16, 32, 160), rows=5, hidden=40),
    ("deep", "native"): Limits(300, batch=4, seqlen=160, heads=4,
                               headdims=(1, 3, 8, 12, 16, 24, 32, 40, 64, 80, 96, 128, 136, 160), rows=12, hidden=1100),
    ("deep", "interp"): Limits(50, batch=3, seqlen=40, heads=3, headdims=(1, 3, 8, 16, 24, 32, 64, 80, 128, 160),
                               rows=6, hidden=300),
}


def limits(backend: str, device: str = "cpu") -> Limits:
    """Size limits for ``backend`` on ``device``: Triton on CPU tensors runs in its (slow) interpreter."""
    interpreted = backend == "triton" and device == "cpu"
    return _LIMITS[(PROFILE, "interp" if interpreted else "native")]


# Passing cases per test (pytest node id), printed at the end of the run by conftest.py.
CASES_PASSED: dict[str, int] = {}


def fuzz(cases, check, lim: Limits) -> None:
    """Run ``check(case)`` on ``lim.examples`` cases drawn from the strategy ``cases`` under the active profile."""
    test_id = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]

    @settings(settings.get_profile(f"fastbert-fuzz-{PROFILE}"), max_examples=lim.examples)
    @given(cases)
    def run(case):
        check(case)
        CASES_PASSED[test_id] = CASES_PASSED.get(test_id, 0) + 1

    run()


# ----------------------------------------------------------------------------------------------------------------
# tensors

LAYOUTS = ("contiguous", "transposed", "sliced_last", "sliced_first", "expanded")
MASK_KINDS = ("none", "all_real", "random", "some_empty", "all_empty")
seeds = st.integers(0, 2**32 - 1)


def layouts(n: int):
    return st.tuples(*[st.sampled_from(LAYOUTS)] * n)


class Maker:
    """Tensors of one case, all drawn from the case's seed (a failing case reproduces from its printed dict)."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, shape, dtype, scale=1.0, offset=0.0, layout="contiguous", device="cpu") -> torch.Tensor:
        """Normal(offset, scale) drawn in fp32 on the CPU (same values on every device), cast, laid out on device."""
        values = (torch.randn(shape, generator=self.gen) * scale + offset).to(device=device, dtype=dtype)
        return lay_out(values, layout)

    def key_padding_mask(self, kind, batch, seqlen, as_int=False, transposed=False, device="cpu"):
        """(batch, seqlen) mask, True = real key. some_empty: sequence 0 (and others at random) has no real key."""
        if kind == "none":
            return None
        if kind in ("all_real", "all_empty"):
            mask = torch.full((batch, seqlen), kind == "all_real")
        else:
            mask = torch.rand((batch, seqlen), generator=self.gen) < 0.6
            if kind == "some_empty":
                mask[torch.rand((batch,), generator=self.gen) < 0.5] = False
                mask[0] = False
        mask = mask.to(device=device, dtype=torch.int64 if as_int else torch.bool)
        return mask.t().contiguous().t() if transposed else mask


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in a tensor with ``layout``'s strides ("expanded": t's first slice along dim 0, repeated).

    transposed: every stride reversed (column-major); sliced_last: stride 2 along the last dim (kernels must not
    assume unit stride there); sliced_first: every other slice of a taller buffer, at a storage offset; expanded:
    stride 0 along dim 0 (several rows read the same memory; 1-D tensors stay as they are, since expanding their only
    dim would make a LayerNorm row constant).
    """
    if t.dim() == 0 or t.numel() == 0 or layout == "contiguous" or (layout == "expanded" and t.dim() == 1):
        return t
    if layout == "transposed":
        reverse = list(reversed(range(t.dim())))
        return t.permute(reverse).contiguous().permute(reverse)
    if layout == "sliced_last":
        wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "sliced_first":
        tall = t.new_zeros(2 * t.shape[0], *t.shape[1:])
        tall[1::2] = t
        return tall[1::2]
    if layout == "expanded":
        return t[:1].expand(t.shape)
    raise ValueError(f"unknown layout {layout!r}")


def forward_backward(fn, tensors: dict, grad_names, dout: torch.Tensor):
    """``fn(**tensors)`` with the ``grad_names`` inputs as leaves that keep their strides (``clone`` would make
    sliced or expanded inputs contiguous); backprop ``dout``. Returns (out, {name: grad})."""
    args = {n: t.detach().requires_grad_(True) if n in grad_names else t for n, t in tensors.items()}
    out = fn(**args)
    out.backward(dout)
    grads = {}
    for name in grad_names:
        assert args[name].grad is not None, f"no gradient reached {name}"
        grads[name] = args[name].grad
    return out.detach(), grads
