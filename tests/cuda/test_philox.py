"""The dropout generator of the CUDA kernels, checked on the CPU (no GPU needed).

- The NumPy Philox4x32-10 of harness.py reproduces Random123's known-answer vectors.
- The C++ generator of csrc/cuda/common.cuh (compiled for the host from tests/cuda/harness_api.cu with nvcc) gives
  the same words, thresholds and keep decisions as the NumPy model the GPU tests build their reference masks from.
- The fragment-layout shortcuts in the tensor-core kernels (one Philox call per lane per 16x16 block in the forward
  layout, two in the transposed dK/dV layout, one per key pair in the SIMT kernels) address exactly the elements
  that the documented mapping assigns to them.
"""

from __future__ import annotations

import ctypes
import itertools

import numpy as np
import pytest
from harness import (
    TAG_ATTENTION,
    TAG_ROWS,
    attention_keep,
    build_library,
    dropout_threshold16,
    nvcc_path,
    philox4x32_10,
    rows_keep,
)

# Random123 kat_vectors: philox4x32 10 <ctr0..3> <key0 key1> -> <out0..3>
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_numpy_philox_known_answers(ctr, key, expected):
    words = philox4x32_10(*ctr, key[0] | (key[1] << 32))
    assert tuple(int(w) for w in words) == expected


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    if nvcc_path() is None:
        pytest.skip("nvcc is not on PATH")
    from harness import HERE, Lib

    path = build_library([HERE / "harness_api.cu"], name="fastbert_philox_host", arch="sm_80",
                         out_dir=tmp_path_factory.mktemp("philox"))
    return Lib(path)


def _host_philox(lib, ctr, key):
    out = (ctypes.c_uint32 * 4)()
    lib.fbh_philox4x32_10(*ctr, key, out)
    return tuple(out)


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_cxx_philox_known_answers(host_lib, ctr, key, expected):
    assert _host_philox(host_lib, ctr, key[0] | (key[1] << 32)) == expected


def test_cxx_philox_matches_numpy_on_random_counters(host_lib):
    rng = np.random.default_rng(0)
    ctrs = rng.integers(0, 2**32, size=(64, 4), dtype=np.uint64)
    keys = rng.integers(0, 2**63, size=64, dtype=np.uint64)
    for ctr, key in zip(ctrs, keys, strict=True):
        words = tuple(int(w) for w in philox4x32_10(*ctr, int(key)))
        assert _host_philox(host_lib, tuple(int(c) for c in ctr), int(key)) == words


@pytest.mark.parametrize("p", [0.0, 1e-6, 0.1, 0.25, 0.5, 0.9, 0.99999])
def test_threshold_matches(host_lib, p):
    assert host_lib.fbh_dropout_threshold16(p) == dropout_threshold16(p)


def test_rows_mapping_matches_numpy(host_lib):
    seed, p = 0x1234_5678_9ABC_DEF0, 0.3
    thr = dropout_threshold16(p)
    keep = rows_keep(seed, 37, 70, p)
    for r, c in itertools.product(range(37), range(70)):
        assert bool(host_lib.fbh_rows_dropout_keep(seed, thr, r, c)) == keep[r, c], (r, c)
    # rows past 2^32: the high word is counter word 2
    for row in ((1 << 33) + 5, (1 << 40) + 123):
        for col in range(16):
            words = philox4x32_10(col >> 3, row & 0xFFFFFFFF, row >> 32, TAG_ROWS, seed)
            s = col & 7
            expected = ((int(words[s >> 1]) >> (16 * (s & 1))) & 0xFFFF) >= thr
            assert bool(host_lib.fbh_rows_dropout_keep(seed, thr, row, col)) == expected


def test_attention_mapping_matches_numpy(host_lib):
    seed, p, batch, nheads, tq, tk = 987654321, 0.2, 2, 3, 21, 37
    thr = dropout_threshold16(p)
    keep = attention_keep(seed, batch, nheads, tq, tk, p)
    for b, h, q, k in itertools.product(range(batch), range(nheads), range(tq), range(tk)):
        assert bool(host_lib.fbh_attn_dropout_keep(seed, thr, b * nheads + h, q, k)) == keep[b, h, q, k]


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_fraction_is_one_minus_p(p):
    keep = attention_keep(7, 4, 4, 128, 128, p)
    n = keep.size
    sigma = np.sqrt(n * p * (1 - p))
    assert abs(keep.sum() - n * (1 - p)) < 5 * sigma
    rows = rows_keep(11, 256, 768, p)
    sigma = np.sqrt(rows.size * p * (1 - p))
    assert abs(rows.sum() - rows.size * (1 - p)) < 5 * sigma


def test_masks_differ_across_seeds_and_positions():
    a, b = attention_keep(1, 1, 2, 64, 64, 0.5), attention_keep(2, 1, 2, 64, 64, 0.5)
    assert (a != b).mean() > 0.4
    assert (a[0, 0] != a[0, 1]).mean() > 0.4  # heads are independent
    assert (a[0, 0, :32] != a[0, 0, 32:]).mean() > 0.4  # query blocks are independent


# ---- the kernels' index algebra vs the documented mapping -----------------------------------------------------


def _mapping(q, k):
    """(counter word 0, word 1, slot) of element (q, k) per launchers.h (words 2, 3 are bh and the tag)."""
    ql, kl = q & 15, k & 15
    c0 = ((k >> 4) << 5) | ((ql & 1) << 4) | (((ql & 7) >> 1) << 2) | ((kl & 7) >> 1)
    return c0, q >> 4, (ql >> 3) * 4 + (kl >> 3) * 2 + (kl & 1)


@pytest.mark.parametrize("qb,kb", [(0, 0), (3, 5), (17, 2)])
def test_forward_layout_uses_one_call_per_lane(qb, kb):
    # attention_fwd.cu / attention_bwd.cu (dQ): lane (g, t4) holds s[nt][i], row g + 8 (i >> 1) of the warp's 16
    # queries, key (nt & 1) * 8 + 2 t4 + (i & 1) of the 16-key block; counter (kb << 5 | (g & 1) << 4 |
    # (g >> 1) << 2 | t4, qb); slot (i >> 1) * 4 + half * 2 + (i & 1).
    for g, t4 in itertools.product(range(8), range(4)):
        c0 = (kb << 5) | ((g & 1) << 4) | ((g >> 1) << 2) | t4
        slots = set()
        for half, i in itertools.product(range(2), range(4)):
            q, k = 16 * qb + g + 8 * (i >> 1), 16 * kb + half * 8 + 2 * t4 + (i & 1)
            slot = (i >> 1) * 4 + half * 2 + (i & 1)
            assert _mapping(q, k) == (c0, qb, slot)
            slots.add(slot)
        assert slots == set(range(8))


@pytest.mark.parametrize("qb,kb", [(0, 0), (2, 9)])
def test_transposed_layout_uses_two_calls_per_lane(qb, kb):
    # attention_bwd.cu dK/dV: lane (g, t4) holds st[nt][i], key g + 8 (i >> 1) of the warp's 16 keys, query
    # (nt & 1) * 8 + 2 t4 + (i & 1) of the 16-query block; call rnd[i & 1] with counter (kb << 5 | (i & 1) << 4 |
    # t4 << 2 | g >> 1, qb); slot half * 4 + (i >> 1) * 2 + (g & 1).
    for g, t4 in itertools.product(range(8), range(4)):
        for half, i in itertools.product(range(2), range(4)):
            k, q = 16 * kb + g + 8 * (i >> 1), 16 * qb + half * 8 + 2 * t4 + (i & 1)
            c0 = (kb << 5) | ((i & 1) << 4) | (t4 << 2) | (g >> 1)
            assert _mapping(q, k) == (c0, qb, half * 4 + (i >> 1) * 2 + (g & 1))


def test_simt_key_pairs_share_a_call():
    # attention_simt.cu keep_pair: keys k, k + 1 (k even) of query q share one counter, slots s and s + 1.
    for q, k in itertools.product(range(40), range(0, 40, 2)):
        c0, c1, s = _mapping(q, k)
        assert _mapping(q, k + 1) == (c0, c1, s + 1)


def test_tags_are_distinct():
    assert TAG_ATTENTION != TAG_ROWS
