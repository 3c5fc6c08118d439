"""Every Triton kernel compiles as its launcher launches it, for sm_80 and sm_90, without spills and within the
arch's shared memory per block. No GPU needed: ptxas ships with Triton.

``_triton_compile.py`` runs the real launchers on CPU tensors at BERT shapes with a stub Triton driver that reports
a CUDA target and compiles without launching, so the specializations (argument types, divisibility, constexprs,
num_warps, num_stages) are exactly those a GPU would compile. CI compiles the subset ``CI_CASES`` (every kernel and
tile config; about 30 kernels per arch, both archs in parallel); ``python tests/ops/_triton_compile.py --table``
compiles the whole matrix and rewrites the committed table benchmarks/results/triton-compile-sm80-sm90.{md,json},
which this test also checks against the tile configs the launchers pick today.
"""

import json
import os

import _triton_compile as tc  # tests/ops is on sys.path (tests/ops/conftest.py)
import pytest

KERNELS = {"_attention_fwd_kernel", "_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel",
           "_add_layer_norm_fwd_kernel", "_add_layer_norm_bwd_kernel", "_bias_gelu_kernel",
           "_bias_gelu_layer_norm_fwd_kernel", "_bias_gelu_layer_norm_bwd_kernel", "_softmax_fwd_kernel",
           "_softmax_bwd_kernel"}


def _config(row):
    return (row["arch"], row["kernel"], json.dumps(row["constexprs"], sort_keys=True), row["num_warps"],
            row["num_stages"])


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton.backends.nvidia")
    rows, _ = tc.run_archs(full=False, timeout=1200)
    print("\n".join(tc.describe(r) for r in rows))
    return rows


def test_every_kernel_compiles_for_sm80_and_sm90(compiled):
    assert {(r["arch"], r["kernel"]) for r in compiled} == {(a, k) for a in tc.ARCHS for k in KERNELS}
    cases = {c for r in compiled for c in r["cases"]}
    assert cases == set(tc.CI_CASES), f"cases that compiled nothing: {set(tc.CI_CASES) - cases}"


def test_no_spills_and_shared_memory_within_the_arch_limit(compiled):
    bad = tc.failures(compiled)
    assert not bad, "\n".join(bad)


def test_committed_table_is_current(compiled):
    # The table is the full matrix: each CI kernel's tile config must be there (a config change needs --table).
    path = tc.TABLE + ".json"
    assert os.path.exists(path), f"{path} is missing: python tests/ops/_triton_compile.py --table"
    with open(path) as f:
        table = json.load(f)
    assert not table["meta"]["failures"], table["meta"]["failures"]
    by_case = {}  # a case can launch one kernel twice (bias_gelu: forward and backward specializations)
    for r in table["rows"]:
        for case in r["cases"]:
            by_case.setdefault((r["arch"], r["kernel"], case), set()).add(_config(r))
    stale = [tc.describe(r) for r in compiled for case in r["cases"]
             if _config(r) not in by_case.get((r["arch"], r["kernel"], case), set())]
    assert not stale, "the committed table is stale (rerun --table):\n" + "\n".join(stale)
